"""Centre-keypoint auxiliary (docs/design.md): sizes, stripping, loss behaviour, checkpoints with/without it."""
import pytest
import torch

from losses import DetectionLoss, keypoint_loss
from checkpoints import load_matching
from model import CAMTL, YOLOv8, count_params

TINY = (0.33, 0.125, 1024)


def test_branch_size_at_n_scale():
    m = YOLOv8(nc=80, scale="n", kpt_aux=True, verbose=False)
    assert count_params(m.detect.cv4) == 71769
    assert count_params(m) == 3157200 + 71769
    m.fuse()
    assert count_params(m.detect.cv4) == 71673


def test_stripped_detections_equal_unstripped_and_size_equals_plain_detector():
    torch.manual_seed(0)
    m = YOLOv8(nc=2, scale=TINY, kpt_aux=True, verbose=False).eval()
    x = torch.rand(2, 3, 96, 64)
    with torch.no_grad():
        before = m(x)
        after = m.strip_aux()(x)
    assert torch.equal(before, after)
    assert count_params(m) == count_params(YOLOv8(nc=2, scale=TINY, verbose=False))
    assert m.train()(x)[0].shape[1] == 64 + 2  # no keypoint channels once stripped
    c = CAMTL({"scale": list(TINY), "kpt_aux": True}, verbose=False)
    assert count_params(c.strip_aux()) == count_params(CAMTL({"scale": list(TINY)}, verbose=False))


def test_keypoint_loss_zero_at_the_centre_and_growing_with_distance():
    gt = torch.tensor([[5.0, 5.0]])
    area = torch.tensor([4.0])
    losses = [float(keypoint_loss(gt + torch.tensor([[d, 0.0]]), gt, area)) for d in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert losses[0] == 0
    assert all(a < b for a, b in zip(losses, losses[1:])) and losses[-1] < 1


def maps(B=2, nc=1, kpt=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 64 + nc + 3 * kpt, 64 // s, 64 // s, generator=g).requires_grad_(True) for s in (8, 16, 32)]


def batch():
    return {"batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.zeros(2, 1),
            "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.25, 0.6, 0.2, 0.25]])}


def test_detection_loss_with_keypoints_adds_two_items_and_leaves_the_others():
    crit = DetectionLoss(nc=1)
    km = maps(kpt=True)
    plain = [m[:, :65].detach().clone().requires_grad_(True) for m in km]
    _, items_k = crit(km, batch())
    _, items_p = crit(plain, batch())
    assert list(items_k) == ["box", "cls", "dfl", "kpt", "kobj"] and list(items_p) == ["box", "cls", "dfl"]
    assert all(torch.allclose(items_k[k], items_p[k]) for k in items_p)  # same assignment, same box/cls/dfl
    assert items_k["kpt"] > 0 and items_k["kobj"] > 0


def test_perfect_centre_prediction_zeroes_the_keypoint_term():
    crit = DetectionLoss(nc=1)
    km = maps(kpt=True)
    # raw x, y such that raw*2 + anchor - 0.5 = GT centre (grid units) for every anchor of every level
    with torch.no_grad():
        for m, s in zip(km, (8, 16, 32)):
            h, w = m.shape[-2:]
            ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
            for b, (cx, cy) in enumerate(((32.0, 32.0), (16.0, 38.4))):
                m[b, 65] = (cx / s - xs + 0.5) / 2
                m[b, 66] = (cy / s - ys + 0.5) / 2
                m[b, 67] = 20.0  # visible
    _, items = crit(km, batch())
    assert items["kpt"] < 1e-6 and items["kobj"] < 1e-6


def test_empty_targets_with_keypoints():
    crit = DetectionLoss(nc=1)
    km = maps(kpt=True)
    empty = {"batch_idx": torch.zeros(0), "cls": torch.zeros(0, 1), "bboxes": torch.zeros(0, 4)}
    loss, items = crit(km, empty)
    assert len(items) == 5 and items["box"] == items["dfl"] == items["kpt"] == items["kobj"] == 0
    loss.backward()
    assert km[0].grad is not None


def test_checkpoints_with_and_without_the_branch_load_into_either_model(capsys):
    with_aux = YOLOv8(nc=1, scale=TINY, kpt_aux=True, verbose=False)
    plain = YOLOv8(nc=1, scale=TINY, verbose=False)
    load_matching(plain, with_aux.state_dict(), "aux.pt")  # branch dropped
    assert "dropped" in capsys.readouterr().out
    assert torch.equal(plain.detect.cv2[0][0].conv.weight, with_aux.detect.cv2[0][0].conv.weight)
    fresh = YOLOv8(nc=1, scale=TINY, kpt_aux=True, verbose=False)
    before = fresh.detect.cv4[0][0].conv.weight.clone()
    load_matching(fresh, plain.state_dict(), "plain.pt")  # branch freshly initialised
    assert "kept fresh init" in capsys.readouterr().out and "detect.cv4" in " ".join(
        n for n, _ in fresh.named_modules() if n.startswith("detect.cv4"))
    assert torch.equal(fresh.detect.cv4[0][0].conv.weight, before)


@pytest.mark.parametrize("gains", [dict(box=7.5, dfl=1.5), dict(box=0.01, dfl=0.01)])
def test_box_and_dfl_gains_stay_configurable(gains):
    _, items = DetectionLoss(nc=1, **gains)(maps(kpt=True), batch())
    ref = DetectionLoss(nc=1)(maps(kpt=True), batch())[1]
    assert torch.allclose(items["box"], ref["box"] * gains["box"] / 7.5) and torch.allclose(items["kpt"], ref["kpt"])
