"""The paper's metrics against hand-computed cases and a brute-force boundary F1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from perception.eval.metrics import BF_TOLERANCE, ErrorDetection, SegmentationMetrics, boundary_f1, mask_boundary


def test_confusion_metrics_hand_case():
    target = np.array([[0, 0, 1, 1], [0, 2, 2, 9]])  # 9 = ignored
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 2]])
    m = SegmentationMetrics(3, ignore_index=9, boundary=False)
    m.update(pred, target)
    r = m.compute()
    # Valid pixels: 7. Correct: (0,0),(0,2),(0,3),(1,0),(1,1) = 5.
    assert r["global_accuracy"] == pytest.approx(5 / 7)
    # Recall: class 0: 2/3, class 1: 2/2, class 2: 1/2.
    assert r["per_class_accuracy"] == pytest.approx([2 / 3, 1.0, 0.5])
    assert r["class_accuracy"] == pytest.approx((2 / 3 + 1 + 0.5) / 3)
    # IoU: class 0: tp 2, gt 3, pred 3 -> 2/4; class 1: tp 2, gt 2, pred 3 -> 2/3; class 2: tp 1, gt 2, pred 1 -> 1/2.
    assert r["per_class_iou"] == pytest.approx([0.5, 2 / 3, 0.5])
    assert r["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert r["confusion"] == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_dataset_level_not_mean_of_images():
    m = SegmentationMetrics(2, boundary=False)
    m.update(np.zeros((1, 1), int), np.zeros((1, 1), int))  # 1/1 correct
    m.update(np.zeros((3, 1), int), np.ones((3, 1), int))  # 0/3 correct
    assert m.compute()["global_accuracy"] == pytest.approx(0.25)  # not (1 + 0) / 2


def test_accepts_torch_and_batches():
    t = torch.randint(0, 3, (2, 8, 8))
    m = SegmentationMetrics(3)
    m.update(t, t)
    r = m.compute()
    assert r["global_accuracy"] == 1.0 and r["miou"] == 1.0 and r["bf"] == 1.0
    with pytest.raises(TypeError):
        m.update(torch.rand(8, 8), t[0])
    with pytest.raises(ValueError):
        m.update(t[0], t[0, :4])


def test_absent_class_is_nan_and_excluded_from_means():
    m = SegmentationMetrics(3, boundary=False)
    m.update(np.array([[0, 1]]), np.array([[0, 1]]))
    r = m.compute()
    assert math.isnan(r["per_class_accuracy"][2]) and math.isnan(r["per_class_iou"][2])
    assert r["class_accuracy"] == 1.0 and r["miou"] == 1.0


def test_mask_boundary_uses_4_neighbours_and_ignores_image_border():
    mask = np.zeros((5, 5), bool)
    mask[1:4, 1:4] = True
    b = mask_boundary(mask)
    expected = mask.copy()
    expected[2, 2] = False  # the centre has all 4 neighbours inside
    assert np.array_equal(b, expected)
    assert not mask_boundary(np.ones((4, 4), bool)).any()  # touching the border is not a boundary


def _halves(h, w, split):
    lab = np.zeros((h, w), np.int64)
    lab[:, split:] = 1
    return lab


def test_bf_hand_cases_with_tolerance():
    # 10x10: tolerance 0.0075 * 14.1 = 0.11 px: a 1-pixel shift of the edge scores 0.
    assert boundary_f1(_halves(10, 10, 5), _halves(10, 10, 5), 2).tolist() == [1.0, 1.0]
    assert boundary_f1(_halves(10, 10, 6), _halves(10, 10, 5), 2).tolist() == [0.0, 0.0]
    # 100x100: tolerance 1.06 px: a 1-pixel shift is within tolerance, a 2-pixel shift is not.
    assert 0.0075 * math.hypot(100, 100) == pytest.approx(1.0607, abs=1e-4)
    assert boundary_f1(_halves(100, 100, 51), _halves(100, 100, 50), 2).tolist() == [1.0, 1.0]
    assert boundary_f1(_halves(100, 100, 52), _halves(100, 100, 50), 2).tolist() == [0.0, 0.0]


def test_bf_skip_and_zero_rules():
    target = _halves(10, 10, 5)
    pred = target.copy()
    pred[4:6, 2:4] = 2  # class 2 appears only in the prediction
    s = boundary_f1(pred, target, 4)
    assert s[2] == 0.0  # only one side has a boundary -> 0
    assert math.isnan(s[3])  # neither side -> skipped
    m = SegmentationMetrics(4, ignore_index=None)
    m.update(pred, target)
    r = m.compute()
    assert r["bf"] == pytest.approx(np.nanmean(s))
    assert math.isnan(r["per_class_bf"][3])


def test_bf_image_with_no_boundaries_is_left_out_of_the_mean():
    m = SegmentationMetrics(2)
    m.update(np.zeros((6, 6), int), np.zeros((6, 6), int))  # no boundary anywhere: no counted class
    m.update(_halves(10, 10, 5), _halves(10, 10, 5))
    assert m.compute()["bf"] == 1.0


def _bf_brute_force(pred, target, k):
    h, w = target.shape
    t = BF_TOLERANCE * math.hypot(h, w)
    out = []
    for c in range(k):
        bg, bp = np.argwhere(mask_boundary(target == c)), np.argwhere(mask_boundary(pred == c))
        if len(bg) == 0 and len(bp) == 0:
            out.append(np.nan)
            continue
        if len(bg) == 0 or len(bp) == 0:
            out.append(0.0)
            continue
        d = np.sqrt(((bp[:, None, :] - bg[None, :, :]) ** 2).sum(-1).astype(np.float64))
        p, r = (d.min(1) <= t).mean(), (d.min(0) <= t).mean()
        out.append(0.0 if p + r == 0 else 2 * p * r / (p + r))
    return np.array(out)


@pytest.mark.parametrize("seed", range(6))
def test_bf_matches_brute_force_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    h, w = 120, 160  # tolerance 1.5 px: distances 1, sqrt(2) pass, 2 does not
    target = rng.integers(0, 3, (h // 8, w // 8)).repeat(8, 0).repeat(8, 1)
    pred = np.roll(target, shift=(int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
    pred[rng.random((h, w)) < 0.01] = 3
    ref = _bf_brute_force(pred, target, 4)
    got = boundary_f1(pred, target, 4)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


def _pairwise_auroc(u: np.ndarray, wrong: np.ndarray) -> float:
    """The AUROC by its definition (the Mann-Whitney U over every error/correct pair, ties half), float64."""
    e, c = u[wrong][:, None], u[~wrong][None, :]
    return float(((e > c).sum() + 0.5 * (e == c).sum()) / (e.size * c.size))


@pytest.mark.parametrize("seed", [0, 1])
def test_error_detection_auroc_equals_the_pairwise_definition(seed):
    rng = np.random.default_rng(seed)
    k, void = 4, 4
    det = ErrorDetection(k, ignore_index=void)
    us, wrongs = [], []
    for _ in range(3):  # frames: the bins add up across updates
        target = rng.integers(0, k + 1, (2, 17, 23))
        pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, k, target.shape)) % k
        # Values on a few levels (zero included) so that ties are exact, more uncertain where wrong.
        levels = np.array([0.0, 1e-7, 3e-4, 0.02, 0.2])
        u = levels[np.clip(rng.integers(0, 4, target.shape) + (pred != target), 0, 4)]
        det.update(u, pred, target)
        keep = target != void
        us.append(u[keep])
        wrongs.append((pred != target)[keep])
    u, wrong = np.concatenate(us), np.concatenate(wrongs)
    got = det.compute()
    assert got["auroc"] == pytest.approx(_pairwise_auroc(u, wrong), abs=1e-12)
    assert got["error_rate"] == pytest.approx(wrong.mean(), abs=1e-12)
    # Continuous values: ties only inside a bin (0.05% of a decade), so within 1e-3 of the exact statistic.
    cont = ErrorDetection(k)
    target = rng.integers(0, k, (40, 40))
    pred = np.where(rng.random(target.shape) < 0.6, target, (target + 1) % k)
    u = rng.lognormal(-4, 2, target.shape) * np.where(pred != target, 3.0, 1.0)
    cont.update(torch.from_numpy(u), torch.from_numpy(pred), target)
    assert cont.compute()["auroc"] == pytest.approx(_pairwise_auroc(u.ravel(), (pred != target).ravel()), abs=1e-3)


def test_error_detection_edge_cases():
    target = np.array([[0, 1, 2, 3]])
    pred = np.array([[0, 1, 0, 0]])  # the last two are wrong
    perfect, reversed_, none = ErrorDetection(4), ErrorDetection(4), ErrorDetection(4)
    perfect.update(np.array([[0.0, 0.1, 0.5, 0.9]]), pred, target)
    reversed_.update(np.array([[0.9, 0.5, 0.1, 0.0]]), pred, target)
    none.update(np.array([[0.1, 0.2, 0.3, 0.4]]), target, target)
    assert perfect.compute()["auroc"] == 1.0 and reversed_.compute()["auroc"] == 0.0
    assert math.isnan(none.compute()["auroc"]) and none.compute()["error_rate"] == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        perfect.update(np.zeros((1, 3)), pred, target)
