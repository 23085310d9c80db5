"""perception-eval and perception-predict: output formats, and agreement with an independent count."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from perception.data.loading import open_dataset
from perception.eval.cli import main as eval_main
from perception.models import load
from perception.inference.predict import main as predict_main


def test_eval_json_and_predictions(toy_model, tmp_path, capsys):
    data, model_dir = toy_model
    out_json, pred_dir = tmp_path / "m.json", tmp_path / "pred"
    assert eval_main(["--model", str(model_dir), "--data", str(data), "--split", "val", "--json", str(out_json),
                      "--save-predictions", str(pred_dir), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "mIoU" in table and "BF" in table and "bg" in table
    doc = json.loads(out_json.read_text())
    for k in ("global_accuracy", "class_accuracy", "miou", "bf"):
        assert 0.0 <= doc[k] <= 1.0
    assert set(doc["per_class"]) == {"bg", "a", "b"}

    ds = open_dataset(data, "val")
    model = load(model_dir)
    correct = total = 0
    for img_path, lab_path in ds.pairs:
        pred = cv2.imread(str(pred_dir / (img_path.stem + ".png")), cv2.IMREAD_UNCHANGED)
        lab = cv2.imread(str(lab_path), cv2.IMREAD_UNCHANGED)
        assert pred.dtype == np.uint8 and pred.shape == lab.shape and pred.max() < 3
        # The saved PNG is what the model predicts for that image.
        rgb = cv2.cvtColor(cv2.imread(str(img_path)), cv2.COLOR_BGR2RGB)
        from perception.data.transforms import normalize

        x = normalize(torch.from_numpy(rgb).permute(2, 0, 1)[None], model.card.input)
        with torch.no_grad():
            assert np.array_equal(model(x).argmax(1)[0].numpy(), pred)
        valid = lab != 255
        correct += int((pred[valid] == lab[valid]).sum())
        total += int(valid.sum())
    assert doc["global_accuracy"] == pytest.approx(correct / total)


def test_eval_errors(toy_model, tmp_path, capsys):
    data, model_dir = toy_model
    assert eval_main(["--model", str(tmp_path / "missing"), "--data", str(data)]) == 2
    assert eval_main(["--model", str(model_dir), "--data", str(data), "--split", "test"]) == 2
    assert eval_main(["--model", str(model_dir), "--data", str(data), "--mc-samples", "4"]) == 2
    err = capsys.readouterr().err
    assert "no split 'test'" in err and "needs a model with dropout" in err


def test_predict_writes_masks_and_overlays(toy_model, tmp_path):
    data, model_dir = toy_model
    imgs = sorted((data / "val" / "images").iterdir())
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "out"
    assert predict_main([str(data / "val" / "images"), "--model", str(model_dir), "--out", str(out),
                         "--save-labels"]) == 0
    for p in imgs:
        mask = cv2.imread(str(out / f"{p.stem}_mask.png"))
        over = cv2.imread(str(out / f"{p.stem}_overlay.png"))
        labels = cv2.imread(str(out / f"{p.stem}_labels.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == over.shape == (*labels.shape, 3)
        palette = load(model_dir).card.palette
        r, g, b = palette[int(labels[-1, -1])]
        assert tuple(mask[-1, -1]) == (b, g, r)  # BGR on disk
    # A broken file is reported and counted, the others still written.
    assert predict_main([str(bad), str(imgs[0]), "--model", str(model_dir), "--out", str(tmp_path / "o2")]) == 1
    assert predict_main([str(tmp_path / "nope.png"), "--model", str(model_dir), "--out", str(out)]) == 2


def test_mc_dropout_eval_and_uncertainty_maps(toy_bayesian_model, tmp_path, capsys):
    data, model_dir = toy_bayesian_model
    out_json = tmp_path / "mc.json"
    assert eval_main(["--model", str(model_dir), "--data", str(data), "--split", "val", "--mc-samples", "3",
                      "--json", str(out_json), "--no-progress"]) == 0
    doc = json.loads(out_json.read_text())
    assert doc["mc_samples"] == 3 and 0.0 <= doc["miou"] <= 1.0
    assert "3 MC samples" in capsys.readouterr().out
    # Same seed, same dropout masks: the MC evaluation reproduces exactly.
    again = tmp_path / "mc_again.json"
    assert eval_main(["--model", str(model_dir), "--data", str(data), "--split", "val", "--mc-samples", "3",
                      "--json", str(again), "--no-progress"]) == 0
    assert json.loads(again.read_text())["confusion"] == doc["confusion"] and doc["seed"] == 0
    # ... and evaluate() leaves its caller's random state as it found it.
    from perception.data.transforms import ToTensors
    from perception.eval.evaluate import evaluate

    model = load(model_dir)
    rng_before = torch.random.get_rng_state()
    evaluate(model, open_dataset(data, "val", transform=ToTensors()), model.card.input, mc_samples=2, progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    out = tmp_path / "pred"
    img = sorted((data / "val" / "images").iterdir())[0]
    assert predict_main([str(img), "--model", str(model_dir), "--out", str(out), "--uncertainty"]) == 0
    heat = cv2.imread(str(out / f"{img.stem}_uncertainty.png"))
    assert heat is not None and heat.shape[:2] == (48, 64)


def test_postprocess_helpers():
    import numpy as np

    from perception.inference.postprocess import classes_present, colorize, draw_legend, overlay, palette_lut

    labels = np.array([[0, 2], [2, 11]], np.uint8)  # 11 = void, beyond the palette
    lut = palette_lut([(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    color = colorize(labels, lut)
    assert color[0, 0].tolist() == [0, 0, 255] and color[0, 1].tolist() == [255, 0, 0]  # BGR
    assert color[1, 1].tolist() == [0, 0, 0]
    assert classes_present(labels, 3).tolist() == [0, 2]
    frame = np.full((2, 2, 3), 100, np.uint8)
    assert overlay(frame, color, 0.0).tolist() == frame.tolist()
    assert overlay(frame, color, 1.0).tolist() == color.tolist()
    big = np.zeros((120, 160, 3), np.uint8)
    out = draw_legend(big, ["a", "b", "c"], [(255, 0, 0), (0, 255, 0), (0, 0, 255)], present=[0, 2])
    assert out is not big and out.any() and not big.any()  # drawn on a copy unless in_place


@pytest.mark.parametrize("weights_dtype", ["float32", "float16"])
def test_ship_model_card_is_reproduced_by_perception_eval(weights_dtype, toy_bayesian_model, tmp_path, capsys):
    """perception-ship model measures the card's numbers; perception-eval of the shipped folder must print the
    same ones, also where the folder stores the weights at half precision."""
    from perception.release.cli import main as ship_main

    data, model_dir = toy_bayesian_model
    dest = tmp_path / "models" / "toy_shipped"
    assert ship_main(["model", str(model_dir), str(dest), "--data", str(data), "--mc-samples", "2", "--try-bn-recalibration",
                      "--training-command", "perception-train --model bayesian_segnet_basic",
                      "--weights-dtype", weights_dtype]) == 0
    card = json.loads((dest / "model.json").read_text())
    assert card["id"] == "toy_shipped" and set(card["metrics"]) == {"val", "val_mc2"}
    assert card["training"]["command"] == "perception-train --model bayesian_segnet_basic"
    assert "miou_after" in card["training"]["bn_recalibration_tried"]
    readme = (dest / "README.md").read_text()
    assert "MC dropout 2 samples" in readme and "perception-eval --model" in readme
    for extra, key in (([], "val"), (["--mc-samples", "2"], "val_mc2")):
        out = tmp_path / f"{key}.json"
        assert eval_main(["--model", str(dest), "--data", str(data), "--split", "val", "--json", str(out),
                          "--no-progress", *extra]) == 0
        doc = json.loads(out.read_text())
        for k in ("global_accuracy", "class_accuracy", "miou", "bf"):
            assert doc[k] == pytest.approx(card["metrics"][key][k], abs=1e-12), (key, k)


def test_benchmark_times_and_scores_mc_dropout_only_for_a_bayesian_model(toy_bayesian_model, toy_model, tmp_path):
    """tools/benchmark.py's MC rows run the node's uncertainty path; a model without dropout is an error row."""
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).parents[1] / "tools" / "benchmark.py"
    docs = {}
    for name, (data, model_dir) in (("bayesian", toy_bayesian_model), ("plain", toy_model)):
        out = tmp_path / f"{name}.json"
        r = subprocess.run([sys.executable, str(tool), "--model", str(model_dir), "--backends", "torch-mc8",
                            "--runs", "2", "--warmup", "1", "--rounds", "1", "--threads", "1", "--data", str(data),
                            "--json", str(out)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        docs[name] = {row["backend"]: row for row in json.loads(out.read_text())["results"]}
    bayes = docs["bayesian"]
    assert set(bayes) == {"torch", "torch-mc8"} and not any("error" in row for row in bayes.values())
    assert 0.0 <= bayes["torch-mc8"]["val_miou"] <= 1.0 and bayes["torch-mc8"]["ratio_vs_torch_fp32"] > 0
    assert "error" not in docs["plain"]["torch"] and "needs a model with dropout" in docs["plain"]["torch-mc8"]["error"]


def test_benchmark_versus_times_two_models_backend_by_backend(toy_bayesian_model, toy_model, tmp_path):
    """Issue 46: one run times both models, interleaved per round, and the second model's rows carry their
    speed-up over the first model's row of the same backend."""
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).parents[1] / "tools" / "benchmark.py"
    out = tmp_path / "versus.json"
    r = subprocess.run([sys.executable, str(tool), "--model", str(toy_model[1]), "--versus", str(toy_bayesian_model[1]),
                        "--backends", "onnxruntime", "--runs", "2", "--warmup", "1", "--rounds", "2", "--threads", "1",
                        "--json", str(out), "--work-dir", str(tmp_path / "work")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    rows = {row["backend"]: row for row in doc["results"]}
    other = Path(toy_bayesian_model[1]).name
    # The exported graphs sit in one folder per model, named after it (both toy folders are called final).
    assert {p.name for p in (tmp_path / "work").iterdir()} == {"final", "final_versus"}
    assert rows[f"onnxruntime [{other}]"]["onnx"] == str(tmp_path / "work" / "final_versus" / "onnxruntime.onnx")
    assert set(rows) == {"torch", f"torch [{other}]", "onnxruntime", f"onnxruntime [{other}]"}, set(rows)
    versus = rows[f"onnxruntime [{other}]"]
    assert versus[f"speedup_vs_{Path(toy_model[1]).name}"] > 0 and len(versus["round_median_ms"]) == 2
    assert rows["onnxruntime"]["ratio_vs_torch_fp32"] > 0 and doc["versus"] == str(toy_bayesian_model[1])
