"""The house rules, checked on the source: stages import only their own or lower stages, no import
cycles, and the runtime (core, inference, stream) imports no torch outside the PyTorch backend."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "perception"

# Lower number = lower layer. A module may import its own layer or lower ones, never higher.
# ``api`` is the Python API (perception.Segmenter, over inference); ``release`` ships trained runs (above
# training and evaluation).
LAYERS = {"core": 0, "models": 1, "data": 1, "export": 2, "inference": 3, "api": 3, "eval": 4, "train": 5,
          "stream": 5, "release": 6}
RUNTIME = ("core", "inference", "stream", "api")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.If) and top_level_only:  # TYPE_CHECKING blocks and the like
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                    found.add(sub.module)
    return found


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "perception" else None


def test_no_relative_imports():
    offenders = [str(p.relative_to(ROOT)) for p in PKG.rglob("*.py")
                 if any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(ast.parse(p.read_text())))]
    assert not offenders, f"use absolute imports (perception.<stage>...): {offenders}"


def test_every_module_belongs_to_a_stage():
    stray = [m for m in _modules() if m != "perception" and _stage(m) not in LAYERS]
    assert not stray, f"modules outside the stages {sorted(LAYERS)}: {stray}"


def test_dependencies_point_down_the_stages():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        own = _stage(name)
        if own is None:
            continue
        for imp in _imports(path, top_level_only=False):
            other = _stage(imp)
            if other is not None and other in LAYERS and LAYERS[other] > LAYERS[own]:
                wrong.append(f"{name} -> {imp}")
            if own != other and {own, other} == {"train", "stream"}:
                wrong.append(f"{name} -> {imp} (train and stream are independent)")
    assert not wrong, "imports that point up the stages:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imp in _imports(path, top_level_only=True):
            while imp and imp not in modules:
                imp = imp.rpartition(".")[0]
            if imp and imp != name and not name.startswith(imp + "."):  # a package's own __init__ is not a cycle
                deps.add(imp)
        graph[name] = deps
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in graph.get(n, ()):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_runtime_modules_do_not_import_torch_at_module_level():
    offenders = []
    for name, path in _modules().items():
        if _stage(name) in RUNTIME and name != "perception.inference.torch":
            bad = {i for i in _imports(path, top_level_only=True) if i.split(".")[0] in ("torch", "safetensors")}
            if bad:
                offenders.append(f"{name}: {sorted(bad)}")
    assert not offenders, offenders


@pytest.mark.parametrize("module", ["perception.stream.node.cli", "perception.stream.consumers.echo",
                                    "perception.stream.consumers.record", "perception.stream.client",
                                    "perception.inference.resolve", "perception.inference.onnxruntime",
                                    "perception.inference.tensorrt", "perception.api"])
def test_runtime_imports_without_torch(module):
    code = ("import sys; sys.modules['torch'] = None; sys.modules['safetensors'] = None; "
            f"import {module}; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
