"""tools/mc_gains.py: every row equals the library's own MC-dropout prediction under the same seed, and the
command scores them on a dataset in one run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from perception.models import get_model, mc_dropout_predict
from perception.models.tta import FlipTTA


def _tool():
    spec = importlib.util.spec_from_file_location("mc_gains", Path(__file__).parents[1] / "tools" / "mc_gains.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize("name", ["bayesian_segnet_basic", "bayesian_segnet"])
def test_each_row_is_the_libraries_mc_prediction_under_the_same_seed(name):
    """The K-sample rows are prefixes of one draw of the largest count; each must be what
    ``mc_dropout_predict(samples=K)`` gives from the same seed: whole passes, and FlipTTA's batch of both
    views for the flip rows (the reference shares no code with the tool's loop)."""
    tool = _tool()
    model = get_model(name, num_classes=3).double()
    with torch.no_grad():  # a fresh model's logits are its classifier's bias: one class everywhere, every sample
        model.classifier.bias.zero_()
        model.classifier.weight.mul_(50)
    x = torch.randn(1, 3, 32, 48, dtype=torch.float64)
    rows = tool.frame_predictions(model, x, [2, 3, 5], seed=11)
    assert list(rows) == tool.row_names([2, 3, 5])
    model.eval()
    with torch.no_grad():
        for name, net in (("one pass", model), ("one pass + flip", FlipTTA(model))):
            logits = net(x)
            assert torch.equal(rows[name].labels, logits.argmax(1)) and rows[name].variance is None
            p = torch.softmax(logits, dim=1)
            assert torch.allclose(rows[name].entropy, -(p * p.log()).sum(1), atol=1e-9)
    for k in (2, 3, 5):
        torch.manual_seed(11)
        plain = mc_dropout_predict(model, x, samples=k, reuse_prefix=False)
        torch.manual_seed(11)
        flipped = mc_dropout_predict(FlipTTA(model), x, samples=k)
        for row, ref in ((rows[f"MC {k}"], plain), (rows[f"MC {k} + flip"], flipped)):
            assert torch.equal(row.labels, ref.labels)
            # mc_dropout_predict returns float32 summaries; the tool keeps float64.
            assert torch.allclose(row.variance.float(), ref.uncertainty, rtol=1e-5, atol=1e-7)
            assert torch.allclose(row.entropy.float(), ref.entropy, rtol=1e-5, atol=1e-7)
            assert row.variance.max() > 0  # the samples differ, so the comparison above compares something
    # The samples matter here: another seed gives other labels, so the equalities above test the seeding.
    other = tool.frame_predictions(model, x, [2, 3, 5], seed=12)
    assert any(not torch.equal(rows[n].labels, other[n].labels) for n in rows if n.startswith("MC"))


def test_mc_gains_scores_every_row_and_writes_json_and_plot(toy_bayesian_model, tmp_path, capsys):
    from perception.data.loading import open_dataset
    from perception.data.transforms import ToTensors
    from perception.eval.evaluate import evaluate
    from perception.models.io import load

    data, model_dir = toy_bayesian_model
    tool = _tool()
    out_json, out_png = tmp_path / "gains.json", tmp_path / "gains.png"
    assert tool.main([str(model_dir), "--data", str(data), "--split", "train", "--samples", "3", "2",
                      "--json", str(out_json), "--plot", str(out_png), "--no-progress"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0].strip() for line in printed[2:]] == tool.row_names([2, 3])
    doc = json.loads(out_json.read_text())
    assert doc["samples"] == [2, 3] and doc["images"] == 8 and list(doc["rows"]) == tool.row_names([2, 3])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The one-pass row is perception-eval's own deterministic evaluation of the same frames.
    model = load(model_dir)
    reference = evaluate(model, open_dataset(data, "train", transform=ToTensors()), model.card.input, progress=False)
    for key in ("global_accuracy", "class_accuracy", "miou", "bf"):
        assert doc["rows"]["one pass"][key] == pytest.approx(reference[key], abs=1e-12)
    for name, row in doc["rows"].items():
        assert 0 <= row["auroc_entropy"] <= 1
        assert (row["auroc_variance"] is None) == (not name.startswith("MC"))


def test_mc_gains_refuses_a_model_without_dropout_in_one_line(toy_model, tmp_path, capsys):
    data, model_dir = toy_model
    tool = _tool()
    assert tool.main([str(model_dir), "--data", str(data), "--json", str(tmp_path / "x.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no dropout layers" in err[0]
    assert not (tmp_path / "x.json").exists()
    assert tool.main([str(model_dir), "--data", str(data), "--samples", "0"]) == 2
