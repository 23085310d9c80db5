"""Max pooling on the quantized tensors of an int8 (QDQ) graph.

ONNX Runtime's static quantization leaves SegNet's pools in float: ``Q -> DQ -> MaxPool -> Q``, so each
pool reads a full-resolution float tensor (4 bytes a value) that exists only to be pooled. Max pooling
commutes with a per-tensor dequantisation ``x = (q - zero_point) * scale`` (``scale > 0``: monotone and
one-to-one), and so does its first-max tie-breaking (equal floats are equal integers), so
``MaxPool(DQ(q)) == DQ(MaxPool(q))`` value for value and index for index. This rewrite pools ``q``
directly (ONNX MaxPool takes uint8/int8, indices included) and keeps a ``DQ`` after the pool for the
consumers that want float; a ``Q`` right after it with the same scale and zero point is then the
identity and goes too. Labels cannot change; ``tests/test_quantized_pools.py`` checks they do not.

A ``Pad`` before a pool (odd sizes) pads with -inf in float: on the integers it pads with the type's
minimum, which is equivalent only while a window's padded cells come after one of its real cells in
scan order (padding at the bottom/right, as the exporter writes it); any other pad is left in float.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

__all__ = ["pools_on_quantized"]


def pools_on_quantized(model, *, unpools: bool = True):
    """Rewrite ``model`` (an ``onnx.ModelProto``, in place) so every ``DQ -> [Pad] -> MaxPool`` pools the
    quantized tensor, and with ``unpools`` every ``DQ -> MaxUnpool -> Slice* -> Q`` unpools it;
    returns ``(model, number of pools and unpools rewritten)``."""
    import onnx
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}

    def const(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        for n in g.node:  # a Constant node
            if n.op_type == "Constant" and n.output[0] == name:
                return numpy_helper.to_array(n.attribute[0].t)
        return None

    def producers() -> dict:
        return {o: n for n in g.node for o in n.output}

    def consumers() -> dict:
        out = defaultdict(list)
        for n in g.node:
            for i in n.input:
                out[i].append(n)
        for o in g.output:
            out[o.name].append(None)  # a graph output: keep
        return out

    def qparams(node) -> tuple[np.ndarray, np.ndarray] | None:
        """(scale, zero point) of a per-tensor Q/DQ node, or None."""
        if len(node.input) < 3:
            return None
        s, z = const(node.input[1]), const(node.input[2])
        if s is None or z is None or s.size != 1 or z.size != 1 or not float(s) > 0:
            return None
        return s, z

    rewritten = 0
    for pool in [n for n in g.node if n.op_type == "MaxPool"]:
        rewritten += _pool_on_quantized(g, pool, const, qparams, producers(), consumers())
        _drop_dead(g)
    for unpool in [n for n in g.node if n.op_type == "MaxUnpool" and unpools]:
        rewritten += _unpool_on_quantized(g, unpool, const, qparams, producers(), consumers())
    _drop_dead(g)
    if rewritten:
        del g.value_info[:]  # recorded float types of tensors that are integers now; runtimes infer them
        _toposort(g)
        onnx.checker.check_model(model)
    return model, rewritten


def _pool_on_quantized(g, pool, const, qparams, prod, cons) -> int:
    """``DQ -> [Pad] -> MaxPool`` -> the pool (and pad) on the integers, a DQ after it under the pooled
    tensor's old name, and a following Q of the same scale and zero point bypassed. 1 if rewritten."""
    from onnx import helper, numpy_helper

    pad = None
    src = prod.get(pool.input[0])
    if src is not None and src.op_type == "Pad":
        pad, src = src, prod.get(src.input[0])
    if src is None or src.op_type != "DequantizeLinear" or qparams(src) is None:
        return 0
    scale, zero = qparams(src)
    qtype = zero.dtype
    q_in = src.input[0]
    x_in = q_in
    if pad is not None:
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        pads = const(pad.input[1]) if len(pad.input) > 1 else None
        value = const(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.float32(0)
        if mode != b"constant" or pads is None or value is None or np.any(pads[: len(pads) // 2] != 0):
            return 0  # only end padding keeps first-max ties on a real cell
        info = np.iinfo(qtype)
        if np.isneginf(value):
            qvalue = info.min
        else:
            k = np.round(float(value) / float(scale)) + int(zero)
            if not (info.min <= k <= info.max) or np.float32((k - int(zero)) * np.float32(scale)) != np.float32(value):
                return 0  # the pad value is no integer of this tensor
            qvalue = int(k)
        qpad_value = pool.name + "_qpad_value"
        g.initializer.append(numpy_helper.from_array(np.array(qvalue, dtype=qtype), qpad_value))
        qpadded = pool.name + "_qpadded"
        g.node.append(helper.make_node("Pad", [q_in, pad.input[1], qpad_value], [qpadded],
                                       name=pad.name + "_quantized", mode="constant"))
        x_in = qpadded
    # The pool on the integers; its values leave through a DQ under the old name, its indices unchanged.
    y_float = pool.output[0]
    y_q = y_float + "_quantized"
    new_pool = helper.make_node("MaxPool", [x_in], [y_q] + list(pool.output[1:]), name=pool.name + "_quantized")
    new_pool.attribute.extend(pool.attribute)
    dq = helper.make_node("DequantizeLinear", [y_q, src.input[1], src.input[2]], [y_float],
                          name=pool.name + "_dequantized")
    g.node.remove(pool)
    g.node.extend([new_pool, dq])
    # A Q of the pooled values with the same scale and zero point returns y_q itself.
    for q in [c for c in cons[y_float] if c is not None and c.op_type == "QuantizeLinear"]:
        p = qparams(q)
        if p is not None and p[0].tobytes() == scale.tobytes() and p[1].dtype == qtype and p[1].tobytes() == zero.tobytes():
            for c in [c for c in cons[q.output[0]] if c is not None]:
                c.input[:] = [y_q if i == q.output[0] else i for i in c.input]
            if None not in cons[q.output[0]]:
                g.node.remove(q)
    return 1


def _unpool_on_quantized(g, unpool, const, qparams, prod, cons) -> int:
    """``DQ -> MaxUnpool -> Slice* -> Q`` (one scale and zero point) -> the same unpooling on the integers:
    a tensor of the zero point (the integer of 0.0) with the pooled integers scattered to their indices.
    ONNX MaxUnpool is float-only; ScatterElements takes any type. 1 if rewritten, else 0."""
    from onnx import TensorProto, helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in unpool.attribute}
    if len(unpool.input) > 2 or list(attrs.get("kernel_shape", [])) != [2, 2] or list(attrs.get("strides", [])) != [2, 2] \
            or any(attrs.get("pads", [0])):
        return 0
    dq = prod.get(unpool.input[0])
    if dq is None or dq.op_type != "DequantizeLinear" or qparams(dq) is None:
        return 0
    scale, zero = qparams(dq)
    chain, cur = [], unpool
    while True:  # the crops after the unpooling, then the Q
        users = cons[cur.output[0]]
        if len(users) != 1 or users[0] is None:
            return 0
        cur = users[0]
        if cur.op_type != "Slice":
            break
        chain.append(cur)
    q = cur
    p = qparams(q) if q.op_type == "QuantizeLinear" else None
    if p is None or p[0].tobytes() != scale.tobytes() or p[1].dtype != zero.dtype or p[1].tobytes() != zero.tobytes():
        return 0
    name = unpool.name + "_quantized"
    t = lambda suffix: f"{name}_{suffix}"  # noqa: E731
    g.initializer.extend([
        numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.int64), t("scale2")),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), t("flat")),
    ])
    fill = helper.make_tensor(t("zero"), helper.np_dtype_to_tensor_dtype(zero.dtype), [1], [int(zero)])
    assert fill.data_type in (TensorProto.UINT8, TensorProto.INT8)
    g.node.extend([
        helper.make_node("Shape", [dq.input[0]], [t("in_shape")], name=t("shape")),
        helper.make_node("Mul", [t("in_shape"), t("scale2")], [t("out_shape")], name=t("out_shape")),
        helper.make_node("ConstantOfShape", [t("out_shape")], [t("zeros")], name=t("zeros"), value=fill),
        helper.make_node("Reshape", [t("zeros"), t("flat")], [t("zeros_flat")], name=t("zeros_flat")),
        helper.make_node("Reshape", [unpool.input[1], t("flat")], [t("indices_flat")], name=t("indices_flat")),
        helper.make_node("Reshape", [dq.input[0], t("flat")], [t("values_flat")], name=t("values_flat")),
        helper.make_node("ScatterElements", [t("zeros_flat"), t("indices_flat"), t("values_flat")], [t("scattered")],
                         name=t("scatter"), axis=0),
        helper.make_node("Reshape", [t("scattered"), t("out_shape")], [t("out")], name=t("out")),
    ])
    last = t("out")
    if chain:
        chain[0].input[0] = last
        last = chain[-1].output[0]
    for c in [c for c in cons[q.output[0]] if c is not None]:
        c.input[:] = [last if i == q.output[0] else i for i in c.input]
    if None in cons[q.output[0]]:
        return 0  # pragma: no cover (a Q that is a graph output: not SegNet's)
    g.node.remove(q)
    return 1


def _drop_dead(g) -> None:
    """Remove nodes none of whose outputs is used (the float Pad/DQ the rewrite bypassed), then the
    initializers nothing reads any more."""
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)


def _toposort(g) -> None:
    """Order the nodes so each comes after its inputs' producers (ONNX requires it)."""
    available = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    nodes, ordered = list(g.node), []
    while nodes:
        progressed = False
        for n in list(nodes):
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
                nodes.remove(n)
                progressed = True
        if not progressed:
            raise ValueError(f"graph has a cycle or a missing input near {nodes[0].name!r}")
    del g.node[:]
    g.node.extend(ordered)
