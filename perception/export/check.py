"""Static checks of exported graphs (no TensorRT needed)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from perception.export.unpool_ops import PLUGIN_DOMAIN, PLUGIN_VERSION, POOL_OP, UNPOOL_OP
from perception.export.trt_ops import TENSORRT_SUPPORTED_OPS

__all__ = ["op_histogram", "tensorrt_problems", "plugin_nodes"]


def _load(model_or_path):
    import onnx

    if isinstance(model_or_path, (str, Path)):
        return onnx.load(str(model_or_path))
    return model_or_path


def op_histogram(model_or_path) -> Counter:
    """(domain, op_type) -> count over the main graph (not function bodies)."""
    m = _load(model_or_path)
    return Counter((n.domain or "", n.op_type) for n in m.graph.node)


def plugin_nodes(model_or_path) -> list:
    m = _load(model_or_path)
    return [n for n in m.graph.node if n.domain == PLUGIN_DOMAIN]


def tensorrt_problems(model_or_path) -> list[str]:
    """Reasons TensorRT's ONNX parser would reject the main graph; empty if none are known.

    Standard ops must be on TensorRT's supported list; ``segnet`` ops must be our two plugins and carry
    ``plugin_version`` / ``plugin_namespace`` as strings (the parser's plugin lookup keys); MaxPool may
    not use its Indices output.
    """
    from onnx import AttributeProto

    m = _load(model_or_path)
    problems = []
    for n in m.graph.node:
        domain = n.domain or ""
        if domain == PLUGIN_DOMAIN:
            if n.op_type not in (POOL_OP, UNPOOL_OP):
                problems.append(f"{n.name}: unknown plugin op {n.op_type}")
            attrs = {a.name: a for a in n.attribute}
            for key, want in (("plugin_version", PLUGIN_VERSION), ("plugin_namespace", PLUGIN_DOMAIN)):
                a = attrs.get(key)
                if a is None or a.type != AttributeProto.STRING or a.s.decode() != want:
                    problems.append(f"{n.name}: attribute {key} must be the string {want!r}")
            for a in n.attribute:
                if a.type not in (AttributeProto.STRING, AttributeProto.INT, AttributeProto.FLOAT,
                                  AttributeProto.INTS, AttributeProto.FLOATS):
                    problems.append(f"{n.name}: attribute {a.name} has a type plugins cannot receive")
        elif domain not in ("", "ai.onnx"):
            problems.append(f"{n.name}: op {domain}::{n.op_type} is in a domain TensorRT does not know")
        elif n.op_type not in TENSORRT_SUPPORTED_OPS:
            problems.append(f"{n.name}: {n.op_type} is not supported by TensorRT's ONNX parser")
        elif n.op_type == "MaxPool" and len([o for o in n.output if o]) > 1:
            problems.append(f"{n.name}: MaxPool's Indices output is not supported by TensorRT")
    return problems
