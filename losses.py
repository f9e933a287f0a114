"""Losses: YOLOv8 detection (TaskAlignedAssigner, CIoU, DFL) and the CA-MTL multi-task terms.

Every loss returns `(total, terms)`: `total` is what backward() sees, `terms` a dict of detached per-image
values by name (`terms["box"]`, `terms["seg"]`, ...), which is what the log, results.csv and validation print.
Gains are looked up by the same names. Detection numbers equal Ultralytics' v8DetectionLoss
(tests/test_yolo.py checks the reference fixture). The assigner works on candidate (GT, anchor) pairs only —
anchors whose centre lies inside a GT — instead of dense (B, max_boxes, anchors) float tensors, which is what
keeps it light at 50 boxes x 8400 anchors.
"""

import torch
import torch.nn.functional as F

from box_ops import bbox_ciou, dist2bbox, xywh2xyxy
from modules import dfl_expectation, make_anchors

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
    claims = torch.zeros(B * A, dtype=torch.long, device=dev)
    claims.index_add_(0, anchor_key[keep], torch.ones_like(anchor_key[keep]))
    best_ovl = torch.zeros(B * A, dtype=ovl.dtype, device=dev).scatter_reduce_(0, anchor_key, ovl, "amax")
    is_best = ovl == best_ovl[anchor_key]
    best_m = torch.full((B * A,), M, dtype=torch.long, device=dev)
    best_m.scatter_reduce_(0, anchor_key[is_best], m[is_best], "amin")
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


def keypoint_loss(pred_xy, gt_xy, area, sigma=1.0):
    """YOLOv8-pose's OKS-shaped keypoint term for one always-visible keypoint, per positive anchor:
    1 - exp(-d² / (2 (2σ)² area)), d and area in grid units of the anchor's stride. (P, 2), (P, 2), (P,) -> (P,)."""
    d2 = (pred_xy - gt_xy).pow(2).sum(-1)
    return 1 - torch.exp(-d2 / ((2 * sigma) ** 2 * (area + 1e-9) * 2))


class DetectionLoss:
    """YOLOv8 detection loss. `loss, terms = crit(preds, batch)`.

    preds: the three raw maps (B, 64+nc, H, W) (3 more channels when the centre-keypoint auxiliary trains);
    batch: batch_idx (N,), cls (N, 1), bboxes (N, 4) normalised xywh.
    terms: {"box", "cls", "dfl"} (+ {"kpt", "kobj"} with the auxiliary), detached 0-d tensors after gains;
    loss = sum(terms) * B with gradient (Ultralytics' convention: per-image mean x batch size)."""

    def __init__(self, nc, strides=(8, 16, 32), reg_max=16, box=7.5, cls=0.5, dfl=1.5, topk=10, alpha=0.5, beta=6.0,
                 kpt=12.0, kobj=1.0):
        self.nc, self.strides, self.reg_max = nc, list(strides), reg_max
        self.gains = {"box": box, "cls": cls, "dfl": dfl, "kpt": kpt, "kobj": kobj}
        self.topk, self.alpha, self.beta = topk, alpha, beta
        self.min_side = float(self.strides[1] if len(self.strides) > 1 else self.strides[0])

    def __call__(self, preds, batch):
        preds = [p.float() for p in preds]  # losses in fp32 even under autocast
        B, dev = preds[0].shape[0], preds[0].device
        flat = torch.cat([p.view(B, p.shape[1], -1) for p in preds], 2)  # (B, 64+nc(+3), A)
        n_kpt = flat.shape[1] - 4 * self.reg_max - self.nc
        if n_kpt not in (0, 3):
            raise ValueError(f"DetectionLoss: maps have {flat.shape[1]} channels, expected "
                             f"{4 * self.reg_max + self.nc} (64 + nc={self.nc}) or 3 more with the keypoint auxiliary")
        dist, logits, kpt = flat.split((4 * self.reg_max, self.nc, n_kpt), 1)  # (B, C, A) each
        anchors, stride = make_anchors(preds, self.strides)  # grid units (A, 2), (A, 1)
        imgsz = (preds[0].shape[2] * self.strides[0], preds[0].shape[3] * self.strides[0])
        bins = torch.arange(self.reg_max, device=dev, dtype=dist.dtype)
        pred_bboxes = dist2bbox(dfl_expectation(dist, bins).transpose(1, 2), anchors, xywh=False)  # (B, A, 4) grid
        pred_dist, pred_logits = dist.transpose(1, 2), logits.transpose(1, 2)  # (B, A, 64), (B, A, nc)

        gt_labels, gt_bboxes = pad_targets(batch, B, imgsz, dev)
        mask_gt = gt_bboxes.sum(2, keepdim=True) > 0
        _, target_bboxes, target_scores, fg, _ = task_aligned_assign(
            pred_logits.detach().sigmoid(), pred_bboxes.detach() * stride, anchors * stride,
            gt_labels, gt_bboxes, mask_gt, self.topk, self.alpha, self.beta, self.min_side)
        score_sum = target_scores.sum().clamp(min=1)

        loss = {"cls": F.binary_cross_entropy_with_logits(pred_logits, target_scores, reduction="sum") / score_sum}
        # box terms over positives; with none they are exact zeros that still keep pred_dist in the graph
        weight = target_scores.sum(-1)[fg].unsqueeze(-1)  # (P, 1)
        tb = (target_bboxes / stride)[fg]  # (P, 4) xyxy grid units
        ciou = bbox_ciou(pred_bboxes[fg], tb).unsqueeze(-1)
        loss["box"] = ((1.0 - ciou) * weight).sum() / score_sum
        anchors_fg = anchors.expand(B, -1, -1)[fg]  # (P, 2)
        target_ltrb = torch.cat((anchors_fg - tb[:, :2], tb[:, 2:] - anchors_fg), -1)
        loss["dfl"] = (df_loss(pred_dist[fg].view(-1, 4, self.reg_max), target_ltrb, self.reg_max) * weight).sum()
        loss["dfl"] = loss["dfl"] / score_sum
        if n_kpt:
            loss.update(self.keypoint_terms(kpt.transpose(1, 2), fg, anchors_fg, tb))
        names = ("box", "cls", "dfl") + (("kpt", "kobj") if n_kpt else ())
        terms = {k: loss[k] * self.gains[k] for k in names}
        total = sum(terms.values()) * B
        return total, {k: v.detach() for k, v in terms.items()}

    @staticmethod
    def keypoint_terms(pred_kpt, fg, anchors_fg, tb):
        """The centre of the assigned GT as one keypoint, as YOLOv8's pose loss with one keypoint (sigma 1).
        pred_kpt (B, A, 3) raw (x, y, visibility logit), fg (B, A), anchors_fg (P, 2), tb (P, 4) xyxy grid units."""
        raw = pred_kpt[fg]  # (P, 3)
        if not len(raw):  # exact zeros that keep the branch in the graph
            return {"kpt": pred_kpt.sum() * 0, "kobj": pred_kpt.sum() * 0}
        pred_xy = raw[:, :2] * 2 + anchors_fg - 0.5  # YOLOv8-pose decoding, grid units
        area = (tb[:, 2] - tb[:, 0]) * (tb[:, 3] - tb[:, 1])
        kpt = keypoint_loss(pred_xy, (tb[:, :2] + tb[:, 2:]) / 2, area).mean()
        kobj = F.binary_cross_entropy_with_logits(raw[:, 2], torch.ones_like(raw[:, 2]))
        return {"kpt": kpt, "kobj": kobj}


# -----------------------------------------------------------------------------
# CA-MTL terms. Every task term is a per-image mean x batch size (the detection loss's convention), so a
# det batch and a seg batch of the same size weigh alike.


def dice_bce(logits, target):
    """Per image BCE + soft Dice, (B, 1, H, W) logits vs soft targets in [0, 1] -> (B,)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
    p, t = logits.sigmoid().flatten(1), target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)  # +1: an empty mask predicted empty costs 0
    return bce + dice


SEG_STRIDES = {"p1": 2, "p2": 4, "p3": 8, "p4": 16, "p5": 32}  # deep supervision's logit maps and their strides


def seg_loss(seg_out, batch, weights):
    """Deep supervision: each p_k that seg_out has (p3/p4/p5, and the fine path's p2/p1) against the mask
    area-averaged to its stride (soft targets), `full` against the mask. weights: {key: weight}."""
    B = batch["mask"].shape[0]
    total = 0.0
    for k, w in weights.items():
        if w and k in seg_out:
            target = batch["mask"] if k == "full" else batch.get(f"mask_{k}")
            if target is None:  # p2, p1: made here, the loader keeps only p3..p5's
                target = F.avg_pool2d(batch["mask"], SEG_STRIDES[k])
            total = total + w * dice_bce(seg_out[k].float(), target.to(seg_out[k].device).float()).mean()
    return total * B


def box_masks(batch, B, h, w, device):
    """GT boxes -> (B, N, h, w) bool rectangles per image (padded), and (B, N) validity."""
    labels, boxes = pad_targets(batch, B, (h, w), device)
    valid = boxes.sum(-1) > 0  # (B, N)
    ys = torch.arange(h, device=device).view(1, 1, h, 1) + 0.5
    xs = torch.arange(w, device=device).view(1, 1, 1, w) + 0.5
    x1, y1, x2, y2 = (boxes[..., i, None, None] for i in range(4))
    return (xs >= x1) & (xs <= x2) & (ys >= y1) & (ys <= y2) & valid[..., None, None], valid


def consistency_loss(full_logits, batch, mode="contain", margin=0.3):
    """Boxes -> mask consistency on detection images, which carry no vessel mask: a stenosis sits on a
    vessel, so the predicted vessel probability inside each GT box should be high.
    contain: mean over boxes of ReLU(margin - mean vessel probability in the box);
    bce: BCE of the full logits against the union of box rectangles as a pseudo-mask (the original's variant).
    An image without boxes says nothing about vessels: it adds nothing, and no gradient, in either mode."""
    B, _, h, w = full_logits.shape
    inside, valid = box_masks(batch, B, h, w, full_logits.device)  # (B, N, h, w)
    if not valid.any():
        return full_logits.sum() * 0.0
    if mode == "bce":
        pseudo = inside.any(1, keepdim=True).float()
        bce = F.binary_cross_entropy_with_logits(full_logits.float(), pseudo, reduction="none").flatten(1).mean(1)
        return (bce * valid.any(1)).sum()  # (B,) per image, images without boxes masked out
    p = full_logits.float().sigmoid()  # (B, 1, h, w)
    cover = (p * inside).flatten(2).sum(2) / inside.flatten(2).sum(2).clamp(min=1)  # (B, N)
    per_box = F.relu(margin - cover) * valid
    return (per_box.sum(1) / valid.sum(1).clamp(min=1)).sum()  # per-image mean x B


def align_loss(attn, full_logits, eps=1e-8):
    """Detection attention should fall on vessels: KL(vessel distribution || CTAM key attention) per scale,
    the vessel distribution being the detached predicted probability pooled to the key grid, normalised."""
    B = full_logits.shape[0]
    vessel = full_logits.detach().float().sigmoid()
    total = 0.0
    for a in attn:  # (B, hk, wk), rows sum to 1
        q = F.adaptive_avg_pool2d(vessel, a.shape[-2:]).flatten(1)
        q = q / q.sum(1, keepdim=True).clamp(min=eps)
        a = a.float().flatten(1)
        total = total + (q * ((q + eps).log() - (a + eps).log())).sum(1).mean()
    return total / len(attn) * B


def l2sp_loss(model, anchor):
    """L2-SP: squared distance of backbone+neck weights to their values at stage start (anchor: name -> tensor)."""
    named = dict(model.named_parameters())
    return sum(((named[k] - w0) ** 2).sum() for k, w0 in anchor.items())


class MultiTaskLoss:
    """The CA-MTL objective. `total, terms = crit(det_out, seg_out, batch, model)`.

    total: the data loss of this batch, lambda-weighted sum of the terms that apply to it (det and cons on detection
    batches, seg on segmentation batches, align wherever CTAM's attention maps were computed); backward() it.
    terms: detached per-image values (divided by the batch size, so they read like YOLOv8's loss items) of exactly
    those terms, by name, with `total`; on detection batches also the detection loss's own box, cls, dfl (+ kpt,
    kobj), already inside `det`; and `l2sp` when an anchor is set. L2-SP is a pull on the weights, not a data term:
    it is logged apart, left out of `total`, and enters the optimisation through add_l2sp_grad_ at the optimizer
    step (outside autograd, so under DDP no rank ever sees a gradient for a parameter its forward did not use)."""

    NAMES = ("det", "seg", "cons", "align", "l2sp", "total")

    def __init__(self, cfg, anchor=None):
        self.cfg, self.anchor = cfg, anchor
        self.weight = {k: cfg[f"lambda_{k}"] for k in self.NAMES[:-1]}
        self.det = DetectionLoss(cfg["nc"], box=cfg["box"], cls=cfg["cls"], dfl=cfg["dfl"], kpt=cfg["kpt"],
                                 kobj=cfg["kobj"])
        self.seg_w = {k: cfg[f"w_{k}"] for k in ("p3", "p4", "p5", "p2", "p1", "full")}

    def __call__(self, det_out, seg_out, batch, model=None):
        c, w = self.cfg, self.weight
        ref = det_out[0] if det_out is not None else seg_out["full"]
        B = ref.shape[0]
        raw, det_terms = {}, {}  # unweighted loss of each term that applies to this batch
        if batch["task"] == "det" and det_out is not None:
            raw["det"], det_terms = self.det(det_out, batch)
            if seg_out is not None and w["cons"]:
                raw["cons"] = consistency_loss(seg_out["full"], batch, c["cons_mode"], c["cons_margin"])
        if batch["task"] == "seg" and seg_out is not None:
            raw["seg"] = seg_loss(seg_out, batch, self.seg_w)
        if seg_out is not None and seg_out.get("attn") is not None and w["align"]:
            raw["align"] = align_loss(seg_out["attn"], seg_out["full"])
        weighted = {k: raw[k] * w[k] for k in self.NAMES if k in raw}
        total = sum(weighted.values(), ref.new_zeros(()).float())
        terms = {k: v.detach() / B for k, v in weighted.items()}
        if self.anchor and w["l2sp"] and model is not None:
            with torch.no_grad():
                terms["l2sp"] = l2sp_loss(model, self.anchor) * w["l2sp"] / B
        terms["total"] = total.detach() / B
        return total, {**terms, **det_terms}

    @torch.no_grad()
    def add_l2sp_grad_(self, model, scale=1.0):
        """Add scale x the gradient of lambda_l2sp * l2sp, i.e. 2 lambda scale (w - w0), to the .grad of the anchored
        parameters that have one. A parameter the step's batches never used (the other domain's DualBN branch)
        keeps none, so the optimizer leaves it, its momentum and its Adam moments alone."""
        if not (self.anchor and self.weight["l2sp"] and scale):
            return
        named = dict(model.named_parameters())
        for k, w0 in self.anchor.items():
            p = named[k]
            if p.grad is not None:
                p.grad.add_(p - w0, alpha=2 * self.weight["l2sp"] * scale)


class TermMeter:
    """Running means of named loss terms, each over the batches that reported it (det's box/cls/dfl only over
    detection batches); `weight` counts images for a per-image mean (validation) or 1 per batch (training)."""

    def __init__(self):
        self.sum, self.n = {}, {}

    def update(self, terms, weight=1):
        for k, v in terms.items():
            self.sum[k] = self.sum.get(k, 0.0) + float(v) * weight
            self.n[k] = self.n.get(k, 0) + weight

    def merge(self, other):
        """Add another meter's sums and counts (another DDP rank's batches); returns self."""
        for k in other.sum:
            self.sum[k], self.n[k] = self.sum.get(k, 0.0) + other.sum[k], self.n.get(k, 0) + other.n[k]
        return self

    def means(self):
        return {k: s / self.n[k] for k, s in self.sum.items()}
