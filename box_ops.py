"""Box maths, one home: conversions, IoU of box sets, Complete IoU of paired boxes. Boxes are xyxy (corners, in
pixels or grid units) unless a name says xywh (centre and size); every function takes torch tensors."""
import math

import torch


def xywh2xyxy(x):
    """(..., 4) centre x, y, width, height -> corners x1, y1, x2, y2."""
    xy, wh = x[..., :2], x[..., 2:4] / 2
    return torch.cat((xy - wh, xy + wh), -1)


def dist2bbox(dist, anchors, xywh=True, dim=-1):
    """(left, top, right, bottom) distances from anchor points -> boxes, xywh or xyxy."""
    lt, rb = dist.chunk(2, dim)
    x1y1, x2y2 = anchors - lt, anchors + rb
    if xywh:
        return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim)
    return torch.cat((x1y1, x2y2), dim)


def box_iou(a, b, eps=1e-7):
    """Pairwise IoU of xyxy boxes a (M, 4) and b (N, 4) -> (M, N). float32, same arithmetic as the reference."""
    a, b = a.float()[:, None], b.float()[None]
    wh = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a + area_b - inter + eps)


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
