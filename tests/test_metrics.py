"""Tests for evaluate.py: NMS, detection mAP (parity with the Ultralytics fixture) and segmentation Dice/IoU."""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evaluate import (DetMeter, SegMeter, detection_metrics, match_greedy, match_predictions, nms, seg_scores,
                      xywh2xyxy)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "map_case.pt")
EMPTY_P, EMPTY_T = torch.zeros(0, 6), torch.zeros(0, 5)
PERFECT_AP = 0.995  # what Ultralytics reports for a flawless class (see test_perfect_prediction)


def target(cls, box):
    return [cls, *box]


def pred(box, conf, cls):
    return [*box, conf, cls]


# -----------------------------------------------------------------------------
# detection metrics


@pytest.mark.parametrize("greedy", [False, True])  # the fixture does not separate the two matching rules
def test_fixture_parity(greedy):
    d = torch.load(FIXTURE, weights_only=True)
    m = detection_metrics(d["preds"], d["targets"], d["nc"], greedy=greedy)
    for k in ("precision", "recall", "map50", "map50_95"):
        assert abs(m[k] - d[k]) < 1e-6, (k, m[k], d[k])
    np.testing.assert_array_equal(m["classes"], d["classes"].numpy())
    np.testing.assert_allclose(m["ap50"], d["ap50_per_class"].numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(m["ap"], d["ap50_95_per_class"].numpy(), atol=1e-6, rtol=0)
    assert m["ap_per_iou"].shape == (4, 10)


def test_meter_accumulates_like_one_shot():
    d = torch.load(FIXTURE, weights_only=True)
    meter = DetMeter()
    for i in range(0, 40, 7):  # uneven "batches"
        meter.update(d["preds"][i:i + 7], d["targets"][i:i + 7])
    a, b = meter.compute(d["nc"]), detection_metrics(d["preds"], d["targets"], d["nc"])
    assert a["map50_95"] == b["map50_95"] and a["precision"] == b["precision"]


def test_perfect_prediction():
    targets = [torch.tensor([target(0, [10, 10, 50, 60]), target(1, [70, 20, 90, 95])]),
               torch.tensor([target(1, [0, 0, 30, 30])])]
    preds = [torch.tensor([pred([10, 10, 50, 60], 0.9, 0), pred([70, 20, 90, 95], 0.8, 1)]),
             torch.tensor([pred([0, 0, 30, 30], 0.7, 1)])]
    m = detection_metrics(preds, targets, nc=3)
    assert m["precision"] == pytest.approx(1.0) and m["recall"] == pytest.approx(1.0)
    # The reference's AP tops out at 0.995, not 1: compute_ap appends a (recall[-1], 0) sentinel, np.interp at
    # recall 1.0 lands on it, and the last trapezoid [0.99, 1] averages 1 and 0. Parity means keeping that quirk.
    assert m["map50"] == pytest.approx(PERFECT_AP) and m["map50_95"] == pytest.approx(PERFECT_AP)
    assert list(m["classes"]) == [0, 1]
    np.testing.assert_allclose(m["maps"], PERFECT_AP)  # class 2 has no labels: it gets the mean


def test_no_predictions():
    targets = [torch.tensor([target(0, [10, 10, 50, 60])]), torch.tensor([target(2, [0, 0, 5, 5])])]
    m = detection_metrics([EMPTY_P, EMPTY_P], targets, nc=3)
    assert (m["precision"], m["recall"], m["map50"], m["map50_95"]) == (0.0, 0.0, 0.0, 0.0)
    assert list(m["classes"]) == [0, 2]


def test_no_targets():
    preds = [torch.tensor([pred([10, 10, 50, 60], 0.9, 0)]), EMPTY_P]
    m = detection_metrics(preds, [EMPTY_T, EMPTY_T], nc=2)
    assert (m["precision"], m["recall"], m["map50"], m["map50_95"]) == (0.0, 0.0, 0.0, 0.0)
    assert len(m["classes"]) == 0 and m["maps"].shape == (2,)
    assert detection_metrics([], [], nc=2)["map50"] == 0.0  # no images at all


def test_false_positive_and_wrong_class():
    targets = [torch.tensor([target(0, [0, 0, 10, 10])])]
    preds = [torch.tensor([pred([0, 0, 10, 10], 0.9, 1),   # right box, wrong class: ignored (class 1 has no labels)
                           pred([50, 50, 60, 60], 0.8, 0),  # FP ranked above the TP
                           pred([0, 0, 10, 10], 0.5, 0)])]
    m = detection_metrics(preds, targets, nc=2)
    assert m["recall"] == pytest.approx(1.0)
    # PR points (r, p): (0, 0) then (1, 0.5); envelope 0.5 up to recall 0.99, then the 0.995 quirk: 0.5 * 0.995
    assert m["map50"] == pytest.approx(0.4975)
    assert m["precision"] == pytest.approx(0.5)


def test_matching_rule_differs_from_greedy():
    # labels A, B; d0 overlaps only B (0.9); d1 overlaps A (0.7) and B (0.8). Same class everywhere.
    iou = np.array([[0.0, 0.7],    # A
                    [0.9, 0.8]],   # B
                   dtype=np.float32)
    # Reference rule: d1's best pair is B, B goes to the earlier detection d0, and d1 does not fall back to A.
    assert match_predictions(iou)[:, 0].tolist() == [True, False]
    # COCO-style greedy: d1 takes the still-free A.
    assert match_greedy(iou)[:, 0].tolist() == [True, True]
    # Detections keep their given order: with d1 listed first it takes B (its best), d0 is then left out.
    assert match_predictions(iou[:, ::-1].copy())[:, 0].tolist() == [True, False]
    # At 0.75 A is out of reach for d1: both rules agree.
    assert match_predictions(iou)[:, 5].tolist() == match_greedy(iou)[:, 5].tolist() == [True, False]


def test_matching_rule_end_to_end():
    # Same situation with real boxes. A and B overlap (IoU 0.82); d0 sits exactly on B; d1 is close to both but
    # closer to B: IoU(d1, A) = 9.2/10.8 = 0.85, IoU(d1, B) = 9.8/10.2 = 0.96.
    t = [torch.tensor([target(0, [0, 0, 10, 10]), target(0, [1, 0, 11, 10])])]
    p = [torch.tensor([pred([1, 0, 11, 10], 0.9, 0), pred([0.8, 0, 10.8, 10], 0.8, 0)])]
    ref, greedy = DetMeter(), DetMeter(greedy=True)
    ref.update(p, t)
    greedy.update(p, t)
    assert ref.tp[0][:, 0].tolist() == [True, False]
    assert greedy.tp[0][:, 0].tolist() == [True, True]
    assert ref.compute(1)["recall"] == pytest.approx(0.5)
    assert greedy.compute(1)["map50"] == pytest.approx(PERFECT_AP)


# -----------------------------------------------------------------------------
# NMS


def raw(boxes_xyxy, scores):
    """Build a decoded head output (1, 4+nc, A) from xyxy boxes and per-class scores."""
    b = torch.tensor(boxes_xyxy, dtype=torch.float32)
    xywh = torch.cat(((b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]), 1)
    return torch.cat((xywh, torch.tensor(scores, dtype=torch.float32)), 1).T[None]


def test_xywh2xyxy():
    assert xywh2xyxy(torch.tensor([[10.0, 20.0, 4.0, 6.0]])).tolist() == [[8.0, 17.0, 12.0, 23.0]]


def test_nms_suppresses_same_class_keeps_other_class():
    boxes = [[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]]
    scores = [[0.6, 0.0], [0.9, 0.0], [0.0, 0.8], [0.3, 0.0]]
    (out,) = nms(raw(boxes, scores), conf=0.25, iou=0.5)
    assert out.shape == (3, 6)
    assert out[:, 4].tolist() == pytest.approx([0.9, 0.8, 0.3])  # sorted by conf, the 0.6 box suppressed
    assert out[:, 5].tolist() == [0, 1, 0]
    assert out[0, :4].tolist() == pytest.approx([1, 1, 11, 11])
    (out,) = nms(raw(boxes, scores), conf=0.25, iou=0.5, agnostic=True)  # now the class-1 box goes too
    assert out[:, 4].tolist() == pytest.approx([0.9, 0.3])


def test_nms_conf_max_det_classes():
    boxes = [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]
    scores = [[0.9, 0.1], [0.2, 0.5], [0.25, 0.0]]
    (out,) = nms(raw(boxes, scores), conf=0.25)  # 0.25 itself is not > 0.25
    assert out[:, 4].tolist() == pytest.approx([0.9, 0.5])
    (out,) = nms(raw(boxes, scores), conf=0.25, max_det=1)
    assert out[:, 4].tolist() == pytest.approx([0.9])
    (out,) = nms(raw(boxes, scores), conf=0.25, classes=[1])
    assert out[:, 5].tolist() == [1]


def test_nms_multi_label():
    (out,) = nms(raw([[0, 0, 10, 10]], [[0.6, 0.4]]), conf=0.3, multi_label=True)
    assert out[:, 5].tolist() == [0, 1]  # one box, two labels, no cross-class suppression
    (out,) = nms(raw([[0, 0, 10, 10]], [[0.6, 0.4]]), conf=0.3)
    assert out[:, 5].tolist() == [0]


def test_nms_empty():
    out = nms(raw([[0, 0, 10, 10]], [[0.1, 0.2]]).repeat(2, 1, 1), conf=0.25)
    assert len(out) == 2 and all(o.shape == (0, 6) for o in out)
    out = nms(torch.zeros(3, 4 + 2, 0))
    assert len(out) == 3 and all(o.shape == (0, 6) for o in out)


def test_nms_output_feeds_metrics():
    boxes = [[0, 0, 10, 10], [1, 1, 11, 11]]
    out = nms(raw(boxes, [[0.9], [0.8]]), conf=0.001, iou=0.7)
    m = detection_metrics(out, [torch.tensor([target(0, [0, 0, 10, 10])])], nc=1)
    assert m["map50"] == pytest.approx(PERFECT_AP)


# -----------------------------------------------------------------------------
# segmentation metrics


def test_seg_meter_global_counts():
    big = 10.0
    meter = SegMeter()
    # image 1: pred {a, b}, mask {b, c} -> I=1, P=2, G=2
    meter.update(torch.tensor([[[big, big], [-big, -big]]]), torch.tensor([[[0, 1], [1, 0]]]))
    # image 2: both empty -> contributes nothing
    meter.update(torch.full((1, 1, 2, 2), -big), torch.zeros(1, 1, 2, 2))
    # image 3: missed a single pixel -> G += 1
    meter.update(torch.full((1, 2, 2), -big), torch.tensor([[[0, 0], [0, 1]]]))
    dice, iou = meter.compute()
    assert dice == pytest.approx(2 * 1 / (2 + 3))
    assert iou == pytest.approx(1 / (2 + 3 - 1))


def test_seg_upsampling_and_probabilities():
    logits = torch.tensor([[[[5.0, -5.0], [5.0, -5.0]]]])  # left half foreground at 2x2
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1
    assert seg_scores(logits, mask) == (1.0, 1.0)  # bilinear upsampling to 4x4 keeps the left half
    assert seg_scores(logits.sigmoid(), mask, from_logits=False) == (1.0, 1.0)
    assert seg_scores(torch.full((1, 1, 4, 4), -5.0), torch.zeros(1, 1, 4, 4)) == (1.0, 1.0)  # nothing anywhere
    assert seg_scores(torch.full((1, 1, 4, 4), 5.0), torch.zeros(1, 1, 4, 4)) == (0.0, 0.0)
