"""
Evaluation for nanoCAMTL: NMS post-processing, detection mAP and vessel segmentation Dice/IoU.

The detection metrics reproduce the numbers Ultralytics' YOLOv8 validator prints (P, R, mAP50, mAP50-95),
including its particular box-to-label matching rule and its F1-based choice of the reported P/R operating point.

    python evaluate.py --weights runs/camtl/exp/weights/best.pt [--data ROOT] [--split val]   # metrics
    python evaluate.py --weights best.pt --source my_images/ --save-dir runs/predict          # predict a folder
    python evaluate.py --weights best.pt2 --source my_images/                 # ... with an export.py program
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

import data
import export
import plots
import synthetic
from config import check_device, next_run_dir
from box_ops import box_iou, xywh2xyxy
from losses import MultiTaskLoss, TermMeter
from model import load_checkpoint, load_weights

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

    def compute(self):
        total, union = self.pred + self.true, self.pred + self.true - self.inter
        return (2 * self.inter / total if total else 1.0), (self.inter / union if union else 1.0)


def seg_scores(prob_or_logits, mask, thr=0.5, from_logits=True):
    """Global Dice and IoU of one batch (pass from_logits=False for probabilities)."""
    m = SegMeter(thr)
    m.inter, m.pred, m.true = _seg_counts(prob_or_logits, mask, thr, from_logits)
    return m.compute()


dice_iou = seg_scores


# -----------------------------------------------------------------------------
# validation loop (per epoch in train.py, and the CLI below)


def fitness(m):
    """best.pt criterion: 0.1 mAP50 + 0.9 mAP50-95 for detection, Dice(full) for segmentation, mean of present."""
    parts = []
    if "map50" in m:
        parts.append(0.1 * m["map50"] + 0.9 * m["map50_95"])
    if "dice_full" in m:
        parts.append(m["dice_full"])
    return float(np.mean(parts)) if parts else 0.0


def targets_xyxy(batch, i, h, w):
    """Batch i's GT rows (M, 5) cls, x1, y1, x2, y2 in canvas pixels."""
    sel = batch["batch_idx"] == i
    b = batch["bboxes"][sel] * torch.tensor([w, h, w, h])
    return torch.cat((batch["cls"][sel].view(-1, 1), xywh2xyxy(b)), 1)


def class_names(nc):
    """Detection class names: the one class of the angiography sets is a stenosis."""
    return ["stenosis"] if nc == 1 else [f"class{i}" for i in range(nc)]


@torch.no_grad()
def validate(model, loaders, cfg, device, crit=None, plot_dir=None, log=None, gather=None):
    """Loss terms, Dice/IoU per scale and detection P/R/mAP on the val loaders {"det": ..., "seg": ...}, without
    augmentation, each batch in its own domain. The detection head returns its raw maps (BN running statistics)
    so the loss can be computed, and they are decoded here. Loss terms are per-image means over the images of
    the batches that report them (val/det over detection images, ...), computed as in training, the alignment term
    included; L2-SP, a property of the weights, is not a val term. plot_dir: also write the pictures (curves,
    confusion matrix, first batches). log: also print the per-class table and the speed per image, as YOLOv8 does.
    gather (DDP): obj -> [every rank's obj]; each rank validated its share of the images (merge_shards)."""
    model.eval()
    det_meter, seg_meters, losses = DetMeter(), {k: SegMeter() for k in ("p3", "p4", "p5", "full")}, TermMeter()
    nms_kw = dict(conf=cfg["val_conf"], iou=cfg["val_iou"], max_det=cfg["max_det"], multi_label=True)
    names, nc = class_names(cfg["nc"]), cfg["nc"]
    cm, images, ms = np.zeros((nc + 1, nc + 1), np.int64), {"det": 0, "seg": 0}, dict.fromkeys(SPEED, 0.0)
    per_class_images, need_attn = np.zeros(nc, np.int64), crit is not None and bool(cfg["lambda_align"])
    for task, loader in loaders.items():
        for bi, batch in enumerate(progress(loader, f"val {task}", log)):
            t0 = clock(device)
            dev_batch = data.to_device(batch, device)  # the CPU batch stays for metrics and pictures
            img = dev_batch["img"]
            t1 = clock(device)
            with model.domain(batch["domain"]):  # raw head maps for the loss, every BN in eval
                det_out, seg_out = model(img, tasks=VAL_TASKS[task], need_attn=need_attn, raw=True)
            t2 = clock(device)
            if crit is not None:  # per-image means: each batch weighs by its image count
                losses.update(crit(det_out, seg_out, dev_batch)[1], img.shape[0])
            t3 = clock(device)
            images[task] += img.shape[0]
            if task == "det":
                h, w = img.shape[-2:]
                preds = [p.cpu() for p in nms(model.detect.decode(det_out), **nms_kw)]
                targets = [targets_xyxy(batch, i, h, w) for i in range(len(preds))]
                det_meter.update(preds, targets)
                for t in targets:
                    per_class_images[np.unique(t[:, 0].long().numpy())] += 1
                if plot_dir is not None:
                    cm += confusion_matrix(preds, targets, nc)
                    if bi == 0:
                        plot_det_batch(batch, preds, seg_out, Path(plot_dir), names)
            else:
                for k, meter in seg_meters.items():
                    meter.update(seg_out[k].float().cpu(), batch["mask"])
                if plot_dir is not None and bi == 0:
                    plots.plot_seg_batch(batch["img"], batch["mask"], seg_out["full"].float().cpu(), batch["paths"],
                                         Path(plot_dir) / "val_seg_batch0.png")
            for k, dt in zip(SPEED, (t1 - t0, t2 - t1, t3 - t2, clock(device) - t3)):
                ms[k] += dt * 1e3
    shard = det_meter, seg_meters, losses, cm, images, per_class_images, ms  # DDP: every rank's share, merged
    det_meter, seg_meters, losses, cm, images, per_class_images, ms = merge_shards(gather(shard)) if gather else shard
    m = {f"val/{k}": v for k, v in losses.means().items()}
    if "seg" in loaders:
        for k, meter in seg_meters.items():
            m[f"dice_{k}"], m[f"iou_{k}"] = (float(v) for v in meter.compute())
    r = None
    if "det" in loaders:
        r = det_meter.compute(nc)
        m.update({k: float(r[k]) for k in ("precision", "recall", "map50", "map50_95")})
        if plot_dir is not None:
            plots.plot_confusion_matrix(cm, names, Path(plot_dir) / "confusion_matrix.png")
            plot_det_curves(r, Path(plot_dir), names)
    m["fitness"] = fitness(m)
    if log is not None:
        log(per_class_table(m, r, images, per_class_images, names))
        n = max(sum(images.values()), 1)
        log("Speed: " + ", ".join(f"{v / n:.1f} ms {k}" for k, v in ms.items()) + " per image")
    return m


SPEED = ("preprocess", "inference", "loss", "postprocess")  # postprocess: decoding, NMS, matching, Dice counts
VAL_TASKS = {"det": ("det", "seg"), "seg": ("seg",)}  # a val loader's task -> the forward's (det: consistency, overlay)


def clock(device):
    """time.perf_counter() once the device's queued work is done (CUDA runs asynchronously: unsynchronized, a
    phase's time would be its launches, not its kernels)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def merge_shards(shards):
    """validate's state (det meter, seg meters, loss meter, confusion matrix, image counts, per-class image counts,
    ms per phase) of each rank's share of the images -> one: counts and sums added, per-image match statistics
    interleaved back into image order (rank r held images r, r + W, ...), so the metrics are exactly those of one
    process over all images (losses up to float summation order)."""
    det, seg, losses, cm, images, per_class, ms = shards[0]
    W = len(shards)
    for a in ("tp", "conf", "pred_cls", "target_cls"):
        lists = [getattr(s[0], a) for s in shards]
        setattr(det, a, [lists[i % W][i // W] for i in range(sum(map(len, lists)))])
    for other in shards[1:]:
        _, seg2, losses2, cm2, images2, per_class2, ms2 = other
        for k, meter in seg.items():
            meter.inter, meter.pred, meter.true = (meter.inter + seg2[k].inter, meter.pred + seg2[k].pred,
                                                   meter.true + seg2[k].true)
        for k in losses2.sum:
            losses.sum[k], losses.n[k] = losses.sum.get(k, 0.0) + losses2.sum[k], losses.n.get(k, 0) + losses2.n[k]
        cm, per_class = cm + cm2, per_class + per_class2
        images = {k: images[k] + images2[k] for k in images}
        ms = {k: ms[k] + ms2[k] for k in ms}
    return det, seg, losses, cm, images, per_class, ms


def progress(loader, desc, log):
    """Iterate a val loader; with a log (a final or CLI validation), show the progress line."""
    bar = plots.Progress(len(loader), desc, every=max(len(loader) // 4, 1), enabled=log is not None)
    for i, batch in enumerate(loader):
        yield batch
        bar.update(i + 1, items=batch["img"].shape[0])


def plot_det_batch(batch, preds, seg_out, out, names):
    """val_batch0_labels.png (ground truth) and val_batch0_pred.png (predictions, predicted vessels)."""
    args = (batch["img"], batch["batch_idx"], batch["cls"], batch["bboxes"])
    plots.plot_batch(*args, batch["mask"], batch["paths"], out / "val_batch0_labels.png", names=names)
    vessels = seg_out["full"].float().sigmoid().cpu() if seg_out is not None else None
    plots.plot_batch(*args, vessels, batch["paths"], out / "val_batch0_pred.png", preds=preds, names=names)


def plot_det_curves(r, out, names):
    """PR_curve.png, F1_curve.png, P_curve.png, R_curve.png from DetMeter.compute's curves."""
    present = [names[c] for c in r["classes"]]
    plots.plot_curves(out, r["px"], r["p_curve"], r["r_curve"], r["f1_curve"], r["px"], r["pr_precision"],
                      r["ap50"], present)


def per_class_table(m, r, images, per_class_images, names):
    """The validator's table: images, instances, P, R, mAP50, mAP50-95 for all classes and each; Dice/IoU."""
    head = f"{'Class':>22}{'Images':>11}{'Instances':>11}{'P':>11}{'R':>11}{'mAP50':>11}{'mAP50-95':>11}"
    lines = []
    if r is not None:
        lines += [head, f"{'all':>22}{images['det']:>11}{int(r['n_labels'].sum()):>11}{m['precision']:>11.3g}"
                        f"{m['recall']:>11.3g}{m['map50']:>11.3g}{m['map50_95']:>11.3g}"]
        if len(names) > 1:
            for i, c in enumerate(r["classes"]):
                lines.append(f"{names[c]:>22}{per_class_images[c]:>11}{int(r['n_labels'][i]):>11}{r['p'][i]:>11.3g}"
                             f"{r['r'][i]:>11.3g}{r['ap50'][i]:>11.3g}{r['ap'][i]:>11.3g}")
    if "dice_full" in m:
        scores = "  ".join(f"{k} {m[k]:.3g}" for k in ("dice_full", "iou_full", "dice_p3", "dice_p4", "dice_p5"))
        lines.append(f"{'vessels':>22}{images['seg']:>11}    {scores}")
    return "\n".join(lines)


def format_metrics(m, prefix="val"):
    keys = ("dice_full", "iou_full", "dice_p3", "dice_p4", "dice_p5", "precision", "recall", "map50", "map50_95",
            "val/total")
    keys = [k for k in keys if k in m]
    return f"{prefix}: " + "  ".join(f"{k} {m[k]:.4f}" for k in keys)


def results_table(m):
    rows = [("Dice / IoU  full", "dice_full", "iou_full"), ("Dice / IoU  p3", "dice_p3", "iou_p3"),
            ("Dice / IoU  p4", "dice_p4", "iou_p4"), ("Dice / IoU  p5", "dice_p5", "iou_p5"),
            ("P / R", "precision", "recall"), ("mAP50 / mAP50-95", "map50", "map50_95")]
    lines = [f"  {'metric':18s} {'value':>17s}", "  " + "-" * 36]
    for name, a, b in rows:
        if a in m:
            lines.append(f"  {name:18s} {m[a]:8.4f} {m[b]:8.4f}")
    names = [n for n in MultiTaskLoss.NAMES if f"val/{n}" in m]
    if names:  # the terms validation computed (per image of their task)
        lines.append("  val loss  " + "  ".join(f"{n} {m['val/' + n]:.4f}" for n in names))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# a prediction overlay for the CLI's folder prediction, drawn with PIL (the run's pictures: plots.py)


def overlay(img, boxes=None, gt=None, prob=None, thr=0.5):
    """One (3, H, W) image in [0, 1] -> PIL image: vessel probability tinted, GT boxes green, predictions red."""
    from PIL import Image, ImageDraw
    a = (img.permute(1, 2, 0).numpy() * 255).astype(np.float32)
    if prob is not None:
        m = (prob.numpy() > thr)[..., None]
        a = np.where(m, 0.5 * a + 0.5 * np.array([0, 220, 255], np.float32), a)
    im = Image.fromarray(a.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for r in (gt if gt is not None else []):
        d.rectangle([float(v) for v in r[1:5]], outline=(0, 255, 0), width=1)
    for r in (boxes if boxes is not None else []):
        d.rectangle([float(v) for v in r[:4]], outline=(255, 40, 40), width=2)
        d.text((float(r[0]) + 2, max(float(r[1]) - 11, 0)), f"{float(r[4]):.2f}", fill=(255, 40, 40))
    return im


# -----------------------------------------------------------------------------
# the CLI: metrics of a checkpoint on a data split, or predictions on a folder of the user's own images

def load_predictor(weights, device="cpu", imgsz=None):
    """Our .pt checkpoint, an Ultralytics yolov8*.pt or an export.py .pt2 -> (run, imgsz). run(x (B, 3, S, S)) ->
    (detections (B, 4+nc, A), vessel logits (B, 1, S, S)) for CA-MTL, (detections,) for a plain detector:
    the eager model goes through the same fused wrapper that export.py traces, so both predict alike.
    ValueError (a CheckpointError for a .pt) naming the file when it is not one."""
    if Path(weights).suffix == ".pt2":
        run, meta = export.load_program(weights, device)
        if imgsz and imgsz != meta["imgsz"]:
            raise ValueError(f"--imgsz {imgsz}: {weights} was exported for {meta['imgsz']} px; "
                             f"re-export with --imgsz {imgsz}")
        return run, meta["imgsz"]
    model, cfg = load_weights(weights)
    return export.deployable(model).to(device), imgsz or (cfg or {}).get("imgsz", 640)


@torch.no_grad()
def predict_image(run, img, imgsz, conf=0.25, iou=0.7, device="cpu"):
    """One image (h0, w0, 3) float in [0, 1] -> (det (n, 6) x1, y1, x2, y2, conf, cls in the image's own pixels,
    vessel logits (h0, w0) or None). Letterboxed exactly as in training; boxes and mask mapped back through it."""
    x, _, _, ratio, pad = data.transform(img, None, np.zeros((0, 5), np.float32), imgsz)
    out = run(x[None].to(device))
    det = nms(out[0].float(), conf, iou)[0].cpu()
    det[:, :4] = data.unletterbox_boxes(det[:, :4], ratio, pad, img.shape[:2])
    det = det[(det[:, 2] > det[:, 0]) & (det[:, 3] > det[:, 1])]  # a box lying wholly in the padding clips to nothing
    logits = data.unletterbox_mask(out[1][0, 0].float().cpu(), ratio, pad, img.shape[:2]) if len(out) > 1 else None
    return det, logits


def save_prediction(img, det, logits, save_dir, stem):
    """{stem}.png overlay, labels/{stem}.txt (cls xc yc w h conf, normalised to the image; empty = nothing found)
    and, for CA-MTL, masks/{stem}.png (vessels 255) at the image's own size."""
    from PIL import Image
    h0, w0 = img.shape[:2]
    (save_dir / "labels").mkdir(parents=True, exist_ok=True)
    lines = [f"{int(c)} {(x1 + x2) / 2 / w0:.6f} {(y1 + y2) / 2 / h0:.6f} {(x2 - x1) / w0:.6f} {(y2 - y1) / h0:.6f} "
             f"{p:.4f}\n" for x1, y1, x2, y2, p, c in det.tolist()]
    (save_dir / "labels" / f"{stem}.txt").write_text("".join(lines))
    prob = logits.sigmoid() if logits is not None else None
    if prob is not None:
        (save_dir / "masks").mkdir(exist_ok=True)
        Image.fromarray(((prob > 0.5).numpy() * 255).astype(np.uint8)).save(save_dir / "masks" / f"{stem}.png")
    overlay(torch.from_numpy(img).permute(2, 0, 1), det, prob=prob).save(save_dir / f"{stem}.png")


def predict_folder(run, source, save_dir, imgsz, conf=0.25, iou=0.7, device="cpu"):
    """Predict every image in a folder (or one file). A file data.read_image cannot read is named and skipped,
    never fatal. Returns {"saved": [stems], "skipped": [paths]}."""
    source, save_dir = Path(source), Path(save_dir)
    if not source.exists():
        raise SystemExit(f"--source {source}: no such file or folder")
    files = [source]
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    save_dir.mkdir(parents=True, exist_ok=True)
    saved, skipped = [], []
    for p in files:
        try:
            img = data.read_image(p)
        except ValueError as e:
            print(f"{p}: skipped, not a readable image ({e.__cause__ or e})")
            skipped.append(p)
            continue
        stem = p.stem if p.stem not in saved else p.name  # a.png and a.jpg: the second keeps its extension
        det, logits = predict_image(run, img, imgsz, conf, iou, device)
        save_prediction(img, det, logits, save_dir, stem)
        saved.append(stem)
        top = f", max conf {det[0, 4]:.2f}" if len(det) else ""
        print(f"{p}: {img.shape[1]}x{img.shape[0]}, {len(det)} boxes{top}")
    print(f"{len(saved)} images predicted -> {save_dir} (overlays, labels/*.txt, CA-MTL vessel masks/*.png)"
          + (f"; {len(skipped)} unreadable files skipped: {', '.join(p.name for p in skipped)}" if skipped else ""))
    return {"saved": saved, "skipped": skipped}


def main(argv=None):
    ap = argparse.ArgumentParser(description="nanoCAMTL: metrics of a checkpoint, or predictions on your images")
    ap.add_argument("--weights", required=True, help="our .pt (run last/best.pt, yolov8{S}-{stage}.pt), "
                    "an export.py .pt2, or (to predict) an Ultralytics yolov8*.pt")
    ap.add_argument("--data", help="processed data root (default: the checkpoint's, else the built-in synthetic set)")
    ap.add_argument("--split", default="val", choices=("train", "val", "test"))
    ap.add_argument("--imgsz", type=int, help="letterbox size (default: the checkpoint's training size)")
    ap.add_argument("--batch", type=int, help="default: the checkpoint's")
    ap.add_argument("--workers", type=int, help="data loader workers (default: the checkpoint's)")
    ap.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N or N")
    ap.add_argument("--source", help="a folder of images (or one image) to predict, instead of computing metrics")
    ap.add_argument("--save-dir", help="exactly where predictions go (default: runs/predict/NAME); with metrics: "
                    "where the validation pictures go (default: none)")
    ap.add_argument("--name", default="", help="prediction: runs/predict/NAME (default exp, exp2, ... as YOLOv8)")
    ap.add_argument("--exist-ok", action="store_true", help="prediction: reuse runs/predict/NAME")
    ap.add_argument("--conf", type=float, default=0.25, help="prediction: confidence threshold")
    ap.add_argument("--iou", type=float, default=0.7, help="prediction: NMS IoU threshold")
    a = ap.parse_args(argv)
    if "," in a.device:
        raise SystemExit(f"--device {a.device}: evaluate.py runs on one device; pick one, e.g. --device cuda:0")
    want = check_device(a.device, "--device")  # cpu, cuda, cuda:N; a bare GPU index N means cuda:N
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {a.device}: CUDA is not available here (no GPU, or a CPU-only torch); "
                         "use --device cpu")
    if want.startswith("cuda:") and int(want[5:]) >= torch.cuda.device_count():
        raise SystemExit(f"--device {a.device}: this machine has {torch.cuda.device_count()} GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    device = torch.device(want)
    if not Path(a.weights).is_file():
        what = "a directory, not a file" if Path(a.weights).is_dir() else "no such file"
        raise SystemExit(f"--weights {a.weights}: {what}; expected a .pt checkpoint (or a .pt2 to predict)")
    if a.imgsz is not None and (a.imgsz <= 0 or a.imgsz % 32):
        raise SystemExit(f"--imgsz {a.imgsz}: must be a positive multiple of 32")
    for flag, v, ok, allowed in (("--batch", a.batch, a.batch is None or a.batch >= 1, ">= 1"),
                                 ("--workers", a.workers, a.workers is None or a.workers >= 0, ">= 0"),
                                 ("--conf", a.conf, 0 <= a.conf <= 1, "in [0, 1]"),
                                 ("--iou", a.iou, 0 <= a.iou <= 1, "in [0, 1]")):
        if not ok:
            raise SystemExit(f"{flag} {v}: must be {allowed}")
    if a.source:
        try:
            run, imgsz = load_predictor(a.weights, device, a.imgsz)
        except ValueError as e:  # not a checkpoint / program, or the wrong size for a program: one line
            raise SystemExit(str(e)) from None
        save_dir = a.save_dir or next_run_dir("runs", "predict", a.name, a.exist_ok)
        return predict_folder(run, a.source, save_dir, imgsz, a.conf, a.iou, device)
    if Path(a.weights).suffix == ".pt2":
        raise SystemExit(f"{a.weights}: an exported program only predicts (--source DIR); "
                         "for metrics give the .pt it came from")
    try:
        model, cfg = load_checkpoint(a.weights, device)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    # the synthetic set is looked up with the training parameters (other ones would regenerate it), whatever --imgsz
    root = Path(a.data or cfg["data"] or synthetic.ensure_synthetic(n=cfg["synthetic_n"], imgsz=cfg["imgsz"]))
    if not root.is_dir():
        where = "--data" if a.data else "from the checkpoint config"
        raise SystemExit(f"data root {root} ({where}) is not a directory; pass --data ROOT")
    cfg["imgsz"] = a.imgsz or cfg["imgsz"]
    workers = cfg["workers"] if a.workers is None else a.workers
    loaders = data.val_loaders(root, cfg["stage"], a.split, cfg["imgsz"], a.batch or cfg["batch"], workers, cfg["nc"])
    m = validate(model, loaders, cfg, device, MultiTaskLoss(cfg), plot_dir=a.save_dir, log=print)
    print(f"{a.weights} on {root} ({a.split}, {cfg['imgsz']} px):\n{results_table(m)}")
    return m


if __name__ == "__main__":
    main()
