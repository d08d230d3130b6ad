"""Metrics: weighted F-beta against pysodmetrics, hand-computed confusion scores, the boundary band, repair
analysis and property tests."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from idgbr.metrics import (BoundaryWFm, ConfusionMatrix, RepairAnalysis, boundary_band, evaluate_maps,
                           weighted_fmeasure, wfm_band_scores)

py_sod_metrics = pytest.importorskip("py_sod_metrics")


def reference_wfm(pred: np.ndarray, gt: np.ndarray) -> float:
    """pysodmetrics' WeightedFmeasure; it takes uint8 maps in [0, 255], thresholds gt at 128 and min-max
    normalises pred (a no-op for a 0/255 map)."""
    metric = py_sod_metrics.WeightedFmeasure()
    metric.step(pred, gt)
    return float(metric.get_results()["wfm"])


def random_binary_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(4, 96, 2))
    kind = seed % 4
    if kind == 0:  # i.i.d. noise: many ties in the nearest-GT search
        gt, pred = rng.random((h, w)) < rng.random(), rng.random((h, w)) < rng.random()
    elif kind == 1:  # smooth blobs, like real masks
        gt = cv2.GaussianBlur(rng.random((h, w)), (0, 0), 3) > 0.5
        pred = gt ^ (cv2.GaussianBlur(rng.random((h, w)), (0, 0), 2) > 0.6)
    elif kind == 2:  # sparse GT: false positives far from it (the full distance transform path)
        gt = np.zeros((h, w), bool)
        gt[rng.integers(0, h, 2), rng.integers(0, w, 2)] = True
        pred = rng.random((h, w)) < 0.3
    else:  # thin boundary bands
        label = (cv2.GaussianBlur(rng.random((h, w)), (0, 0), 4) * 6).astype(np.uint8)
        gt, pred = boundary_band(label, 3), boundary_band(np.roll(label, 1, axis=int(seed % 2)), 3)
    return pred, gt


@pytest.mark.parametrize("seed", range(24))
def test_weighted_fmeasure_matches_pysodmetrics_on_binary_maps(seed: int) -> None:
    pred, gt = random_binary_pair(seed)
    expected = reference_wfm(pred.astype(np.uint8) * 255, gt.astype(np.uint8) * 255)
    assert weighted_fmeasure(pred, gt) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_weighted_fmeasure_matches_pysodmetrics_on_grey_maps(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    _, gt = random_binary_pair(seed)
    grey = rng.integers(0, 256, gt.shape).astype(np.uint8)
    scaled = grey / 255.0
    normalised = (scaled - scaled.min()) / (scaled.max() - scaled.min())  # pysodmetrics' mapminmax
    expected = reference_wfm(grey, gt.astype(np.uint8) * 255)
    assert weighted_fmeasure(normalised, gt) == pytest.approx(expected, abs=1e-6)


def test_weighted_fmeasure_at_512_matches_pysodmetrics() -> None:
    rng = np.random.default_rng(7)
    label = (cv2.GaussianBlur(rng.random((512, 512)), (0, 0), 12) * 40).astype(np.uint8)
    noisy = label.copy()
    cv2.circle(noisy, (100, 300), 25, 0, -1)
    for tol in (1, 5):
        gt, pred = boundary_band(label, tol), boundary_band(noisy, tol)
        for g, p in ((gt, pred), (~gt, ~pred)):
            expected = reference_wfm(p.astype(np.uint8) * 255, g.astype(np.uint8) * 255)
            assert weighted_fmeasure(p, g) == pytest.approx(expected, abs=1e-6)


def test_weighted_fmeasure_edge_cases() -> None:
    gt = np.zeros((8, 8), bool)
    assert weighted_fmeasure(gt, gt) == 0.0  # empty GT: 0, as pysodmetrics
    gt[2:5, 3:6] = True
    assert weighted_fmeasure(gt, gt) == pytest.approx(1.0, abs=1e-12)
    empty = np.zeros_like(gt)  # not 0: the zero-padded Gaussian lowers EA near the image border (as the original)
    assert weighted_fmeasure(empty, gt) == pytest.approx(reference_wfm(empty.astype(np.uint8), gt.astype(np.uint8) * 255))
    with pytest.raises(ValueError):
        weighted_fmeasure(np.full(gt.shape, 2.0), gt)


def test_confusion_matrix_hand_computed() -> None:
    # 3 classes, 10 labelled pixels (255 is ignored whatever is predicted there).
    gt = np.array([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 255, 255]])
    pred = np.array([[0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 1, 2]])
    # class 0: TP 3, GT 4, pred 4 -> IoU 3/5, P 3/4, R 3/4, F1 3/4
    # class 1: TP 2, GT 3, pred 3 -> IoU 2/4, P 2/3, R 2/3, F1 2/3
    # class 2: TP 2, GT 3, pred 3 -> IoU 2/4, P 2/3, R 2/3, F1 2/3
    cm = ConfusionMatrix(3)
    cm.update(gt, pred)
    out = cm.compute()
    assert out["iou"] == pytest.approx([3 / 5, 2 / 4, 2 / 4])
    assert out["precision"] == pytest.approx([3 / 4, 2 / 3, 2 / 3])
    assert out["recall"] == pytest.approx([3 / 4, 2 / 3, 2 / 3])
    assert out["f1"] == pytest.approx([3 / 4, 2 / 3, 2 / 3])
    assert out["oa"] == pytest.approx(7 / 10)
    pe = (4 * 4 + 3 * 3 + 3 * 3) / 10**2
    assert out["kappa"] == pytest.approx((7 / 10 - pe) / (1 - pe))
    assert out["miou"] == pytest.approx((3 / 5 + 1 / 2 + 1 / 2) / 3)
    assert out["mf1"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    assert out["fwiou"] == pytest.approx(0.4 * 3 / 5 + 0.3 * 0.5 + 0.3 * 0.5)
    assert out["num_pixels"] == 10


def test_absent_class_is_reported_but_not_averaged() -> None:
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 2, 1, 1]])  # class 2 predicted once, never in the GT
    cm = ConfusionMatrix(3)
    cm.update(gt, pred)
    out = cm.compute()
    assert out["present"] == [True, True, False]
    assert out["iou"][2] == 0.0 and out["precision"][2] == 0.0
    assert out["miou"] == pytest.approx((1 / 2 + 1) / 2)


def test_invalid_predictions_count_as_errors() -> None:
    gt = np.array([[0, 0, 1, 1]])
    valid = ConfusionMatrix(2)
    valid.update(gt, np.array([[0, 0, 1, 1]]))
    broken = ConfusionMatrix(2)
    broken.update(gt, np.array([[0, 7, 1, 255]]))  # 7 and 255 are not classes
    out = broken.compute()
    assert valid.compute()["oa"] == 1.0
    assert out["oa"] == pytest.approx(0.5)  # the reference would drop both pixels and report 1.0
    assert out["recall"] == pytest.approx([0.5, 0.5])
    assert out["precision"] == pytest.approx([1.0, 1.0])
    assert out["iou"] == pytest.approx([0.5, 0.5])
    assert out["invalid_pred_pixels"] == 2


def test_ground_truth_outside_the_classes_is_refused() -> None:
    with pytest.raises(ValueError):
        ConfusionMatrix(2).update(np.array([[0, 3]]), np.array([[0, 1]]))


def test_boundary_band_step_edge_and_ignore() -> None:
    label = np.zeros((6, 10), np.uint8)
    label[:, 5:] = 1
    # Sobel x is non-zero on the two columns next to the change (4, 5); a 3x3 dilation widens that to 3..6.
    np.testing.assert_array_equal(boundary_band(label, 1).any(axis=0), np.isin(np.arange(10), [4, 5]))
    np.testing.assert_array_equal(boundary_band(label, 3).any(axis=0), np.isin(np.arange(10), [3, 4, 5, 6]))
    assert not boundary_band(np.zeros((5, 5), np.uint8), 3).any()
    ignored = label.copy()
    ignored[:, 5:] = 255  # 255 takes part in the edge, but a 255 pixel inside the band reads as outside it
    band = boundary_band(ignored, 3)
    np.testing.assert_array_equal(band.any(axis=0), np.isin(np.arange(10), [3, 4]))


def test_band_scores_classes_follow_the_gt_band() -> None:
    flat = np.zeros((16, 16), np.uint8)
    assert set(wfm_band_scores(flat, flat, 3)) == {0}  # no true boundary: only the non-band class
    label = flat.copy()
    label[:, 8:] = 1
    scores = wfm_band_scores(label, label, 3)
    assert set(scores) == {0, 1} and all(v == pytest.approx(1.0) for v in scores.values())


def test_boundary_wfm_aggregate_min_and_band_mean() -> None:
    label = np.zeros((32, 32), np.uint8)
    label[:, 16:] = 1
    shifted = np.roll(label, 2, axis=1)
    acc = BoundaryWFm((3,), "min")
    acc.update(label, shifted)
    acc.update(np.zeros_like(label), np.zeros_like(label))  # no boundary: class 0 only, Q = 1
    res = acc.result()
    first = wfm_band_scores(shifted, label, 3)
    assert res["band"]["3"] == pytest.approx(first[1])  # band class only from the image with a boundary
    assert res["classes"]["3"][0] == pytest.approx((first[0] + 1.0) / 2)
    assert res["wfm"]["3"] == pytest.approx(min(first[1], (first[0] + 1.0) / 2))
    mean = BoundaryWFm((3,), "mean")
    mean.update(label, shifted)
    assert mean.result()["wfm"]["3"] == pytest.approx((first[0] + first[1]) / 2)


def test_repair_analysis_hand_computed() -> None:
    gt = np.array([[1, 1, 1, 1, 0, 0, 0, 0]])
    coarse = np.array([[1, 1, 0, 0, 1, 1, 0, 0]])
    refined = np.array([[1, 0, 1, 0, 0, 1, 0, 0]])
    # foreground (binary data -> class 1): RTm = {0, 1}, refined keeps pixel 0 -> IoU_RTm = 1/2.
    # RFm = {2, 3, 4, 5}; M_t ∩ RFm = {2, 3}, M_re ∩ RFm = {2, 5}: IoU_RFm = |{2}| / |{2, 3, 5}| = 1/3.
    repair = RepairAnalysis(2, k=0.5)
    value = repair.update(gt, coarse, refined)
    assert value == pytest.approx(1 / 3 - 0.5 * (1 - 1 / 2))
    out = repair.result(["bg", "fg"])
    assert out["iou_rtm"] == pytest.approx(0.5) and out["iou_rfm"] == pytest.approx(1 / 3)
    assert out["buckets"] == {"complete": 0, "partial": 1, "error": 0}
    perfect = RepairAnalysis(2)
    assert math.isnan(perfect.update(gt, gt, gt))  # no coarse error: undefined, not scored
    assert perfect.result()["iou_imp"] is None and perfect.result()["num_unscored_images"] == 1
    multi = RepairAnalysis(3)
    assert multi.classes == [0, 1, 2]


def test_evaluate_maps_keys_and_coarse() -> None:
    gt = np.zeros((40, 40), np.uint8)
    gt[:, 10:25] = 1
    gt[5:15, 30:] = 2
    items = [(gt, gt, np.roll(gt, 3, axis=0))]
    res = evaluate_maps(items, 3, class_names=["a", "b", "c"])
    for key in ("miou", "mf1", "oa", "kappa", "fwiou", "wfm", "per_class", "repair", "coarse", "num_images"):
        assert key in res
    assert set(res["wfm"]) == {"1", "3", "5"}
    assert res["miou"] == pytest.approx(1.0) and res["coarse"]["miou"] < 1.0
    assert res["repair"]["iou_imp"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        evaluate_maps([(gt, gt), (gt, gt, gt)], 3)


# ------------------------------------------------------------------------------------------------ properties
def label_maps(max_classes: int = 4):
    return st.integers(2, max_classes).flatmap(lambda k: st.tuples(
        st.just(k),
        st.integers(4, 24).flatmap(lambda h: st.integers(4, 24).flatmap(lambda w: st.tuples(
            arrays(np.uint8, (h, w), elements=st.integers(0, k - 1)),
            arrays(np.uint8, (h, w), elements=st.integers(0, k - 1))))),
    ))


@settings(max_examples=40, deadline=None)
@given(label_maps())
def test_perfect_prediction_scores_one(data) -> None:
    k, (gt, _) = data
    res = evaluate_maps([(gt, gt)], k)
    for key in ("miou", "mf1", "oa", "kappa"):
        assert res[key] == pytest.approx(1.0)
    for value in res["wfm"].values():
        assert value == pytest.approx(1.0)
    for row in res["per_class"]:
        assert row["present"] == bool((gt == row["index"]).any())
        if row["present"]:
            assert row["iou"] == pytest.approx(1.0) and row["f1"] == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(label_maps(), st.booleans())
def test_scores_are_fractions(data, with_ignore) -> None:
    k, (gt, pred) = data
    if with_ignore:
        gt = gt.copy()
        gt[0, :] = 255
    res = evaluate_maps([(gt, pred, np.roll(pred, 1, axis=1))], k)
    for scope in (res, res["coarse"]):
        for key in ("miou", "mf1", "oa", "fwiou"):
            assert 0.0 <= scope[key] <= 1.0
        assert -1.0 <= scope["kappa"] <= 1.0  # negative only when worse than chance
        for table in (scope["wfm"], scope["wfm_band"]):
            assert all(0.0 <= v <= 1.0 for v in table.values())
        for row in scope["per_class"]:
            assert all(0.0 <= row[m] <= 1.0 for m in ("iou", "precision", "recall", "f1"))
    for key in ("iou_rtm", "iou_rfm"):
        assert res["repair"][key] is None or 0.0 <= res["repair"][key] <= 1.0
    fractions = res["repair"]["bucket_fractions"]
    assert sum(fractions.values()) == pytest.approx(1.0) or res["repair"]["num_scored_images"] == 0


@settings(max_examples=30, deadline=None)
@given(label_maps(), st.randoms(use_true_random=False))
def test_confusion_scores_invariant_to_class_relabelling(data, rnd) -> None:
    k, (gt, pred) = data
    perm = list(range(k))
    rnd.shuffle(perm)
    lut = np.array(perm + [255] * (256 - k), np.uint8)
    a, b = evaluate_maps([(gt, pred)], k), evaluate_maps([(lut[gt], lut[pred])], k)
    for key in ("miou", "mf1", "oa", "kappa", "fwiou"):
        assert a[key] == pytest.approx(b[key])


@settings(max_examples=30, deadline=None)
@given(label_maps(max_classes=2))
def test_binary_wfm_invariant_to_swapping_classes(data) -> None:
    # Sobel(1 - x) = -Sobel(x): the bands, hence WFm, do not depend on which class is "foreground". (With more
    # classes a relabelling can change the rare Sobel cancellations, as in the reference.)
    _, (gt, pred) = data
    a, b = evaluate_maps([(gt, pred)], 2), evaluate_maps([(1 - gt, 1 - pred)], 2)
    assert a["wfm"] == pytest.approx(b["wfm"])
    assert a["miou"] == pytest.approx(b["miou"])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_weighted_fmeasure_matches_pysodmetrics_property(seed) -> None:
    pred, gt = random_binary_pair(seed)
    expected = reference_wfm(pred.astype(np.uint8) * 255, gt.astype(np.uint8) * 255)
    assert weighted_fmeasure(pred, gt) == pytest.approx(expected, abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(label_maps(), st.integers(1, 3), st.booleans())
def test_empty_classes_change_nothing_and_perfect_stays_one(data, extra, with_ignore) -> None:
    """Classes absent from both maps (issue 7 §4) are not averaged: the scores equal those without them, stay
    finite, and a perfect prediction still scores 1 (mIoU, mF1, OA, WFm), also with ignored pixels."""
    k, (gt, pred) = data
    if with_ignore:
        gt = gt.copy()
        gt[0, :] = 255
    base, more = evaluate_maps([(gt, pred)], k), evaluate_maps([(gt, pred)], k + extra)
    for key in ("miou", "mf1", "oa", "kappa"):
        assert np.isfinite(more[key]) and more[key] == pytest.approx(base[key])
    assert more["wfm"] == pytest.approx(base["wfm"])
    assert [row["present"] for row in more["per_class"]][k:] == [False] * extra
    perfect = evaluate_maps([(gt, gt)], k + extra)  # boundary WFm treats 255 as a region, as the reference does
    for key in ("miou", "mf1", "oa"):
        assert perfect[key] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in perfect["wfm"].values())


def test_all_ignored_ground_truth_gives_no_nan_crash() -> None:
    """An image whose ground truth is all ignore pixels is scored without NaN: alone, every confusion score is 0
    (the documented "no labelled pixel" value) and no class is present; added to other images, it changes none of
    their scores (it adds no pixel to the confusion matrix, and no boundary to WFm or BF)."""
    gt = np.full((8, 8), 255, np.uint8)
    res = evaluate_maps([(gt, np.zeros_like(gt))], 3)
    assert [res[key] for key in ("miou", "mf1", "oa", "kappa", "fwiou")] == [0.0] * 5
    assert res["num_pixels"] == 0 and not any(c["present"] for c in res["per_class"])
    assert all(np.isfinite(v) for v in res["wfm"].values())

    labelled = np.zeros((32, 32), np.uint8)
    labelled[8:20, 8:24] = 1
    labelled[20:, :10] = 2
    pairs = [(labelled, np.roll(labelled, 2, axis=1)), (labelled.T.copy(), np.roll(labelled.T, 1, axis=0))]
    alone = evaluate_maps(pairs, 3)
    mixed = evaluate_maps(pairs[:1] + [(gt, np.zeros_like(gt))] + pairs[1:], 3)
    for key in ("miou", "mf1", "oa", "kappa", "fwiou", "wfm", "bf", "num_pixels"):
        assert mixed[key] == alone[key], key
    assert 0 < alone["miou"] < 1 and mixed["num_images"] == 3


def _bpr(gts, preds, tolerance):
    from idgbr.metrics import BoundaryPR

    scores = BoundaryPR((tolerance,))
    for gt, pred in zip(gts, preds):
        scores.update(gt, pred)
    result = scores.result()
    return {**result.pop("bf")[str(tolerance)], **result}


def _halves(split_at: int) -> np.ndarray:
    label = np.zeros((32, 32), np.uint8)
    label[:, split_at:] = 1
    return label


def test_boundary_pr_counts_a_shifted_boundary_only_within_the_tolerance() -> None:
    """BoundaryPR: a boundary moved by 2 px is all hits at 3 px and all misses at 0 px."""
    gt, shifted = _halves(16), _halves(18)  # boundary pixels at x = 15/16 and 17/18: 1-3 px apart
    near = _bpr([gt], [shifted], tolerance=3)
    assert near["precision"] == near["recall"] == near["f"] == 1.0
    far = _bpr([gt], [shifted], tolerance=0)
    assert far["precision"] == far["recall"] == 0.0
    same = _bpr([gt], [gt], tolerance=0)
    assert same["f"] == 1.0 and same["boundary_ratio"] == 1.0 and same["components_ratio"] == 1.0


def test_boundary_pr_a_far_speck_costs_precision_and_adds_components() -> None:
    """An island 9 px from the true boundary: recall stays 1, precision drops, components 1.5x; in an ignore area
    it does not count."""
    gt = _halves(16)
    speck = gt.copy()
    speck[5:7, 3:5] = 1  # a 2x2 island of class 1, 9 px from the true boundary
    result = _bpr([gt], [speck], tolerance=3)
    assert result["recall"] == 1.0 and result["precision"] < 1.0
    assert result["components_ratio"] == 1.5 and result["boundary_ratio"] > 1.0
    ignored = gt.copy()
    ignored[:, :6] = 255  # borders with ignore pixels are not boundaries, and the speck lies in the ignore area
    assert _bpr([ignored], [speck], tolerance=3)["precision"] == 1.0
