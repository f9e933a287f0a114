"""
Metrics of nanoCAMTL: NMS post-processing, detection P/R/mAP50/mAP50-95 and vessel Dice/IoU, and `measure`, which
scores any predictor on validation loaders (export.py --int8 compares its fp32 and int8 programs with it).

The detection metrics reproduce the numbers Ultralytics' YOLOv8 validator prints (P, R, mAP50, mAP50-95),
including its particular box-to-label matching rule and its F1-based choice of the reported P/R operating point.
Imports nothing of nanoCAMTL but box_ops, so that evaluate.py and export.py can both use it.
"""

import numpy as np
import torch
import torch.nn.functional as F

from box_ops import box_iou, xywh2xyxy

# IoU thresholds 0.50:0.05:0.95. Built in float32 exactly like the reference so that an IoU sitting right on a
# threshold (e.g. float32(0.55)) is judged the same way.
IOU_THRESHOLDS = torch.linspace(0.5, 0.95, 10).numpy()

# NMS settings of the Ultralytics *validation* path: a very low confidence floor (so the PR curve is complete) and
# multi-label boxes (one row per class scoring above conf). nms()'s own defaults are those of the *predict* path.
VAL_NMS = dict(conf=0.001, iou=0.7, max_det=300, multi_label=True)

# -----------------------------------------------------------------------------
# NMS


@torch.no_grad()
def nms(pred, conf=0.25, iou=0.7, max_det=300, classes=None, agnostic=False, multi_label=False, max_nms=30000):
    """
    pred: decoded head output (B, 4+nc, A) = xywh in input pixels, then sigmoid class scores.
    Returns one (N, 6) float tensor per image, rows x1, y1, x2, y2, conf, cls, sorted by conf descending.
    multi_label=False keeps each anchor's best class (predict path); the Ultralytics validator uses
    multi_label=True (see VAL_NMS), which emits one row per (anchor, class) scoring above conf.
    """
    import torchvision  # here, not at the top: with torch._dynamo it takes 1-2 s, which commands that stop early skip
    nc = pred.shape[1] - 4
    multi_label &= nc > 1  # with one class the two modes coincide
    out = []
    for x in pred.transpose(1, 2):  # (A, 4+nc) per image
        x = x[x[:, 4:].amax(1) > conf]  # cheap pre-filter: anchors with at least one score above conf
        boxes, scores = xywh2xyxy(x[:, :4]), x[:, 4:]
        if multi_label:
            i, j = torch.nonzero(scores > conf, as_tuple=True)
            det = torch.cat((boxes[i], scores[i, j, None], j[:, None].float()), 1)
        else:
            best, j = scores.max(1, keepdim=True)
            det = torch.cat((boxes, best, j.float()), 1)[best.view(-1) > conf]  # strict '>', as the reference
        if classes is not None:
            det = det[(det[:, 5:6] == torch.tensor(classes, device=det.device)).any(1)]
        if len(det) > max_nms:  # bound the O(n^2) NMS cost, like the reference
            det = det[det[:, 4].argsort(descending=True)[:max_nms]]
        group = torch.zeros_like(det[:, 5]) if agnostic else det[:, 5]
        keep = torchvision.ops.batched_nms(det[:, :4], det[:, 4], group, iou)[:max_det]  # sorted by score desc
        out.append(det[keep].float())
    return out


# -----------------------------------------------------------------------------
# detection metrics


def _rows(x, ncol):
    """Tensor/array/list of rows -> float numpy (n, ncol), so empty inputs of any shape work."""
    x = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)
    return x.reshape(-1, ncol)


def match_predictions(iou, thresholds=IOU_THRESHOLDS):
    """
    iou: (M labels, N detections), already zeroed where classes differ. Returns correct (N, T) bool.
    The IoU-sorted rule of the older YOLOv8 releases (8.0-8.3; DetMeter(greedy=False), kept to compare with numbers
    they produced; the default is match_greedy): per threshold take all pairs with IoU >= t,
    sort them by IoU (highest first, ties -> lower label then lower detection index), keep each detection's first
    pair, then, walking those in ascending detection index, keep each label's first pair. A detection whose best
    label is taken by an earlier detection is a false positive even if another label was free.
    """
    correct = np.zeros((iou.shape[1], len(thresholds)), dtype=bool)
    for k, t in enumerate(thresholds):
        lab, det = np.nonzero(iou >= t)
        if not len(lab):
            continue
        order = np.argsort(-iou[lab, det], kind="stable")
        lab, det = lab[order], det[order]
        _, first = np.unique(det, return_index=True)  # best pair per detection, now in ascending detection index
        lab, det = lab[first], det[first]
        _, first = np.unique(lab, return_index=True)  # lowest-index detection per label
        correct[det[first], k] = True
    return correct


def match_greedy(iou, thresholds=IOU_THRESHOLDS):
    """
    Same inputs/output as match_predictions; the COCO-style rule of the Ultralytics 8.4.190 reference and the default
    of DetMeter/detection_metrics: detections, in the given order (which must be descending confidence, as NMS
    delivers them), each claim their highest-IoU label still unclaimed at that threshold (ties -> lower label
    index) and are correct if that IoU >= t. Unlike match_predictions, a detection whose best label is already
    taken falls back to the next free one; thresholds are independent (a label too far for an earlier detection at
    a high t stays free for a later one).
    """
    correct = np.zeros((iou.shape[1], len(thresholds)), dtype=bool)
    free = np.ones((iou.shape[0], len(thresholds)), dtype=bool)  # labels still unclaimed, per threshold
    cols = np.arange(len(thresholds))
    for j in np.flatnonzero((iou >= thresholds.min()).any(0)):  # detections that can match anything at all
        cand = iou[:, j, None] * free  # (M, T)
        best = cand.argmax(0)
        correct[j] = cand[best, cols] >= thresholds
        free[best[correct[j]], cols[correct[j]]] = False
    return correct


def precision_envelope(recall, precision):
    """Recall with sentinels (0 first; recall[-1], 1 last) and the monotone precision envelope over it: at each
    recall, the best precision at that recall or beyond. What compute_ap integrates and PR_curve.png draws."""
    mrec = np.concatenate(([0.0], recall, [recall[-1] if len(recall) else 1.0], [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0], [0.0]))
    return mrec, np.flip(np.maximum.accumulate(np.flip(mpre)))


def compute_ap(recall, precision):
    """
    AP = area under the monotone precision envelope, sampled at 101 recall points (COCO), trapezoid rule.
    Quirk kept for parity: the (recall[-1], 0) sentinel makes np.interp return 0 at recall 1.0, so a flawless class
    scores 0.995, not 1 (the familiar "mAP50 0.995" of Ultralytics logs).
    """
    mrec, mpre = precision_envelope(recall, precision)
    x = np.linspace(0, 1, 101)
    y = np.interp(x, mrec, mpre)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)  # == np.trapezoid(y, x)


def box_filter(y, f=0.05):
    """Box filter of odd width ~ 2*f*len(y), edges padded with the end values (so the output has len(y))."""
    nf = round(len(y) * f * 2) // 2 + 1
    pad = np.ones(nf // 2)
    return np.convolve(np.concatenate((pad * y[0], y, pad * y[-1])), np.ones(nf) / nf, mode="valid")


def ap_per_class(tp, conf, pred_cls, target_cls, eps=1e-16):
    """
    tp (N, T) bool, conf/pred_cls (N,), target_cls (M,) over the whole dataset -> dict of per-class arrays.
    Only classes that have labels are scored; predictions of label-less classes are ignored, and a labelled class
    with no predictions scores 0 everywhere (and drags the means down).
    """
    order = np.argsort(-conf, kind="stable")  # ties keep the given order
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]
    classes, n_labels = np.unique(target_cls, return_counts=True)
    grid = np.linspace(0, 1, 1000)  # confidence grid for the P/R/F1 curves
    ap = np.zeros((len(classes), tp.shape[1]))
    p_curve, r_curve = np.zeros((len(classes), 1000)), np.zeros((len(classes), 1000))
    pr_precision = np.zeros((len(classes), 1000))  # the IoU-0.5 precision envelope on a recall grid
    for ci, c in enumerate(classes):
        i = pred_cls == c
        if not i.any():
            continue
        tpc = tp[i].cumsum(0)
        fpc = (1 - tp[i]).cumsum(0)
        recall = tpc / (n_labels[ci] + eps)
        precision = tpc / (tpc + fpc)
        # np.interp needs increasing x, and conf decreases along the list: negate both
        r_curve[ci] = np.interp(-grid, -conf[i], recall[:, 0], left=0)
        p_curve[ci] = np.interp(-grid, -conf[i], precision[:, 0], left=1)
        pr_precision[ci] = np.interp(grid, *precision_envelope(recall[:, 0], precision[:, 0]))
        ap[ci] = [compute_ap(recall[:, j], precision[:, j]) for j in range(tp.shape[1])]
    f1_curve = 2 * p_curve * r_curve / (p_curve + r_curve + eps)
    best = box_filter(f1_curve.mean(0), 0.1).argmax() if len(classes) else 0  # one operating point for all classes
    return dict(classes=classes.astype(int), n_labels=n_labels, p=p_curve[:, best], r=r_curve[:, best],
                f1=f1_curve[:, best], ap_per_iou=ap, ap50=ap[:, 0], ap=ap.mean(1), conf_best=float(grid[best]),
                px=grid, p_curve=p_curve, r_curve=r_curve, f1_curve=f1_curve, pr_precision=pr_precision)


class DetMeter:
    """
    Accumulates per-image match statistics (not boxes); compute() runs the dataset-level AP.
    greedy=True (default): the current reference's rule, Ultralytics 8.4.190 / COCO greedy-by-confidence
    (match_greedy); greedy=False: the IoU-sorted rule of older releases (match_predictions), to compare with numbers
    they produced. The two agree on sparse scenes and differ around the second decimal of mAP50-95 on crowded ones.
    """

    def __init__(self, greedy=True):
        self.match = match_greedy if greedy else match_predictions
        self.tp, self.conf, self.pred_cls, self.target_cls = [], [], [], []

    def update(self, preds, targets):
        """preds: per image (N, 6) x1,y1,x2,y2,conf,cls; targets: per image (M, 5) cls,x1,y1,x2,y2.
        Detections are matched in descending confidence (a stable sort: NMS output keeps its order)."""
        for p, t in zip(preds, targets):
            p, t = _rows(p, 6), _rows(t, 5)
            p = p[np.argsort(-p[:, 4], kind="stable")]
            correct = np.zeros((len(p), len(IOU_THRESHOLDS)), dtype=bool)
            if len(p) and len(t):
                iou = box_iou(torch.from_numpy(t[:, 1:]), torch.from_numpy(p[:, :4])).numpy()
                correct = self.match(iou * (t[:, :1] == p[None, :, 5]))
            self.tp.append(correct)
            self.conf.append(p[:, 4])
            self.pred_cls.append(p[:, 5])
            self.target_cls.append(t[:, 0])

    @classmethod
    def interleaved(cls, shards):
        """DDP: the meters of W ranks, rank r having scored images r, r + W, ... -> one meter with every image's
        statistics back in image order, so compute() gives exactly what one process over all images gives."""
        out, W = shards[0], len(shards)
        for a in ("tp", "conf", "pred_cls", "target_cls"):
            lists = [getattr(m, a) for m in shards]
            setattr(out, a, [lists[i % W][i // W] for i in range(sum(map(len, lists)))])
        return out

    def compute(self, nc):
        """
        -> dict: precision, recall, map50, map50_95 (floats, means over classes that have labels), maps (nc,)
        mAP50-95 per class id, and per labelled class (aligned with `classes`): n_labels, p, r, f1 at the shared
        max-F1 confidence `conf_best`, ap50, ap (mean over IoU thresholds), ap_per_iou (n_classes, 10).
        """
        cat = lambda xs, shape: np.concatenate(xs, 0) if xs else np.zeros(shape)
        s = ap_per_class(cat(self.tp, (0, len(IOU_THRESHOLDS))).astype(bool), cat(self.conf, 0),
                         cat(self.pred_cls, 0), cat(self.target_cls, 0))
        mean = lambda a: float(a.mean()) if len(a) else 0.0
        maps = np.full(nc, mean(s["ap"]))  # per-class mAP50-95 over all nc ids; label-less classes get the mean
        maps[s["classes"]] = s["ap"]
        return dict(precision=mean(s["p"]), recall=mean(s["r"]), map50=mean(s["ap50"]), map50_95=mean(s["ap"]),
                    maps=maps, **s)


def confusion_matrix(preds, targets, nc, conf=0.25, iou=0.45):
    """
    Detection confusion matrix as YOLOv8's validator builds it -> (nc + 1, nc + 1) int array,
    rows = predicted class, columns = true class, index nc = background.
    preds: per image (N, 6) x1, y1, x2, y2, conf, cls; targets: per image (M, 5) cls, x1, y1, x2, y2 (pixels).
    Detections with conf > `conf` are matched to labels whatever their class: pairs with IoU > `iou`, each
    detection keeps its best label, then each label its best detection (ties: lower index). A matched pair counts at
    [pred cls, true cls] (a wrong class is off the diagonal), an unmatched label at [background, true cls] (missed,
    FN), an unmatched detection at [pred cls, background] (FP). The reference skips those FPs in an image where
    nothing matched at all; here every unmatched detection counts.
    """
    m = np.zeros((nc + 1, nc + 1), np.int64)
    for p, t in zip(preds, targets):
        p, t = torch.as_tensor(p).double().reshape(-1, 6).numpy(), torch.as_tensor(t).double().reshape(-1, 5).numpy()
        p = p[p[:, 4] > conf]
        pc, tc = p[:, 5].astype(int), t[:, 0].astype(int)
        det_of_label = np.full(len(t), -1)
        if len(p) and len(t):
            ious = box_iou(torch.from_numpy(t[:, 1:]), torch.from_numpy(p[:, :4])).numpy()  # (M, N)
            best = ious.argmax(0)  # each detection's best label
            for j in np.flatnonzero(ious[best, np.arange(len(p))] > iou):
                g = best[j]
                if det_of_label[g] < 0 or ious[g, j] > ious[g, det_of_label[g]]:
                    det_of_label[g] = j
        for g, j in enumerate(det_of_label):
            m[pc[j] if j >= 0 else nc, tc[g]] += 1
        for j in sorted(set(range(len(p))) - set(det_of_label.tolist())):
            m[pc[j], nc] += 1
    return m


def detection_metrics(preds, targets, nc, greedy=True):
    """One-shot DetMeter over lists of per-image predictions and targets (see DetMeter.update for formats);
    greedy as in DetMeter (default the 8.4 greedy rule, False the older IoU-sorted one)."""
    meter = DetMeter(greedy)
    meter.update(preds, targets)
    return meter.compute(nc)


# -----------------------------------------------------------------------------
# segmentation metrics


def _seg_counts(x, mask, thr=0.5, from_logits=True):
    """Pixel counts (intersection, predicted, true) for a batch; x (B[,1],h,w) is upsampled to the mask size."""
    x, mask = x.detach().float(), mask.detach()
    if x.dim() == 3:
        x = x[:, None]
    if mask.dim() == 3:
        mask = mask[:, None]
    if x.shape[-2:] != mask.shape[-2:]:  # interpolate logits, not hard masks, so edges stay smooth
        x = F.interpolate(x, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    pred = (x.sigmoid() if from_logits else x) > thr
    true = mask > 0.5
    return int((pred & true).sum()), int(pred.sum()), int(true.sum())


class SegMeter:
    """
    Global (dataset-level) Dice and IoU: pixel counts are summed over all images before dividing, so every pixel
    weighs the same and an image where both prediction and mask are empty simply contributes nothing (no 0/0).
    If the whole dataset has no foreground and none is predicted, both scores are 1.
    """

    def __init__(self, thr=0.5):
        self.thr, self.inter, self.pred, self.true = thr, 0, 0, 0

    def update(self, logits, mask):
        i, p, t = _seg_counts(logits, mask, self.thr)
        self.inter, self.pred, self.true = self.inter + i, self.pred + p, self.true + t

    def merge(self, other):
        """Add another meter's counts (another DDP rank's images); returns self."""
        self.inter, self.pred, self.true = self.inter + other.inter, self.pred + other.pred, self.true + other.true
        return self

    def compute(self):
        total, union = self.pred + self.true, self.pred + self.true - self.inter
        return (2 * self.inter / total if total else 1.0), (self.inter / union if union else 1.0)


class VesselMeter:
    """Vessel scores as the retinal-vessel literature computes them: each image's probability map at the image's
    original size (not the letterbox canvas), against its full-size mask, counted only inside its field-of-view
    mask when the set ships one (DRIVE, HRF), every pixel of every image pooled before dividing. Se (sensitivity,
    recall), Sp (specificity), Acc, F1 (= Dice) at probability > thr, and AUC of the probability map (ROC area from
    histograms of 10,000 bins: exact up to probabilities that fall in one bin, which count as ties)."""

    BINS = 10_000

    def __init__(self, thr=0.5):
        self.thr, self.tp, self.fp, self.fn, self.tn = thr, 0, 0, 0, 0
        self.pos, self.neg = np.zeros(self.BINS, np.int64), np.zeros(self.BINS, np.int64)  # pixels per prob bin

    def update(self, prob, true, fov=None):
        """prob (H, W) vessel probabilities, true (H, W) bool mask, fov (H, W) bool or None (every pixel counts)."""
        prob, true = np.asarray(prob, np.float64), np.asarray(true, bool)
        if fov is not None:
            prob, true = prob[np.asarray(fov, bool)], true[np.asarray(fov, bool)]
        pred = prob > self.thr
        self.tp += int((pred & true).sum())
        self.fp += int((pred & ~true).sum())
        self.fn += int((~pred & true).sum())
        self.tn += int((~pred & ~true).sum())
        b = np.clip((prob * self.BINS).astype(np.int64), 0, self.BINS - 1)
        self.pos += np.bincount(b[true], minlength=self.BINS)
        self.neg += np.bincount(b[~true], minlength=self.BINS)

    def merge(self, other):
        """Add another meter's counts (another DDP rank's images); returns self."""
        for k in ("tp", "fp", "fn", "tn", "pos", "neg"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        return self

    def compute(self):
        """-> {se, sp, acc, f1, auc}; a score whose denominator is 0 is nan (no such pixels were scored)."""
        def div(a, b):
            return a / b if b else float("nan")
        tp, fp, fn, tn = self.tp, self.fp, self.fn, self.tn
        P, N = int(self.pos.sum()), int(self.neg.sum())
        below = np.cumsum(self.neg) - self.neg  # negatives in lower bins than each bin
        auc = div(float((self.pos * (below + 0.5 * self.neg)).sum()), P * N)  # P(prob of a vessel > of a background)
        return {"se": div(tp, tp + fn), "sp": div(tn, tn + fp), "acc": div(tp + tn, tp + fp + fn + tn),
                "f1": div(2 * tp, 2 * tp + fp + fn), "auc": auc}


def seg_scores(prob_or_logits, mask, thr=0.5, from_logits=True):
    """Global Dice and IoU of one batch (pass from_logits=False for probabilities)."""
    m = SegMeter(thr)
    m.inter, m.pred, m.true = _seg_counts(prob_or_logits, mask, thr, from_logits)
    return m.compute()


dice_iou = seg_scores


def targets_xyxy(batch, i, h, w):
    """Batch i's GT rows (M, 5) cls, x1, y1, x2, y2 in canvas pixels."""
    sel = batch["batch_idx"] == i
    b = batch["bboxes"][sel] * torch.tensor([w, h, w, h])
    return torch.cat((batch["cls"][sel].view(-1, 1), xywh2xyxy(b)), 1)
