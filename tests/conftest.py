from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CAMVID = Path(os.environ.get("CAMVID_ROOT", Path(__file__).resolve().parents[1].parent / "shared" / "camvid"))


@pytest.fixture(scope="session")
def camvid_root() -> Path:
    if not (CAMVID / "train.txt").is_file():
        pytest.skip(f"CamVid not found at {CAMVID} (set CAMVID_ROOT, or place ../shared/camvid beside the checkout)")
    return CAMVID


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def make_toy_dataset(root: Path, *, n_train: int = 8, n_val: int = 2, size=(48, 64), classes=("bg", "a", "b")) -> Path:
    """A learnable folder-layout dataset: each class is a coloured rectangle on a grey background."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    colours = [(90, 90, 90), (20, 200, 40), (200, 40, 20)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{c} {r} {g} {b}\n" for c, (r, g, b) in zip(classes, colours)))
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(n):
            lab = np.zeros(size, np.uint8)
            for c in range(1, len(classes)):
                y, x = rng.integers(0, size[0] - 12), rng.integers(0, size[1] - 12)
                lab[y : y + 12, x : x + 12] = c
            lab[0, 0] = 255  # an ignored pixel
            img = np.array([colours[c] for c in range(len(classes))] + [(0, 0, 0)] * 253, np.uint8)[lab]
            img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / split / "images" / f"{split}{i:03d}.png"), img[..., ::-1])
            cv2.imwrite(str(root / split / "labels" / f"{split}{i:03d}.png"), lab)
    return root


@pytest.fixture
def toy_data(tmp_path) -> Path:
    return make_toy_dataset(tmp_path / "toy")


def _train_toy(root: Path, model: str) -> tuple[Path, Path]:
    from perception.train.cli import main as train_main

    data = make_toy_dataset(root / "data")
    out = root / "run"
    rc = train_main(["--model", model, "--data", str(data), "--out", str(out), "--epochs", "1",
                     "--crop", "32x48", "--batch-size", "2", "--no-progress", "--amp", "off"])
    assert rc == 0
    return data, out / "final"


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, model folder) of a tiny segnet_basic trained for one epoch on the toy data."""
    return _train_toy(tmp_path_factory.mktemp("toy_model"), "segnet_basic")


@pytest.fixture(scope="session")
def toy_bayesian_model(tmp_path_factory) -> tuple[Path, Path]:
    """The same for bayesian_segnet_basic (MC dropout)."""
    return _train_toy(tmp_path_factory.mktemp("toy_bayes"), "bayesian_segnet_basic")


SHIPPED_BASIC = Path(__file__).resolve().parents[1] / "models" / "segnet_basic_camvid"


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    """The committed CamVid SegNet-Basic model folder (part of the repository, never skipped)."""
    assert (SHIPPED_BASIC / "weights.safetensors").is_file(), f"missing shipped model {SHIPPED_BASIC}"
    return SHIPPED_BASIC


def make_video(path: Path, n: int = 8, size=(64, 48), fps: float = 10.0) -> Path:
    """A small MJPG .avi of moving blocks (the codec is in every OpenCV build)."""
    import cv2
    import numpy as np

    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened(), "OpenCV cannot write MJPG video here"
    for i in range(n):
        img = np.full((h, w, 3), 90, np.uint8)
        img[h // 3 :, (i * 5) % w : (i * 5) % w + w // 4] = (20, 200, 40)
        img[: h // 4, :] = (200, 40, 20)
        writer.write(img)
    writer.release()
    return path


def free_endpoint() -> str:
    """A loopback TCP endpoint nobody listens on (for a node started by its command line)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def start_node(source_uri: str, model_dir: Path, *, n_subs: int = 1, backend: str = "torch",
               publish: str = "tcp://127.0.0.1:*", source_options=None, **settings):
    """A node publishing on ``publish`` (a free loopback port by default), in a thread not yet started:
    (node, publisher, thread, result dict that gets "rc"). It holds its first frame until ``n_subs``
    subscribers have joined."""
    import threading

    from perception.inference import load_backend
    from perception.stream.node.pipeline import Node, NodeSettings
    from perception.stream.node.sources import open_source
    from perception.stream.publisher import Publisher

    pub = Publisher(publish, "segnet")
    node = Node(open_source(source_uri, source_options), load_backend(model_dir, backend=backend), pub,
                NodeSettings(wait_for_subscribers=n_subs, wait_timeout=20, **settings), log=lambda m: None)
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("rc", node.run()), daemon=True)
    return node, pub, t, result


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return _cuda_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible to PyTorch)")
    skip_trt = pytest.mark.skip(reason="needs TensorRT and a CUDA GPU")
    for item in items:
        if "tensorrt" in item.keywords and not _tensorrt_available():
            item.add_marker(skip_trt)
        elif "gpu" in item.keywords and not _cuda_available():
            item.add_marker(skip_gpu)
