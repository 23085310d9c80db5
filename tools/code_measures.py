#!/usr/bin/env python3
"""The structure measures issue 43 set targets for, read from the source with ``ast`` (nothing is run):

    python tools/code_measures.py            # from the repository root

resolve()'s length, functions over 60 and 80 lines, public classes without a docstring, public methods
without one, the length of class ``Node``, modules writing the model folder's file names as literals, and
``print(..., file=sys.stderr)`` in the library modules of ``perception/inference/`` (CLIs excepted).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "perception"
FOLDER_FILE_NAMES = ("model_int8.onnx", "weights.safetensors", "model.onnx", "model.json")
INFERENCE_CLIS = ("predict.py",)


def _length(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def _prints_to_stderr(tree: ast.AST) -> int:
    return sum(1 for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"
               and any(k.arg == "file" and ast.unparse(k.value) == "sys.stderr" for k in n.keywords))


def main() -> int:
    long60, long80, undoc_classes, methods, undoc_methods = [], [], [], 0, 0
    literal_modules, inference_prints, lengths = [], 0, {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT)
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if _length(node) > 60:
                    long60.append(f"{rel}:{node.name} {_length(node)}")
                if _length(node) > 80:
                    long80.append(f"{rel}:{node.name} {_length(node)}")
                if node.name == "resolve" and rel.name == "resolve.py":
                    lengths["resolve"] = _length(node)
            elif isinstance(node, ast.ClassDef):
                if not node.name.startswith("_") and ast.get_docstring(node) is None:
                    undoc_classes.append(f"{rel}:{node.name}")
                if node.name == "Node" and rel.name == "pipeline.py":
                    lengths["Node"] = _length(node)
                for b in node.body:
                    if isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef)) and not b.name.startswith("_"):
                        methods += 1
                        undoc_methods += ast.get_docstring(b) is None
        strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        if strings & set(FOLDER_FILE_NAMES):
            literal_modules.append(str(rel))
        if rel.parts[1] == "inference" and rel.name not in INFERENCE_CLIS:
            inference_prints += _prints_to_stderr(tree)
    print(f"resolve() lines: {lengths.get('resolve')}")
    print(f"class Node lines: {lengths.get('Node')}")
    print(f"functions over 80 lines: {len(long80)} {long80}")
    print(f"functions over 60 lines: {len(long60)} {long60}")
    print(f"public classes without a docstring: {len(undoc_classes)} {undoc_classes}")
    print(f"public methods without a docstring: {undoc_methods} of {methods}")
    print(f"modules writing the folder's file names as literals: {len(literal_modules)} {literal_modules}")
    print(f"print(..., file=sys.stderr) in inference/ library modules: {inference_prints}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
