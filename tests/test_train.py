"""Training: loss normalisation, config precedence, resume equivalence, DDP on CPU (gloo, 2 processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from perception.models import load
from perception.train.checkpoint import load_checkpoint
from perception.train.cli import main as train_main
from perception.train.loop import machine_label
from perception.train.config import build_config
from perception.train.loss import SegmentationLoss

TINY = ["--model", "segnet_basic", "--crop", "32x48", "--batch-size", "2", "--no-progress", "--amp", "off",
        "--lr", "0.01", "--optimizer", "adamw", "--schedule", "cosine", "--class-weights", "median"]


def test_loss_normalisation_caffe_vs_pytorch():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0, :] = 255
    w = torch.tensor([0.5, 2.0, 4.0])
    valid = target != 255
    logp = torch.log_softmax(logits, 1)
    nll = -logp.gather(1, target.clamp(max=2)[:, None])[:, 0]
    pix_w = w.double()[target.clamp(max=2)]
    caffe = (nll * pix_w)[valid].sum() / valid.sum()  # Caffe: divide by non-void pixel count
    pytorch = (nll * pix_w)[valid].sum() / pix_w[valid].sum()  # PyTorch: divide by summed weights
    got_caffe = SegmentationLoss(w, ignore_index=255, normalization="valid_pixels")(logits.float(), target)
    got_pt = SegmentationLoss(w, ignore_index=255, normalization="weights")(logits.float(), target)
    assert got_caffe.item() == pytest.approx(caffe.item(), rel=1e-5)
    assert got_pt.item() == pytest.approx(pytorch.item(), rel=1e-5)
    assert got_pt.item() == pytest.approx(F.cross_entropy(logits, target, weight=w.double(), ignore_index=255).item())
    assert got_caffe.item() != pytest.approx(got_pt.item(), rel=1e-3)


def test_config_precedence_recipe_yaml_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("recipe: paper\nepochs: 7\nlr: 0.05\n")
    cfg = build_config(yaml_file=y, overrides={"lr": 0.2})
    assert cfg.recipe == "paper" and cfg.optimizer == "sgd" and cfg.class_weights == "reference"
    assert cfg.epochs == 7 and cfg.lr == 0.2 and cfg.crop is None
    assert build_config(overrides={"recipe": "paper", "model": "segnet"}).lr == 0.001  # paper lr for SegNet
    assert build_config(overrides={"recipe": "paper"}).lr == 0.1  # Basic family
    y.write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown config keys"):
        build_config(yaml_file=y)


def _state(out: Path) -> dict:
    return load_checkpoint(out / "last.pt")["model"]


def test_train_writes_outputs_and_rebuilds_from_folder(toy_data, tmp_path):
    out = tmp_path / "run"
    assert train_main([*TINY, "--data", str(toy_data), "--out", str(out), "--epochs", "2"]) == 0
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "last.pt", "summary.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"val_global_accuracy", "val_class_accuracy", "val_miou", "val_bf"} <= set(rows[-1])
    model = load(out / "final")
    assert model.card.classes == ["bg", "a", "b"]
    assert model.card.training["command"].startswith("perception-train")
    assert model.card.metrics["val"]["miou"] == pytest.approx(json.loads((out / "summary.json").read_text())["final_val"]["miou"])
    # A second run into the same folder without --resume is refused, not silently overwritten.
    assert train_main([*TINY, "--data", str(toy_data), "--out", str(out), "--epochs", "2"]) == 2


def test_resume_after_kill_equals_uninterrupted(toy_data, tmp_path):
    args = [*TINY, "--data", str(toy_data), "--epochs", "3", "--model", "bayesian_segnet_basic", "--val-every", "3"]
    ref = tmp_path / "ref"
    assert train_main([*args, "--out", str(ref)]) == 0

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "perception.train.cli", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            hist = out / "metrics.jsonl"
            if hist.exists() and hist.read_text().count("\n") >= 1 and (out / "last.pt").exists():
                break
            if proc.poll() is not None:
                pytest.fail("training exited before it could be killed")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    ck = load_checkpoint(out / "last.pt")
    assert ck["state"]["epoch"] < 3, "the run finished before it was killed; nothing was resumed"
    assert train_main([*args, "--out", str(out), "--resume"]) == 0
    epochs = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3], "history rows of the re-run epoch must not be duplicated"
    a, b = _state(ref), _state(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The shipped card names the command that started the run, and the resumes after it.
    training = json.loads((out / "final" / "model.json").read_text())["training"]
    assert "--resume" not in training["command"] and training["command"].startswith("perception-train ")
    assert len(training["resumed_with"]) == 1 and "--resume" in training["resumed_with"][0]
    (resume,) = training["resumes"]
    assert resume["after_epoch"] == ck["state"]["epoch"]
    assert resume["compact"] is False and resume["optimizer_restarted"] is False and resume["selection_restarted"] is False
    # The summary's training time counts every stretch's epochs, not just the resumed process's.
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["training_seconds"] == round(sum(r["epoch_seconds"] for r in rows), 1)
    assert summary["training_seconds"] > sum(r["epoch_seconds"] for r in rows if r["epoch"] > ck["state"]["epoch"])
    assert summary["wall_seconds_this_process"] > 0
    # Each epoch and the resume name the machine and precision that ran them: a run resumed on another
    # machine can say which trained which epochs (cards sum their hours per machine).
    label = machine_label(torch.device("cpu"), "off")
    assert label.endswith(", fp32") and os.cpu_count() is not None and f"{os.cpu_count()} cores" in label
    assert [r["machine"] for r in rows] == [label] * 3 and resume["machine"] == label


def _signal_at_steps(monkeypatch, steps: set[int], signum: int = signal.SIGTERM) -> None:
    """Deliver ``signum`` to this process right after the training steps numbered in ``steps`` (1-based), as
    a user's Ctrl-C or a scheduler's SIGTERM would arrive while the run trains."""
    import perception.train.loop as loop

    count = {"n": 0}
    train_step = loop._train_step

    def step_then_signal(*args, **kwargs):
        loss = train_step(*args, **kwargs)
        count["n"] += 1
        if count["n"] in steps:
            signal.raise_signal(signum)
        return loss

    monkeypatch.setattr(loop, "_train_step", step_then_signal)


# 8 toy images in batches of 2: 4 steps an epoch, 12 in 3 epochs. Step 6 lands inside epoch 2, step 4 on
# epoch 1's last batch (the run checkpoints that epoch and stops before the next), step 12 before the final
# evaluations (the resume does only them). With loader workers, the augmentation runs in them: the replay
# must set their streams too.
@pytest.mark.parametrize("at_step, stopped_at, workers", [(6, (1, 2), 0), (4, (1, 0), 0), (12, (3, 0), 0),
                                                          (7, (1, 3), 2)])
def test_stop_on_signal_checkpoints_where_it_is_and_resumes_as_uninterrupted(toy_data, tmp_path, monkeypatch,
                                                                           capsys, at_step, stopped_at, workers):
    # Bayesian SegNet-Basic: its dropout draws from the global RNG in every step, so a resume that did not
    # restore the streams of the step it stopped after would train on other masks.
    args = [*TINY, "--data", str(toy_data), "--epochs", "3", "--model", "bayesian_segnet_basic", "--val-every", "1",
            "--num-workers", str(workers)]
    ref = tmp_path / "ref"
    assert train_main([*args, "--out", str(ref)]) == 0
    before = signal.getsignal(signal.SIGTERM)

    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        _signal_at_steps(m, {at_step})
        assert train_main([*args, "--out", str(out)]) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before, "the trainer's handler outlived its run"
    err = capsys.readouterr().err
    epoch, batch = stopped_at
    where = f"in epoch {epoch + 1} after batch {batch} of 4" if batch else f"after epoch {epoch}"
    assert f"stopped {where}; {out / 'last.pt'} holds it" in err
    state = load_checkpoint(out / "last.pt")["state"]
    assert (state["epoch"], state["batch"], state["step"]) == (epoch, batch, at_step)
    assert not (out / "final").exists()
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, epoch + 1))

    assert train_main([*args, "--out", str(out), "--resume"]) == 0
    a, b = _state(ref), _state(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # The cut epoch's record adds both stretches: its loss is the uninterrupted epoch's, over all its batches.
    for r, q in zip(rows, ref_rows):
        assert r["train_loss"] == pytest.approx(q["train_loss"], rel=1e-12) and r["val_miou"] == q["val_miou"]
        assert r.get("resumed_after_batch") == (batch if batch and r["epoch"] == epoch + 1 else None)
    if epoch < 3:  # the resume trained, so the checkpoint holds its record (the card's, where best/ follows it)
        (resume,) = load_checkpoint(out / "last.pt")["state"]["resumes"]
        assert resume["after_epoch"] == epoch and resume.get("after_batch", 0) == batch


def test_stop_on_signal_asks_once_and_aborts_on_the_second():
    from perception.train.cli import StopOnSignal

    before = signal.getsignal(signal.SIGINT)
    with StopOnSignal() as stop:
        assert not stop()
        signal.raise_signal(signal.SIGINT)
        assert stop() and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) == before


def test_a_resume_that_would_split_batches_differently_is_refused(toy_data, tmp_path, monkeypatch, capsys):
    args = [*TINY, "--data", str(toy_data), "--epochs", "2"]
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _signal_at_steps(m, {3})
        assert train_main([*args, "--out", str(out)]) == 128 + signal.SIGTERM
    # Batch 3 of 4 done; batches of 4 give 2 an epoch, so batch 3 names no point of this run.
    capsys.readouterr()
    assert train_main([*args, "--out", str(out), "--resume", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("perception-train:") and "after batch 3" in err and "batch size" in err and "\n" not in err


def test_a_compact_state_stopped_inside_an_epoch_resumes_there(toy_data, tmp_path, monkeypatch, capsys):
    # The working-stretch routine: stop the trainer mid-epoch, commit a compact copy, resume elsewhere from it.
    import importlib.util
    import shutil

    args = [*TINY, "--data", str(toy_data), "--epochs", "2"]
    out, moved = tmp_path / "run", tmp_path / "moved"
    with monkeypatch.context() as m:
        _signal_at_steps(m, {3})
        assert train_main([*args, "--out", str(out)]) == 128 + signal.SIGTERM
    spec = importlib.util.spec_from_file_location("compact", Path(__file__).parents[1] / "tools" / "compact_resume_state.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    moved.mkdir()
    shutil.copy(out / "config.yaml", moved / "config.yaml")
    capsys.readouterr()
    assert tool.main([str(out / "last.pt"), str(moved / "last.pt")]) == 0
    assert "in epoch 1 after batch 3" in capsys.readouterr().out
    assert train_main(["--out", str(moved), "--resume", "--data", str(toy_data), "--no-progress"]) == 0
    assert "resuming" in (said := capsys.readouterr().out) and "in epoch 1 after batch 3 of 4" in said
    rows = [json.loads(x) for x in (moved / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"], r.get("resumed_after_batch")) for r in rows] == [(1, 4, 3), (2, 8, None)]
    (resume,) = load_checkpoint(moved / "last.pt")["state"]["resumes"]
    assert (resume["after_epoch"], resume["after_batch"], resume["compact"], resume["optimizer_restarted"]) == (0, 3, True, True)


def test_compiled_training_matches_eager(toy_data, tmp_path):
    # --compile changes how the step runs, not what it computes: the first epoch's loss (one step, before
    # any update) matches eager to float tolerance, later ones closely, and the checkpoint and the shipped
    # folder hold the plain module's names.
    args = [*TINY, "--data", str(toy_data), "--epochs", "2", "--max-iters-per-epoch", "1", "--val-every", "2"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert train_main([*args, "--out", str(eager)]) == 0
    assert train_main([*args, "--out", str(compiled), "--compile"]) == 0
    rows = [[json.loads(x)["train_loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
            for out in (eager, compiled)]
    assert rows[1][0] == pytest.approx(rows[0][0], rel=1e-4)
    assert rows[1][1] == pytest.approx(rows[0][1], rel=2e-2)
    assert _state(compiled).keys() == _state(eager).keys()
    assert load(compiled / "final").card.training["config"]["compile"] is True


def test_compact_resume_state_moves_a_run_to_another_folder(toy_data, tmp_path, capsys):
    import importlib.util
    import shutil

    from perception.models.registry import get_model

    out = tmp_path / "run"
    assert train_main([*TINY, "--data", str(toy_data), "--epochs", "2", "--out", str(out)]) == 0
    spec = importlib.util.spec_from_file_location("compact", Path(__file__).parents[1] / "tools" / "compact_resume_state.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):  # what training_state/ carries; no best/ folder
        shutil.copy(out / name, moved / name)
    assert tool.main([str(out / "last.pt"), str(moved / "last.pt"), "--max-mb", "1e-4"]) == 1
    assert not (moved / "last.pt").exists()  # over the limit: nothing written
    assert tool.main([str(out / "last.pt"), str(moved / "last.pt")]) == 0
    full, small = load_checkpoint(out / "last.pt"), load_checkpoint(moved / "last.pt")
    assert "optimizer" not in small and small["compact"] == {"dtype": "float16", "optimizer": False}
    assert (moved / "last.pt").stat().st_size < 0.6 * (out / "last.pt").stat().st_size
    # Loading casts back to float32: the weights are the originals rounded once to fp16.
    net = get_model("segnet_basic", num_classes=3)
    net.load_state_dict(small["model"])
    for k, v in net.state_dict().items():
        ref = full["model"][k]
        assert v.dtype == ref.dtype and torch.equal(v, ref.half().to(ref.dtype) if ref.is_floating_point() else ref), k

    capsys.readouterr()
    assert train_main(["--out", str(moved), "--resume", "--data", str(toy_data), "--epochs", "3", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "without optimiser moments" in err and "best is missing" in err
    rows = [json.loads(x) for x in (moved / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1].get("best") is True  # selection restarted
    training = load(moved / "final").card.training
    assert training["epoch"] == 3
    assert [(r["after_epoch"], r["compact"], r["optimizer_restarted"], r["selection_restarted"])
            for r in training["resumes"]] == [(2, True, True, True)]

    # Keeping the optimiser (bf16 moments): resume loads them cast to float32, with nothing to restart.
    moved2 = tmp_path / "moved2"
    shutil.copytree(moved, moved2, ignore=shutil.ignore_patterns("last.pt", "final", "best"))
    (moved2 / "metrics.jsonl").write_text("".join(f"{json.dumps(r)}\n" for r in rows[:2]))
    assert tool.main([str(out / "last.pt"), str(moved2 / "last.pt"), "--keep-optimizer", "--dtype", "bfloat16"]) == 0
    kept = load_checkpoint(moved2 / "last.pt")
    assert kept["compact"] == {"dtype": "bfloat16", "optimizer": True}
    assert all(st["exp_avg"].dtype == torch.bfloat16 for st in kept["optimizer"]["state"].values())
    capsys.readouterr()
    assert train_main(["--out", str(moved2), "--resume", "--data", str(toy_data), "--epochs", "3", "--no-progress"]) == 0
    assert "without optimiser moments" not in capsys.readouterr().err
    assert [(r["compact"], r["optimizer_restarted"]) for r in load(moved2 / "final").card.training["resumes"]] == [(True, False)]


def test_resume_without_checkpoint_is_an_error(toy_data, tmp_path, capsys):
    assert train_main([*TINY, "--data", str(toy_data), "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_ddp_two_processes_on_cpu_gloo(toy_data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "perception.train.cli", *TINY, "--data", str(toy_data), "--out", str(out), "--epochs", "2"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2, "rank 0 alone writes the history"
    # 8 images, 2 processes x batch 2: 2 steps per epoch (each process sees half the data).
    assert rows[-1]["step"] == 4
    assert (out / "final" / "weights.safetensors").is_file()


def test_batch_norm_recalibration_is_the_dataset_average():
    from perception.models.io import InputSpec
    from perception.train.loop import recalibrate_batch_norm

    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
    model = torch.nn.Sequential(conv, bn).eval()
    bn.running_mean.fill_(5.0)  # stale statistics that must be replaced
    images = [torch.randint(0, 256, (3, 6, 8), dtype=torch.uint8) for _ in range(5)]
    dataset = [(img, torch.zeros(6, 8, dtype=torch.int64)) for img in images]
    spec = InputSpec(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    recalibrate_batch_norm(model, dataset, spec, device="cpu", progress=False)
    from perception.data.transforms import normalize

    with torch.no_grad():
        feats = [conv(normalize(img[None], spec)) for img in images]
    means = torch.stack([f.mean((0, 2, 3)) for f in feats])
    vars_ = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats])
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, vars_.mean(0))
    assert not model.training and bn.momentum == 0.1


def test_init_weights_fine_tunes_from_a_model_folder(toy_model, tmp_path, capsys):
    """A Bayesian variant starts from SegNet-Basic weights (same parameters, plus dropout)."""
    data, model_dir = toy_model
    out = tmp_path / "ft"
    assert train_main([*TINY, "--model", "bayesian_segnet_basic", "--data", str(data), "--out", str(out),
                       "--epochs", "1", "--lr", "1e-12", "--init-weights", str(model_dir)]) == 0
    assert "initialised" in capsys.readouterr().out
    src, ft = load(model_dir), load(out / "final")
    w_src = src.state_dict()["encoder.stages.0.0.weight"]
    w_ft = ft.state_dict()["encoder.stages.0.0.weight"]
    assert torch.allclose(w_src, w_ft, atol=1e-6)  # lr ~0: the weights are the initial ones
    # Different class count: the classifier is skipped, everything else loads.
    from perception.models import get_model
    from perception.train.loop import init_from_model_folder

    loaded, skipped = init_from_model_folder(get_model("segnet_basic", num_classes=5), model_dir)
    assert sorted(skipped) == ["classifier.bias", "classifier.weight"] and loaded > 0
    with pytest.raises(ValueError, match="no tensor"):
        init_from_model_folder(get_model("segnet", num_classes=5), model_dir)


def test_bad_yaml_config_is_a_one_line_error(tmp_path, capsys):
    from perception.train.cli import main as train_main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: [unclosed\n")
    assert train_main(["--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not valid YAML" in err[0]


@pytest.mark.parametrize("device,amp,native,avx512,expected,says", [
    ("cpu", "off", True, False, False, True),    # fp32 on an AVX2 CPU: NCHW, said
    ("cpu", "off", True, True, True, False),     # fp32 on an AVX-512 CPU: channels_last
    ("cpu", "auto", False, False, False, True),  # auto precision is fp32 here: NCHW
    ("cpu", "auto", True, False, True, False),   # auto precision is bf16 here: channels_last
    ("cpu", "bf16", False, False, True, False),  # asked bf16 (emulated) still gets the bf16 layout
    ("cuda", "off", True, False, True, False),
])
def test_channels_last_auto_follows_device_precision_and_isa(monkeypatch, device, amp, native, avx512, expected, says):
    from perception.models import precision

    monkeypatch.setattr(precision, "native_bf16", lambda d: native)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512" if avx512 else "AVX2")
    got, note = precision.resolve_channels_last("auto", device, amp)
    assert got is expected and (note is not None) is says
    assert precision.resolve_channels_last("on", device, amp) == (True, None)
    assert precision.resolve_channels_last("off", device, amp) == (False, None)
    assert precision.resolve_channels_last(True, device, amp) == (True, None)  # an older config's yes/no
    with pytest.raises(ValueError, match="channels_last must be one of"):
        precision.resolve_channels_last("maybe", device, amp)


def test_channels_last_config_values(tmp_path, capsys):
    from perception.train.config import RECIPES

    assert RECIPES["cpu"]["channels_last"] == "auto" and RECIPES["robust"]["channels_last"] == "auto"
    y = tmp_path / "old.yaml"
    y.write_text("channels_last: true\n")  # config.yaml of a run started before auto|on|off
    assert build_config(yaml_file=y).channels_last == "on"
    y.write_text("channels_last: false\n")
    assert build_config(yaml_file=y).channels_last == "off"
    with pytest.raises(ValueError, match="channels"):
        build_config(overrides={"channels_last": "sometimes"})
    with pytest.raises(SystemExit) as stop:  # argparse's usage error (exit 2) names the flag
        train_main(["--channels-last", "sometimes", "--data", str(tmp_path), "--out", str(tmp_path / "r")])
    assert stop.value.code == 2 and "--channels-last" in capsys.readouterr().err


@pytest.mark.parametrize("value,expected", [("on", True), ("off", False), ("auto", False)])
def test_the_training_step_sees_the_layout_asked_for(toy_data, tmp_path, monkeypatch, capsys, value, expected):
    """What the model's forward receives in training, for fp32 on a CPU taken to be AVX2 (auto: NCHW, said
    in the log)."""
    from perception.models import segnet_basic

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")

    seen: list[bool] = []
    original = segnet_basic.SegNetBasic.forward

    def spy(self, x):
        if self.training:
            seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return original(self, x)

    monkeypatch.setattr(segnet_basic.SegNetBasic, "forward", spy)
    assert train_main([*TINY, "--data", str(toy_data), "--epochs", "1", "--max-iters-per-epoch", "2",
                       "--channels-last", value, "--out", str(tmp_path / value)]) == 0
    assert seen and set(seen) == {expected}
    assert ("channels-last auto: NCHW" in capsys.readouterr().out) is (value == "auto")
