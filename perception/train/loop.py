"""The training loop: one process, or one rank of a torchrun/DDP job.

Reproducibility contract: every epoch's randomness (data order, augmentation, dropout) is derived
from ``(seed, epoch, rank)``, and checkpoints are taken at epoch boundaries, so a run killed at any
point and resumed with ``--resume`` produces the same weights as an uninterrupted run. A run asked to
stop (``train(stop=...)``; the CLI's SIGINT/SIGTERM) also checkpoints where it is inside an epoch, with
the RNG streams after its last step: resuming replays the epoch's data up to there without training on
it and goes on as if never stopped.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from perception.core.cpu import isa_summary
from perception.core.classes import CAMVID_REFERENCE_WEIGHTS
from perception.data.class_weights import median_frequency_weights
from perception.core.classes import default_palette
from perception.data.loading import open_dataset
from perception.data.transforms import ToTensors, TrainAugment, normalize
from perception.eval.card_metrics import card_metrics, metrics_key
from perception.eval.evaluate import evaluate
from perception.models.precision import autocast_context, resolve_amp, resolve_channels_last
from perception.models import io as model_io
from perception.models.pretrained import init_encoder_bn_from_data
from perception.models.registry import get_model, model_config
from perception.train.checkpoint import atomic_torch_save, capture_rng_state, load_checkpoint, restore_rng_state
from perception.train.config import TrainConfig
from perception.train.distributed import DistInfo, all_reduce_sum, cleanup_distributed, init_distributed
from perception.train.loss import SegmentationLoss, distillation_loss
from perception.train.plots import plot_history, read_history

__all__ = ["train", "TrainingStopped", "machine_description", "machine_label", "resolve_device", "recalibrate_batch_norm",
           "LAST_CHECKPOINT"]

LAST_CHECKPOINT = "last.pt"
BEST_DIR = "best"
FINAL_DIR = "final"
CHECKPOINT_VERSION = 1


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and info is not None and info.enabled:
        name = f"cuda:{info.local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    return torch.device(name)


def machine_description(device: torch.device | None = None) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    d = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_isa": isa_summary(),  # what decides bf16 and int8 speed (and int8 results without VNNI)
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device is not None and device.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name(device)
    return d


def machine_label(device: torch.device | None = None, amp: str = "off") -> str:
    """What trained an epoch, in one line: the GPU, or the CPU with its instruction set and cores, and the
    precision (``amp`` as resolved). Each epoch's record carries it, so a run resumed on other machines says
    which trained which epochs (CPUs of one name can differ fivefold: ``AMD EPYC`` is a Zen 3 or a Zen 4)."""
    m = machine_description(device)
    where = m["gpu"] if "gpu" in m else f"{m['cpu']} ({m['cpu_isa']}, {m['cpu_count']} cores)"
    return f"{where}, {'fp32' if amp == 'off' else amp}"


def _class_weights(cfg: TrainConfig, train_set) -> np.ndarray | None:
    k = train_set.num_classes
    if cfg.class_weights == "none":
        return None
    if cfg.class_weights == "reference":
        if k != len(CAMVID_REFERENCE_WEIGHTS):
            raise ValueError(f"reference class weights are CamVid's 11 classes; this data has {k}")
        w = np.asarray(CAMVID_REFERENCE_WEIGHTS, dtype=np.float64)
    else:
        w = median_frequency_weights(train_set.labels(), k, train_set.ignore_index)
    return w**cfg.class_weight_power


def _lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    total = cfg.epochs * steps_per_epoch
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total - warm))
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return (1 - progress) ** 0.9  # poly


def _is_encoder_param(name: str) -> bool:
    return name.startswith("encoders.") or name.startswith("encoder.")


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Parameter groups: no weight decay on biases and batch-norm parameters (as Caffe's decay_mult: 0 on
    biases); with ``--encoder-lr-mult`` or ``--freeze-encoder-epochs`` the encoder's parameters form groups
    of their own (tagged ``encoder``), after the others, so group 0 stays the decoder's."""
    split = cfg.encoder_lr_mult != 1.0 or cfg.freeze_encoder_epochs > 0
    buckets: dict[tuple[bool, bool], list] = {(e, d): [] for e in (False, True) for d in (True, False)}
    for name, p in getattr(model, "module", model).named_parameters():
        buckets[(split and _is_encoder_param(name), p.ndim > 1)].append(p)
    if split and not (buckets[(True, True)] or buckets[(True, False)]):
        raise ValueError(f"--encoder-lr-mult/--freeze-encoder-epochs: {cfg.model} has no 'encoders' parameters")
    groups = []
    for (enc, decay), params in buckets.items():
        if params or (not enc):
            groups.append({"params": params, "weight_decay": cfg.weight_decay if decay else 0.0,
                           "lr": cfg.lr * (cfg.encoder_lr_mult if enc else 1.0), "encoder": enc})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _lr_lambdas(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> list:
    """One schedule per parameter group: the shared one, and zero for the encoder while it is frozen."""
    frozen_steps = int(round(cfg.freeze_encoder_epochs * steps_per_epoch))

    def shared(step: int) -> float:
        return _lr_factor(cfg, step, steps_per_epoch)

    def encoder(step: int) -> float:
        return 0.0 if step < frozen_steps else _lr_factor(cfg, step, steps_per_epoch)

    return [encoder if g.get("encoder") else shared for g in optimizer.param_groups]


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    aug = info.dataset.transform
    if isinstance(aug, TrainAugment):
        aug.reseed(aug.epoch_seed * 1000 + worker_id)


def _epoch_seed(cfg: TrainConfig, epoch: int, rank: int) -> int:
    return (cfg.seed * 1_000_003 + epoch * 1009 + rank) % (2**31)


def _holds_out(cfg: TrainConfig) -> bool:
    return bool(cfg.holdout) or cfg.holdout_list is not None


def _selection_name(cfg: TrainConfig) -> str:
    """The metrics key of the selection set: ``holdout_0006R0`` for held-out drives, else the split's name."""
    if cfg.holdout:
        return metrics_key(cfg.train_split, cfg.holdout)
    if cfg.holdout_list is not None:
        return metrics_key(cfg.train_split, [Path(cfg.holdout_list).stem])
    return metrics_key(str(cfg.val_split))


def _open_splits(cfg: TrainConfig, aug: TrainAugment):
    """(training set, selection set or None, {name: report-only set}).

    With held-out drives, the selection set is their frames (taken out of ``train_split``) and
    ``val_split`` is reported at the end only where none of its images were trained on.
    """
    from perception.data.splits import split_pairs_by_group

    train_set = open_dataset(cfg.data, cfg.train_split, transform=aug, cache=cfg.cache)
    aug.ignore_index = train_set.ignore_index if train_set.ignore_index is not None else 255
    report: dict[str, Any] = {}
    if not _holds_out(cfg):
        val_set = open_dataset(cfg.data, cfg.val_split, transform=ToTensors(), cache=cfg.cache) if cfg.val_split else None
        return train_set, val_set, report
    kept, held = split_pairs_by_group(
        train_set.pairs, holdout=cfg.holdout or (), holdout_list=cfg.holdout_list, pattern=cfg.group_pattern
    )
    if not kept:
        raise ValueError(f"holding out {_selection_name(cfg)} leaves no training images in {cfg.train_split!r}")
    if not held:
        raise ValueError(f"{_selection_name(cfg)} holds out no image of {cfg.train_split!r}")
    val_set = train_set.with_pairs(held, transform=ToTensors())
    train_set = train_set.with_pairs(kept)
    if cfg.val_split:
        extra = open_dataset(cfg.data, cfg.val_split, transform=ToTensors(), cache=False)
        trained = {img.resolve() for img, _ in kept}
        if not any(img.resolve() in trained for img, _ in extra.pairs):
            report[cfg.val_split] = extra
        else:
            print(f"note: {cfg.val_split!r} is part of the training images; it is not reported", flush=True)
    return train_set, val_set, report


def _choose_epochs(cfg: TrainConfig, state: _State, elapsed: float, epoch_seconds: float, val_set, model, spec, info,
                   *, channels_last: bool = False) -> None:
    """Fix ``cfg.epochs`` (at most its current value) so the run ends within ``cfg.time_budget_s``.

    ``epoch_seconds`` is one epoch's whole cost (training, checkpoint, plot); a tenth of the budget is
    kept back for what the estimate misses (machines shared with other runs slow down unevenly).
    """
    val_seconds = 0.0
    if val_set is not None and info.is_main:
        t0 = time.time()
        evaluate(model, val_set, spec, amp=cfg.amp, progress=False, channels_last=channels_last)
        val_seconds = time.time() - t0
    per_epoch = epoch_seconds + val_seconds / max(1, cfg.val_every)
    left = 0.9 * cfg.time_budget_s - elapsed - val_seconds * 2  # the final fp32 evaluations
    chosen = max(state.epoch + 1, min(cfg.epochs, state.epoch + int(left // max(per_epoch, 1e-6))))
    if info.enabled:  # rank 0 alone validated: its choice holds for every rank
        t = torch.tensor([chosen], dtype=torch.int64, device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.broadcast(t, src=0)
        chosen = int(t.item())
    state.time_budget_s = cfg.time_budget_s
    if info.is_main:
        print(f"time budget {cfg.time_budget_s:.0f} s: {epoch_seconds:.1f} s/epoch + {val_seconds:.1f} s/validation "
              f"-> {chosen} epochs (of at most {cfg.epochs})", flush=True)
    cfg.epochs = chosen
    cfg.time_budget_s = None  # chosen once; a resumed run keeps the chosen number


@dataclass
class _State:
    epoch: int = 0  # epochs completed
    step: int = 0
    best_miou: float = -1.0
    best_epoch: int = -1
    command: str = ""  # the command that started the run; a resumed run's card still names it
    resumed_with: list[str] = field(default_factory=list)
    # One record per resume (after_epoch, compact, optimizer_restarted, selection_restarted, machine):
    # whether the run can claim to equal an uninterrupted one, and which epochs its selection compared.
    resumes: list[dict[str, Any]] = field(default_factory=list)
    time_budget_s: float | None = None  # set where the number of epochs was chosen to fit a time budget
    # The --init-weights and --distill-from folders' identities, read when the run starts (the folders, often
    # under runs/, may be gone when a resumed run writes its card): see _lineage.
    lineage: dict[str, Any] = field(default_factory=dict)
    # A run stopped inside an epoch: the batches of epoch ``epoch + 1`` already trained, and their summed loss
    # (all ranks), seconds and machine, which that epoch's record adds up when the run resumes and finishes it.
    batch: int = 0
    partial: dict[str, Any] = field(default_factory=dict)


class TrainingStopped(Exception):
    """``train`` was asked to stop (its ``stop`` callable returned True) and saved where it was."""

    def __init__(self, *, out: Path, epoch: int, batch: int, steps_per_epoch: int, saved: bool) -> None:
        self.out, self.epoch, self.batch, self.saved = out, epoch, batch, saved
        where = (f"in epoch {epoch + 1} after batch {batch} of {steps_per_epoch}" if batch
                 else f"after epoch {epoch}")
        super().__init__((f"stopped {where}; {out / LAST_CHECKPOINT} holds it: the same command with --resume "
                          "continues from there") if saved else "stopped before the first step; nothing to resume")


def _lineage(cfg: TrainConfig) -> dict[str, Any]:
    """What a model folder this run starts from (``init_from``) or learns from (``teacher``) is: its path, card
    id and weights' sha256, and for a start what it was pruned from and its encoder's provenance, so the card of
    a fine-tuned, pruned or distilled model names its sources (and licence) after runs/ is gone."""
    records: dict[str, Any] = {}
    for key, folder in (("init_from", cfg.init_weights), ("teacher", cfg.distill_from)):
        if not folder or not (Path(folder) / model_io.CARD_FILE).is_file():
            continue  # weights without a card: nothing to name
        card = model_io.load_card(folder)
        record = {"folder": str(folder), "id": card.id, "weights_sha256": model_io.weights_sha256(folder)}
        if key == "init_from":
            record.update({k: v for k, v in (("pruned_from", card.extra.get("pruned_from")),
                                             ("encoder", card.training.get("encoder"))) if v})
        records[key] = record
    return records


def _encoder_record(model: nn.Module, state: _State) -> dict[str, Any]:
    """The card's ``encoder``: the imported weights' provenance, or where the run started from a model folder,
    that folder's (marked ``via: init_weights``)."""
    own = getattr(model, "encoder_provenance", None)
    if own:
        return {"encoder": dict(own)}
    inherited = state.lineage.get("init_from", {}).get("encoder")
    return {"encoder": {**inherited, "via": "init_weights"}} if inherited else {}


def _make_card(cfg: TrainConfig, model: nn.Module, dataset, spec, metrics, command, device, state) -> model_io.ModelCard:
    palette = list(getattr(dataset, "palette", ()) or default_palette(dataset.num_classes))
    return model_io.ModelCard(
        id=Path(cfg.out).name,
        architecture=model_config(model),
        classes=list(dataset.classes),
        palette=[list(c) for c in palette],
        input=spec,
        ignore_index=dataset.ignore_index,
        training={
            "command": state.command or command,
            **({"resumed_with": list(state.resumed_with)} if state.resumed_with else {}),
            **({"resumes": [dict(r) for r in state.resumes]} if state.resumes else {}),
            "config": cfg.to_dict(),
            "data": str(cfg.data),
            "train_split": cfg.train_split,
            **({"holdout": list(cfg.holdout or []), "holdout_list": cfg.holdout_list} if _holds_out(cfg) else {}),
            "selection": _selection_name(cfg) if (_holds_out(cfg) or cfg.val_split) else None,
            "train_images": len(dataset),
            **_encoder_record(model, state),
            **{k: {f: v for f, v in r.items() if f != "encoder"} for k, r in state.lineage.items()},
            "epoch": state.epoch,
            **({"epochs_chosen_for_time_budget_s": state.time_budget_s} if state.time_budget_s else {}),
            "machine": machine_description(device),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        metrics={_selection_name(cfg): card_metrics(metrics)} if metrics else {},
    )


def _truncate_history(path: Path, epochs_done: int) -> None:
    """Drop history rows of epochs after the checkpoint (a kill between the two writes re-runs that epoch)."""
    if not path.is_file():
        return
    from perception.core.fileio import atomic_write_bytes

    rows = [r for r in read_history(path) if r.get("epoch", 0) <= epochs_done]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


@torch.no_grad()
def init_from_model_folder(model: nn.Module, folder: str | Path) -> tuple[int, list[str]]:
    """Copy the tensors of ``folder/weights.safetensors`` whose names and shapes match into ``model``.
    Returns (number copied, names skipped)."""
    from safetensors.torch import load_file

    path = Path(folder) / model_io.WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--init-weights: no {model_io.WEIGHTS_FILE} in {folder}")
    source = load_file(str(path))
    own = model.state_dict()
    skipped = [k for k, v in source.items() if k not in own or own[k].shape != v.shape]
    for k, v in source.items():
        if k not in skipped:
            own[k].copy_(v)
    loaded = len(source) - len(skipped)
    if loaded == 0:
        raise ValueError(f"--init-weights: no tensor of {folder} fits {model_config(model)['name']}")
    return loaded, skipped


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, dataset, spec, *, device, amp: str = "off", progress: bool = True) -> None:
    """Recompute batch-norm running statistics as plain averages over ``dataset`` (no augmentation),
    as the reference implementation did before testing."""
    from tqdm.auto import tqdm

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    try:
        for i in tqdm(range(len(dataset)), desc="bn-recalibrate", disable=not progress, leave=False):
            img, _ = dataset[i]
            with autocast_context(device, amp):
                model(normalize(img[None].to(device), spec))
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.eval()


@dataclass
class _Run:
    """Everything one training run holds, passed between its phases."""

    cfg: TrainConfig
    info: Any
    device: torch.device
    out: Path
    command: str
    aug: TrainAugment
    train_set: Any
    val_set: Any
    report_sets: dict[str, Any]
    spec: Any
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: Any
    loader: Any
    steps_per_epoch: int
    state: _State
    channels_last: bool = False  # cfg.channels_last resolved for this device and precision
    machine: str = ""  # machine_label() of this process: each epoch's record and each resume name it
    ddp_model: nn.Module | None = None
    teacher: nn.Module | None = None  # --distill-from: frozen, in eval mode
    resume_rng: dict[str, Any] | None = None  # a mid-epoch checkpoint's RNG streams, restored after the replay

    @property
    def ckpt_path(self) -> Path:
        return self.out / LAST_CHECKPOINT

    @property
    def history_path(self) -> Path:
        return self.out / "metrics.jsonl"


def train(cfg: TrainConfig, *, resume: bool = False, command: str | None = None, progress: bool = True,
          stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the summary also written to ``<out>/summary.json``.

    Phases: setup (data, model, optimiser), resume, then per epoch train / choose epochs / validate
    and select / checkpoint, and finalize (the model folder that ships, with its measured card).
    ``stop`` is asked after every training step (and before each epoch): once it returns True the run
    checkpoints where it is and raises :class:`TrainingStopped`; ``resume=True`` continues from there."""
    command = command or " ".join(shlex.quote(a) for a in sys.argv)
    info = init_distributed("cuda" if cfg.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu")
    # config.yaml keeps what was asked (auto re-decides on the machine that resumes); the run uses this.
    device = resolve_device(cfg.device, info)
    _, amp_note = resolve_amp(cfg.amp, device)
    _, layout_note = resolve_channels_last(cfg.channels_last, device, cfg.amp)
    for note in (amp_note, layout_note):
        if note and info.is_main:  # a choice made for the user goes with the run's log; a warning to stderr
            print(note, file=sys.stderr if note.startswith("warning") else sys.stdout, flush=True)
    try:
        run = _setup(cfg, info, resume=resume, command=command)
        if resume:
            _resume(run)
        run.ddp_model = run.model
        if info.enabled:
            run.ddp_model = nn.parallel.DistributedDataParallel(
                run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None
            )
        if cfg.compile:
            # Only the training step is compiled: checkpoints, validation and the shipped folder use the
            # plain module (no `_orig_mod.` prefixes in saved names).
            run.ddp_model = torch.compile(run.ddp_model)
        run_started = time.time()
        bookkeeping_seconds = 0.0  # checkpoint + plot of the last epoch: part of an epoch's cost
        while run.state.epoch < cfg.epochs:
            if _stop_agreed(stop, run):  # between epochs: the last checkpoint already holds this point
                raise TrainingStopped(out=run.out, epoch=run.state.epoch, batch=0, steps_per_epoch=run.steps_per_epoch,
                                      saved=run.ckpt_path.exists())
            record = _train_epoch(run, progress=progress, stop=stop)
            if record is None:  # stopped inside the epoch
                if info.is_main:
                    _save_state(run)
                if info.enabled:
                    torch.distributed.barrier()
                raise TrainingStopped(out=run.out, epoch=run.state.epoch, batch=run.state.batch,
                                      steps_per_epoch=run.steps_per_epoch, saved=True)
            if cfg.time_budget_s is not None and run.state.epoch >= max(1, math.ceil(cfg.warmup_epochs)):
                # The lr of the warmup epochs does not depend on the total, so choosing the total now
                # trains exactly as a run started with --epochs <chosen> would.
                _choose_epochs(cfg, run.state, time.time() - run_started,
                               record["epoch_seconds"] + bookkeeping_seconds, run.val_set, run.model, run.spec, info,
                               channels_last=run.channels_last)
                if info.is_main:
                    (run.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            _validate_and_select(run, record, progress=progress)
            if info.is_main:
                t_book = time.time()
                _checkpoint(run, record)
                bookkeeping_seconds = time.time() - t_book
            if info.enabled:
                torch.distributed.barrier()
        if _stop_agreed(stop, run):  # the final evaluations can take minutes: --resume does only them
            raise TrainingStopped(out=run.out, epoch=run.state.epoch, batch=0, steps_per_epoch=run.steps_per_epoch,
                                  saved=True)
        return _finalize(run, progress=progress, started=run_started)
    finally:
        cleanup_distributed()


def _setup(cfg: TrainConfig, info, *, resume: bool, command: str) -> _Run:
    """Output folder and effective config, data splits, model, loss, optimiser, schedule, loader."""
    if cfg.encoder_bn == "data" and not cfg.encoder_weights:  # before anything is written
        raise ValueError("--encoder-bn data initialises an imported encoder: give --encoder-weights too")
    device = resolve_device(cfg.device, info)
    out = Path(cfg.out)
    ckpt_path = out / LAST_CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    if resume and not ckpt_path.exists():
        raise FileNotFoundError(f"--resume given but there is no checkpoint at {ckpt_path}")
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    aug = TrainAugment(
        crop=cfg.crop, scale=cfg.scale, hflip=cfg.hflip, color_jitter=cfg.color_jitter, gamma=cfg.gamma,
        hue=cfg.hue, blur=cfg.blur, noise=cfg.noise,
    )
    train_set, val_set, report_sets = _open_splits(cfg, aug)
    if info.is_main:
        print(f"training on {len(train_set)} images ({cfg.train_split}"
              + (f" without {_selection_name(cfg)}" if _holds_out(cfg) else "") + ")"
              + (f"; selecting on {_selection_name(cfg)} ({len(val_set)} images)" if val_set is not None else "")
              + "".join(f"; reporting {k} ({len(v)} images)" for k, v in report_sets.items()), flush=True)
    first_img, _ = train_set.load(0)
    spec = model_io.InputSpec(height=first_img.shape[0], width=first_img.shape[1])

    model = _make_model(cfg, info, train_set, spec, device, resume=resume)
    channels_last, _ = resolve_channels_last(cfg.channels_last, device, cfg.amp)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    weights = _class_weights(cfg, train_set)
    criterion = SegmentationLoss(
        None if weights is None else torch.as_tensor(weights, dtype=torch.float32),
        ignore_index=train_set.ignore_index if train_set.ignore_index is not None else -100,
        normalization=cfg.loss_normalization,
        label_smoothing=cfg.label_smoothing,
    ).to(device)
    optimizer = _optimizer(cfg, model)
    teacher = _load_teacher(cfg, train_set.num_classes, device, channels_last) if cfg.distill_from else None

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop and validation sizes
    if cfg.cache:
        train_set.preload()  # decoded once, before DataLoader workers fork (they share the pages)
    sampler = DistributedSampler(
        train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    loader = DataLoader(
        train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers, drop_last=True,
        worker_init_fn=_worker_init if cfg.num_workers else None,
    )
    steps_per_epoch = len(loader)
    if cfg.max_iters_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_iters_per_epoch)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images give no full batch of {cfg.batch_size} per process")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambdas(cfg, optimizer, steps_per_epoch))
    return _Run(cfg=cfg, info=info, device=device, out=out, command=command, aug=aug, train_set=train_set,
                val_set=val_set, report_sets=report_sets, spec=spec, model=model, criterion=criterion,
                optimizer=optimizer, scheduler=scheduler, sampler=sampler, loader=loader,
                steps_per_epoch=steps_per_epoch, state=_State(command=command, lineage={} if resume else _lineage(cfg)),
                channels_last=channels_last, teacher=teacher, machine=machine_label(device, resolve_amp(cfg.amp, device)[0]))


def _load_teacher(cfg: TrainConfig, num_classes: int, device, channels_last: bool) -> nn.Module:
    """The --distill-from model folder, frozen and in eval mode (its dropout off, its batch norms fixed)."""
    teacher = model_io.load(cfg.distill_from, map_location=device).eval()
    if len(teacher.card.classes) != num_classes:
        raise ValueError(f"--distill-from {cfg.distill_from} predicts {len(teacher.card.classes)} classes; the data has "
                         f"{num_classes}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(memory_format=torch.channels_last) if channels_last else teacher


def _make_model(cfg: TrainConfig, info, train_set, spec, device, *, resume: bool) -> nn.Module:
    """The model to train: built from the seed, an imported encoder (its batch norms from data with
    ``--encoder-bn data``), or a model folder's weights (``--init-weights``)."""
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    kwargs = dict(cfg.model_kwargs)
    if cfg.init_weights and (Path(cfg.init_weights) / model_io.CARD_FILE).is_file():
        # A pruned folder gives its layer widths (unless --model-kwargs says otherwise).
        widths = model_io.load_card(cfg.init_weights).architecture.get("kwargs", {})
        kwargs.update({k: widths[k] for k in ("stages", "decoder_stages") if k in widths and k not in kwargs})
    if cfg.encoder_weights:
        kwargs["encoder_weights"] = cfg.encoder_weights
    model = get_model(cfg.model, num_classes=train_set.num_classes, **kwargs).to(device)
    if cfg.init_weights and not resume:
        loaded, skipped = init_from_model_folder(model, cfg.init_weights)
        if info.is_main:
            print(f"initialised {loaded} tensors from {cfg.init_weights}"
                  + (f"; skipped {len(skipped)} that differ: {skipped[:4]}" if skipped else ""), flush=True)
    if cfg.encoder_bn == "data" and not resume and not cfg.init_weights:
        if getattr(model, "encoder_provenance", {}).get("batch_norm") == "from source":
            raise ValueError(f"--encoder-bn data: {cfg.encoder_weights} brings batch-norm statistics of its own")
        record = init_encoder_bn_from_data(model, _encoder_bn_batches(cfg, train_set, spec))
        if info.is_main:
            print(f"encoder batch norms from data: {record['batch_norm'].split(': ', 1)[1]}", flush=True)
    return model


def _encoder_bn_batches(cfg: TrainConfig, train_set, spec, *, batch: int = 8):
    """``--encoder-bn-crops`` crops of training frames (training size, no other augmentation) as model input,
    chosen with their own generator from ``--seed`` so the run's other random streams are untouched."""
    rng = np.random.default_rng(cfg.seed)
    picks = rng.choice(len(train_set), size=cfg.encoder_bn_crops, replace=cfg.encoder_bn_crops > len(train_set))
    crops = []
    for i in picks:
        img, _ = train_set.load(int(i))
        ch, cw = cfg.crop or img.shape[:2]
        ch, cw = min(ch, img.shape[0]), min(cw, img.shape[1])
        y, x = int(rng.integers(0, img.shape[0] - ch + 1)), int(rng.integers(0, img.shape[1] - cw + 1))
        crops.append(torch.from_numpy(np.ascontiguousarray(img[y:y + ch, x:x + cw].transpose(2, 0, 1))))
    sizes = {tuple(c.shape) for c in crops}
    step = batch if len(sizes) == 1 else 1  # frames of several sizes (a folder dataset) go one by one
    for k in range(0, len(crops), step):
        yield normalize(torch.stack(crops[k:k + step]), spec)


def _resume(run: _Run) -> None:
    """Weights, optimiser, schedule, counters and RNG streams from the last checkpoint."""
    ck = load_checkpoint(run.ckpt_path)
    if ck.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{run.ckpt_path}: checkpoint version {ck.get('version')} is not {CHECKPOINT_VERSION}")
    if ck["model_config"] != model_config(run.model):
        raise ValueError(f"{run.ckpt_path} holds {ck['model_config']}, but the config builds {model_config(run.model)}")
    run.model.load_state_dict(ck["model"])  # copies into the float32 parameters (a compact state is fp16)
    compact = "compact" in ck  # fp16 weights at least; maybe no optimiser moments either
    if "optimizer" in ck:
        run.optimizer.load_state_dict(ck["optimizer"])  # casts moments to the parameters' dtype
    else:
        print(f"warning: {run.ckpt_path} is a compact resume state without optimiser moments: the optimiser "
              "restarts them here (the schedule continues), so this run will not end bit-identical to an "
              "uninterrupted one", file=sys.stderr, flush=True)
    run.scheduler.load_state_dict(ck["scheduler"])
    run.state = _State(**ck["state"])
    if run.state.batch >= run.steps_per_epoch:
        raise ValueError(f"{run.ckpt_path} stopped inside epoch {run.state.epoch + 1} after batch {run.state.batch}, but "
                         f"this config gives {run.steps_per_epoch} batches an epoch: resume with the batch size and "
                         "--max-iters-per-epoch it was trained with")
    if not run.state.lineage:  # the checkpoint's record (read once, when the run started), else read it now
        run.state.lineage = _lineage(run.cfg)
    selection_restarted = False
    if run.state.best_epoch > 0 and not (run.out / BEST_DIR / model_io.CARD_FILE).is_file():
        # The resume state came without the run's best/ folder (another machine): selection starts over
        # from here rather than comparing against weights that no longer exist.
        print(f"warning: {run.out / BEST_DIR} is missing; the best epoch so far ({run.state.best_epoch}, "
              f"mIoU {run.state.best_miou:.4f}) is forgotten and selection restarts", file=sys.stderr, flush=True)
        run.state.best_miou, run.state.best_epoch = -1.0, -1
        selection_restarted = True
    if run.state.command:  # checkpoints written before the field existed have none
        run.state.resumed_with.append(run.command)
        run.state.resumes.append({"after_epoch": run.state.epoch, "compact": compact,
                                  "optimizer_restarted": "optimizer" not in ck,
                                  "selection_restarted": selection_restarted, "machine": run.machine,
                                  **({"after_batch": run.state.batch} if run.state.batch else {})})
    restore_rng_state(ck["rng"])
    # Inside an epoch the streams are the ones after its last trained step: set again once the epoch's first
    # batches have been replayed (the replay draws them as the first stretch did; see _replay_trained_batches).
    run.resume_rng = ck["rng"] if run.state.batch else None
    if run.info.is_main:
        _truncate_history(run.history_path, run.state.epoch)
        where = (f"in epoch {run.state.epoch + 1} after batch {run.state.batch} of {run.steps_per_epoch}"
                 if run.state.batch else f"after epoch {run.state.epoch}")
        print(f"resuming {run.out} {where} (best val mIoU {run.state.best_miou:.4f})", flush=True)


def _seed_epoch(run: _Run, epoch: int) -> None:
    """Every random stream of an epoch from (seed, epoch, rank): data order, augmentation, dropout."""
    seed = _epoch_seed(run.cfg, epoch, run.info.rank)
    torch.manual_seed(seed)
    np.random.seed(seed)
    run.aug.epoch_seed = seed
    run.aug.reseed(seed)
    run.sampler.set_epoch(epoch)


def _replay_trained_batches(run: _Run, batches, count: int) -> None:
    """Draw (not train on) the batches a stopped run trained in this epoch, so that the data order and the
    augmentation streams, in the workers too, stand where they stood; then the RNG streams after its last step."""
    t0 = time.time()
    for _ in range(count):
        next(batches)
    restore_rng_state(run.resume_rng)
    run.resume_rng = None
    if run.info.is_main:
        print(f"epoch {run.state.epoch + 1}: replayed the {count} batches trained before the stop "
              f"({time.time() - t0:.0f} s)", flush=True)


def _stop_agreed(stop: Callable[[], bool] | None, run: _Run) -> bool:
    """Whether to stop now; under DDP every rank stops at the same step if any rank was asked to."""
    if stop is None:
        return False
    asked = torch.tensor([1.0 if stop() else 0.0], device=run.device)
    return bool(all_reduce_sum(asked, run.info).item() > 0)


def _train_step(run: _Run, images: torch.Tensor, labels: torch.Tensor, where: str) -> float:
    """One optimiser step on one batch; returns its loss."""
    cfg = run.cfg
    x = normalize(images.to(run.device, non_blocking=True), run.spec)
    if run.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = labels.to(run.device, non_blocking=True)
    with autocast_context(run.device, cfg.amp):
        logits = run.ddp_model(x)
    loss = run.criterion(logits, y)
    if run.teacher is not None:
        with torch.no_grad(), autocast_context(run.device, cfg.amp):
            teacher_logits = run.teacher(x)
        soft = distillation_loss(logits, teacher_logits, cfg.distill_temperature)
        loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * soft
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at {where}")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.scheduler.step()
    return loss.item()


def _train_epoch(run: _Run, *, progress: bool, stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
    """One pass over the training data; returns the epoch's history record, or None where ``stop`` asked to
    stop inside it (``state.batch`` and ``state.partial`` then say how far it got)."""
    from tqdm.auto import tqdm

    cfg, info, state = run.cfg, run.info, run.state
    epoch, done = state.epoch, state.batch  # done > 0: resuming an epoch a stop cut
    _seed_epoch(run, epoch)
    run.ddp_model.train()
    batches = iter(run.loader)
    if done:
        _replay_trained_batches(run, batches, done)
    # The first stretch's summed loss is every rank's: rank 0 carries it, the all-reduce below adds the rest.
    before = state.partial.get("loss_sum", [0.0, 0.0]) if (done and info.is_main) else [0.0, 0.0]
    loss_sum = torch.tensor(before, dtype=torch.float64)
    seconds_before = state.partial.get("seconds", 0.0) if done else 0.0
    t0 = time.time()
    bar = tqdm(total=run.steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="it",
               disable=not (progress and info.is_main), dynamic_ncols=True)
    for it, (images, labels) in enumerate(batches, start=done):
        if it >= run.steps_per_epoch:
            break
        loss = _train_step(run, images, labels, f"epoch {epoch + 1}, iteration {it}")
        state.step += 1
        loss_sum += torch.tensor([loss, 1.0], dtype=torch.float64)
        elapsed = time.time() - t0
        bar.set_postfix(
            loss=f"{loss_sum[0] / loss_sum[1]:.4f}",
            img_s=f"{(it + 1 - done) * cfg.batch_size * info.world_size / max(elapsed, 1e-9):.1f}",
            lr=f"{run.scheduler.get_last_lr()[0]:.2e}",
        )
        bar.update(1)
        if it + 1 < run.steps_per_epoch and _stop_agreed(stop, run):  # at the epoch's end, it checkpoints anyway
            bar.close()
            state.batch = it + 1
            state.partial = {"loss_sum": all_reduce_sum(loss_sum, info).tolist(),
                             "seconds": round(seconds_before + time.time() - t0, 2),
                             "machine": _joined(state.partial.get("machine") if done else None, run.machine)}
            return None
    bar.close()
    all_reduce_sum(loss_sum, info)
    record = {
        "epoch": epoch + 1,
        "step": state.step,
        "train_loss": float(loss_sum[0] / loss_sum[1]),
        "lr": run.scheduler.get_last_lr()[0],
        "epoch_seconds": round(seconds_before + time.time() - t0, 2),
        # An epoch a stop cut and another machine finished names both (cards group epochs by this label).
        "machine": _joined(state.partial.get("machine") if done else None, run.machine),
        **({"resumed_after_batch": done} if done else {}),
    }
    state.epoch, state.batch, state.partial = epoch + 1, 0, {}
    return record


def _joined(first: str | None, then: str) -> str:
    return then if first in (None, then) else f"{first} + {then}"


def _validate_and_select(run: _Run, record: dict[str, Any], *, progress: bool) -> None:
    """Evaluate on the selection split when due; the best epoch so far is saved as best/."""
    cfg, state = run.cfg, run.state
    is_last = state.epoch == cfg.epochs
    if not (run.info.is_main and run.val_set is not None and (state.epoch % cfg.val_every == 0 or is_last)):
        return
    m = evaluate(run.model, run.val_set, run.spec, amp=cfg.amp, progress=progress, channels_last=run.channels_last)
    record.update({f"val_{k}": m[k] for k in ("global_accuracy", "class_accuracy", "miou", "bf")})
    if m["miou"] > state.best_miou:
        state.best_miou, state.best_epoch = float(m["miou"]), state.epoch
        card = _make_card(cfg, run.model, run.train_set, run.spec, m, run.command, run.device, state)
        model_io.save(run.model, run.out / BEST_DIR, card)
        record["best"] = True
    print(
        f"epoch {state.epoch}: loss {record['train_loss']:.4f}  val G {m['global_accuracy']:.4f} "
        f"C {m['class_accuracy']:.4f} mIoU {m['miou']:.4f} BF {m['bf']:.4f}" + ("  (best)" if record.get("best") else ""),
        flush=True,
    )


def _checkpoint(run: _Run, record: dict[str, Any]) -> None:
    """The epoch's history line, the resumable checkpoint (atomic) and the curves."""
    with open(run.history_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    _save_state(run)
    try:
        plot_history(run.history_path, run.out / "curves.png", selection=run.val_set is not None)
    except Exception as e:  # a plot must never kill a long run
        print(f"warning: could not plot training curves: {e}", file=sys.stderr)


def _save_state(run: _Run) -> None:
    """The resumable checkpoint, written atomically: the old complete file or the new one, never half."""
    atomic_torch_save(
        {
            "version": CHECKPOINT_VERSION,
            "model_config": model_config(run.model),
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "state": vars(run.state).copy(),
            "rng": capture_rng_state(),
            "config": run.cfg.to_dict(),
        },
        run.ckpt_path,
    )


def _finalize(run: _Run, *, progress: bool, started: float) -> dict[str, Any]:
    """The model that ships (best on the selection split, or the last epoch without one), measured
    in fp32 on every split the run reports, saved as final/ with its card; the run's summary."""
    cfg, state, out = run.cfg, run.state, run.out
    summary: dict[str, Any] = {"out": str(out), "epochs": state.epoch, "best_epoch": state.best_epoch,
                               "best_val_miou": state.best_miou}
    if not run.info.is_main:
        return summary
    if run.val_set is not None and (out / BEST_DIR).is_dir():
        final = model_io.load(out / BEST_DIR, map_location=str(run.device))
    else:  # nothing to select on (e.g. a final run on all the data): the last epoch ships
        final = run.model
        final.card = _make_card(cfg, run.model, run.train_set, run.spec, None, run.command, run.device, state)
    if cfg.bn_recalibrate:
        recalibrate_batch_norm(final, run.train_set.with_pairs(run.train_set.pairs, transform=ToTensors()), run.spec,
                               device=run.device, amp="off", progress=progress)
    card = final.card
    card.metrics = {}
    splits = ([(_selection_name(cfg), run.val_set)] if run.val_set is not None else []) + list(run.report_sets.items())
    for name, dataset in splits:
        m = evaluate(final, dataset, run.spec, amp="off", progress=progress)
        card.metrics[name] = card_metrics(m)
        print(
            f"final ({FINAL_DIR}/, fp32{', BN recalibrated' if cfg.bn_recalibrate else ''}): {name} "
            f"G {m['global_accuracy']:.4f} C {m['class_accuracy']:.4f} mIoU {m['miou']:.4f} BF {m['bf']:.4f}",
            flush=True,
        )
    card.training["bn_recalibrated"] = cfg.bn_recalibrate
    card.training["evaluated_precision"] = "fp32"
    model_io.save(final, out / FINAL_DIR, card)
    if run.val_set is not None:
        summary["final_val"] = card.metrics[_selection_name(cfg)]
    summary["final_metrics"] = card.metrics
    # A resumed run's epochs ran in several processes: the training time is the history's, every stretch
    # (tools/train_many.py tabulates it); this process's wall time (evaluations included) is kept apart.
    summary["training_seconds"] = round(sum(r.get("epoch_seconds", 0.0) for r in read_history(run.history_path)), 1)
    summary["wall_seconds_this_process"] = round(time.time() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
