"""Losses: YOLOv8 detection (TaskAlignedAssigner, CIoU, DFL) and the CA-MTL multi-task terms.

Detection numbers equal Ultralytics' v8DetectionLoss (tests/test_loss.py checks the fixture). The assigner
works on candidate (GT, anchor) pairs only — anchors whose centre lies inside a GT — instead of dense
(B, max_boxes, anchors) float tensors, which is what keeps it light at 50 boxes x 8400 anchors.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules import dist2bbox, make_anchors

# -----------------------------------------------------------------------------
# box helpers


def xywh2xyxy(x):
    xy, wh = x[..., :2], x[..., 2:4] / 2
    return torch.cat((xy - wh, xy + wh), -1)


def bbox_ciou(b1, b2, eps=1e-7):
    """Complete IoU of paired xyxy boxes (..., 4) -> (...): IoU - centre distance² / enclosing diagonal² - α·v."""
    (x1, y1, x2, y2), (u1, v1, u2, v2) = b1.unbind(-1), b2.unbind(-1)
    w1, h1 = x2 - x1, y2 - y1 + eps
    w2, h2 = u2 - u1, v2 - v1 + eps
    inter = (x2.minimum(u2) - x1.maximum(u1)).clamp(0) * (y2.minimum(v2) - y1.maximum(v1)).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = x2.maximum(u2) - x1.minimum(u1)  # enclosing box
    ch = y2.maximum(v2) - y1.minimum(v1)
    c2 = cw.pow(2) + ch.pow(2) + eps
    rho2 = ((u1 + u2 - x1 - x2).pow(2) + (v1 + v2 - y1 - y2).pow(2)) / 4
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).pow(2)  # aspect-ratio consistency
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return iou - (rho2 / c2 + v * alpha)


def dfl_expectation(pred_dist, reg_max=16):
    """(B, A, 4*reg_max) logits -> (B, A, 4) expected distances in grid units."""
    b, a, _ = pred_dist.shape
    proj = torch.arange(reg_max, device=pred_dist.device, dtype=pred_dist.dtype)
    return pred_dist.view(b, a, 4, reg_max).softmax(3) @ proj


def df_loss(pred_dist, target, reg_max=16):
    """Distribution focal loss: cross-entropy to the two bins around each target distance, weighted by
    closeness. pred_dist (N, 4, reg_max) logits, target (N, 4) -> (N, 1)."""
    target = target.clamp(0, reg_max - 1 - 0.01)
    tl = target.long()
    wl = tl + 1 - target
    logp = F.log_softmax(pred_dist, -1)
    lo = logp.gather(-1, tl.unsqueeze(-1)).squeeze(-1)
    hi = logp.gather(-1, (tl + 1).unsqueeze(-1)).squeeze(-1)
    return -(lo * wl + hi * (1 - wl)).mean(-1, keepdim=True)


# -----------------------------------------------------------------------------
# Task-aligned assignment (TOOD), as YOLOv8 does it


def _segment_rank(key, value):
    """Rank of each element within its key group by value, descending (0 = best); ties keep input order."""
    order = torch.sort(value, descending=True, stable=True).indices
    order = order[torch.sort(key[order], stable=True).indices]  # grouped by key, best first inside a group
    sorted_key = key[order]
    first = torch.ones_like(sorted_key, dtype=torch.bool)
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    start = torch.cummax(torch.where(first, torch.arange(len(key), device=key.device), 0), 0).values
    rank = torch.empty_like(key)
    rank[order] = torch.arange(len(key), device=key.device) - start
    return rank


@torch.no_grad()
def task_aligned_assign(pd_scores, pd_bboxes, anchors, gt_labels, gt_bboxes, mask_gt,
                        topk=10, alpha=0.5, beta=6.0, min_side=16.0, eps=1e-9):
    """Assign GTs to anchors.

    pd_scores (B, A, nc) probabilities, pd_bboxes (B, A, 4) xyxy pixels, anchors (A, 2) pixels,
    gt_labels (B, M, 1), gt_bboxes (B, M, 4) xyxy pixels, mask_gt (B, M, 1) valid GTs.
    Returns target_labels (B, A), target_bboxes (B, A, 4), target_scores (B, A, nc), fg_mask (B, A),
    target_gt_idx (B, A).

    1. candidates: anchor centres strictly inside a GT; GT sides shorter than min_side (the middle stride)
       are widened to it about the centre for this test only, so tiny objects still get anchors.
    2. align metric = score^alpha * CIoU^beta (CIoU clamped at 0); each GT keeps its top-k candidates.
    3. an anchor kept by several GTs goes to the GT it overlaps most (over all GTs it is a candidate of).
    4. target score = align metric rescaled per GT so its best anchor gets that GT's best CIoU.
    """
    B, A, nc = pd_scores.shape
    M = gt_bboxes.shape[1]
    dev = pd_scores.device
    target_labels = torch.full((B, A), 0, dtype=torch.long, device=dev)
    target_gt_idx = torch.zeros((B, A), dtype=torch.long, device=dev)
    target_bboxes = torch.zeros((B, A, 4), dtype=pd_bboxes.dtype, device=dev)
    target_scores = torch.zeros((B, A, nc), dtype=pd_scores.dtype, device=dev)
    fg_mask = torch.zeros((B, A), dtype=torch.bool, device=dev)
    if M == 0:
        return target_labels, target_bboxes, target_scores, fg_mask, target_gt_idx

    # 1. candidate pairs (b, m, a)
    c, wh = (gt_bboxes[..., :2] + gt_bboxes[..., 2:]) / 2, gt_bboxes[..., 2:] - gt_bboxes[..., :2]
    wh = torch.where((wh < min_side) & mask_gt.bool(), torch.full_like(wh, min_side), wh)
    lt, rb = (c - wh / 2).unsqueeze(2), (c + wh / 2).unsqueeze(2)  # (B, M, 1, 2)
    inside = ((anchors - lt).amin(-1) > eps) & ((rb - anchors).amin(-1) > eps) & mask_gt.bool()  # (B, M, A)
    b, m, a = inside.nonzero(as_tuple=True)
    if len(b) == 0:
        return target_labels, target_bboxes, target_scores, fg_mask, target_gt_idx

    # 2. align metric on pairs; top-k per GT
    labels = gt_labels[b, m, 0].long()
    ovl = bbox_ciou(gt_bboxes[b, m], pd_bboxes[b, a]).clamp_(0)  # (P,)
    metric = pd_scores[b, a, labels].pow(alpha) * ovl.pow(beta)
    # A zero metric (CIoU clamped at 0) never makes a positive: the reference's dense top-k pads short
    # candidate lists with zero-metric anchors, mostly outside the box and then dropped; keeping none
    # reproduces it without depending on how topk orders ties.
    keep = (_segment_rank(b * M + m, metric) < topk) & (metric > 0)

    # 3. one GT per anchor: several claimants -> the GT of highest overlap (first on ties)
    anchor_key = b * A + a
    claims = torch.zeros(B * A, dtype=torch.long, device=dev).index_add_(0, anchor_key[keep], torch.ones_like(anchor_key[keep]))
    best_ovl = torch.zeros(B * A, dtype=ovl.dtype, device=dev).scatter_reduce_(0, anchor_key, ovl, "amax")
    is_best = ovl == best_ovl[anchor_key]
    best_m = torch.full((B * A,), M, dtype=torch.long, device=dev).scatter_reduce_(0, anchor_key[is_best], m[is_best], "amin")
    multi = claims[anchor_key] > 1
    pos = torch.where(multi, m == best_m[anchor_key], keep)
    b, m, a, labels, ovl, metric = b[pos], m[pos], a[pos], labels[pos], ovl[pos], metric[pos]

    # 4. normalise per GT: metric * (best overlap of the GT) / (best metric of the GT)
    gt_key = b * M + m
    gt_best_metric = torch.zeros(B * M, dtype=metric.dtype, device=dev).scatter_reduce_(0, gt_key, metric, "amax")
    gt_best_ovl = torch.zeros(B * M, dtype=ovl.dtype, device=dev).scatter_reduce_(0, gt_key, ovl, "amax")
    norm = metric * gt_best_ovl[gt_key] / (gt_best_metric[gt_key] + eps)

    fg_mask[b, a] = True
    target_gt_idx[b, a] = m
    target_labels[b, a] = labels
    target_bboxes[b, a] = gt_bboxes[b, m]
    target_scores[b, a, labels] = norm.to(target_scores.dtype)
    return target_labels, target_bboxes, target_scores, fg_mask, target_gt_idx


# -----------------------------------------------------------------------------
# YOLOv8 detection loss


def pad_targets(batch, B, imgsz_hw, device):
    """Flat targets (batch_idx, cls, normalised xywh) -> per image padded (B, M, 1) labels and
    (B, M, 4) xyxy pixel boxes, M = most boxes in one image."""
    idx = batch["batch_idx"].to(device).long().view(-1)
    cls = batch["cls"].to(device).float().view(-1, 1)
    boxes = batch["bboxes"].to(device).float().view(-1, 4)
    M = int(torch.bincount(idx, minlength=B).max()) if len(idx) else 0
    labels = torch.zeros(B, M, 1, device=device)
    bboxes = torch.zeros(B, M, 4, device=device)
    if M:
        order = torch.sort(idx, stable=True).indices
        idx, cls, boxes = idx[order], cls[order], boxes[order]
        first = torch.searchsorted(idx, idx, right=False)  # position of each image's first box
        slot = torch.arange(len(idx), device=device) - first
        h, w = imgsz_hw
        labels[idx, slot] = cls
        bboxes[idx, slot] = xywh2xyxy(boxes * boxes.new_tensor([w, h, w, h]))
    return labels, bboxes


class DetectionLoss:
    """YOLOv8 detection loss. `loss, items = crit(preds, batch)`: preds the three raw maps (B, 64+nc, H, W),
    batch with batch_idx (N,), cls (N, 1), bboxes (N, 4) normalised xywh. items = detached (box, cls, dfl)
    after gains; loss = items.sum() * B with gradient (Ultralytics' convention: per-image mean x batch)."""

    def __init__(self, nc, strides=(8, 16, 32), reg_max=16, box=7.5, cls=0.5, dfl=1.5, topk=10, alpha=0.5, beta=6.0):
        self.nc, self.strides, self.reg_max = nc, list(strides), reg_max
        self.gains = (box, cls, dfl)
        self.topk, self.alpha, self.beta = topk, alpha, beta
        self.min_side = float(self.strides[1] if len(self.strides) > 1 else self.strides[0])

    def __call__(self, preds, batch):
        preds = [p.float() for p in preds]  # losses in fp32 even under autocast
        B, dev = preds[0].shape[0], preds[0].device
        flat = torch.cat([p.view(B, p.shape[1], -1) for p in preds], 2)  # (B, 64+nc, A)
        pred_dist, pred_logits = flat.split((4 * self.reg_max, self.nc), 1)
        pred_dist, pred_logits = pred_dist.transpose(1, 2), pred_logits.transpose(1, 2)  # (B, A, 64), (B, A, nc)
        anchors, stride = make_anchors(preds, self.strides)  # grid units (A, 2), (A, 1)
        imgsz = (preds[0].shape[2] * self.strides[0], preds[0].shape[3] * self.strides[0])

        gt_labels, gt_bboxes = pad_targets(batch, B, imgsz, dev)
        mask_gt = gt_bboxes.sum(2, keepdim=True) > 0
        pred_bboxes = dist2bbox(dfl_expectation(pred_dist, self.reg_max), anchors, xywh=False)  # (B, A, 4) grid units

        _, target_bboxes, target_scores, fg, _ = task_aligned_assign(
            pred_logits.detach().sigmoid(), pred_bboxes.detach() * stride, anchors * stride,
            gt_labels, gt_bboxes, mask_gt, self.topk, self.alpha, self.beta, self.min_side)
        score_sum = target_scores.sum().clamp(min=1)

        loss_cls = F.binary_cross_entropy_with_logits(pred_logits, target_scores, reduction="sum") / score_sum
        # box terms over positives; with none they are exact zeros that still keep pred_dist in the graph
        weight = target_scores.sum(-1)[fg].unsqueeze(-1)  # (P, 1)
        target_bboxes = target_bboxes / stride  # grid units
        ciou = bbox_ciou(pred_bboxes[fg], target_bboxes[fg]).unsqueeze(-1)
        loss_box = ((1.0 - ciou) * weight).sum() / score_sum
        anchors_fg = anchors.expand(B, -1, -1)[fg]
        target_ltrb = torch.cat((anchors_fg - target_bboxes[fg][:, :2], target_bboxes[fg][:, 2:] - anchors_fg), -1)
        loss_dfl = (df_loss(pred_dist[fg].view(-1, 4, self.reg_max), target_ltrb, self.reg_max) * weight).sum() / score_sum

        items = torch.stack((loss_box * self.gains[0], loss_cls * self.gains[1], loss_dfl * self.gains[2]))
        return items.sum() * B, items.detach()
