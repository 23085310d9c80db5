"""Build TensorRT engines for SegNet models (the logic behind ``tools/build_engine.py``).

Every step that needs neither TensorRT nor a GPU (ONNX export, Triton PTX, ptxas) runs first, so a
CPU machine still produces and checks those artefacts and then stops with a one-line reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perception.export.tensorrt import TENSORRT_INSTALL
from perception.core.cli import fail
from perception.core.fileio import atomic_write_bytes, sha256_file
from perception.core.model_folder import engine_sidecar
from perception.core.options import add_arguments, at_least, opt, parse_into

__all__ = ["BuildEngineOptions", "build_parser", "main", "MissingDependency", "sidecar_path", "SIDECAR_SCHEMA"]

SIDECAR_SCHEMA = 1
EXIT_MISSING = 3  # TensorRT or a GPU is missing (everything possible before that was done)


class MissingDependency(RuntimeError):
    """TensorRT, pycuda or Triton is not installed here (the message says which and how to install it)."""


sidecar_path = engine_sidecar  # <engine>.json, beside the engine (core.model_folder owns the name)


def _parse_size(text: str) -> tuple[int, int]:
    from perception.core.sizes import parse_hw

    return parse_hw(text, option="--size", minimum=32)


@dataclass
class BuildEngineOptions:
    """tools/build_engine.py's options (core.options)."""

    model: str | None = opt(None, help="a model by name, a model folder (exported to ONNX first) or an .onnx from "
                                       "perception-export")
    out: str | None = opt(None, help="engine file to write (a JSON sidecar is written beside it)")
    precision: str = opt("fp16", choices=("fp32", "fp16"),
                         help="fp16 exports an fp16 graph (TensorRT 11 is strongly typed: precision lives in the ONNX types)")
    unpool: str = opt("plugin", choices=("plugin", "native"),
                      help="plugin: our Triton plugins; native: standard ops only, no plugin")
    batch: int = opt(1, check=at_least(1))
    size: tuple[int, int] | None = opt(None, parse=_parse_size, metavar="HxW", help="default: the model's input size")
    workspace: int = opt(1024, check=at_least(1), help="workspace limit in MB")
    timing_cache: str | None = opt(None, help="TensorRT timing cache file (read if present, then updated)")
    emit_ptx: str | None = opt(None, metavar="DIR", help="write the plugins' Triton kernels as PTX here")
    arch: str = opt("sm_90", help="target for --emit-ptx, e.g. sm_80, sm_86, sm_89, sm_90")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="build_engine.py", description=__doc__)
    add_arguments(p, BuildEngineOptions)
    return p


def emit_and_assemble_ptx(out_dir: Path, arch: str, log) -> list[Path]:
    from perception.export.tensorrt.kernels import emit_ptx

    paths = emit_ptx(out_dir, arch=arch)
    ptxas = shutil.which("ptxas")
    for p in paths:
        if ptxas is None:
            log(f"wrote {p} (ptxas not found: not assembled)")
            continue
        target = next((ln.split()[1] for ln in p.read_text().splitlines() if ln.startswith(".target")), arch)
        r = subprocess.run([ptxas, f"-arch={target}", str(p), "-o", os.devnull], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"ptxas rejected {p}: {r.stderr.strip()}")
        log(f"wrote {p} (ptxas -arch={target}: ok)")
    return paths


def _export(model: Path, args, onnx_path: Path, log) -> tuple[Path, dict[str, Any]]:
    """The ONNX to build from (a model folder is exported to ``onnx_path``), and its model card."""
    from perception.export.onnx import ExportOptions, export_onnx, read_card_from_onnx

    if model.is_dir():
        opts = ExportOptions(unpool=args.unpool, batch=args.batch, size=args.size, fp16=args.precision == "fp16",
                             outputs=("labels", "probs"))
        t0 = time.time()
        export_onnx(model, onnx_path, opts)
        log(f"exported {onnx_path} ({args.unpool} unpooling, {args.precision}) in {time.time() - t0:.1f}s")
    elif model.suffix == ".onnx" and model.is_file():
        onnx_path = model
    else:
        raise FileNotFoundError(f"--model must be a model folder or an .onnx file: {model}")
    card = read_card_from_onnx(onnx_path)
    return onnx_path, card.to_dict()


def _check_onnx(onnx_path: Path, unpool: str, log) -> None:
    from perception.export.check import plugin_nodes, tensorrt_problems

    problems = tensorrt_problems(onnx_path)
    if problems:
        raise ValueError(f"{onnx_path} would not parse in TensorRT: {problems[0]} ({len(problems)} problems)")
    n = len(plugin_nodes(onnx_path))
    if unpool == "plugin" and n == 0:
        log("note: this ONNX has no segnet plugin nodes (native unpooling)")
    log(f"ONNX check: every op is TensorRT-parsable; {n} plugin nodes")


def _require_tensorrt_and_gpu():
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependency(f"TensorRT is not installed ({TENSORRT_INSTALL}, on a machine with an NVIDIA GPU "
                                "and driver)") from None
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        raise MissingDependency("no CUDA GPU is available: TensorRT engines are built on the GPU they run on")
    return trt


def plugin_layer_names(trt, network) -> list[str]:
    """Names of the plugin layers in a parsed network (any of TensorRT's plugin layer kinds)."""
    kinds = {getattr(trt.LayerType, k) for k in ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3") if hasattr(trt.LayerType, k)}
    layers = (network.get_layer(i) for i in range(network.num_layers))
    return [layer.name for layer in layers if layer.type in kinds]


def check_plugin_layers(trt, network, node_names: list[str]) -> None:
    """Fail unless each of our plugin nodes became a plugin layer. onnx-tensorrt names a node's layer after
    the node (``ImporterContext::registerLayer``; our exported node names are unique), so the check counts
    only our plugins' layers, whatever other plugins the network holds.

    When a plugin is not registered under the name/version/namespace its node carries, onnx-tensorrt
    (10.7+) inlines the node's model-local ONNX function instead: the build would "succeed" with the
    plugins silently replaced by standard ops.
    """
    layers = set(plugin_layer_names(trt, network))
    missing = [n for n in node_names if n not in layers]
    if missing:
        raise RuntimeError(
            f"{len(missing)} of the graph's {len(node_names)} segnet plugin nodes are not plugin layers in the parsed "
            f"network (e.g. {missing[0]}): TensorRT did not find the segnet plugins (registered under another name, "
            "version or namespace?) and inlined their ONNX functions instead")


def build_engine(onnx_path: Path, out: Path, args, card: dict[str, Any], log) -> Path:
    """Parse ``onnx_path`` into a strongly typed network, build, and write engine + sidecar atomically."""
    trt = _require_tensorrt_and_gpu()
    from perception.export.tensorrt.plugins import register_plugins

    register_plugins()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if args.unpool == "plugin":  # the nodes say aot=1 too: the engine carries the PTX and runs without Python
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT could not parse {onnx_path}: {errors}")
    log(f"parsed: {network.num_layers} layers, {len(plugin_layer_names(trt, network))} of them plugins")
    if args.unpool == "plugin":
        from perception.export.check import plugin_nodes

        check_plugin_layers(trt, network, [n.name for n in plugin_nodes(onnx_path)])
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, args.workspace << 20)
    cache = None
    if args.timing_cache:
        blob = Path(args.timing_cache).read_bytes() if Path(args.timing_cache).is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    inp = network.get_input(0)
    if any(d < 0 for d in inp.shape):  # dynamic export: one profile at the requested size
        h, w = args.size or (card["input"]["height"], card["input"]["width"])
        shape = (args.batch, h, w, 3)
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, shape, shape, shape)
        config.add_optimization_profile(profile)
    t0 = time.time()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    log(f"built engine in {time.time() - t0:.1f}s")
    atomic_write_bytes(out, bytes(serialized))
    if cache is not None:
        Path(args.timing_cache).write_bytes(bytes(cache.serialize()))
    sc = atomic_write_bytes(sidecar_path(out), (json.dumps(_sidecar(trt, network, out, onnx_path, args, card), indent=2)
                                                + "\n").encode())
    log(f"wrote {out} and {sc}")
    return out


def _sidecar(trt, network, out: Path, onnx_path: Path, args, card: dict[str, Any]) -> dict[str, Any]:
    """What the runtime needs to know of an engine (input shape, unpooling form, card) and how it was built."""
    import torch

    from perception.export.onnx import read_onnx_metadata
    from perception.export.tensorrt.plugins import current_sm_arch

    inp = network.get_input(0)
    major, minor = torch.cuda.get_device_capability()
    return {
        "schema": SIDECAR_SCHEMA,
        "engine_sha256": sha256_file(out),
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "compute_capability": f"{major}.{minor}",
        "sm_arch": current_sm_arch(),
        "precision": args.precision,
        "unpool": args.unpool,
        **({"plugin_impl": "aot"} if args.unpool == "plugin" else {}),
        "input_shape": [int(d) for d in network.get_input(0).shape] if all(d >= 0 for d in inp.shape)
        else [args.batch, *(args.size or (card["input"]["height"], card["input"]["width"])), 3],
        "outputs": [network.get_output(i).name for i in range(network.num_outputs)],
        "classes": card["classes"],
        "palette": card["palette"],
        "model_card": card,
        "source_onnx_sha256": sha256_file(onnx_path),
        "source_model_sha256": read_onnx_metadata(onnx_path).get("segnet.source_sha256"),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse_into(parser, BuildEngineOptions, argv)
    except ValueError as e:
        return fail("build_engine", str(e))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if not args.model and not args.emit_ptx:
        return fail("build_engine", "give --model (and --out) to build, and/or --emit-ptx DIR")
    # Compiling kernels (PTX, engines) must not run under Triton's CPU interpreter: with
    # TRITON_INTERPRET=1 in the environment, @triton.jit hands back interpreted functions and
    # compilation fails inside the interpreter's patched ops. Nothing here needs the interpreter.
    if os.environ.pop("TRITON_INTERPRET", None) is not None and "triton" in sys.modules:
        return fail("build_engine", "unset TRITON_INTERPRET before Triton is imported (it was, in this process)")
    try:
        if args.emit_ptx:
            emit_and_assemble_ptx(Path(args.emit_ptx), args.arch, log)
        if not args.model:
            return 0
        if not args.out:
            raise ValueError("--out is required with --model")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        # The ONNX stays beside the engine: it is what was built, and it is still useful without TensorRT.
        from perception.core.zoo import find_model

        onnx_path, card = _export(find_model(args.model), args, out.with_suffix(".onnx"), log)
        _check_onnx(onnx_path, args.unpool, log)
        build_engine(onnx_path, out, args, card, log)
    except MissingDependency as e:
        log(f"build_engine: {e}; stopping after the steps that need neither")
        return EXIT_MISSING
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        return fail("build_engine", str(e))
    return 0
