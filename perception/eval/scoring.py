"""Scoring what a backend predicts (an .onnx, an int8 .onnx, an engine: what the node runs), without
PyTorch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from perception.eval.metrics import SegmentationMetrics

__all__ = ["evaluate_backend"]


def evaluate_backend(
    backend,
    dataset,
    *,
    boundary: bool = True,
    progress: bool = True,
    on_prediction: Callable[[int, np.ndarray], None] | None = None,
    uncertainty: bool = False,
) -> dict[str, Any]:
    """Score an inference backend (what the node runs: an .onnx, an int8 .onnx, an engine) on
    ``dataset``'s raw items (RGB uint8 image, labels), frames fed as BGR like a camera's.

    ``uncertainty`` scores the labels of the backend's uncertainty path (MC dropout for a Bayesian
    model in PyTorch: the mean of the samples' probabilities), as the node publishes them."""
    from tqdm.auto import tqdm

    metrics = SegmentationMetrics(dataset.num_classes, dataset.ignore_index, boundary=boundary)
    for i in tqdm(range(len(dataset)), desc="eval", unit="img", disable=not progress, leave=False):
        img, lab = dataset.load(i)
        pred = backend.infer(np.ascontiguousarray(img[..., ::-1])[None], uncertainty=uncertainty).labels[0]
        metrics.update(pred, lab)
        if on_prediction is not None:
            on_prediction(i, pred)
    return metrics.compute()
