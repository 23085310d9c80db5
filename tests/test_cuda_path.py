"""The PyTorch CUDA path around the device, run on a CPU: --device parsing and errors through the CLIs, the
device rows of resolve()'s decision, and the CUDA-graph bookkeeping of GraphedStep and TorchBackend driven
through a stand-in graph API that replays by re-running the step (tests/test_gpu.py runs the real thing)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from perception.core import model_folder
from perception.core.choices import parse_device
from perception.inference import resolve as resolve_module
from perception.inference.cuda_graphs import GraphedStep
from perception.inference.resolve import resolve
from test_resolve import _folder

ROOT = Path(__file__).resolve().parents[1]


class CaptureRules(TorchFunctionMode):
    """What CUDA stream capture refuses, raised as PyTorch raises it on a GPU: tensors made from host data
    (a copy in), and values read back to the host (a synchronisation)."""

    REFUSED = {torch.tensor, torch.as_tensor, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu,
               torch.Tensor.numpy}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.REFUSED:
            raise RuntimeError(f"operation not permitted when stream is capturing ({func.__name__})")
        return func(*args, **(kwargs or {}))


class ReplayByRerun:
    """A GraphApi whose "graph" is the step itself: capture runs it under :class:`CaptureRules`, replay re-runs
    it on the static input and writes the static outputs in place, so a caller that forgets to refresh the
    static input, keeps stale outputs, or copies from the host inside the step fails here as on a GPU."""

    def __init__(self, fail_on: tuple | None = None) -> None:
        self.warmups = self.replays = 0
        self.fail_on = fail_on

    def warm_up(self, fn, iterations):
        for _ in range(iterations):
            fn()
            self.warmups += 1

    def capture(self, fn):
        with CaptureRules():
            out = fn()
        if self.fail_on is not None and tuple(out[0].shape[1:]) == self.fail_on:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        return (fn, out), out

    def replay(self, graph):
        self.replays += 1
        fn, static_out = graph
        for static, fresh in zip(static_out, fn()):
            static.copy_(fresh)


def test_parse_device():
    assert [parse_device(d) for d in ("auto", "CPU", "cuda", "cuda:1")] == ["auto", "cpu", "cuda", "cuda:1"]
    for bad in ("gpu", "cuda:", "cuda:x", "mps"):
        with pytest.raises(ValueError, match="a device is auto, cpu, cuda or cuda:N"):
            parse_device(bad)


@pytest.fixture
def gpu(monkeypatch):
    """Whether PyTorch sees a CUDA GPU here, for resolve() (and no TensorRT unless asked)."""
    def set_gpu(cuda: bool, *, trt: bool = False) -> None:
        monkeypatch.setattr(resolve_module, "torch_cuda_status",
                            lambda: (True, "") if cuda else (False, "this PyTorch is a CPU-only build"))
        monkeypatch.setattr(resolve_module, "torch_available", lambda: True)
        monkeypatch.setattr(model_folder, "tensorrt_gpu_available", lambda: trt)
        monkeypatch.setattr(model_folder, "u8s8_may_saturate", lambda: False)
    return set_gpu


# contents, GPU here, TensorRT here, options -> (backend, device, precision option or None, words in the notes)
DEVICE_ROWS = [
    ("onnx+int8+weights", True, False, {}, ("torch", "cuda", "fp16", [])),
    ("onnx+int8+weights", True, False, {"precision": "fp32"}, ("torch", "cuda", "fp32", [])),
    ("onnx+int8+weights", False, False, {}, ("onnxruntime", "cpu", None, [])),
    ("onnx+int8", True, False, {}, ("onnxruntime", "cpu", None, ["runs on the CPU", "weights.safetensors"])),
    ("onnx+int8+weights", True, False, {"device": "cpu"}, ("onnxruntime", "cpu", None, [])),
    ("onnx+int8+weights", True, False, {"device": "cuda:1"}, ("torch", "cuda:1", "fp16", [])),
    ("onnx+int8+weights", True, False, {"device": "cuda", "backend": "onnxruntime"},
     ("onnxruntime", "cuda", None, [])),
    ("onnx+int8+weights+engine", True, True, {}, ("tensorrt", "cuda", None, [])),
    ("onnx+int8+weights+engine", True, True, {"device": "cpu"}, ("onnxruntime", "cpu", None, [])),
]


@pytest.mark.parametrize("contents,cuda,trt,options,expected", DEVICE_ROWS)
def test_the_device_rows_of_the_decision(tmp_path, gpu, contents, cuda, trt, options, expected):
    gpu(cuda, trt=trt)
    r = resolve(_folder(tmp_path, contents), **options)
    backend, device, precision, words = expected
    assert (r.backend, r.device, r.options.get("precision")) == (backend, device, precision), r
    assert all(w in " ".join(r.notes) for w in words) and bool(r.notes) == bool(words), r.notes


@pytest.mark.parametrize("contents,cuda,options,error", [
    ("onnx+weights", False, {"device": "cuda"}, "--device cuda: this PyTorch is a CPU-only build; use --device cpu"),
    ("onnx+int8", True, {"device": "cuda"}, "does not carry"),
    ("onnx+weights", True, {"device": "cuda", "precision": "int8"}, "int8 runs on the CPU"),
    ("onnx+weights", True, {"device": "gpu"}, "a device is auto, cpu, cuda or cuda:N"),
])
def test_a_device_that_cannot_be_used_is_a_one_line_reason(tmp_path, gpu, contents, cuda, options, error):
    gpu(cuda)
    with pytest.raises((ValueError, RuntimeError, FileNotFoundError), match=error) as e:
        resolve(_folder(tmp_path, contents), **options)
    assert "\n" not in str(e.value)


def test_cpu_only_pytorch_is_recognised_without_importing_it():
    if torch.version.cuda is not None:
        pytest.skip("this PyTorch is a CUDA build")
    code = ("import sys; from perception.core.model_folder import torch_cuda_status; "
            "print(torch_cuda_status()); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.split("\n")[:2] == ["(False, 'this PyTorch is a CPU-only build')", "False"], r


@pytest.mark.parametrize("argv", [
    ["perception.inference.predict", "--device", "cuda", "--out", "OUT", "IMG"],
    ["perception.stream.node.cli", "--source", "demo", "--device", "cuda"],
    ["perception.eval.cli", "--device", "cuda", "--data", "DATA"],
])
def test_clis_say_in_one_line_that_cuda_is_missing(argv, tmp_path, toy_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    data, model = toy_model
    argv = [a.replace("OUT", str(tmp_path / "out")).replace("DATA", str(data)) for a in argv]
    img = tmp_path / "f.png"
    import cv2

    cv2.imwrite(str(img), np.zeros((48, 64, 3), np.uint8))
    argv = [a.replace("IMG", str(img)) for a in argv] + ["--model", str(model)]
    r = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("effective config:")]
    assert r.returncode in (1, 2) and len(lines) == 1 and "--device cuda:" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    bad = subprocess.run([sys.executable, "-m", argv[0], "--device", "gpu", "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "a device is auto, cpu, cuda or cuda:N" in bad.stderr


def test_graphed_step_captures_per_shape_replays_and_evicts():
    calls = []

    def step(x, *, scale):
        calls.append(tuple(x.shape))
        return (x * scale, x.sum().reshape(1))

    api = ReplayByRerun()
    g = GraphedStep(step, api, warmup=2, max_graphs=2)
    a, b = torch.arange(6.0).reshape(2, 3), torch.arange(4.0).reshape(1, 4)
    assert torch.equal(g(a, scale=2.0)[0], a * 2) and g.captures == 1 and api.warmups == 2
    out = g(a + 1, scale=2.0)  # the same key: replayed on the new input, not captured again
    assert torch.equal(out[0], (a + 1) * 2) and torch.equal(out[1], (a + 1).sum().reshape(1)) and g.captures == 1
    assert torch.equal(g(a, scale=3.0)[0], a * 3) and g.captures == 2  # options are part of the key
    assert torch.equal(g(b, scale=2.0)[0], b * 2) and g.captures == 3  # evicts (a, 2.0), the least recent
    assert torch.equal(g(a, scale=2.0)[0], a * 2) and g.captures == 4


def test_a_failed_capture_warns_once_and_runs_that_shape_eagerly():
    api = ReplayByRerun(fail_on=(5,))
    g = GraphedStep(lambda x: (x + 1,), api)
    with pytest.warns(RuntimeWarning, match=r"capture failed for input \(2, 5\) \(operation not permitted"):
        assert torch.equal(g(torch.zeros(2, 5))[0], torch.ones(2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(g(torch.ones(2, 5))[0], torch.full((2, 5), 2.0))  # eager, no second warning
        assert torch.equal(g(torch.zeros(2, 4))[0], torch.ones(2, 4)) and g.captures == 1  # other shapes graphed


def test_torch_backend_with_graphs_gives_the_eager_labels(toy_model, toy_bayesian_model):
    """TorchBackend's graphed step (upload, BGR->RGB on the device, normalisation, network, argmax), driven
    through the stand-in API on the CPU: it is captured (nothing in it copies from the host: normalize()'s
    mean and std were made from host lists at each call, which capture refuses), and its labels and
    probabilities equal the eager backend's; MC-dropout sampling stays eager."""
    from perception.inference.torch import TorchBackend

    _, model = toy_model
    eager = TorchBackend(model)
    api = ReplayByRerun()
    graphed = TorchBackend(model, cuda_graphs=True, graph_api=api)
    assert eager.graphed is None and graphed.graphed is not None
    rng = np.random.default_rng(0)
    for hw in ((48, 64), (48, 64), (40, 72), (48, 64)):
        frames = rng.integers(0, 256, (2, *hw, 3), dtype=np.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a capture that fell back to eager would pass silently
            got = graphed.infer(frames, probs=True)
        want = eager.infer(frames, probs=True)
        assert np.array_equal(got.labels, want.labels) and np.allclose(got.probs, want.probs, atol=1e-6)
    assert graphed.graphed.captures == 1 and api.replays == 4  # network size is fixed: one graph
    _, bayes = toy_bayesian_model
    b = TorchBackend(bayes, cuda_graphs=True, graph_api=ReplayByRerun(), mc_samples=2)
    r = b.infer(rng.integers(0, 256, (1, 48, 64, 3), dtype=np.uint8), uncertainty=True)
    assert r.uncertainty is not None and b.graphed.captures == 0
