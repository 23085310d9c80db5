"""Static checks of exported graphs (no TensorRT needed)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from perception.export.unpool_ops import PLUGIN_DOMAIN, PLUGIN_VERSION, POOL_OP, UNPOOL_OP
from perception.export.trt_ops import TENSORRT_SUPPORTED_OPS

__all__ = ["op_histogram", "tensorrt_problems", "uint8_problems", "plugin_nodes"]


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


def uint8_problems(model) -> list[str]:
    """TensorRT's rule for UINT8 (onnx-tensorrt ``docs/operators.md``: "UINT8 is only supported as network
    input or output tensor types"; ``ModelImporter.cpp``: "TensorRT does not support UINT8 types for
    intermediate tensors!"): after shape inference, no UINT8 tensor may be produced by a node other than
    a Constant unless it is a graph output, and a UINT8 graph input may feed only Cast nodes."""
    import onnx
    from onnx import TensorProto

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001  (custom-domain ops without schemas: infer what can be inferred)
        inferred = model
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)
             if v.type.HasField("tensor_type")}
    outputs = {o.name for o in g.output}
    uint8_inputs = {i.name for i in g.input if types.get(i.name) == TensorProto.UINT8}
    problems = []
    for n in g.node:
        if n.op_type != "Cast" and any(x in uint8_inputs for x in n.input):
            problems.append(f"{n.name or n.op_type}: {n.op_type} reads the UINT8 input directly; TensorRT "
                            "needs a Cast first (UINT8 is only a network input or output type)")
        if n.op_type == "Constant":
            continue
        for out in n.output:
            if out and types.get(out) == TensorProto.UINT8 and out not in outputs:
                problems.append(f"{n.name or n.op_type}: {n.op_type} produces the UINT8 tensor {out!r}, which is not "
                                "a graph output (TensorRT takes UINT8 only as a network input or output)")
    return problems


def tensorrt_problems(model_or_path) -> list[str]:
    """Reasons TensorRT's ONNX parser would reject the main graph; empty if none are known.

    Standard ops must be on TensorRT's supported list; ``segnet`` ops must be our two plugins and carry
    ``plugin_version`` / ``plugin_namespace`` as strings (the parser's plugin lookup keys); MaxPool may
    not use its Indices output; UINT8 only at the graph's input (into a Cast) and outputs
    (:func:`uint8_problems`).
    """
    from onnx import AttributeProto

    m = _load(model_or_path)
    problems = uint8_problems(m)
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
            # Our plugins have both an AOT and a JIT implementation: tensorrt.plugin creates such a plugin
            # only for a node that says which (INT aot=1: the PTX goes into the engine, which then runs
            # without Python), or under a network flag preferring one.
            aot = attrs.get("aot")
            if aot is None or aot.type != AttributeProto.INT or aot.i != 1:
                problems.append(f"{n.name}: attribute aot must be the INT 1 (the ahead-of-time implementation)")
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
    return problems + qdq_problems(m)


def qdq_problems(model) -> list[str]:
    """TensorRT's rules for explicit quantization (onnx-tensorrt ``onnxOpImporters.cpp``: "TensorRT only
    supports symmetric quantization. The zero point ... must be all zeros"; ``docs/operators.md``:
    DequantizeLinear on INT8, FP8 or INT4): every Q/DQ zero point is 0, no QuantizeLinear makes UINT8,
    and every DequantizeLinear reads INT8 (or FP8/INT4), so no INT32 bias DequantizeLinear."""
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].HasField("t")}
    tensors = {**consts, **inits}
    allowed = {TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN}
    produced: dict[str, int] = {}  # QuantizeLinear output -> its type (the zero point's, uint8 without one)
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            zp = tensors.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            produced[n.output[0]] = zp.data_type if zp is not None else TensorProto.UINT8
    problems = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = tensors.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is not None and numpy_helper.to_array(zp).any():
            problems.append(f"{n.name}: {n.op_type} has non-zero zero points (TensorRT quantizes symmetrically)")
        kind = produced.get(n.output[0]) if n.op_type == "QuantizeLinear" else (
            produced.get(n.input[0]) or (tensors[n.input[0]].data_type if n.input[0] in tensors else None))
        if kind is not None and kind not in allowed:
            problems.append(f"{n.name}: {n.op_type} on {TensorProto.DataType.Name(kind)} (TensorRT takes INT8, "
                            "FP8 or INT4)")
    return problems
