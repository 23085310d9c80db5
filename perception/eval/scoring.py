"""Scoring what a backend predicts (an .onnx, an int8 .onnx, an engine: what the node runs), without
PyTorch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from perception.eval.metrics import SegmentationMetrics

__all__ = ["evaluate_backend", "score_predictions"]


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
    def predict(i: int) -> tuple[np.ndarray, np.ndarray]:
        img, lab = dataset.load(i)
        return backend.infer(np.ascontiguousarray(img[..., ::-1])[None], uncertainty=uncertainty).labels[0], lab

    return score_predictions(predict, len(dataset), dataset.num_classes, dataset.ignore_index, boundary=boundary,
                             progress=progress, on_prediction=on_prediction)


def score_predictions(
    predict: Callable[[int], tuple[np.ndarray, np.ndarray]],
    count: int,
    num_classes: int,
    ignore_index: int,
    *,
    boundary: bool = True,
    progress: bool = True,
    on_prediction: Callable[[int, np.ndarray], None] | None = None,
) -> dict[str, Any]:
    """The scoring loop every evaluation shares: ``predict(i)`` -> (predicted uint8 labels, true labels)
    for i in range(count), accumulated into the paper's metrics, with a progress bar."""
    from tqdm.auto import tqdm

    metrics = SegmentationMetrics(num_classes, ignore_index, boundary=boundary)
    for i in tqdm(range(count), desc="eval", unit="img", disable=not progress, leave=False):
        pred, lab = predict(i)
        metrics.update(pred, lab)
        if on_prediction is not None:
            on_prediction(i, pred)
    return metrics.compute()
