"""The CA-MTL loss terms on hand-built cases: each batch reports exactly the terms that apply to it, by name."""
import math

import pytest
import torch
import torch.nn as nn

from losses import MultiTaskLoss, align_loss, consistency_loss, dice_bce, l2sp_loss, seg_loss

W4 = {"p3": 0.25, "p4": 0.25, "p5": 0.25, "full": 1.0}  # the default deep-supervision weights

CFG = dict(nc=1, box=7.5, cls=0.5, dfl=1.5, kpt=12.0, kobj=1.0, w_p3=0.25, w_p4=0.25, w_p5=0.25, w_p2=0.25, w_p1=0.25,
           w_full=1.0, lambda_det=1.0, lambda_seg=1.0, lambda_cons=0.1, cons_mode="contain", cons_margin=0.3,
           lambda_align=0.05, lambda_l2sp=1e-3)
B, S = 2, 64


def det_maps(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 65, S // s, S // s, generator=g).requires_grad_(True) for s in (8, 16, 32)]


def seg_maps(fill=0.0):
    return {k: torch.full((B, 1, S // s, S // s), fill).requires_grad_(True)
            for k, s in (("p3", 8), ("p4", 16), ("p5", 32), ("full", 1))}


def det_batch():
    return {"task": "det", "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.zeros(2, 1),
            "bboxes": torch.tensor([[0.5, 0.5, 0.25, 0.25], [0.3, 0.3, 0.2, 0.2]])}


def seg_batch(mask):
    b = {"task": "seg", "mask": mask}
    for k, s in (("p3", 8), ("p4", 16), ("p5", 32)):
        b[f"mask_{k}"] = nn.functional.avg_pool2d(mask, s)
    return b


def test_det_only_batch_has_no_seg_cons_align_terms():
    crit = MultiTaskLoss(CFG)
    total, terms = crit(det_maps(), None, det_batch())
    assert list(terms) == ["det", "total", "box", "cls", "dfl"]  # seg, cons, align, l2sp do not apply
    det, tot = float(terms["det"]), float(terms["total"])
    assert det > 0 and math.isclose(det, sum(float(terms[k]) for k in ("box", "cls", "dfl")), rel_tol=1e-6)
    assert math.isclose(tot, det, rel_tol=1e-6) and math.isclose(total.item(), tot * B, rel_tol=1e-6)


def test_seg_only_batch_has_no_det_term_and_total_is_the_sum():
    mask = torch.zeros(B, 1, S, S)
    mask[:, :, 20:40, 10:50] = 1
    crit = MultiTaskLoss(CFG)
    total, t = crit(None, seg_maps(), seg_batch(mask))
    assert list(t) == ["seg", "total"] and t["seg"] > 0
    assert torch.isclose(t["total"], t["seg"])
    total.backward()


def test_seg_loss_is_small_for_a_perfect_prediction_and_weights_scales():
    mask = torch.zeros(B, 1, S, S)
    mask[:, :, 0:32, 32:64] = 1  # aligned to stride 32: every scale's soft mask is binary
    batch = seg_batch(mask)
    perfect = {k: (batch[f"mask_{k}"] * 2 - 1) * 20 for k in ("p3", "p4", "p5")}
    perfect["full"] = (mask * 2 - 1) * 20
    good = float(seg_loss(perfect, batch, W4))
    bad = float(seg_loss(seg_maps(0.0), batch, W4).detach())  # the maps require grad
    assert good < 0.05 * bad
    # per-image mean x batch: doubling the batch with the same images doubles the loss
    both = {k: torch.cat([v, v]) for k, v in perfect.items()}
    bb = {k: torch.cat([v, v]) for k, v in batch.items() if torch.is_tensor(v)}
    assert math.isclose(float(seg_loss(both, bb, W4)), 2 * good, rel_tol=1e-5)


def test_dice_bce_of_empty_mask_predicted_empty_is_near_zero():
    assert float(dice_bce(torch.full((1, 1, 8, 8), -30.0), torch.zeros(1, 1, 8, 8))) < 1e-6


def test_consistency_zero_when_boxes_are_covered_and_positive_otherwise():
    batch = det_batch()
    covered = torch.full((B, 1, S, S), 10.0)  # vessel probability ~1 everywhere
    empty = torch.full((B, 1, S, S), -10.0)
    assert float(consistency_loss(covered, batch, "contain", 0.3)) == 0
    assert math.isclose(float(consistency_loss(empty, batch, "contain", 0.3)), 0.3 * B, rel_tol=1e-3)
    # bce mode: the box rectangles are the pseudo-mask
    pseudo = torch.full((B, 1, S, S), -20.0)
    pseudo[0, :, 24:40, 24:40] = 20.0
    pseudo[1, :, 13:26, 13:26] = 20.0
    assert float(consistency_loss(pseudo, batch, "bce")) < 0.05
    assert float(consistency_loss(empty, batch, "bce")) > 0.1
    none = {"batch_idx": torch.zeros(0), "cls": torch.zeros(0, 1), "bboxes": torch.zeros(0, 4)}
    assert float(consistency_loss(empty, none)) == 0


def test_align_zero_when_attention_follows_the_vessels():
    full = torch.full((B, 1, S, S), -8.0)
    full[:, :, :, 24:40] = 8.0  # a vertical vessel
    grids = [(4, 4), (2, 2)]
    follow = []
    for h, w in grids:
        q = nn.functional.adaptive_avg_pool2d(full.sigmoid(), (h, w)).flatten(1)
        follow.append((q / q.sum(1, keepdim=True)).view(B, h, w))
    uniform = [torch.full((B, h, w), 1.0 / (h * w)) for h, w in grids]
    assert float(align_loss(follow, full)) < 1e-5
    assert float(align_loss(uniform, full)) > 0.1


def test_l2sp_is_zero_at_the_anchor_and_grows_with_distance():
    m = nn.Linear(3, 2)
    anchor = {k: p.detach().clone() for k, p in m.named_parameters()}
    assert float(l2sp_loss(m, anchor).detach()) == 0
    with torch.no_grad():
        m.weight.add_(0.5)
    assert math.isclose(float(l2sp_loss(m, anchor).detach()), 6 * 0.25, rel_tol=1e-6)


def test_det_batch_with_seg_and_attention_reports_cons_and_align():
    crit = MultiTaskLoss(CFG)
    seg = seg_maps(-5.0)
    seg["attn"] = [torch.full((B, 2, 2), 0.25)]
    seg["full"] = seg["full"].detach().clone()
    seg["full"][:, :, :, 36:40] = 5.0  # covers 25% of box 0 and none of box 1: below the 0.3 margin
    seg["full"].requires_grad_(True)
    total, t = crit(det_maps(), seg, det_batch())
    assert t["det"] > 0 and "seg" not in t and t["cons"] > 0 and t["align"] > 0
    assert torch.isclose(t["total"], t["det"] + t["cons"] + t["align"])
    total.backward()
    assert seg["full"].grad.abs().sum() > 0


@pytest.mark.parametrize("lam", [0.0, 1e-3])
def test_l2sp_term_follows_its_lambda(lam):
    m = nn.Linear(2, 2)
    anchor = {k: p.detach().clone() + 1 for k, p in m.named_parameters()}
    crit = MultiTaskLoss({**CFG, "lambda_l2sp": lam}, anchor)
    _, t = crit(det_maps(), None, det_batch(), m)
    assert (t.get("l2sp", 0) > 0) == (lam > 0)


def test_bce_consistency_ignores_images_without_boxes():
    logits = torch.full((B, 1, S, S), 3.0, requires_grad=True)
    one_image = {"batch_idx": torch.tensor([0.0]), "cls": torch.zeros(1, 1),
                 "bboxes": torch.tensor([[0.5, 0.5, 0.25, 0.25]])}
    loss = consistency_loss(logits, one_image, "bce")
    loss.backward()
    assert loss > 0 and logits.grad[0].abs().sum() > 0
    assert logits.grad[1].abs().sum() == 0  # image 1 has no boxes: no pull towards "no vessel"


def test_l2sp_gradient_equals_autograd_of_the_term_times_micro_batches():
    m = nn.Linear(3, 2)
    anchor = {k: p.detach().clone() + 0.5 for k, p in m.named_parameters()}
    crit = MultiTaskLoss({**CFG, "lambda_l2sp": 1e-2}, anchor)
    (3 * 1e-2 * l2sp_loss(m, anchor)).backward()
    want = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad(set_to_none=False)  # zeros: add_l2sp_grad_ adds to the gradients a step has
    crit.add_l2sp_grad_(m, scale=3)
    assert all(torch.allclose(p.grad, want[k]) for k, p in m.named_parameters())
    _, t = crit(det_maps(), None, det_batch(), m)
    assert t["l2sp"] > 0 and torch.isclose(t["total"], t["det"])  # logged apart, not part of the data total
