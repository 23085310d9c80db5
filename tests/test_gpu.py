"""GPU-only checks (skipped cleanly without CUDA / TensorRT). Every behaviour here also has a CPU test:
kernels under the interpreter, plugin logic against a stand-in, ONNX checks (tests/test_plugins.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(autouse=True)
def _not_under_the_interpreter():
    """A GPU test under Triton's CPU interpreter would test the interpreter (kernels on CPU copies, AOT
    compilation through patched ops): refuse, rather than pass or fail for the wrong reason."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.fail("TRITON_INTERPRET=1 is set: GPU tests must run without Triton's interpreter "
                    "(run them as tools/gpu_check.py does)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hw", [(45, 60), (23, 31), (360, 480)])
def test_triton_kernels_on_cuda(dtype, hw):
    pytest.importorskip("triton")
    from perception.export.tensorrt import kernels as K

    x = torch.randint(0, 3, (2, 16, *hw), device="cuda").to(dtype)
    y, idx = K.max_pool_argmax(x)
    ry, ridx = F.max_pool2d(x.float(), 2, 2, ceil_mode=True, return_indices=True)
    assert torch.equal(y.float(), ry) and torch.equal(idx.long(), ridx)
    v = torch.randn_like(y)
    assert torch.equal(K.max_unpool2d(v, idx, hw).float(), F.max_unpool2d(v.float(), ridx, 2, 2, output_size=hw))


def _demo_frames(n: int):
    import cv2

    from perception.stream.node.sources import DEMO_CLIP

    cap = cv2.VideoCapture(str(DEMO_CLIP))
    frames = [cap.read()[1] for _ in range(n)]
    cap.release()
    return np.stack(frames)


@pytest.mark.gpu
def test_torch_cuda_backend_graphs_equal_eager_and_fp16_agrees_with_fp32(shipped_model):
    """The PyTorch CUDA path: a replayed CUDA graph gives the eager step's labels (the same kernels, the
    static buffers refreshed each call: a stale input would disagree wholesale), for two batch sizes and a
    size seen again; fp16 agrees with fp32 on >= 99.5% of pixels."""
    from perception.inference.torch import TorchBackend

    frames = _demo_frames(4)
    eager = TorchBackend(shipped_model, device="cuda", precision="fp16", cuda_graphs=False)
    graphed = TorchBackend(shipped_model, device="cuda", precision="fp16")
    fp32 = TorchBackend(shipped_model, device="cuda", precision="fp32", cuda_graphs=False)
    for batch in (frames[:1], frames, frames[1:2]):
        want = eager.infer(batch).labels
        assert (graphed.infer(batch).labels == want).mean() >= 0.9999  # the same kernels, replayed
        assert (fp32.infer(batch).labels == want).mean() >= 0.995
    assert graphed.graphed.captures == 2  # batch 1 and batch 4


@pytest.mark.gpu
def test_resolve_runs_a_folder_on_the_gpu_by_default(shipped_model):
    from perception.inference.resolve import resolve

    r = resolve(shipped_model)
    assert (r.backend, r.device, r.options["precision"]) == ("torch", "cuda", "fp16")
    backend = r.load()
    assert backend.graphed is not None and backend.infer(_demo_frames(1)).labels.shape == (1, 360, 480)


def _one_plugin_onnx(path: Path, op: str, dtype):
    """A graph of a single segnet plugin (pool, or pool+unpool) with a fixed 1x8x45x61 input."""
    import onnx
    from onnx import TensorProto, helper

    et = TensorProto.FLOAT16 if dtype == torch.float16 else TensorProto.FLOAT
    attrs = {"plugin_version": "1", "plugin_namespace": "segnet", "aot": 1}
    nodes = [helper.make_node("MaxPoolArgmax", ["x"], ["y", "idx"], domain="segnet", **attrs)]
    outputs = [helper.make_tensor_value_info("y", et, None), helper.make_tensor_value_info("idx", TensorProto.INT32, None)]
    if op == "unpool":
        nodes.append(helper.make_node("MaxUnpool2d", ["y", "idx", "x"], ["out"], domain="segnet", **attrs))
        outputs = [helper.make_tensor_value_info("out", et, None)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", et, [1, 8, 45, 61])], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("segnet", 1)])
    onnx.save(model, str(path))


@pytest.mark.tensorrt
@pytest.mark.parametrize("op", ["pool", "unpool"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_plugin_engines_against_pytorch(op, dtype, tmp_path):
    import tensorrt as trt

    from perception.export.tensorrt.plugins import register_plugins

    register_plugins()
    _one_plugin_onnx(tmp_path / "p.onnx", op, dtype)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(tmp_path / "p.onnx")), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    serialized = builder.build_serialized_network(network, builder.create_builder_config())
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    ctx = engine.create_execution_context()
    x = torch.randint(0, 3, (1, 8, 45, 61), device="cuda").to(dtype)
    ry, ridx = F.max_pool2d(x.float(), 2, 2, ceil_mode=True, return_indices=True)
    bufs = {"x": x}
    if op == "pool":
        bufs["y"], bufs["idx"] = torch.empty_like(ry, dtype=dtype), torch.empty_like(ridx, dtype=torch.int32)
    else:
        bufs["out"] = torch.empty_like(x)
    for name, t in bufs.items():
        ctx.set_tensor_address(name, t.data_ptr())
    stream = torch.cuda.current_stream()
    assert ctx.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    if op == "pool":
        assert torch.equal(bufs["y"].float(), ry) and torch.equal(bufs["idx"].long(), ridx)
    else:
        assert torch.equal(bufs["out"].float(), F.max_unpool2d(ry, ridx, 2, 2, output_size=(45, 61)))


@pytest.mark.tensorrt
@pytest.mark.parametrize("unpool", ["plugin", "native"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_segnet_basic_engines_against_onnxruntime(unpool, precision, shipped_model, camvid_root, tmp_path):
    import cv2

    from perception.inference import load_backend
    from perception.export.tensorrt.builder import main as build_main
    from perception.export.onnx import ExportOptions, export_onnx

    eng = tmp_path / "m.engine"
    assert build_main(["--model", str(shipped_model), "--out", str(eng), "--unpool", unpool,
                       "--precision", precision]) == 0
    frames = np.stack([cv2.imread(str(p)) for p in sorted((camvid_root / "val").iterdir())[:8]])
    want = load_backend(export_onnx(shipped_model, tmp_path / "ref.onnx", ExportOptions())).infer(frames).labels
    got = load_backend(eng).infer(frames).labels
    assert (got == want).mean() >= 0.995
