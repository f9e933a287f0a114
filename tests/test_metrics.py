"""Tests for metrics.py: NMS, detection mAP (parity with the Ultralytics fixture) and segmentation Dice/IoU."""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from box_ops import xywh2xyxy
from metrics import DetMeter, SegMeter, detection_metrics, match_greedy, match_predictions, nms, seg_scores

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
    # Older IoU-sorted rule: d1's best pair is B, B goes to the earlier detection d0, d1 does not fall back to A.
    assert match_predictions(iou)[:, 0].tolist() == [True, False]
    # COCO-style greedy (the default, Ultralytics 8.4): d1 takes the still-free A.
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
    old, greedy = DetMeter(greedy=False), DetMeter()  # greedy is the default
    old.update(p, t)
    greedy.update(p, t)
    assert old.tp[0][:, 0].tolist() == [True, False]
    assert greedy.tp[0][:, 0].tolist() == [True, True]
    assert old.compute(1)["recall"] == pytest.approx(0.5)
    assert greedy.compute(1)["map50"] == pytest.approx(PERFECT_AP)


# -----------------------------------------------------------------------------
# matching rules on crowded scenes, against a brute-force evaluator written from the definitions
# (pure Python loops, float64, no code shared with metrics.py)

BF_THRESHOLDS = [0.5 + 0.05 * k for k in range(10)]


def bf_iou(a, b):
    iw, ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0])), max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def bf_match(dets, gts, t, rule):
    """dets [(box, conf, cls)] of one image, gts [(cls, box)] -> TP flag per detection, most confident first."""
    dets = sorted(dets, key=lambda d: -d[1])
    ious = [[bf_iou(d[0], g[1]) if d[2] == g[0] else 0.0 for g in gts] for d in dets]
    if rule == "greedy":  # each detection in turn takes the unclaimed GT of highest IoU (ties: lower index) if >= t
        claimed, flags = set(), []
        for row in ious:
            best = None
            for gi, v in enumerate(row):
                if gi not in claimed and v >= t and (best is None or v > row[best]):
                    best = gi
            if best is not None:
                claimed.add(best)
            flags.append(best is not None)
        return dets, flags
    # iou_sorted: each detection points at its best GT overall (ties: lower index) if >= t; a GT goes to the most
    # confident detection pointing at it, the others are false positives even when another GT is free
    owner = {}
    for di, row in enumerate(ious):
        best = max(range(len(row)), key=lambda gi: (row[gi], -gi)) if row else None
        if best is not None and row[best] >= t:
            owner.setdefault(best, di)
    return dets, [di in owner.values() for di in range(len(dets))]


def bf_interp(x, xs, ys):
    """np.interp for non-decreasing xs (x inside [xs[0], xs[-1]]): linear from the last xs[j] <= x to the next."""
    if x >= xs[-1]:
        return ys[-1]
    j = max(i for i in range(len(xs)) if xs[i] <= x)
    return ys[j] + (x - xs[j]) * (ys[j + 1] - ys[j]) / (xs[j + 1] - xs[j])


def bf_ap(flags, n_labels):
    """AP of one class from its detections' TP flags (dataset-wide, descending confidence): area under the
    precision envelope sampled at recall 0, 0.01, .., 1 (trapezoids), with the reference's sentinels: (0, 1) in
    front, (last recall, 0) and (1, 0) behind, so the point at recall 1 is always 0 (a perfect class: 0.995)."""
    if not flags:
        return 0.0
    tp = fp = 0
    xs, ys = [0.0], [1.0]
    for f in flags:
        tp, fp = tp + f, fp + (not f)
        xs.append(tp / n_labels)
        ys.append(tp / (tp + fp))
    xs, ys = xs + [xs[-1], 1.0], ys + [0.0, 0.0]
    for i in range(len(ys) - 2, -1, -1):  # envelope: best precision at this recall or beyond
        ys[i] = max(ys[i], ys[i + 1])
    pts = [bf_interp(k / 100, xs, ys) for k in range(101)]
    return sum((pts[k] + pts[k + 1]) / 2 * 0.01 for k in range(100))


def bf_curve(confs, vals, g, left):
    """Value at confidence g of the curve through (confs[i], vals[i]) (confs descending), linear in between;
    `left` above the highest confidence, the last value below the lowest."""
    if g > confs[0]:
        return left
    if g <= confs[-1]:
        return vals[-1]
    j = max(i for i in range(len(confs)) if confs[i] >= g)
    return vals[j] + (confs[j] - g) * (vals[j + 1] - vals[j]) / (confs[j] - confs[j + 1])


def brute_force_metrics(preds, targets, rule):
    """Same inputs as detection_metrics -> precision, recall, map50, map50_95, ap_per_iou (class, threshold).
    P and R are taken at the confidence (grid of 1000) maximising the mean F1 over classes at IoU 0.5, after a
    101-wide box filter with edges padded by the end values, as the reference does."""
    imgs = [([(r[:4], r[4], int(r[5])) for r in p.tolist()], [(int(r[0]), r[1:]) for r in t.tolist()])
            for p, t in zip(preds, targets)]
    classes = sorted({g[0] for _, gts in imgs for g in gts})
    n_labels = {c: sum(g[0] == c for _, gts in imgs for g in gts) for c in classes}
    per_class = {c: [] for c in classes}  # c -> [(conf, [flag per threshold])]
    for dets, gts in imgs:
        matched = [bf_match(dets, gts, t, rule) for t in BF_THRESHOLDS]
        for i, d in enumerate(matched[0][0]):
            if d[2] in per_class:
                per_class[d[2]].append((d[1], [m[1][i] for m in matched]))
    ap, curves = [], []
    for c in classes:
        rows = sorted(per_class[c], key=lambda r: -r[0])
        ap.append([bf_ap([r[1][k] for r in rows], n_labels[c]) for k in range(len(BF_THRESHOLDS))])
        tp = [sum(r[1][0] for r in rows[:i + 1]) for i in range(len(rows))]
        curves.append(([r[0] for r in rows], [x / n_labels[c] for x in tp], [x / (i + 1) for i, x in enumerate(tp)]))
    grid = [i / 999 for i in range(1000)]
    p_at = [[bf_curve(cf, pr, g, 1.0) if cf else 0.0 for g in grid] for cf, _, pr in curves]
    r_at = [[bf_curve(cf, rc, g, 0.0) if cf else 0.0 for g in grid] for cf, rc, _ in curves]
    f1 = [sum(2 * p[i] * r[i] / (p[i] + r[i] + 1e-16) for p, r in zip(p_at, r_at)) / len(classes) for i in range(1000)]
    padded = [f1[0]] * 50 + f1 + [f1[-1]] * 50
    smoothed = [sum(padded[i:i + 101]) / 101 for i in range(1000)]
    best = smoothed.index(max(smoothed))
    mean = lambda xs: sum(xs) / len(xs)
    return dict(precision=mean([p[best] for p in p_at]), recall=mean([r[best] for r in r_at]),
                map50=mean([a[0] for a in ap]), map50_95=mean([mean(a) for a in ap]), ap_per_iou=ap)


def bf_margin(preds, targets):
    """Smallest distance of a same-class IoU to a threshold: far from 0, float32 vs float64 cannot flip a match."""
    return min(abs(bf_iou(p[:4], t[1:]) - th) for pp, tt in zip(preds, targets) for p in pp.tolist()
               for t in tt.tolist() if p[5] == t[0] for th in BF_THRESHOLDS)


def nms_order(rows):
    """Detections as NMS delivers them: descending confidence."""
    return torch.tensor(sorted(rows, key=lambda r: -r[4]))


def crowded_scene():
    # image 0: a row of five class-0 objects (10 x 20, one every 4 px: neighbours overlap with IoU 0.43), seven
    # detections, several of them between two objects; image 1: two overlapping class-0 objects and a tight
    # cluster of three class-1 objects. 7 + 3 labels: no recall k/n falls on the 0.01 grid of compute_ap.
    t0 = torch.tensor([target(0, [x, 0, x + 10, 20]) for x in (0, 4, 8, 12, 16)])
    p0 = nms_order([pred([4.6, 0.9, 14.3, 19.9], 0.95, 0), pred([5.9, 0.4, 15.6, 19.9], 0.90, 0),
                    pred([9.2, 0.4, 19.7, 20.2], 0.85, 0), pred([0.2, 0.3, 10.5, 19.9], 0.80, 0),
                    pred([13.4, 0.6, 23.3, 20.2], 0.70, 0), pred([17.1, 0.1, 26.6, 20.5], 0.60, 0),
                    pred([10.8, 0.0, 20.1, 20.4], 0.40, 0)])
    t1 = torch.tensor([target(0, [50, 50, 62, 70]), target(0, [55, 52, 67, 72]),
                       target(1, [0, 0, 20, 20]), target(1, [6, 2, 26, 22]), target(1, [12, 0, 32, 20])])
    p1 = nms_order([pred([55.9, 51.7, 68.1, 71.4], 0.88, 0), pred([50.9, 50.8, 62.8, 70.3], 0.50, 0),
                    pred([5.0, 0.7, 24.6, 21.4], 0.93, 1), pred([8.9, 0.9, 28.8, 20.8], 0.82, 1),
                    pred([12.3, 0.0, 32.3, 20.2], 0.75, 1), pred([0.0, 0.0, 20.4, 20.0], 0.30, 1)])
    return [p0, p1], [t0, t1]


def assert_matches_brute_force(m, bf):
    for k in ("precision", "recall", "map50", "map50_95"):
        assert abs(m[k] - bf[k]) < 1e-9, (k, m[k], bf[k])
    np.testing.assert_allclose(m["ap_per_iou"], bf["ap_per_iou"], atol=1e-9, rtol=0)


def test_crowded_scene_default_is_greedy():
    preds, targets = crowded_scene()
    assert bf_margin(preds, targets) > 0.01
    greedy, iou_sorted = brute_force_metrics(preds, targets, "greedy"), brute_force_metrics(preds, targets, "iou")
    m = detection_metrics(preds, targets, nc=2)  # the default rule
    assert_matches_brute_force(m, greedy)
    meter = DetMeter()  # the meter validate() uses, fed image by image
    for p, t in zip(preds, targets):
        meter.update([p], [t])
    assert_matches_brute_force(meter.compute(2), greedy)
    old = detection_metrics(preds, targets, nc=2, greedy=False)
    assert_matches_brute_force(old, iou_sorted)
    # the two rules part in the second decimal of mAP50-95 (and here already at mAP50), not in P/R
    assert greedy["map50_95"] == pytest.approx(0.6519, abs=1e-4) and greedy["map50"] == pytest.approx(0.9450, abs=1e-4)
    assert old["map50_95"] == pytest.approx(0.6248, abs=1e-4) and old["map50"] == pytest.approx(0.8594, abs=1e-4)
    assert m["map50_95"] - old["map50_95"] > 0.02


def test_greedy_confident_detection_keeps_gt_a_later_one_fits_better():
    # d0 (0.9) overlaps A with IoU 0.76; d1 (0.8) overlaps A better (0.92) and B a little (0.63).
    t = [torch.tensor([target(0, [5, 0, 15, 10]), target(0, [7.6, 0, 17.6, 10])])]  # A, B
    p = [nms_order([pred([2.5, 0, 14.5, 10], 0.9, 0), pred([5.8, 0, 15, 10], 0.8, 0)])]  # d0, d1
    assert bf_margin(p, t) > 0.009
    greedy, old = DetMeter(), DetMeter(greedy=False)
    greedy.update(p, t)
    old.update(p, t)
    # thresholds 0.50 .. 0.95. d0 keeps A wherever it can (t <= 0.75) although d1 fits A better; greedy d1 then
    # falls back to B up to 0.60, misses at 0.65-0.75, and gets A from 0.80 on, where A is out of d0's reach.
    T, F = True, False
    assert greedy.tp[0][0].tolist() == old.tp[0][0].tolist() == [T, T, T, T, T, T, F, F, F, F]
    assert greedy.tp[0][1].tolist() == [T, T, T, F, F, F, T, T, T, F]
    assert old.tp[0][1].tolist() == [F, F, F, F, F, F, T, T, T, F]  # no fall-back to B
    assert_matches_brute_force(greedy.compute(1), brute_force_metrics(p, t, "greedy"))
    assert_matches_brute_force(old.compute(1), brute_force_metrics(p, t, "iou"))
    assert greedy.compute(1)["map50"] == pytest.approx(PERFECT_AP)  # both labels found, nothing false


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
