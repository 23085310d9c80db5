"""Held-out-drive selection, the robust recipe's augmentations, time-budgeted runs, flip TTA, fp16 model
folders and the sweep tools."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import make_toy_dataset

ROOT = Path(__file__).resolve().parents[1]


def _drive_dataset(root: Path, drives=(("d1", 6), ("d2", 4), ("d3", 3)), size=(48, 64)) -> Path:
    """A CamVid-layout list dataset (``train.txt``) whose frame names carry the drive: ``d1_0003.png``."""
    toy = make_toy_dataset(root / "toy", n_train=sum(n for _, n in drives), n_val=2, size=size)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    src = sorted((toy / "train" / "images").iterdir())
    lines, i = [], 0
    for drive, n in drives:
        for k in range(n):
            name = f"{drive}_{k:04d}.png"
            (root / "images" / name).write_bytes(src[i].read_bytes())
            (root / "labels" / name).write_bytes((toy / "train" / "labels" / src[i].name).read_bytes())
            lines.append(f"images/{name} labels/{name}\n")
            i += 1
    (root / "train.txt").write_text("".join(lines[:-2]))
    (root / "val.txt").write_text("".join(lines[-2:]))  # the last two frames of d3
    (root / "classes.txt").write_text((toy / "classes.txt").read_text())
    return root


def test_group_of_and_split_by_group(tmp_path):
    from perception.data.splits import group_counts, group_of, split_pairs_by_group

    assert group_of("0006R0_f02310.png") == "0006R0"
    assert group_of("/x/y/Seq05VD_f00000.png") == "Seq05VD"
    assert group_of("cam-left-0001.png", r"^(cam-\w+)-") == "cam-left"
    with pytest.raises(ValueError, match="does not match"):
        group_of("nounderscore.png")
    with pytest.raises(ValueError, match="capture group"):
        group_of("a_b.png", r"^a_")
    pairs = [(Path(f"{d}_{i}.png"), Path(f"l{d}{i}.png")) for d, n in (("A", 3), ("B", 2), ("C", 1)) for i in range(n)]
    assert group_counts(pairs) == {"A": 3, "B": 2, "C": 1}
    kept, held = split_pairs_by_group(pairs, holdout=["B"])
    assert [p[0].name for p in held] == ["B_0.png", "B_1.png"]
    assert len(kept) == 4 and all(not p[0].name.startswith("B") for p in kept)
    with pytest.raises(ValueError, match=r"not in the data; groups \(frames\): A \(3\), B \(2\), C \(1\)"):
        split_pairs_by_group(pairs, holdout=["Z"])
    names = tmp_path / "held.txt"
    names.write_text("# frames of a new road\nimages/A_1.png\nC_0.png  extra-column-ignored\n\n")
    kept, held = split_pairs_by_group(pairs, holdout_list=names)
    assert sorted(p[0].name for p in held) == ["A_1.png", "C_0.png"]
    names.write_text("Q_9.png\n")
    with pytest.raises(ValueError, match="not in the data"):
        split_pairs_by_group(pairs, holdout_list=names)


def test_open_dataset_joins_splits_and_selects_groups(tmp_path):
    from perception.data import open_dataset

    root = _drive_dataset(tmp_path / "drives")
    both = open_dataset(root, "train+val")
    assert len(both) == 13 and both.classes == open_dataset(root, "train").classes
    assert len(open_dataset(root, "train+val", groups=["d3"])) == 3
    assert len(open_dataset(root, "train", groups=["d3"])) == 1
    assert len(open_dataset(root, "train+val", exclude_groups=["d1", "d2"])) == 3
    with pytest.raises(ValueError, match="not in the data"):
        open_dataset(root, "train", groups=["d9"])


def test_train_holds_out_a_drive_and_reports_val_only_if_unseen(tmp_path, capsys):
    from perception.train.cli import main as train_main

    root = _drive_dataset(tmp_path / "drives")
    common = ["--model", "segnet_basic", "--data", str(root), "--epochs", "2", "--crop", "32x48", "--batch-size", "2",
              "--no-progress", "--amp", "off", "--holdout", "d2"]
    out = tmp_path / "run"
    assert train_main([*common, "--out", str(out)]) == 0
    card = json.loads((out / "final" / "model.json").read_text())
    # train.txt minus d2 trains; d2's frames select; val (two d3 frames never trained on) is reported.
    assert card["training"]["train_images"] == 11 - 4
    assert card["training"]["holdout"] == ["d2"] and card["training"]["selection"] == "holdout_d2"
    assert set(card["metrics"]) == {"holdout_d2", "val"}
    # The card's held-out numbers are what perception-eval measures on that drive.
    from perception.eval.cli import main as eval_main

    js = tmp_path / "eval.json"
    assert eval_main(["--model", str(out / "final"), "--data", str(root), "--split", "train", "--groups", "d2",
                      "--json", str(js), "--no-progress"]) == 0
    ev = json.loads(js.read_text())
    assert ev["images"] == 4 and ev["groups"] == ["d2"]
    assert ev["miou"] == pytest.approx(card["metrics"]["holdout_d2"]["miou"], abs=1e-12)

    # Batch-norm recalibration at shipping runs over the frames the model trained on, never the held-out
    # drive it is then measured on.
    from perception.release import ship
    from perception.release.cli import main as ship_main

    dest = tmp_path / "models" / "recal"
    assert ship_main(["model", str(out / "final"), str(dest), "--data", str(root), "--split", "train", "--groups", "d2",
                      "--try-bn-recalibration"]) == 0
    tried = json.loads((dest / "model.json").read_text())["training"]["bn_recalibration_tried"]
    assert tried["frames"] == card["training"]["train_images"] == 7
    from types import SimpleNamespace

    from perception.core.card import load_card

    frames = ship.training_frames(load_card(out / "final"), str(root))
    assert sorted(img.name for img, _ in frames.pairs) == [f"d1_{k:04d}.png" for k in range(6)] + ["d3_0000.png"]
    held = tmp_path / "held.txt"
    held.write_text("d1_0002.png\nimages/d3_0000.png  # a path works too\n")
    by_list = SimpleNamespace(training={"train_split": "train", "holdout": ["d2"], "holdout_list": str(held)})
    assert sorted(img.name for img, _ in ship.training_frames(by_list, str(root)).pairs) == [
        f"d1_{k:04d}.png" for k in (0, 1, 3, 4, 5)]
    # int8 calibration draws from the same frames: never a held-out drive's, nor a frame held out by name.
    from perception.release.int8 import calibration_pairs

    assert sorted(Path(img).name for img, _ in calibration_pairs(by_list, str(root), "train", [], 20)) == [
        f"d1_{k:04d}.png" for k in (0, 1, 3, 4, 5)]

    # Training on train+val: val is trained on, so it is not reported.
    out2 = tmp_path / "run2"
    assert train_main([*common, "--train-split", "train+val", "--out", str(out2)]) == 0
    card2 = json.loads((out2 / "final" / "model.json").read_text())
    assert card2["training"]["train_images"] == 13 - 4 and set(card2["metrics"]) == {"holdout_d2"}
    assert "'val' is part of the training images" in capsys.readouterr().out


def test_final_run_without_selection_ships_the_last_epoch(tmp_path, capsys):
    from perception.models import io as model_io
    from perception.train.cli import main as train_main

    root = _drive_dataset(tmp_path / "drives")
    out = tmp_path / "run"
    assert train_main(["--model", "segnet_basic", "--data", str(root), "--train-split", "train+val", "--val-split",
                       "none", "--epochs", "1", "--crop", "32x48", "--batch-size", "4", "--no-progress", "--amp", "off",
                       "--out", str(out)]) == 0
    final = model_io.load(out / "final")
    last = torch.load(out / "last.pt", weights_only=True)["model"]
    for k, v in final.state_dict().items():
        assert torch.equal(v, last[k]), k
    assert final.card.metrics == {} and final.card.training["train_images"] == 13
    # Its curves have no validation panels to leave empty: train loss and lr only (1x2 at 11x4 in, 90 dpi).
    from PIL import Image

    assert Image.open(out / "curves.png").size == (990, 360)

    # Shipping it: the drive it trained on is labelled as such, and the held-out run of the same recipe
    # (which chose the number of epochs) is measured on that drive and cited, with its own command.
    heldout = tmp_path / "heldout"
    assert train_main(["--model", "segnet_basic", "--data", str(root), "--train-split", "train+val", "--holdout",
                       "d2", "--epochs", "1", "--crop", "32x48", "--batch-size", "4", "--no-progress", "--amp", "off",
                       "--out", str(heldout)]) == 0
    assert Image.open(heldout / "curves.png").size == (1170, 630)  # with a selection split: all six panels
    from perception.release.cli import main as ship_main

    dest = tmp_path / "models" / "all_data"
    flags = ["--data", str(root), "--split", "train+val", "--groups", "d2", "--also", "val"]
    capsys.readouterr()
    assert ship_main(["model", str(out / "final"), str(dest), *flags, "--recipe-run", str(out / "final")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on 4 frames of holdout_d2" in err[0]
    assert ship_main(["model", str(out / "final"), str(dest), *flags, "--recipe-run", str(heldout / "final"),
                      "--note", "trained over two stretches"]) == 0
    card = json.loads((dest / "model.json").read_text())
    assert card["extra"]["notes"] == ["trained over two stretches"]
    assert "- trained over two stretches" in (dest / "README.md").read_text()
    assert set(card["metrics"]) == {"holdout_d2", "val"}
    recipe = card["training"]["recipe_run"]
    assert recipe["train_images"] == 9 and recipe["command"].startswith("perception-train")
    assert "--holdout d2" in recipe["command"]
    from perception.eval.cli import main as eval_main

    for model_dir, got in ((heldout / "final", recipe["metrics"]["holdout_d2"]), (dest, card["metrics"]["holdout_d2"])):
        doc_path = tmp_path / "eval.json"
        assert eval_main(["--model", str(model_dir), "--data", str(root), "--split", "train+val", "--groups", "d2",
                          "--json", str(doc_path), "--no-progress"]) == 0
        assert json.loads(doc_path.read_text())["miou"] == pytest.approx(got["miou"], abs=1e-12)
    readme = (dest / "README.md").read_text()
    assert "holdout_d2 (measured; 4 of 4 frames were in training)" in readme
    assert "val (measured; 2 of 2 frames were in training)" in readme
    assert "no selection split: the last epoch ships" in readme and "the recipe's held-out run (9 images" in readme
    assert "A held-out drive is a road the model never saw" not in readme
    assert recipe["architecture"] == "segnet_basic" and "no held-out run of this network" not in readme

    # The Bayesian twin trained on everything cites the plain network's held-out run: the card says whose.
    bayes = tmp_path / "bayes"
    assert train_main(["--model", "bayesian_segnet_basic", "--data", str(root), "--train-split", "train+val",
                       "--val-split", "none", "--epochs", "1", "--crop", "32x48", "--batch-size", "4", "--no-progress",
                       "--amp", "off", "--out", str(bayes)]) == 0
    dest_b = tmp_path / "models" / "bayes"
    assert ship_main(["model", str(bayes / "final"), str(dest_b), *flags[:6], "--recipe-run", str(heldout / "final")]) == 0
    readme_b = (dest_b / "README.md").read_text()
    assert "the recipe's held-out run, `segnet_basic` (9 images" in readme_b
    assert "It trained `segnet_basic`, not `bayesian_segnet_basic`" in readme_b


@pytest.mark.parametrize(
    ("resumes", "says", "never_says"),
    [
        (None, "continued (same config) with:", "exact"),  # a run older than the record
        ([{"after_epoch": 3, "compact": False, "selection_restarted": False}], "exact resume", "compact"),
        ([{"after_epoch": 4, "compact": True, "optimizer_restarted": True, "selection_restarted": True},
          {"after_epoch": 44, "compact": True, "optimizer_restarted": True, "selection_restarted": True}],
         "after epoch 4, 44 it continued from a compact resume state", "exact"),
        ([{"after_epoch": 7, "compact": True, "optimizer_restarted": False, "selection_restarted": False}],
         "after epoch 7 it continued from a compact resume state", "moments"),  # --keep-optimizer
    ],
)
def test_ship_model_claims_an_exact_resume_only_where_the_trainer_recorded_one(resumes, says, never_says):
    from perception.release.readme import resume_lines

    training = {"resumed_with": ["perception-train --out r --resume"], "config": {"epochs": 100},
                **({"resumes": resumes} if resumes is not None else {})}
    text = "\n".join(resume_lines(training))
    assert says in text and never_says not in text and "perception-train --out r --resume" in text
    if resumes and resumes[-1]["selection_restarted"]:
        assert "the best of epochs 45-100" in text and "restarted its moments after epoch 4, 44" in text
    assert resume_lines({"config": {"epochs": 5}}) == []  # never resumed: nothing to say


def test_time_budget_chooses_epochs_once_and_resume_keeps_them(tmp_path, capsys):
    from perception.train.cli import main as train_main

    data = make_toy_dataset(tmp_path / "toy")
    out = tmp_path / "run"
    # A budget far too small for more epochs: the run stops right after its warmup epoch.
    args = ["--model", "segnet_basic", "--data", str(data), "--epochs", "50", "--warmup-epochs", "1", "--crop", "32x48",
            "--batch-size", "4", "--no-progress", "--amp", "off", "--out", str(out)]
    assert train_main([*args, "--time-budget", "0.001"]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["epochs"] == 2 and cfg["time_budget_s"] is None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    card = json.loads((out / "final" / "model.json").read_text())
    assert card["training"]["epochs_chosen_for_time_budget_s"] == 0.001
    assert "-> 2 epochs (of at most 50)" in capsys.readouterr().out


def test_robust_augmentations_are_seeded_and_leave_old_streams_alone():
    from perception.data.transforms import TrainAugment

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    lab = rng.integers(0, 5, (60, 80), dtype=np.uint8)
    old = TrainAugment(crop=(32, 48), scale=(0.75, 1.5), color_jitter=0.3, seed=5)
    same = TrainAugment(crop=(32, 48), scale=(0.75, 1.5), color_jitter=0.3, gamma=(1.0, 1.0), hue=0, blur=0, noise=0, seed=5)
    for _ in range(3):
        a, b = old(img, lab), same(img, lab)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    robust = dict(crop=(32, 48), scale=(0.5, 2.0), color_jitter=0.4, gamma=(0.5, 2.0), hue=10.0, blur=0.5, noise=8.0)
    r1, r2 = TrainAugment(**robust, seed=3), TrainAugment(**robust, seed=3)
    for _ in range(3):
        a, b = r1(img, lab), r2(img, lab)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert a[0].dtype == torch.uint8 and a[0].shape == (3, 32, 48)


def test_gamma_and_hue_against_independent_references():
    from perception.data.transforms import TrainAugment

    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    lab = np.zeros((16, 16), np.uint8)
    aug = TrainAugment(crop=None, hflip=False, gamma=(2.0, 2.0), seed=0)
    out = aug(img, lab)[0].numpy().transpose(1, 2, 0)
    np.testing.assert_array_equal(out, np.round(255 * (img / 255.0) ** 2.0).astype(np.uint8))
    # A hue shift of +120 degrees turns pure red into pure green (and green into blue).
    prim = np.zeros((4, 4, 3), np.uint8)
    prim[:2, :, 0] = 255
    prim[2:, :, 1] = 255
    aug = TrainAugment(crop=None, hflip=False, hue=120.0, seed=0)
    aug.rng = type("R", (), {"uniform": staticmethod(lambda lo, hi: 120.0), "random": staticmethod(lambda: 1.0)})()
    out = aug(prim, np.zeros((4, 4), np.uint8))[0].numpy().transpose(1, 2, 0)
    np.testing.assert_array_equal(out[:2].reshape(-1, 3), np.tile([0, 255, 0], (8, 1)))
    np.testing.assert_array_equal(out[2:].reshape(-1, 3), np.tile([0, 0, 255], (8, 1)))


def test_label_smoothing_matches_pytorch():
    import torch.nn.functional as F

    from perception.train.loss import SegmentationLoss

    logits = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 5, 6))
    target[0, 0, 0] = 255
    loss = SegmentationLoss(None, ignore_index=255, normalization="weights", label_smoothing=0.1)(logits, target)
    ref = F.cross_entropy(logits, target, ignore_index=255, label_smoothing=0.1)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    # Hand case, one pixel, two classes: (1 - eps) * CE(true) + eps * mean over classes of CE.
    lg = torch.tensor([[[[2.0]], [[0.0]]]], dtype=torch.float64)
    lp = torch.log_softmax(lg[0, :, 0, 0], 0)
    expected = -(0.9 * lp[0] + 0.1 * lp.mean())
    got = SegmentationLoss(None, label_smoothing=0.1)(lg, torch.zeros(1, 1, 1, dtype=torch.long))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)  # the loss runs in fp32


def test_flip_tta_averages_the_logits_of_the_mirror(toy_model):
    from perception.data.transforms import normalize
    from perception.eval.evaluate import predict_labels
    from perception.models import io as model_io

    model = model_io.load(toy_model[1]).double()
    spec = model.card.input
    imgs = torch.randint(0, 256, (2, 3, 48, 64), dtype=torch.uint8)
    labels, _ = predict_labels(model, imgs, spec, tta="flip")
    x = normalize(imgs, spec).double()
    with torch.no_grad():
        ref = (model(x) + model(x.flip(-1)).flip(-1)).argmax(1)
    assert torch.equal(labels, ref)
    # A mirror-symmetric image gives a mirror-symmetric mask under flip TTA.
    sym = torch.cat([imgs[..., :32], imgs[..., :32].flip(-1)], -1)
    out, _ = predict_labels(model, sym, spec, tta="flip")
    assert torch.equal(out, out.flip(-1))
    with pytest.raises(ValueError, match="tta"):
        predict_labels(model, imgs, spec, tta="rotate")


def test_fp16_model_folder_loads_into_fp32_and_predicts_alike(toy_model, tmp_path):
    from perception.models import io as model_io

    model = model_io.load(toy_model[1])
    model_io.save(model, tmp_path / "half", model.card, weights_dtype=torch.float16)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "half" / model_io.WEIGHTS_FILE))
    assert {v.dtype for v in stored.values()} <= {torch.float16, torch.int64}
    half = (tmp_path / "half" / model_io.WEIGHTS_FILE).stat().st_size
    assert half < 0.55 * (toy_model[1] / model_io.WEIGHTS_FILE).stat().st_size
    half = model_io.load(tmp_path / "half")
    assert half.card.training["weights_dtype"] == "float16"
    assert all(p.dtype == torch.float32 for p in half.parameters())
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        a, b = model(x), half(x)
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.99
    with pytest.raises(ValueError, match="does not fit"):
        model_io.cast_floating({"w": torch.tensor([1e6])}, torch.float16)


def test_train_many_runs_a_sweep_and_tabulates_it(tmp_path):
    data = make_toy_dataset(tmp_path / "toy")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "common": ["--data", str(data), "--epochs", "1", "--crop", "32x48", "--batch-size", "4", "--no-progress",
                   "--amp", "off"],
        "runs": {"plain": ["--model", "segnet_basic"], "smooth": ["--model", "segnet_basic", "--label-smoothing", "0.1"]},
    }))
    out = tmp_path / "runs"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "train_many.py"), str(sweep), "--out", str(out),
                        "--threads", "1", "--", "--seed", "3"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((out / "sweep.json").read_text())
    assert [row["run"] for row in rows] == ["plain", "smooth"] and all(row["rc"] == 0 for row in rows)
    for row in rows:
        card = json.loads((out / row["run"] / "final" / "model.json").read_text())
        assert row["val mIoU"] == round(100 * card["metrics"]["val"]["miou"], 1)
        assert card["training"]["config"]["seed"] == 3
    assert "| plain |" in (out / "sweep.md").read_text()
    # pack_runs: every run's logs, and fp16 model folders that perception loads.
    packed = tmp_path / "packed"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "pack_runs.py"), str(out), str(packed), "--rank-by", "val",
                        "--chunk-mib", "0.1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    parts = sorted(packed.glob("part.tar.*"))
    assert len(parts) > 1
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        tar.extractall(unpacked, filter="data")
    from perception.models import io as model_io

    m = model_io.load(unpacked / "plain" / "model")
    assert m.card.training["weights_dtype"] == "float16" and (unpacked / "plain.log").is_file()


def test_flip_tta_in_the_exported_graph_and_the_node_backends(toy_model, tmp_path):
    from perception.inference.onnxruntime import OnnxRuntimeBackend
    from perception.inference.torch import TorchBackend
    from perception.export.onnx import ExportOptions, export_onnx, read_onnx_metadata
    from perception.export.verify import synthetic_frame
    from perception.stream.node.cli import NodeConfig, node_backend

    path = export_onnx(toy_model[1], tmp_path / "tta.onnx", ExportOptions(tta="flip", size=(48, 64)))
    assert read_onnx_metadata(path)["segnet.tta"] == "flip"
    frames = np.stack([synthetic_frame(48, 64, seed=s) for s in range(2)])
    ort_labels = np.concatenate([OnnxRuntimeBackend(path).infer(f[None]).labels for f in frames])
    torch_tta = TorchBackend(toy_model[1], tta="flip").infer(frames).labels
    plain = TorchBackend(toy_model[1]).infer(frames).labels
    assert (ort_labels == torch_tta).mean() > 0.999
    # What the flip TTA computes, from two plain passes: mean of the logits of the frame and its mirror.
    from perception.models import io as model_io
    from perception.data.transforms import normalize

    model = model_io.load(toy_model[1])
    x = normalize(torch.from_numpy(frames[..., ::-1].copy()).permute(0, 3, 1, 2), model.card.input)
    with torch.no_grad():
        ref = ((model(x) + model(x.flip(-1)).flip(-1)) / 2).argmax(1).numpy()
    assert (torch_tta == ref).mean() > 0.999 and plain.shape == torch_tta.shape
    # The node: a folder is exported with the TTA; an .onnx without it is refused with a clear error.
    b = node_backend(NodeConfig(model=str(toy_model[1]), tta="flip", backend="onnxruntime"))
    assert read_onnx_metadata(b.path)["segnet.tta"] == "flip"
    plain_onnx = export_onnx(toy_model[1], tmp_path / "plain.onnx", ExportOptions(size=(48, 64)))
    with pytest.raises(ValueError, match="exported with --tta flip"):
        node_backend(NodeConfig(model=str(plain_onnx), tta="flip"))


def test_eval_runs_an_exported_model_through_the_node_backend(toy_model, tmp_path, capsys):
    from perception.eval.cli import main as eval_main
    from perception.export.onnx import ExportOptions, export_onnx

    data, folder = toy_model
    onnx_path = export_onnx(folder, tmp_path / "m.onnx", ExportOptions())
    a, b = tmp_path / "folder.json", tmp_path / "onnx.json"
    assert eval_main(["--model", str(folder), "--data", str(data), "--json", str(a), "--no-progress"]) == 0
    assert eval_main(["--model", str(onnx_path), "--data", str(data), "--json", str(b), "--no-progress",
                      "--save-predictions", str(tmp_path / "pred")]) == 0
    fa, fb = json.loads(a.read_text()), json.loads(b.read_text())
    assert fb["backend"] == "onnxruntime" and fa["backend"] == "torch"
    assert fb["miou"] == pytest.approx(fa["miou"], abs=0.01)
    assert len(list((tmp_path / "pred").glob("*.png"))) == fb["images"]
    assert eval_main(["--model", str(onnx_path), "--data", str(data), "--tta", "flip"]) == 2
    assert "export with --tta flip" in capsys.readouterr().err


def test_resume_that_changed_options_is_not_called_the_same_config():
    from perception.release.readme import resume_lines

    start = "perception-train --data d --epochs 120 --lr 2e-3 --out r"
    commands = [f"{start} --resume", "perception-train --data d --epochs 80 --lr 2e-3 --out r --resume",
                "perception-train --data d --epochs 80 --lr 2e-3 --out r --resume"]
    resumes = [{"after_epoch": e, "compact": False, "optimizer_restarted": False, "selection_restarted": False}
               for e in (5, 34, 40)]
    text = "\n".join(resume_lines({"command": start, "resumed_with": commands, "resumes": resumes,
                                   "config": {"epochs": 80}}))
    assert "same config" not in text and "exact resume" not in text
    assert "after epoch 34: `--epochs 80` (was `--epochs 120`)" in text and "after epoch 40" not in text
    assert "no single command reproduces it" in text and "new length" in text
    # The same command each time: the claim stands.
    same = resume_lines({"command": start, "resumed_with": [f"{start} --resume"], "resumes": resumes[:1],
                         "config": {"epochs": 120}})
    assert "(same config, exact resume)" in same[0]
    # A run stopped inside an epoch says how far into it each resume took it up.
    inside = [{**resumes[1], "compact": True, "optimizer_restarted": True, "after_batch": 23}]
    text = resume_lines({"command": start, "resumed_with": [commands[1]], "resumes": inside, "config": {"epochs": 80}})[0]
    assert "after epoch 34 and 23 batches: `--epochs 80`" in text
    assert "after epoch 34 and 23 batches it continued from a compact resume state" in text


def test_card_gives_each_machine_its_epochs_and_hours(tmp_path):
    from types import SimpleNamespace

    from perception.release.readme import ReadmeInputs, _training_time
    from perception.release.ship import _run_history

    zen4, zen3 = "AMD EPYC (AVX-512 VNNI BF16, 2 cores), bf16", "AMD EPYC (AVX2, 2 cores), fp32"
    rows = ([{"epoch": e, "epoch_seconds": 400.0} for e in (1, 2)]  # before the trainer named machines
            + [{"epoch": e, "epoch_seconds": 380.0 + e, "machine": zen4} for e in (3, 4, 5)]
            + [{"epoch": e, "epoch_seconds": 2000.0, "machine": zen3} for e in (6, 7)])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    card = SimpleNamespace(training={"machine": {"cpu": "AMD EPYC"}})
    history = _run_history(card, tmp_path)
    t = card.training
    assert [(s["epochs"], s["machine"], s["epochs_count"]) for s in t["stretches"]] == [
        ([1, 2], None, 2), ([3, 5], zen4, 3), ([6, 7], zen3, 2)]
    assert t["stretches"][1]["median_epoch_seconds"] == 384.0
    assert t["stretches"][2]["hours"] == round(4000 / 3600, 3)
    assert t["train_hours"] == round(sum(r["epoch_seconds"] for r in rows) / 3600, 3)
    assert t["idle_hours"] == round((2 * 400 + 3 * 384 + 2 * 2000) / 3600, 3)  # each machine at its own median
    x = ReadmeInputs(card=card, parameters=0, rows=[], split_name="s", metrics={}, data="d", status="final",
                     dest=tmp_path, run_dir=tmp_path, history=history)
    text = "\n".join(_training_time(x))
    assert f"- epochs 3-5: 0.32 h on {zen4}; median epoch 384 s" in text and f"- epochs 6-7: 1.11 h on {zen3}" in text
    assert "- epochs 1-2: 0.22 h on a machine the trainer did not record" in text
    assert "on the machine above" not in text
    # One machine throughout: one line, as before.
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({**r, "machine": zen4}) + "\n" for r in rows))
    card = SimpleNamespace(training={"machine": {"cpu": "AMD EPYC"}})
    _run_history(card, tmp_path)
    assert "stretches" not in card.training
