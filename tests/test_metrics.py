"""sp_cam/metrics.py: both absent-class conventions against hand-computed values and slow reference implementations."""

import json

import numpy as np
import pytest

from sp_cam.metrics import ABSENT_CONVENTIONS, confusion_matrix, iou_from_confusion

# 5 classes; 3 (cow) and 4 (sheep) appear in neither GT nor prediction. The GT-255 pixel (predicted 2) is not scored.
GT = np.array([[0, 0, 1, 1], [0, 0, 2, 255]], np.uint8)
PRED = np.array([[0, 1, 1, 1], [0, 0, 2, 2]], np.uint8)
NAMES = ("background", "cat", "dog", "cow", "sheep")


def slow_confusion(preds, gts, n):
    conf = np.zeros((n, n), np.int64)
    for pred, gt in zip(preds, gts, strict=True):
        for p, g in zip(pred.reshape(-1), gt.reshape(-1), strict=True):
            if g != 255:
                conf[g, p] += 1
    return conf


def irn_style(preds, gts, n):
    """IRN's eval_sem_seg arithmetic: union = GT + Pred - TP, fp = 1 - GT / union, fn = 1 - Pred / union, nanmean."""
    conf = slow_confusion(preds, gts, n).astype(np.float64)
    gtj, resj, tp = conf.sum(1), conf.sum(0), np.diag(conf)
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = gtj + resj - tp
        iou, fp, fn = tp / denom, 1 - gtj / denom, 1 - resj / denom
    return {"miou": 100 * np.nanmean(iou), "iou": iou, "fp": fp, "fn": fn}


def puzzlecam_style(preds, gts, n):
    """PuzzleCAM's calculator: per class P, T, TP by pixel counting, a 1e-10 in every denominator, plain means."""
    P, T, TP = np.zeros(n), np.zeros(n), np.zeros(n)
    for pred, gt in zip(preds, gts, strict=True):
        scored = gt < 255
        for c in range(n):
            P[c] += np.sum((pred == c) & scored)
            T[c] += np.sum((gt == c) & scored)
            TP[c] += np.sum((gt == c) & (pred == gt) & scored)
    union = T + P - TP + 1e-10
    iou, fp, fn = TP / union, (P - TP) / union, (T - TP) / union
    return {"miou": 100 * iou.mean(), "fg_miou": 100 * iou[1:].mean(), "fp_fg": fp[1:].mean(), "fn_fg": fn[1:].mean()}


def test_confusion_matrix_matches_pixel_loop():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 6, (9, 11)).astype(np.uint8)
    gt[rng.random((9, 11)) < 0.2] = 255
    pred = rng.integers(0, 6, (9, 11)).astype(np.uint8)
    np.testing.assert_array_equal(confusion_matrix(pred, gt, 6), slow_confusion([pred], [gt], 6))


def test_hand_computed_present():
    r = iou_from_confusion(confusion_matrix(PRED, GT, 5))
    # bg: TP 3, GT 4, pred 3 -> union 4; cat: TP 2, GT 2, pred 3 -> union 3; dog: TP 1, GT 1, pred 1
    np.testing.assert_allclose(r.iou[:3], [3 / 4, 2 / 3, 1.0])
    assert np.isnan(r.iou[3:]).all() and r.absent.tolist() == [False, False, False, True, True]
    np.testing.assert_allclose(r.fp[:3], [0 / 4, 1 / 3, 0.0])  # FP / (TP + FP + FN)
    np.testing.assert_allclose(r.fn[:3], [1 / 4, 0 / 3, 0.0])  # FN / (TP + FP + FN)
    np.testing.assert_allclose(r.precision[:3], [3 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(r.recall[:3], [3 / 4, 2 / 2, 1.0])
    assert r.gt_pixels.tolist() == [4, 2, 1, 0, 0] and r.pred_pixels.tolist() == [3, 3, 1, 0, 0]
    assert r.convention == "present" and r.num_scored == 3
    assert r.miou == pytest.approx(100 * (3 / 4 + 2 / 3 + 1) / 3)  # 80.56
    assert r.fg_miou == pytest.approx(100 * (2 / 3 + 1) / 2)  # 83.33
    assert r.fg_fp == pytest.approx(100 * (1 / 3 + 0) / 2) and r.fg_fn == pytest.approx(0.0)
    assert r.pixel_acc == pytest.approx(100 * 6 / 7)
    assert r.mean_acc == pytest.approx(100 * (3 / 4 + 1 + 1) / 3)
    assert r.fw_iou == pytest.approx(100 * (4 * 3 / 4 + 2 * 2 / 3 + 1 * 1) / 7)


def test_hand_computed_zero():
    r = iou_from_confusion(confusion_matrix(PRED, GT, 5), absent="zero")
    np.testing.assert_allclose(r.iou, [3 / 4, 2 / 3, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(r.fp, [0.0, 1 / 3, 0.0, 0.0, 0.0])
    assert r.convention == "zero" and r.num_scored == 5 and r.absent.sum() == 2
    assert r.miou == pytest.approx(100 * (3 / 4 + 2 / 3 + 1) / 5)  # 48.33
    assert r.fg_miou == pytest.approx(100 * (2 / 3 + 1) / 4)  # 41.67
    assert r.fg_fp == pytest.approx(100 * (1 / 3) / 4)
    # the convention does not touch accuracy or fwIoU
    assert r.pixel_acc == pytest.approx(100 * 6 / 7) and r.fw_iou == pytest.approx(100 * (3 + 4 / 3 + 1) / 7)


def test_gt_as_prediction_on_a_subset_with_most_classes_absent():
    gt = np.zeros((6, 8), np.uint8)
    gt[2:5, 3:7] = 15  # person only, as on a VOC subset of a few photos
    gt[0, 0] = 255
    conf = confusion_matrix(gt, gt, 21)
    present = iou_from_confusion(conf)
    assert present.miou == pytest.approx(100.0) and present.fg_miou == pytest.approx(100.0)
    assert present.num_scored == 2 and int(present.absent.sum()) == 19
    zero = iou_from_confusion(conf, absent="zero")
    assert zero.miou == pytest.approx(100 * 2 / 21)  # 9.52: the published convention on such a subset
    assert zero.fg_miou == pytest.approx(100 * 1 / 20)


def test_against_irn_and_puzzlecam_reimplementations():
    rng = np.random.default_rng(1)
    n = 8
    gts, preds = [], []
    for _ in range(4):
        gt = rng.choice([0, 1, 2, 5], size=(7, 9)).astype(np.uint8)  # 3, 4, 6, 7 never in GT
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = rng.choice([0, 1, 2, 4, 5], size=(7, 9)).astype(np.uint8)  # 4 predicted but never in GT
        gts.append(gt)
        preds.append(pred)
    conf = sum(confusion_matrix(p, g, n) for p, g in zip(preds, gts, strict=True))
    irn, pcam = irn_style(preds, gts, n), puzzlecam_style(preds, gts, n)
    present, zero = iou_from_confusion(conf, "present"), iou_from_confusion(conf, "zero")
    assert present.absent.tolist() == [False, False, False, True, False, False, True, True]
    assert present.miou == pytest.approx(irn["miou"], abs=1e-9)
    np.testing.assert_allclose(present.iou, irn["iou"], equal_nan=True)
    np.testing.assert_allclose(present.fp, irn["fp"], equal_nan=True, atol=1e-12)
    np.testing.assert_allclose(present.fn, irn["fn"], equal_nan=True, atol=1e-12)
    assert zero.miou == pytest.approx(pcam["miou"], abs=1e-6)
    assert zero.fg_miou == pytest.approx(pcam["fg_miou"], abs=1e-6)
    assert zero.fg_fp == pytest.approx(100 * pcam["fp_fg"], abs=1e-6)
    assert zero.fg_fn == pytest.approx(100 * pcam["fn_fg"], abs=1e-6)
    assert present.miou > zero.miou  # three absent classes pull the published number down


def test_table_and_dict():
    r = iou_from_confusion(confusion_matrix(PRED, GT, 5))
    text = r.table(NAMES)
    miou = next(line for line in text.splitlines() if line.startswith("mIoU "))
    assert miou.split()[1] == "80.56" and "over the 3 classes present in GT or prediction" in miou
    cow = next(line for line in text.splitlines() if line.startswith("cow"))
    assert "absent" in cow and "-" in cow
    z = iou_from_confusion(confusion_matrix(PRED, GT, 5), absent="zero").table(NAMES)
    assert "over all 5 classes, absent ones counted as 0" in z
    d = r.as_dict(NAMES)
    json.dumps(d, allow_nan=False)  # NaN is written as null
    assert d["absent"] == "present" and d["absent_classes"] == ["cow", "sheep"] and d["num_scored"] == 3
    assert d["confusion"] == confusion_matrix(PRED, GT, 5).tolist()
    assert d["classes"][1] == {
        "index": 1, "name": "cat", "iou": pytest.approx(200 / 3), "fp": pytest.approx(100 / 3), "fn": 0.0,
        "precision": pytest.approx(200 / 3), "recall": 100.0, "gt_pixels": 2, "pred_pixels": 3, "tp": 2,
        "absent": False,
    }  # fmt: skip
    assert d["classes"][3]["iou"] is None and d["iou"]["cow"] is None
    with pytest.raises(ValueError, match="4 class names for 5"):
        r.table(NAMES[:4])


def test_bad_inputs():
    with pytest.raises(ValueError, match="present, zero"):
        iou_from_confusion(np.eye(3), absent="nan")
    assert ABSENT_CONVENTIONS == ("present", "zero")
    with pytest.raises(ValueError, match="square"):
        iou_from_confusion(np.zeros((2, 3)))
    empty = iou_from_confusion(np.zeros((3, 3), np.int64))
    assert np.isnan(empty.miou) and empty.absent.all()
