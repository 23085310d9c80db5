"""The TensorRT layer's CPU-checkable rules (issue 28): the UINT8 rule of TensorRT's ONNX parser, the
plugin-count guard, the version pin and the runtime's teardown order, against stand-ins."""

from __future__ import annotations

import tomllib
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from perception.export.check import tensorrt_problems, uint8_problems
from perception.export.onnx import ExportOptions, export_onnx

ROOT = Path(__file__).resolve().parents[1]
FORMS = ["native", "plugin", "onnx"]


def _graph(first_op: str) -> onnx.ModelProto:
    """image (uint8 NHWC) -> first_op -> ... -> float: the order before (Transpose first) and after (Cast)."""
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, [1, 4, 5, 3])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 5])
    if first_op == "Transpose":
        nodes = [helper.make_node("Transpose", ["image"], ["t"], perm=[0, 3, 1, 2], name="T"),
                 helper.make_node("Cast", ["t"], ["y"], to=TensorProto.FLOAT, name="C")]
    else:
        nodes = [helper.make_node("Cast", ["image"], ["c"], to=TensorProto.FLOAT, name="C"),
                 helper.make_node("Transpose", ["c"], ["y"], perm=[0, 3, 1, 2], name="T")]
    return helper.make_model(helper.make_graph(nodes, "g", [image], [out]), opset_imports=[helper.make_opsetid("", 17)])


def test_the_uint8_rule_on_hand_built_graphs():
    before = uint8_problems(_graph("Transpose"))
    assert len(before) == 2 and "reads the UINT8 input directly" in before[0] and "'t'" in before[1]
    assert uint8_problems(_graph("Cast")) == []
    # A uint8 graph output (labels) is allowed; a uint8 intermediate is not.
    g = _graph("Cast")
    g.graph.node.append(helper.make_node("Cast", ["y"], ["u"], to=TensorProto.UINT8, name="U"))
    g.graph.node.append(helper.make_node("Cast", ["u"], ["z"], to=TensorProto.FLOAT, name="Z"))
    g.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 4, 5]))
    assert [p.split(":")[0] for p in uint8_problems(g)] == ["U"]
    g.graph.output.append(helper.make_tensor_value_info("u", TensorProto.UINT8, [1, 3, 4, 5]))
    assert uint8_problems(g) == []


@pytest.fixture(scope="module")
def exported(shipped_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("trt")
    return {f: export_onnx(shipped_model, d / f"{f}.onnx", ExportOptions(unpool=f, outputs=("labels", "probs")))
            for f in FORMS}


@pytest.mark.parametrize("form", FORMS)
def test_every_unpool_form_keeps_uint8_at_the_boundary(form, exported):
    assert uint8_problems(onnx.load(str(exported[form]))) == []
    if form != "onnx":  # MaxUnpool / MaxPool indices: rejected by TensorRT by design (ONNX Runtime only)
        assert tensorrt_problems(exported[form]) == []


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in (ROOT / "models").glob("*/model.onnx")))
def test_shipped_graphs_keep_uint8_at_the_boundary(folder):
    assert uint8_problems(onnx.load(str(ROOT / "models" / folder / "model.onnx"))) == []


@pytest.mark.parametrize("form", ["native", "plugin"])
def test_int8_graphs_and_the_uint8_rule(form, exported, tmp_path):
    """s8 activations: TensorRT-parsable; u8 (ONNX Runtime's fast path on x86): the check says why not."""
    from perception.export.quantize import quantize_int8

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (360, 480, 3), dtype=np.uint8) for _ in range(2)]
    s8 = quantize_int8(exported[form], tmp_path / "s8.onnx", frames, activations="s8")
    graph = onnx.load(str(s8)).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    assert tensorrt_problems(s8) == []
    # Read off the graph itself: symmetric (every zero point 0) and no INT32 bias DequantizeLinear, as
    # onnx-tensorrt requires (issue 44, item 2: 34 of 52 Q/DQ nodes had non-zero zero points).
    inits = {t.name: t for t in graph.initializer}
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(not onnx.numpy_helper.to_array(inits[n.input[2]]).any() for n in qdq if len(n.input) > 2)
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] in inits
                   and inits[n.input[0]].data_type == TensorProto.INT32 for n in graph.node)
    u8 = quantize_int8(exported[form], tmp_path / "u8.onnx", frames, activations="u8")
    problems = uint8_problems(onnx.load(str(u8)))
    assert problems and all("QuantizeLinear produces the UINT8 tensor" in p for p in problems)


class _LayerType:
    PLUGIN_V2, PLUGIN_V3, CONVOLUTION, ACTIVATION = "PLUGIN_V2", "PLUGIN_V3", "CONVOLUTION", "ACTIVATION"


class _Network:
    """Layers as (kind, name); a bare kind gets the name ``layer<i>``."""

    def __init__(self, layers: list) -> None:
        self.layers = [x if isinstance(x, tuple) else (x, f"layer{i}") for i, x in enumerate(layers)]
        self.num_layers = len(self.layers)

    def get_layer(self, i: int):
        return types.SimpleNamespace(type=self.layers[i][0], name=self.layers[i][1])


def test_the_build_fails_when_plugins_were_inlined():
    from perception.export.tensorrt.builder import check_plugin_layers, plugin_layer_names

    trt = types.SimpleNamespace(LayerType=_LayerType)
    ours = ["/pools.0/MaxPoolArgmax", "/unpools.0/MaxUnpool2d"]
    with_plugins = _Network(["CONVOLUTION", ("PLUGIN_V3", ours[0]), "ACTIVATION", ("PLUGIN_V3", ours[1]),
                             ("PLUGIN_V2", "someone_elses_plugin")])
    assert plugin_layer_names(trt, with_plugins) == [*ours, "someone_elses_plugin"]
    check_plugin_layers(trt, with_plugins, ours)
    inlined = _Network(["CONVOLUTION", "ACTIVATION"] * 4)  # the parser used the ONNX functions instead
    with pytest.raises(RuntimeError, match="2 of the graph's 2 segnet plugin nodes are not plugin layers"):
        check_plugin_layers(trt, inlined, ours)
    # Issue 44 (style): another plugin in the network made up for ours being inlined when layers were counted.
    other = _Network([("PLUGIN_V3", ours[0]), ("PLUGIN_V2", "someone_elses_plugin")])
    with pytest.raises(RuntimeError, match=r"1 of the graph's 2 .* \(e\.g\. /unpools\.0/MaxUnpool2d\)"):
        check_plugin_layers(trt, other, ours)


def test_build_engine_checks_the_plugin_count_after_parsing(monkeypatch, tmp_path, exported):
    """build_engine against a stand-in TensorRT whose parser inlines the plugins: it stops before building."""
    from perception.export.tensorrt import builder

    events = []

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            events.append("parse")
            return True

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            events.append(f"flags {flags}")
            return _Network(["CONVOLUTION"] * 10)

        def create_builder_config(self):
            events.append("config")
            raise AssertionError("must not get this far")

    trt = types.SimpleNamespace(
        Logger=type("Logger", (), {"WARNING": 0, "__init__": lambda self, level: None}), Builder=Builder,
        # TensorRT 10's values (kSTRONGLY_TYPED 1, kPREFER_JIT_PYTHON_PLUGINS 2, kPREFER_AOT_PYTHON_PLUGINS 3,
        # as bindings that mirror NvInfer.h give them; the check below does not depend on them).
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1, PREFER_JIT_PYTHON_PLUGINS=2,
                                                            PREFER_AOT_PYTHON_PLUGINS=3), OnnxParser=Parser,
        LayerType=_LayerType)
    monkeypatch.setattr(builder, "_require_tensorrt_and_gpu", lambda: trt)
    monkeypatch.setattr("perception.export.tensorrt.plugins.register_plugins", lambda: None)
    args = types.SimpleNamespace(unpool="plugin")
    with pytest.raises(RuntimeError, match="inlined their ONNX functions"):
        builder.build_engine(exported["plugin"], tmp_path / "x.engine", args, {}, lambda m: None)
    # Strongly typed, and the plugins' AOT implementation preferred (issue 44, item 7).
    assert events == [f"flags {(1 << 1) | (1 << 3)}", "parse"] and not (tmp_path / "x.engine").exists()


def test_tensorrt_pin_admits_only_what_the_code_is_written_for():
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, cuda in (("tensorrt-cu12", "cu12"), ("tensorrt-cu13", "cu13"), ("tensorrt", "cu13")):
        reqs = {Requirement(r).name: Requirement(r) for r in extras[extra]}
        # Issue 44, item 4: the bare `tensorrt` metapackage requires tensorrt_cu13 (CUDA 13, drivers 580+)
        # since 10.14, whatever the machine's CUDA: each extra names its CUDA major explicitly.
        assert "tensorrt" not in reqs and set(reqs) >= {f"tensorrt-{cuda}", "pycuda", "triton"}, (extra, reqs)
        for version, ok in (("10.9.0", False), ("10.13.3", False), ("10.14.1", True), ("10.16.0", True),
                            ("11.0.0", False)):
            assert reqs[f"tensorrt-{cuda}"].specifier.contains(version, prereleases=True) is ok, (extra, version)
        # Issue 44, item 5: pycuda before 2025.1.2 does not build against CUDA 13 (and has no wheels).
        for version, ok in (("2024.1.2", False), ("2025.1.1", False), ("2025.1.2", True), ("2026.1", True)):
            assert reqs["pycuda"].specifier.contains(version) is ok, (extra, version)


def test_tensorrt_backend_releases_its_objects_before_the_cuda_context():
    from perception.inference.tensorrt import TensorRTBackend

    events: list[str] = []

    class Tracked:
        def __init__(self, name: str) -> None:
            self.name = name

        def __del__(self) -> None:
            events.append(f"del {self.name}")

    class Ctx:
        def push(self):
            events.append("push")

        def pop(self):
            events.append("pop")

        def detach(self):
            events.append("detach")

    class DevMem:
        def free(self):
            events.append("free")

    be = TensorRTBackend.__new__(TensorRTBackend)
    be._ctx = Ctx()
    be._buffers = {"image": (None, DevMem()), "labels": (None, DevMem())}
    be.context, be.engine, be.runtime, be.stream = (Tracked(n) for n in ("context", "engine", "runtime", "stream"))
    be.close()
    assert events == ["push", "free", "free", "del context", "del engine", "del runtime", "del stream", "pop", "detach"]
    be.close()  # twice: nothing more
    assert events[-1] == "detach" and events.count("detach") == 1


def test_plugin_nodes_must_ask_for_the_ahead_of_time_implementation(exported):
    """tensorrt.plugin creates a plugin with both AOT and JIT implementations only for a node that says
    which (INT aot=1) or under a network flag: the check requires aot=1 (issue 44, item 7)."""
    import onnx

    from perception.export.check import plugin_nodes, tensorrt_problems

    model = onnx.load(str(exported["plugin"]))
    assert tensorrt_problems(model) == []
    node = plugin_nodes(model)[0]
    kept = [a for a in node.attribute if a.name != "aot"]
    del node.attribute[:]
    node.attribute.extend(kept)
    problems = tensorrt_problems(model)
    assert len(problems) == 1 and "attribute aot must be the INT 1" in problems[0]
    node.attribute.append(onnx.helper.make_attribute("aot", 0))
    assert "attribute aot must be the INT 1" in tensorrt_problems(model)[0]


def test_a_plugin_engine_loads_without_pytorch(tmp_path):
    """The runtime install has no PyTorch, and an AOT engine needs no Python definitions at run time: the
    TensorRT backend of a plugin-form engine must not import the plugin definitions (which import torch).
    Driven with torch blocked and stand-ins for tensorrt and pycuda, up to deserialising the engine
    (issue 44, item 1: before, register_plugins() imported torch first)."""
    import hashlib
    import json
    import subprocess
    import sys

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not really an engine")
    card = json.loads((ROOT / "models" / "segnet_basic_camvid" / "model.json").read_text())
    sidecar = {"schema": 1, "engine_sha256": hashlib.sha256(engine.read_bytes()).hexdigest(), "tensorrt": "10.14.1",
               "gpu": "stand-in", "compute_capability": "9.0", "unpool": "plugin", "plugin_impl": "aot",
               "input_shape": [1, 360, 480, 3], "model_card": card}
    (tmp_path / "m.engine.json").write_text(json.dumps(sidecar))
    code = f"""
import sys, types
sys.modules["torch"] = None
trt = types.ModuleType("tensorrt"); trt.__version__ = "10.14.1"
class Logger:
    WARNING = 2
    def __init__(self, level): pass
class Runtime:
    def __init__(self, logger): pass
    def deserialize_cuda_engine(self, data): return None
trt.Logger, trt.Runtime = Logger, Runtime
events = []
class Ctx:
    def push(self): events.append("push")
    def pop(self): events.append("pop")
    def detach(self): events.append("detach")
class Device:
    def __init__(self, i): pass
    def compute_capability(self): return (9, 0)
    def retain_primary_context(self): return Ctx()
pycuda = types.ModuleType("pycuda"); driver = types.ModuleType("pycuda.driver")
driver.init, driver.Device = (lambda: None), Device
pycuda.driver = driver
sys.modules.update({{"tensorrt": trt, "pycuda": pycuda, "pycuda.driver": driver}})
from perception.inference.tensorrt import TensorRTBackend
try:
    TensorRTBackend({str(engine)!r})
except Exception as e:
    print(type(e).__name__, e)
print(events)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "ValueError TensorRT could not deserialize" in r.stdout, r.stdout + r.stderr[-2000:]
    # Issue 44 (style): the failed constructor released the primary context it retained (it leaked before).
    assert r.stdout.strip().splitlines()[-1] == "['push', 'pop', 'push', 'pop', 'detach']", r.stdout


def test_the_check_reports_what_tensorrt_rejects_in_quantized_graphs():
    """onnx-tensorrt: symmetric quantization only ("The zero point ... must be all zeros") and
    DequantizeLinear on INT8/FP8/INT4: a hand-built graph with a non-zero int8 zero point, a UINT8
    QuantizeLinear and an INT32 bias DequantizeLinear gets one problem each."""
    from perception.export.check import qdq_problems

    def init(name, value, dtype):
        return onnx.numpy_helper.from_array(np.array(value, dtype=dtype), name)

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp_nonzero"], ["q1"], name="Q_nonzero"),
             helper.make_node("DequantizeLinear", ["q1", "s", "zp_nonzero"], ["d1"], name="DQ_nonzero"),
             helper.make_node("QuantizeLinear", ["x", "s", "zp_u8"], ["q2"], name="Q_u8"),
             helper.make_node("DequantizeLinear", ["bias32", "s"], ["b"], name="DQ_bias"),
             helper.make_node("QuantizeLinear", ["x", "s", "zp_zero"], ["q3"], name="Q_ok"),
             helper.make_node("DequantizeLinear", ["q3", "s", "zp_zero"], ["d3"], name="DQ_ok")]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [4]) for o in ("d1", "b", "d3")],
                              initializer=[init("s", 0.1, np.float32), init("zp_nonzero", 3, np.int8),
                                           init("zp_u8", 0, np.uint8), init("zp_zero", 0, np.int8),
                                           init("bias32", [1, 2, 3, 4], np.int32)])
    problems = qdq_problems(helper.make_model(graph))
    assert sorted(p.split(":")[0] for p in problems) == ["DQ_bias", "DQ_nonzero", "Q_nonzero", "Q_u8"], problems
