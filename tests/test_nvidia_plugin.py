"""Our two TensorRT plugins driven by NVIDIA's own ``tensorrt.plugin`` code (the pure-Python ``plugin/*.py`` of
the pinned ``tensorrt-cu12-bindings`` wheel, identical to TensorRT OSS release/10.14) over a stand-in for
the compiled module (tests/support/trt_standin.py), the way TensorRT's builder calls a quickly deployable
plugin: registration with NVIDIA's validation, create_plugin, output types, output shapes, format
combinations, launch parameters and kernel, for both plugins, at several shapes and both precisions. Also
the ONNX parser's plugin dispatch for an exported graph, and the graph TensorRT would build were the
plugins not registered. Skipped, with the command to run, where the wheel is not installed."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
import nvidia_plugin  # noqa: E402

pytest.importorskip("triton", reason="the AOT implementation compiles Triton kernels (pip install '.[kernels]')")
FOLDER, WHY = nvidia_plugin.plugin_sources()
pytestmark = pytest.mark.skipif(FOLDER is None, reason=WHY)

from perception.export.tensorrt import kernels as K  # noqa: E402
from perception.export.tensorrt import plugins as P  # noqa: E402


@pytest.fixture
def nvidia(monkeypatch):
    """(trt stand-in, NVIDIA's trtp) in sys.modules for one test, our plugins not yet registered."""
    saved = {k: v for k, v in sys.modules.items() if k == "tensorrt" or k.startswith("tensorrt.")}
    monkeypatch.setenv("SEGNET_SM_ARCH", "sm_90")
    monkeypatch.setattr(P, "_registered", False)
    try:
        yield nvidia_plugin.load(FOLDER)
    finally:
        for k in [k for k in sys.modules if k == "tensorrt" or k.startswith("tensorrt.")]:
            del sys.modules[k]
        sys.modules.update(saved)


class SymExprSetter:
    """What TensorRT hands get_launch_params for the kernel's extra (scalar) arguments."""

    def __init__(self) -> None:
        self.nbSymExprs = 0
        self.exprs: dict[int, object] = {}

    def __setitem__(self, i: int, expr) -> None:
        self.exprs[i] = expr


def _value(sym_expr) -> int | str:
    """An ISymExpr's value: its constant, or the symbolic expression's text."""
    e = sym_expr.expr
    return e.get_constant_value() if e.is_constant() else e.text


def _drive(trt, plugin_id: str, in_shapes: list[tuple], in_types: list, *, symbolic_batch: bool = False):
    """One plugin through the builder's calls; returns what each step answered."""
    ns, name = plugin_id.split("::")
    creator = trt.get_plugin_registry().get_creator(name, "1", ns)
    assert creator is not None, f"{plugin_id} is not in TensorRT's plugin registry"
    plugin = creator.create_plugin(name, ns, trt.PluginFieldCollection([]), trt.TensorRTPhase.BUILD,
                                   trt.QuickPluginCreationRequest.PREFER_AOT).clone()
    out_types = plugin.get_output_data_types(in_types, [len(s) for s in in_shapes])
    builder = trt.IExprBuilder()

    def dims(shape):
        return [trt.IDimensionExpr(None, "N") if symbolic_batch and i == 0 else builder.constant(d)
                for i, d in enumerate(shape)]

    in_exprs = [dims(s) for s in in_shapes]
    out_exprs = plugin.get_output_shapes(in_exprs, [], builder)
    out_shapes = [tuple(in_shapes[0][0] if (symbolic_batch and i == 0) else e.get_constant_value()
                        for i, e in enumerate(exprs)) for exprs in out_exprs]
    in_out = [trt.DynamicPluginTensorDesc(trt.PluginTensorDesc(s, t)) for s, t in zip(in_shapes, in_types)]
    in_out += [trt.DynamicPluginTensorDesc(trt.PluginTensorDesc(s, t)) for s, t in zip(out_shapes, out_types)]
    combos = plugin.get_supported_format_combinations(in_out, len(in_shapes))
    width = len(in_out)
    combos = [tuple((d.type, d.format) for d in combos[i:i + width]) for i in range(0, len(combos), width)]
    plugin.configure_plugin(in_out[:len(in_shapes)], in_out[len(in_shapes):])
    tactics = plugin.get_valid_tactics()
    plugin.set_tactic(tactics[0] if tactics else 0)
    launch, setter = types.SimpleNamespace(), SymExprSetter()
    plugin.get_launch_params(in_exprs, in_out, len(in_shapes), launch, setter, builder)
    n_in = len(in_shapes)
    kernel, ptx = plugin.get_kernel([d.desc for d in in_out[:n_in]], [d.desc for d in in_out[n_in:]])
    scalars = [_value(setter.exprs[i]) for i in range(setter.nbSymExprs)]
    return types.SimpleNamespace(plugin=plugin, out_types=out_types, out_exprs=out_exprs, out_shapes=out_shapes,
                                 combos=combos, launch=launch, scalars=scalars,
                                 kernel=kernel.decode() if isinstance(kernel, bytes) else kernel, ptx=ptx.decode())


def _check_kernel(run, kernel: str, scalars: list[int], precision: str) -> None:
    assert run.kernel == kernel and f".entry {kernel}(" in run.ptx.replace(" (", "(")
    assert (".f16" in run.ptx or ".b16" in run.ptx) == (precision == "fp16")  # the PTX of the asked type
    params = K.ptx_entry_params(run.ptx, kernel)
    assert len(params) == len(K.KERNEL_SIGNATURES[kernel])  # what a TensorRT launch passes, no scratch pointers
    assert sum(p != ".u64" for p in params) == len(run.scalars)  # one int32 parameter per extra argument
    assert run.scalars == scalars
    assert _value(run.launch.grid_x) == K.grid_size(scalars[-1]) and _value(run.launch.grid_y) == 1
    assert _value(run.launch.block_x) % 32 == 0 and _value(run.launch.shared_mem) >= 0


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(1, 64, 360, 480), (2, 3, 45, 61), (1, 1, 7, 1)])
def test_pool_plugin_through_nvidias_plugin_code(nvidia, precision, shape):
    trt, _ = nvidia
    P.register_plugins()
    dtype = trt.float16 if precision == "fp16" else trt.float32
    run = _drive(trt, P.POOL_PLUGIN_ID, [shape], [dtype])
    assert type(run.plugin).__name__ == "_TemplateAOTPlugin"  # the engine embeds the PTX
    ho, wo = K.pool_output_hw(shape[2], shape[3])
    assert run.out_types == [dtype, trt.int32] and run.out_shapes == [(*shape[:2], ho, wo)] * 2
    assert {c[0] for c in run.combos} == {(trt.float32, trt.TensorFormat.LINEAR), (trt.float16, trt.TensorFormat.LINEAR)}
    assert all(c[1][0] == c[0][0] and c[2][0] == trt.int32 for c in run.combos)  # values follow x; int32 indices
    _check_kernel(run, "pool_argmax_kernel", K.pool_scalar_args(*shape), precision)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(1, 64, 360, 480), (2, 3, 45, 61)])
def test_unpool_plugin_through_nvidias_plugin_code(nvidia, precision, shape):
    trt, _ = nvidia
    P.register_plugins()
    dtype = trt.float16 if precision == "fp16" else trt.float32
    pooled = (*shape[:2], *K.pool_output_hw(shape[2], shape[3]))
    run = _drive(trt, P.UNPOOL_PLUGIN_ID, [pooled, pooled, shape], [dtype, trt.int32, dtype])
    assert run.out_types == [dtype] and run.out_shapes == [shape]  # shaped like the pre-pool tensor
    assert all(c[1][0] == trt.int32 and c[0][0] == c[2][0] == c[3][0] for c in run.combos)
    _check_kernel(run, "unpool_kernel", K.unpool_scalar_args(*shape), precision)


def test_a_symbolic_batch_stays_symbolic_and_is_never_asked_for_its_truth(nvidia):
    """A dynamic batch: shapes and launch parameters stay expressions (the stand-in raises on bool(), as
    TensorRT 10.16's tensorrt.plugin does); the spatial arithmetic still folds to constants."""
    trt, _ = nvidia
    P.register_plugins()
    run = _drive(trt, P.POOL_PLUGIN_ID, [(4, 8, 45, 61)], [trt.float32], symbolic_batch=True)
    assert "N" in run.out_exprs[0][0].text and run.out_exprs[0][2].get_constant_value() == 23
    assert run.scalars[:4] == [45, 61, 23, 31] and "N" in str(run.scalars[4])
    assert "N" in str(_value(run.launch.grid_x))


def test_both_implementations_need_a_preference(nvidia):
    """Issue 44, item 7: with both an AOT and a JIT implementation, NVIDIA's creator refuses a plugin node
    that says neither (the builder's PREFER_AOT_PYTHON_PLUGINS flag and the nodes' aot=1 say it)."""
    trt, _ = nvidia
    P.register_plugins()
    ns, name = P.POOL_PLUGIN_ID.split("::")
    creator = trt.get_plugin_registry().get_creator(name, "1", ns)
    with pytest.raises(ValueError, match="has both AOT and JIT implementations"):
        creator.create_plugin(name, ns, trt.PluginFieldCollection([]), trt.TensorRTPhase.BUILD,
                              trt.QuickPluginCreationRequest.UNKNOWN)
    jit = creator.create_plugin(name, ns, trt.PluginFieldCollection([]), trt.TensorRTPhase.BUILD,
                                trt.QuickPluginCreationRequest.PREFER_JIT)
    assert type(jit).__name__ == "_TemplateJITPlugin"


def test_a_registration_that_failed_half_way_can_be_retried(nvidia, monkeypatch):
    """Issue 44 (style): NVIDIA's register refuses a plugin defined before, so a registration that failed
    after the first plugin (here: the unpool plugin's aot_impl) could never be completed in that process."""
    trt, trtp = nvidia
    real = trtp.aot_impl
    calls = {"n": 0}

    def flaky(plugin_id):
        if plugin_id == P.UNPOOL_PLUGIN_ID and calls["n"] == 0:
            calls["n"] += 1
            raise RuntimeError("simulated failure half-way")
        return real(plugin_id)

    monkeypatch.setattr(trtp, "aot_impl", flaky)
    with pytest.raises(RuntimeError, match="half-way"):
        P.register_plugins()
    P.register_plugins()  # the retry completes it
    for plugin_id in (P.POOL_PLUGIN_ID, P.UNPOOL_PLUGIN_ID):
        ns, name = plugin_id.split("::")
        assert trt.get_plugin_registry().get_creator(name, "1", ns) is not None
    run = _drive(trt, P.UNPOOL_PLUGIN_ID, [(1, 2, 3, 4), (1, 2, 3, 4), (1, 2, 5, 7)], [trt.float32, trt.int32, trt.float32])
    assert run.kernel == "unpool_kernel"


def test_the_parsers_plugin_dispatch_finds_our_creators(nvidia, exported_plugin_onnx):
    """onnx-tensorrt looks a plugin node up by (op_type, plugin_version or "1", plugin_namespace) and passes
    its non-reserved attributes as fields; every node of an exported graph resolves, asks for AOT, and its
    creator accepts the fields it is given."""
    import onnx

    trt, _ = nvidia
    P.register_plugins()
    model = onnx.load(str(exported_plugin_onnx))
    nodes = [n for n in model.graph.node if any(a.name == "plugin_namespace" for a in n.attribute)]
    assert len(nodes) == 8
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        version = attrs.get("plugin_version", b"1").decode()
        namespace = attrs["plugin_namespace"].decode()
        creator = trt.get_plugin_registry().get_creator(node.op_type, version, namespace)
        assert creator is not None, (node.op_type, version, namespace)
        assert attrs.get("aot") == 1  # an INT attribute, as the parser reads it
        fields = [k for k in attrs if k not in ("plugin_version", "plugin_namespace", "aot")]
        plugin = creator.create_plugin(node.op_type, namespace, trt.PluginFieldCollection(
            [trt.PluginField(k, np.array([]), trt.PluginFieldType.UNKNOWN) for k in fields]),
            trt.TensorRTPhase.BUILD, trt.QuickPluginCreationRequest.PREFER_AOT)
        assert type(plugin).__name__ == "_TemplateAOTPlugin"


def test_the_inlined_fallback_graph_is_parsable_too(exported_plugin_onnx):
    """Were the plugins not registered, onnx-tensorrt would inline each node's model-local function: that
    graph (onnx.inliner's) passes the same TensorRT checks (the builder's layer check refuses it anyway)."""
    import onnx
    from onnx import inliner

    from perception.export.check import tensorrt_problems

    inlined = inliner.inline_local_functions(onnx.load(str(exported_plugin_onnx)))
    assert not any(n.domain == "segnet" for n in inlined.graph.node)
    assert tensorrt_problems(inlined) == []


@pytest.fixture(scope="module")
def exported_plugin_onnx(tmp_path_factory, shipped_model):
    from perception.export.onnx import ExportOptions, export_onnx

    return export_onnx(shipped_model, tmp_path_factory.mktemp("plugin") / "m.onnx", ExportOptions(unpool="plugin"))
