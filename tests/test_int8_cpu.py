"""int8 that computes the same on every CPU, and training precision that suits the CPU
(perception.core.cpu, perception.export.quantize, perception.models.precision).

On x86 without VNNI, ONNX Runtime's u8 x s8 convolution adds pairs of products into int16 with
saturation (VPMADDUBSW); the graph's accuracy measured on a VNNI machine then does not hold (measured:
37.3 -> 30.4 held-out mIoU). These tests check the cure where no such CPU is needed: the weights' range
against a reference model of that instruction, and the rules that decide what runs."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from perception.core import cpu  # noqa: E402
from perception.export.onnx import ExportOptions, export_onnx  # noqa: E402
from perception.export.quantize import quantize_int8  # noqa: E402

INT16_MAX, INT16_MIN = 32767, -32768


def _conv_weights(path) -> list[np.ndarray]:
    """The int8 weight tensors of the graph's convolutions (QDQ: initializer -> DequantizeLinear -> Conv)."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = []
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and \
                any(c.op_type == "Conv" and c.input[1] == n.output[0] for c in consumers.get(n.output[0], [])):
            w = numpy_helper.to_array(inits[n.input[0]])
            assert w.dtype == np.int8
            out.append(w)
    return out


def _saturating_pair_sums(w: np.ndarray, a: np.ndarray) -> np.ndarray:
    """A reference model of VPMADDUBSW + VPMADDWD: per output channel, products of uint8 activations and
    int8 weights added two at a time into int16 with saturation, then the pairs summed exactly."""
    k = w.reshape(w.shape[0], -1).astype(np.int64)
    k = np.pad(k, ((0, 0), (0, k.shape[1] % 2)))
    x = np.pad(a.reshape(-1).astype(np.int64), (0, a.size % 2))
    pairs = (k * x).reshape(k.shape[0], -1, 2).sum(-1)
    return np.clip(pairs, INT16_MIN, INT16_MAX).sum(-1)


def _worst_activations(w: np.ndarray) -> np.ndarray:
    """For each output channel the uint8 input that maximises its pair sums: 255 where the weight is > 0."""
    return np.where(w.reshape(w.shape[0], -1) > 0, 255, 0).astype(np.uint8)


@pytest.fixture(scope="module")
def graphs(shipped_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int8_bits")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(2)]
    fp32 = export_onnx(shipped_model, tmp / "fp32.onnx", ExportOptions(unpool="onnx", size=(64, 96)))
    return {bits: quantize_int8(fp32, tmp / f"w{bits}.onnx", frames, weight_bits=bits) for bits in (7, 8)} | \
        {"default": quantize_int8(fp32, tmp / "default.onnx", frames)}


def test_seven_bit_weights_cannot_saturate_and_eight_bit_ones_do(graphs):
    from perception.core.onnx_meta import read_onnx_metadata

    assert read_onnx_metadata(graphs["default"])["segnet.int8_weight_bits"] == "7"  # the default for CPUs
    assert read_onnx_metadata(graphs[8])["segnet.int8_weight_bits"] == "8"
    w7, w8 = _conv_weights(graphs[7]), _conv_weights(graphs[8])
    assert len(w7) == len(w8) >= 8  # every convolution of SegNet-Basic
    for w in w7:
        assert np.abs(w.astype(np.int16)).max() <= 64
        worst = _worst_activations(w)
        for c in range(0, w.shape[0], 7):  # the saturating sum equals the exact one, even at the worst input
            k = w[c:c + 1]
            exact = int((k.reshape(-1).astype(np.int64) * worst[c].astype(np.int64)).sum())
            assert _saturating_pair_sums(k, worst[c])[0] == exact
    # 8-bit weights reach 127 in every layer, and their worst input does saturate: the check can fail.
    assert all(np.abs(w.astype(np.int16)).max() == 127 for w in w8)
    saturated = 0
    for w in w8:
        worst = _worst_activations(w)
        exact = (w.reshape(w.shape[0], -1).astype(np.int64) * worst.astype(np.int64)).sum(-1)
        emulated = np.array([_saturating_pair_sums(w[c:c + 1], worst[c])[0] for c in range(w.shape[0])])
        saturated += int((emulated != exact).sum())
    assert saturated > 0


def test_reference_pair_sum_is_the_dot_product_when_nothing_saturates():
    rng = np.random.default_rng(3)
    w = rng.integers(-20, 21, (3, 5, 3, 3)).astype(np.int8)
    a = rng.integers(0, 256, 45).astype(np.uint8)
    for c in range(3):
        assert _saturating_pair_sums(w[c:c + 1], a)[0] == int((w[c].reshape(-1).astype(np.int64) * a).sum())


@pytest.mark.parametrize("flags,x86,saturates,isa", [
    ({"avx2", "fma"}, True, True, "AVX2"),                                     # Zen 3, Haswell..Ice Lake client
    ({"avx2", "avx512f", "avx512bw"}, True, True, "AVX-512"),                  # Skylake-SP: AVX-512, no VNNI
    ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}, True, False, "AVX-512 VNNI BF16"),  # Zen 4/5, Cooper Lake
    ({"avx2", "avx_vnni"}, True, False, "AVX2 AVX-VNNI"),                      # Alder Lake
    ({"asimd", "asimddp"}, False, False, "NEON dotprod"),                      # ARM widens before it adds
])
def test_which_cpus_saturate(flags, x86, saturates, isa):
    fs = frozenset(flags)
    assert cpu.u8s8_may_saturate(fs, x86=x86) is saturates
    assert cpu.isa_summary(fs) == isa


def test_unreadable_flags_on_x86_count_as_saturating(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: None)
    assert cpu.has_vnni() is None
    assert cpu.u8s8_may_saturate(x86=True) is True
    assert cpu.u8s8_may_saturate(x86=False) is False


def test_auto_runs_an_eight_bit_graph_only_where_it_cannot_saturate(graphs, shipped_model, tmp_path):
    import shutil

    from perception.core.card import INT8_ONNX_FILE
    from perception.inference.resolve import int8_cpu_verdict, int8_verdict

    for saturates in (True, False):
        assert int8_cpu_verdict(graphs[7], saturates=saturates)[0]
    ok, why = int8_cpu_verdict(graphs[8], saturates=True)
    assert not ok and "VNNI" in why
    assert int8_cpu_verdict(graphs[8], saturates=False)[0]
    # A folder whose card would let int8 run: the graph's weights decide on a CPU without VNNI.
    folder = tmp_path / "m"
    shutil.copytree(shipped_model, folder, ignore=shutil.ignore_patterns("heldout_*"))
    for bits, expected in ((7, True), (8, False)):
        shutil.copy(graphs[bits], folder / INT8_ONNX_FILE)
        assert int8_verdict(folder, saturates=True)[0] is expected
        assert int8_verdict(folder, saturates=False)[0] is True


def test_every_shipped_int8_graph_has_seven_bit_weights():
    """So the held-out int8 mIoU in each card holds on every CPU, not only on the one that measured it."""
    from perception.core.onnx_meta import read_onnx_metadata
    from perception.core.card import INT8_ONNX_FILE
    from perception.core.zoo import ZOO_DIR

    found = sorted(ZOO_DIR.glob(f"**/{INT8_ONNX_FILE}"))
    assert found
    for path in found:
        assert read_onnx_metadata(path).get("segnet.int8_weight_bits") == "7", path
        assert max(int(np.abs(w.astype(np.int16)).max()) for w in _conv_weights(path)) <= 64, path


@pytest.mark.parametrize("native,asked,expected,says", [
    (True, "auto", "bf16", False),
    (False, "auto", "off", True),
    (False, "bf16", "bf16", True),   # as asked, with a warning
    (True, "bf16", "bf16", False),
    (False, "off", "off", False),
])
def test_amp_auto_uses_bf16_only_where_it_is_native(monkeypatch, native, asked, expected, says):
    from perception.models import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    amp, note = precision.resolve_amp(asked, "cpu")
    assert amp == expected and (note is not None) is says
    with pytest.raises(ValueError, match="amp must be one of"):
        precision.resolve_amp("int4", "cpu")


def test_the_cpu_recipe_asks_for_auto():
    from perception.train.config import RECIPES

    assert RECIPES["cpu"]["amp"] == "auto" and RECIPES["robust"]["amp"] == "auto"


def test_the_backend_says_why_it_runs_fp32_or_an_int8_graph_that_may_differ(graphs, shipped_model, tmp_path,
                                                                              monkeypatch):
    import shutil

    from perception.core import model_folder
    from perception.core.card import INT8_ONNX_FILE
    from perception.inference.resolve import resolve

    monkeypatch.setattr(model_folder, "u8s8_may_saturate", lambda: True)  # as on an AVX2 CPU
    folder = tmp_path / "m"
    shutil.copytree(shipped_model, folder, ignore=shutil.ignore_patterns("heldout_*"))
    shutil.copy(graphs[8], folder / INT8_ONNX_FILE)
    r = resolve(folder)  # the card allows int8; the CPU does not
    with r.load() as b:
        assert b.precision == "fp32"
    assert len(r.notes) == 1 and "fp32, not model_int8.onnx" in r.notes[0] and "no VNNI" in r.notes[0]
    r = resolve(graphs[8])  # an int8 file asked for by name runs, with a warning
    with r.load() as b:
        assert b.precision == "int8"
    assert len(r.notes) == 1 and r.notes[0].startswith("warning:")
    shutil.copy(graphs[7], folder / INT8_ONNX_FILE)
    r = resolve(folder)
    with r.load() as b:
        assert b.precision == "int8"
    assert r.notes == []
