"""YOLOv8 core against the Ultralytics reference fixtures: model, checkpoint import, loss."""
import os
import pickle
from pathlib import Path

import pytest
import torch

from box_ops import bbox_ciou
from losses import DetectionLoss, task_aligned_assign
from checkpoints import read_ultralytics
from model import YOLOv8
from modules import C2f, Conv

FIX = Path(__file__).parent / "fixtures"


def bn_eval(model):
    """Training graph (raw maps) but BatchNorm with running statistics, as the fixture was made."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    return model


@pytest.fixture(scope="module")
def det():
    return YOLOv8.from_ultralytics(str(FIX / "det.pt"), verbose=False), torch.load(FIX / "det_io.pt", weights_only=True)


def test_raw_maps_match_reference(det):
    m, io = det
    with torch.no_grad():
        levels = bn_eval(m)(io["x"])
    assert [tuple(t.shape) for t in levels] == [tuple(t.shape) for t in io["train_levels"]]
    for a, b in zip(levels, io["train_levels"]):
        assert (a - b).abs().max() < 1e-4


def test_decoded_output_matches_reference(det):
    m, io = det
    with torch.no_grad():
        out = m.eval()(io["x"])
    assert out.shape == io["eval_out"].shape == (2, 4 + 3, 16 * 16 + 8 * 8 + 4 * 4)
    assert (out - io["eval_out"]).abs().max() < 1e-3
    assert sum(p.numel() for p in m.parameters()) == io["num_params"]


def test_fuse_equals_unfused(det):
    m, io = det
    m = YOLOv8.from_ultralytics(str(FIX / "det.pt"), verbose=False).eval()
    with torch.no_grad():
        ref = m(io["x"])
        fused = m.fuse()(io["x"])
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules())
    assert (fused - ref).abs().max() < 1e-3
    assert (fused[:, 4:] - ref[:, 4:]).abs().max() < 1e-5  # scores


def test_seg_checkpoint_backbone_neck_match_reference():
    io = torch.load(FIX / "seg_io.pt", weights_only=True)
    m = YOLOv8.from_ultralytics(str(FIX / "seg.pt"), verbose=False).eval()
    assert m.nc == 80
    with torch.no_grad():
        feats = m.features(io["x"])
    for a, b in zip(feats, io["neck_p3_p4_p5"]):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-4


def test_nc_change_skips_class_branch_only():
    sd = read_ultralytics(str(FIX / "det.pt"))
    m = YOLOv8.from_ultralytics(str(FIX / "det.pt"), nc=1, verbose=False)
    assert m.nc == 1 and m.detect.cv3[0][-1].weight.shape[0] == 1
    assert torch.equal(m.detect.cv2[0][0].conv.weight, sd["model.22.cv2.0.0.conv.weight"])  # box branch loaded
    assert torch.equal(m.backbone[0].conv.weight, sd["model.0.conv.weight"])
    prior = torch.log(torch.tensor(5 / 1 / (640 / 8) ** 2))
    assert torch.allclose(m.detect.cv3[0][-1].bias, prior)  # fresh prior-bias init


@pytest.mark.parametrize("scale,want",
                         [("n", 3157200), ("s", 11166560), ("m", 25902640), ("l", 43691520), ("x", 68229648)])
def test_param_counts_equal_reference(scale, want):
    assert sum(p.numel() for p in YOLOv8(nc=80, scale=scale, verbose=False).parameters()) == want


def test_ema_attention_param_count_and_shapes():
    m = YOLOv8(nc=80, scale="n", ema_attention=True, verbose=False)
    assert sum(p.numel() for p in m.parameters()) == 3170864
    ema_sizes = [sum(p.numel() for p in e.parameters()) for e in (m.neck.ema3, m.neck.ema4, m.neck.ema5)]
    assert ema_sizes == [672, 2624, 10368]
    out = m.train()(torch.rand(2, 3, 64, 96))
    assert [tuple(o.shape) for o in out] == [(2, 144, 8, 12), (2, 144, 4, 6), (2, 144, 2, 3)]


def test_gflops_reported_like_reference():
    m = YOLOv8(nc=80, scale="n", verbose=False)
    assert "8.7 GFLOPs at 640" in m.summary()


def test_bad_image_size_is_rejected_with_a_clear_message():
    m = YOLOv8(nc=2, scale=(0.33, 0.125, 1024), verbose=False)
    with pytest.raises(ValueError, match="multiple of 32"):
        m(torch.rand(1, 3, 100, 128))


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_code_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _Payload.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"model": _Payload(), "epoch": 1}, path)
    with pytest.raises(ValueError, match="refusing to load global .*system"):
        read_ultralytics(str(path))
    assert not marker.exists()
    # the same with a raw pickle file (legacy format)
    with open(path, "wb") as f:
        pickle.dump({"model": _Payload()}, f, protocol=2)
    with pytest.raises(ValueError):
        read_ultralytics(str(path))
    assert not marker.exists()


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    data = (FIX / "det.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt: not a readable PyTorch checkpoint"):
        YOLOv8.from_ultralytics(str(cut))
    txt = tmp_path / "notes.pt"
    txt.write_text("hello")
    with pytest.raises(ValueError, match="notes.pt"):
        YOLOv8.from_ultralytics(str(txt))
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not a YOLOv8 checkpoint"):
        YOLOv8.from_ultralytics(str(other))


# ----------------------------------------------------------------------------- loss


@pytest.fixture(scope="module")
def case():
    return torch.load(FIX / "loss_case.pt", weights_only=True)


def test_loss_matches_reference(case):
    crit = DetectionLoss(nc=case["nc"], strides=case["strides"], **case["hyp"])
    feats = [f.clone().requires_grad_(True) for f in case["feats"]]
    loss, terms = crit(feats, case["batch"])
    assert list(terms) == ["box", "cls", "dfl"]
    items = torch.stack(list(terms.values()))
    rel = ((items - case["loss_items"]).abs() / case["loss_items"].abs()).max()
    assert rel < 1e-4
    assert torch.allclose(loss, case["loss_total"].sum(), rtol=1e-4)
    assert not items.requires_grad
    loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_loss_with_empty_targets_has_only_negatives(case):
    crit = DetectionLoss(nc=case["nc"])
    feats = [f.clone().requires_grad_(True) for f in case["feats"]]
    empty = {"batch_idx": torch.zeros(0), "cls": torch.zeros(0, 1), "bboxes": torch.zeros(0, 4)}
    loss, terms = crit(feats, empty)
    assert terms["box"] == 0 and terms["dfl"] == 0 and terms["cls"] > 0
    loss.backward()
    # cls BCE toward all-zero targets: gradient = sigmoid(logit) / 1 * gain * B
    g = feats[0].grad[:, 64:]
    want = torch.sigmoid(case["feats"][0][:, 64:]) * 0.5 * 4
    assert torch.allclose(g, want, atol=1e-5)


def test_one_image_without_boxes_gets_no_positives(case):
    B = case["feats"][0].shape[0]
    has = set(case["batch"]["batch_idx"].long().tolist())
    assert len(has) < B  # the fixture has an image without targets
    crit = DetectionLoss(nc=case["nc"])
    _, terms = crit(case["feats"], case["batch"])
    assert all(torch.isfinite(v) for v in terms.values())


def test_assigner_small_box_widened_and_perfect_prediction():
    # one 4x4 px GT at the centre of a 64 px image: without widening to 16 px no stride-8 centre is inside
    grid = torch.arange(8) * 8 + 4.0
    anchors = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).view(-1, 2)
    gt = torch.tensor([[[30.0, 30.0, 34.0, 34.0]]])
    pd_boxes = gt.expand(1, 64, 4).clone()
    scores = torch.full((1, 64, 1), 0.5)
    labels, boxes, tscores, fg, idx = task_aligned_assign(scores, pd_boxes, anchors, torch.zeros(1, 1, 1), gt,
                                                          torch.ones(1, 1, 1, dtype=torch.bool))
    assert fg.sum() == 4  # the 4 anchors at 28 and 36 around the centre
    assert torch.allclose(tscores.max(), bbox_ciou(gt[0, 0], gt[0, 0]))  # best anchor gets the GT's best CIoU (1)


def test_ciou_of_identical_boxes_is_one_and_decreases_with_offset():
    a = torch.tensor([10.0, 10.0, 30.0, 40.0])
    assert torch.isclose(bbox_ciou(a, a), torch.tensor(1.0), atol=1e-6)
    assert bbox_ciou(a, a + 2) < bbox_ciou(a, a + 1) < 1


def test_fused_conv_folds_batchnorm():
    c = Conv(4, 8, 3).eval()
    c.bn.running_mean.uniform_(-1, 1)
    c.bn.running_var.uniform_(0.5, 2)
    x = torch.rand(2, 4, 9, 9)
    ref = c(x)
    c.fuse()
    assert isinstance(c.bn, torch.nn.Identity) and torch.allclose(c(x), ref, atol=1e-5)


@pytest.mark.parametrize("n,shortcut", [(0, False), (1, True), (2, True), (2, False)])
def test_c2f_concat_of_cv1_whole_equals_its_two_halves(n, shortcut):
    # C2f concatenates cv1's whole output (for the int8 program's layout); YOLOv8 defines it on cv1's two halves
    torch.manual_seed(0)
    m = C2f(16, 32, n, shortcut).eval()
    x = torch.randn(2, 16, 12, 10)
    with torch.no_grad():
        y = list(m.cv1(x).chunk(2, 1))
        for b in m.m:
            y.append(b(y[-1]))
        want = m.cv2(torch.cat(y, 1))
        assert torch.equal(m(x), want)
