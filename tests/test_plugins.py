"""Triton kernels (under Triton's CPU interpreter), their PTX (assembled with ptxas), the TensorRT
plugin definitions (against a stand-in of tensorrt.plugin), and the engine builder's CPU path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install '.[kernels]')")

from perception.export.tensorrt import kernels as K  # noqa: E402


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    """Triton's CPU interpreter for this module's tests only (the kernels read the variable at each call).
    Set at import, it stayed set for every later test of the session: on a GPU machine the engine
    builder refused to run and the CUDA kernel test ran in the interpreter on CPU copies."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

def test_kernels_match_pytorch_under_the_interpreter():
    """tests/support/interpreted_kernels.py (pool and unpool against PyTorch: random, planted ties, odd
    sizes, fp32 and fp16) in a process of its own: Triton's interpreter must be on before triton is
    imported (its jit-defined library functions, e.g. tl.zeros_like, are made at import), and on in this
    process it would leak into every later test, the GPU ones included."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(root),
                        str(root / "tests" / "support" / "interpreted_kernels.py")],
                       env=env, capture_output=True, text=True, timeout=900, cwd=root)
    assert r.returncode == 0 and "42 passed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]


def test_kernel_input_errors():
    with pytest.raises(ValueError):
        K.max_pool_argmax(torch.zeros(2, 3, 4, dtype=torch.float32))
    with pytest.raises(ValueError, match="does not unpool"):
        K.max_unpool2d(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3, dtype=torch.int32), (9, 9))
    env = dict(os.environ)
    try:
        os.environ["TRITON_INTERPRET"] = "0"
        with pytest.raises(RuntimeError, match="CUDA tensor"):
            K.max_pool_argmax(torch.zeros(1, 1, 4, 4))
    finally:
        os.environ.clear()
        os.environ.update(env)


def test_scalar_args_and_grid_hand_cases():
    # 45x61 pools to 23x31; N*C = 6 planes.
    assert K.pool_scalar_args(2, 3, 45, 61) == [45, 61, 23, 31, 6 * 23 * 31]
    assert K.unpool_scalar_args(2, 3, 45, 61) == [45, 61, 23, 31, 6 * 45 * 61]
    assert K.grid_size(256) == 1 and K.grid_size(257) == 2 and K.grid_size(0) == 1
    assert K.pool_output_hw(360, 480) == (180, 240) and K.pool_output_hw(45, 60) == (23, 30)
    # The kernel launch argument order is the declared signature's.
    assert K.KERNEL_SIGNATURES["pool_argmax_kernel"] == ["*x", "H", "W", "Ho", "Wo", "total", "*y", "*idx"]


def _compile_in_subprocess(code: str) -> str:
    # PTX compilation must not run under the interpreter: a clean process without TRITON_INTERPRET.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"])
def test_ptx_for_each_target_assembles(arch, tmp_path):
    _compile_in_subprocess(
        f"from perception.export.tensorrt.kernels import emit_ptx; emit_ptx({str(tmp_path)!r}, arch={arch!r})"
    )
    files = sorted(tmp_path.glob("*.ptx"))
    assert len(files) == 4
    for f in files:
        text = f.read_text()
        entry = text.split(".entry", 1)[1].split("(", 1)[0].strip()
        params = K.ptx_entry_params(text, entry)
        expected = K.KERNEL_SIGNATURES[entry]
        # Exactly the declared parameters: Triton's trailing scratch pointers were removed.
        assert len(params) == len(expected)
        assert [p == ".u64" for p in params] == [e.startswith("*") for e in expected]
        # 8.0 where it suffices; Blackwell needs newer (issue 44, item 3: 8.0 for sm_100 aborted the process)
        assert f".version {K.ptx_version_for(arch) / 10:.1f}" in text
        # No line info: it put this checkout's absolute path (.file "/.../kernels.py") into every engine.
        assert ".file" not in text and ".loc" not in text and str(Path(K.__file__).parent) not in text
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        pytest.skip("ptxas not installed: PTX generated and checked, not assembled")
    for f in files:
        target = next(x.split()[1] for x in f.read_text().splitlines() if x.startswith(".target"))
        r = subprocess.run([ptxas, f"-arch={target}", str(f), "-o", os.devnull], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_strip_refuses_used_trailing_params():
    ptx = (".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1\n)\n{\n"
           "\tld.param.u64 %rd1, [k_param_1];\n}\n")
    with pytest.raises(ValueError, match="uses its trailing parameter"):
        K.strip_unused_trailing_params(ptx, "k", 1)
    unused = ptx.replace("[k_param_1]", "[k_param_0]")
    assert K.ptx_entry_params(K.strip_unused_trailing_params(unused, "k", 1), "k") == [".u64"]


# --- TensorRT plugin definitions: tests/test_nvidia_plugin.py drives them with NVIDIA's own tensorrt.plugin --


def test_register_without_tensorrt_fails_cleanly(monkeypatch):
    from perception.export.tensorrt import plugins as P

    monkeypatch.setattr(P, "_registered", False)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    with pytest.raises(ImportError):
        P.register_plugins()


# --- the builder on a machine without TensorRT ----------------------------------------------------


def test_build_engine_without_tensorrt_exports_then_fails_clearly(shipped_model, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:  # before the build: with TensorRT it builds an engine
        pytest.skip("TensorRT is installed here: the failure path does not apply")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, str(root / "tools" / "build_engine.py"), "--model", str(shipped_model),
         "--out", str(tmp_path / "m.engine"), "--precision", "fp32", "--emit-ptx", str(tmp_path / "ptx")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 3, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "TensorRT is not installed" in last
    assert (tmp_path / "m.onnx").is_file() and len(list((tmp_path / "ptx").glob("*.ptx"))) == 4
    assert not (tmp_path / "m.engine").exists()
    # What the builder would feed TensorRT: plugin nodes with the lookup attributes, all else parsable.
    from perception.export.check import plugin_nodes, tensorrt_problems

    assert tensorrt_problems(tmp_path / "m.onnx") == [] and len(plugin_nodes(tmp_path / "m.onnx")) == 8


def test_tensorrt_sidecar_check(tmp_path):
    from perception.inference.tensorrt import check_sidecar
    from perception.core.fileio import sha256_file as _sha256

    eng = tmp_path / "m.engine"
    eng.write_bytes(b"engine bytes")
    good = {"engine_sha256": _sha256(eng), "tensorrt": "10.13.0", "compute_capability": "9.0", "gpu": "H100"}
    check_sidecar(eng, good, trt_version="10.13.2", compute_capability="9.0")
    with pytest.raises(ValueError, match="replaced or corrupted"):
        check_sidecar(eng, {**good, "engine_sha256": "0" * 64}, trt_version="10.13.0", compute_capability="9.0")
    with pytest.raises(ValueError, match="TensorRT 10.13.0"):
        check_sidecar(eng, good, trt_version="11.4.0", compute_capability="9.0")
    with pytest.raises(ValueError, match="compute capability 9.0"):
        check_sidecar(eng, good, trt_version="10.13.0", compute_capability="8.6")


def test_tensorrt_backend_without_tensorrt_is_a_clear_error(tmp_path):
    import json

    from perception.inference import load_backend
    from perception.models.io import ModelCard

    eng = tmp_path / "m.engine"
    eng.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="sidecar"):
        load_backend(eng)
    card = ModelCard(id="m", architecture={"name": "segnet_basic", "num_classes": 1, "kwargs": {}},
                     classes=["a"], palette=[[0, 0, 0]])
    (tmp_path / "m.engine.json").write_text(json.dumps({"model_card": card.to_dict()}))
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="needs TensorRT"):
            load_backend(eng)


def test_emit_ptx_ignores_an_interpreter_left_in_the_environment(tmp_path):
    # TRITON_INTERPRET=1 (as the CPU tests set it) and a cold Triton cache used to crash --emit-ptx.
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_CACHE_DIR=str(tmp_path / "cache"),
               TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "build_engine.py"),
                        "--emit-ptx", str(tmp_path / "ptx"), "--arch", "sm_90"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode in (0, 3), r.stderr[-2000:]
    assert len(sorted((tmp_path / "ptx").glob("*.ptx"))) == 4, r.stderr[-2000:]


def test_the_interpreter_does_not_outlive_this_module(tmp_path):
    """One pytest session, as a GPU machine runs it: interpreter tests here, then a test of another
    module, which must see no TRITON_INTERPRET (tests/test_gpu.py refuses to run under it)."""
    probe = tmp_path / "test_probe_after.py"
    probe.write_text("import os\n\ndef test_probe_after():\n    assert os.environ.get('TRITON_INTERPRET') is None\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(root),
         "-k", "scalar_args or kernel_input_errors or probe_after",
         str(root / "tests" / "test_plugins.py"), str(probe)],
        env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert r.returncode == 0 and "3 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.mark.parametrize("arch,ptx_version,error", [("sm_100", 80, "PTX ISA 8.0 cannot target sm_100: it needs 8.6"),
                                                     ("sm_120", 86, "needs 8.7"), ("sm_130", None, "newer than")])
def test_an_unsupported_ptx_isa_and_arch_pair_is_a_one_line_error_not_an_abort(arch, ptx_version, error):
    """LLVM aborts the whole process (SIGABRT, inside TensorRT's launch-parameter callback at build time) on a
    PTX ISA too old for the target; the pair is checked first and refused with one line, in a subprocess so
    an abort would show as one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from perception.export.tensorrt import kernels as K\n"
            f"try:\n    K.compile_ptx('unpool_kernel', arch={arch!r}, ptx_version={ptx_version!r})\n"
            "except ValueError as e:\n    print('ERROR', e)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.startswith("ERROR") and error in r.stdout and r.stdout.count("\n") == 1, r.stdout
