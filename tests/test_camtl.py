"""CAMTL: shapes, exactness against YOLOv8 with COCO weights, gradients, DualBN, GroupNorm, task gating,
attention maps, stage setup."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import read_ultralytics
from model import CAMTL, YOLOv8, gflops, load_checkpoint, stage_setup
from modules import (Conv, CrossAttention, DualBatchNorm2d, SegHeadMulti, gn_groups, to_dualbn, to_groupnorm,
                     token_grid, upsample_bilinear)

FIX = Path(__file__).parent / "fixtures"
T = (1 / 3, 0.125, 1024)  # the fixtures' tiny scale: fast, and COCO-like weights exist for it
SEG_PARTS = ("s5", "fpma4", "fpma3", "seg_head")


pytestmark = pytest.mark.usefixtures("one_thread")


def camtl(**cfg):
    return CAMTL({"scale": T, **cfg}, verbose=False)


def open_gates(model, value=0.1):
    for m in model.modules():
        if isinstance(m, CrossAttention):
            m.gate.data.fill_(value)
    return model


def nonzero_grad(p):
    return p.grad is not None and p.grad.abs().sum() > 0


def bn_eval(model):
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


# ----------------------------------------------------------------------------- shapes and sizes


@pytest.mark.parametrize("scale", ["n", "s", "m", "l", "x"])
def test_output_shapes_every_scale(scale):
    """On the meta device: the same code computes every shape, without the arithmetic (an x-scale network takes
    seconds to initialise and run on a CPU; the n-scale one runs for real in the other tests)."""
    with torch.device("meta"):
        m = CAMTL({"scale": scale, "nc": 2}, verbose=False).eval()
    for h, w in [(160, 96), (64, 128)]:  # 160 and 96 are multiples of 32, not of 64
        with torch.no_grad():
            det, seg = m(torch.rand(1, 3, h, w, device="meta"))
        assert det.shape == (1, 4 + 2, sum((h // s) * (w // s) for s in (8, 16, 32)))
        assert {k: tuple(v.shape) for k, v in seg.items()} == {
            "p3": (1, 1, h // 8, w // 8), "p4": (1, 1, h // 16, w // 16), "p5": (1, 1, h // 32, w // 32),
            "full": (1, 1, h, w)}


def test_train_mode_shapes_at_320x256_and_bad_size_rejected():
    m = CAMTL({"scale": "n"}, verbose=False).train()
    det, seg = m(torch.rand(2, 3, 320, 256))
    assert [tuple(d.shape) for d in det] == [(2, 65, 40, 32), (2, 65, 20, 16), (2, 65, 10, 8)]
    assert seg["full"].shape == (2, 1, 320, 256)
    with pytest.raises(ValueError, match="multiple of 32"):
        m(torch.rand(1, 3, 100, 128))


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="'attn_dims'"):
        CAMTL({"attn_dims": 32}, verbose=False)
    m = camtl()
    with pytest.raises(ValueError, match="tasks"):
        m(torch.rand(1, 3, 64, 64), tasks=("mask",))
    with pytest.raises(ValueError, match="need_attn"):
        m(torch.rand(1, 3, 64, 64), tasks=("det",), need_attn=True)


# ----------------------------------------------------------------------------- COCO weights


def test_detection_equals_yolov8_with_coco_weights():
    io = torch.load(FIX / "det_io.pt", weights_only=True)
    ref = YOLOv8.from_ultralytics(str(FIX / "det.pt"), verbose=False)
    m = CAMTL.from_ultralytics(str(FIX / "det.pt"), verbose=False)  # = from_pretrained({scale, nc 3}, det=...)
    with torch.no_grad():
        assert torch.equal(m.eval()(io["x"])[0], ref.eval()(io["x"]))
        assert all(torch.equal(a, b) for a, b in zip(bn_eval(m)(io["x"])[0], bn_eval(ref)(io["x"])))
        open_gates(m)  # the attention path is live: open gates change the detections
        assert not torch.equal(m.eval()(io["x"])[0], ref.eval()(io["x"]))


def test_from_pretrained_takes_backbone_neck_from_seg_and_detect_from_det():
    det, seg = read_ultralytics(str(FIX / "det.pt")), read_ultralytics(str(FIX / "seg.pt"))
    m = CAMTL.from_pretrained({"scale": T, "nc": 1}, det=str(FIX / "det.pt"), seg=str(FIX / "seg.pt"), verbose=False)
    assert torch.equal(m.backbone[0].conv.weight, seg["model.0.conv.weight"])
    assert torch.equal(m.neck.n5.cv2.conv.weight, seg["model.21.cv2.conv.weight"])
    assert torch.equal(m.detect.cv2[0][0].conv.weight, det["model.22.cv2.0.0.conv.weight"])
    assert m.detect.cv3[0][-1].weight.shape[0] == 1  # nc 1 != 3: class branch fresh
    # backbone+neck equal to a YOLOv8 built from the seg checkpoint
    ref = YOLOv8.from_ultralytics(str(FIX / "seg.pt"), verbose=False).eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(m.eval().features(x), ref.features(x)))


# ----------------------------------------------------------------------------- gradients


def seg_loss(seg, mask):
    return sum(F.binary_cross_entropy_with_logits(v, F.adaptive_avg_pool2d(mask, v.shape[-2:])) for v in seg.values())


def test_seg_loss_reaches_backbone_seg_stream_and_head_but_not_detection():
    m = camtl().train()
    x, mask = torch.rand(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.5).float()
    det, seg = m(x, tasks=("seg",))
    assert det is None
    seg_loss(seg, mask).backward()
    assert nonzero_grad(m.backbone[0].conv.weight) and nonzero_grad(m.neck.n3.cv2.conv.weight)
    assert all(nonzero_grad(p) for p in m.seg_head.parameters())
    assert nonzero_grad(m.s5.conv.weight) and nonzero_grad(m.fpma3.gate) and nonzero_grad(m.fpma4.gate)
    assert all(p.grad is None for part in (m.detect, m.ctam, m.csam) for p in part.parameters())
    # gates at zero pass no gradient into the attention itself; once open, every seg-stream tensor learns
    m.zero_grad(set_to_none=True)
    seg_loss(open_gates(m)(x, tasks=("seg",))[1], mask).backward()
    assert all(nonzero_grad(p) for name in SEG_PARTS for p in getattr(m, name).parameters())


def test_det_loss_reaches_ctam_keys_values():
    m = camtl().train()
    x = torch.rand(2, 3, 64, 64)
    det, seg = m(x, tasks=("det",))
    assert seg is None
    sum(d.square().mean() for d in det).backward()
    assert all(nonzero_grad(c.gate) for c in m.ctam)  # at init only the gates learn (zero-gated residuals)
    m.zero_grad(set_to_none=True)
    det, _ = open_gates(m)(x, tasks=("det",))
    sum(d.square().mean() for d in det).backward()
    assert all(nonzero_grad(c.kv[0].weight) and nonzero_grad(c.q.weight) for c in m.ctam)
    assert nonzero_grad(m.fpma3.kv[0].weight) and nonzero_grad(m.s5.conv.weight)  # through CTAM's keys
    assert all(p.grad is None for p in m.seg_head.parameters())


# ----------------------------------------------------------------------------- task gating and attention maps


def test_seg_task_runs_no_detection_module_and_det_task_no_seg_head():
    m = camtl().eval()
    calls = []
    for name in ("detect", "ctam", "csam", "seg_head"):
        for mod in getattr(m, name).modules():
            mod.register_forward_hook(lambda *a, name=name: calls.append(name))
    with torch.no_grad():
        m(torch.rand(1, 3, 64, 64), tasks=("seg",))
        assert set(calls) == {"seg_head"}
        calls.clear()
        m(torch.rand(1, 3, 64, 64), tasks=("det",))
        assert set(calls) == {"detect", "ctam", "csam"}


def test_attention_maps_are_distributions_over_the_pooled_key_grid():
    m = camtl(attn_tokens=16).train()
    det, seg = m(torch.rand(2, 3, 128, 96), need_attn=True)
    assert [tuple(a.shape) for a in seg["attn"]] == [(2, 4, 4), (2, 4, 4), (2, 4, 3)]  # S3 16x12, S4 8x6 pooled; S5 4x3
    for a in seg["attn"]:
        assert (a >= 0).all() and torch.allclose(a.sum((1, 2)), torch.ones(2))
        assert a.requires_grad  # the alignment loss trains CTAM's queries and keys
    assert token_grid(64, 64, 256) == (16, 16) and token_grid(40, 32, 256) == (17, 15)


def test_attention_map_is_the_mean_attention_when_queries_fit_the_budget():
    a = CrossAttention(8, (6,), dim=8, heads=2, tokens=64)
    x, s = torch.rand(1, 8, 4, 4), torch.rand(1, 6, 4, 4)  # 16 queries, 16 keys: nothing pooled
    _, (amap,) = a(x, [s], need_attn=True)
    q = a.q(x).flatten(2).view(1, 2, 4, 16).transpose(2, 3)  # (B, heads, Lq, d)
    k = a.kv[0](s)[:, :8].flatten(2).view(1, 2, 4, 16).transpose(2, 3)
    w = (q @ k.transpose(2, 3) / 2).softmax(-1)  # the weights SDPA uses, d = 4
    assert torch.allclose(amap.view(1, 16), w.mean((1, 2)), atol=1e-6)


def test_attention_cost_grows_linearly_with_image_area():
    m = camtl(attn_tokens=16, attn_query_stride=8)  # keys pooled to the same grid at all sizes, queries all kept
    f1, f2, f3 = (gflops(m, s) for s in (128, 256, 384))  # areas 1 : 4 : 9
    assert (f3 - f2) / 5 == pytest.approx((f2 - f1) / 3, rel=1e-9)  # affine in area (pooled keys: a constant)
    pooled = [gflops(camtl(attn_tokens=16, attn_query_stride=q), 384) for q in (16, 32)]  # P3's queries 2x2, 4x4
    assert f3 > pooled[0] > pooled[1]


def test_attn_query_stride_sets_each_levels_query_pooling():
    def qpools(m):  # P3, P4, P5 attentions: seg stream, CTAM, CSAM (P5 has no CSAM)
        return [(m.fpma3.qpool, m.ctam[0].qpool, m.csam.attn[0].qpool),
                (m.fpma4.qpool, m.ctam[1].qpool, m.csam.attn[1].qpool), (m.ctam[2].qpool,)]
    assert qpools(camtl()) == [(2, 2, 2), (1, 1, 1), (1,)]  # default 16 px: P3 pooled 2x2
    assert qpools(camtl(attn_query_stride=8)) == [(1, 1, 1), (1, 1, 1), (1,)]
    assert qpools(camtl(attn_query_stride=32)) == [(4, 4, 4), (2, 2, 2), (1,)]


def test_queries_are_pooled_and_the_output_upsampled_to_the_grid():
    torch.manual_seed(0)
    a = CrossAttention(8, (6,), dim=8, heads=2, tokens=16, qpool=2).eval()
    x, s = torch.rand(2, 8, 8, 8, requires_grad=True), torch.rand(2, 6, 8, 8)  # 64 queries -> a 4x4 grid
    assert torch.equal(a(x, [s])[0], x)  # gate zero: the identity, pooled queries or not
    a.gate.data.uniform_(0.5, 1)
    y, _ = a(x, [s])

    def heads(t):  # (2, 8, 16) -> (2, heads 2, 16 positions, d 4)
        return t.view(2, 2, 4, 16).transpose(2, 3)
    k, v = a.kv[0](F.adaptive_avg_pool2d(s, 4)).flatten(2).chunk(2, 1)
    o = F.scaled_dot_product_attention(heads(a.q(F.adaptive_avg_pool2d(x, 4)).flatten(2)), heads(k), heads(v))
    o = a.proj(o.transpose(2, 3).reshape(2, 8, 4, 4))  # (2, heads, 16, d) -> (2, heads * d, 4, 4)
    assert torch.allclose(y, x + a.gate.view(1, -1, 1, 1) * F.interpolate(o, (8, 8), mode="bilinear"), atol=1e-6)
    y.square().sum().backward()
    assert a.q.weight.grad.abs().sum() > 0 and a.kv[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shape,size", [((2, 1, 8, 8), (64, 64)), ((1, 3, 5, 7), (13, 29)), ((2, 2, 9, 6), (4, 3)),
                                        ((1, 1, 1, 4), (3, 8))])
def test_upsample_bilinear_is_f_interpolate_in_value_and_gradient(shape, size):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape[:2], *size, dtype=torch.float64)
    y = upsample_bilinear(x, size)
    ref = F.interpolate(x, size, mode="bilinear", align_corners=False)
    assert y.shape == ref.shape and torch.allclose(y, ref, atol=1e-12)  # up, down, odd ratios, one-pixel rows
    gx, = torch.autograd.grad(y, x, g)
    gref, = torch.autograd.grad(ref, x, g)
    assert torch.allclose(gx, gref, atol=1e-12)
    xf = x.detach().float().contiguous(memory_format=torch.channels_last)  # the seg head's case: fp32, channels_last
    assert torch.allclose(upsample_bilinear(xf, size), ref.float(), atol=1e-5)


def test_seg_head_full_logits_are_the_fused_logits_upsampled():
    torch.manual_seed(0)
    head = SegHeadMulti((16, 32, 32))
    xs = [torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4), torch.randn(2, 32, 2, 2)]
    for mode in (True, False):  # training: the matmul upsample; eval: F.interpolate
        out = head.train(mode)(xs, (64, 64))
        up = torch.cat([out["p3"]] + [F.interpolate(out[k], (8, 8), mode="bilinear") for k in ("p4", "p5")], 1)
        fused = (head.gate(up).softmax(1) * up).sum(1, keepdim=True)  # refine starts as the identity
        assert out["full"].shape == (2, 1, 64, 64)
        assert torch.allclose(out["full"], F.interpolate(fused, (64, 64), mode="bilinear"), atol=1e-5)


# ----------------------------------------------------------------------------- normalisation


def test_groupnorm_conversion_keeps_affine_parameters():
    net = nn.Sequential(Conv(3, 24, 3), Conv(24, 12, 1))
    for c in net:
        c.bn.weight.data.uniform_(0.5, 2)
        c.bn.bias.data.uniform_(-1, 1)
    want = [(c.bn.weight.clone(), c.bn.bias.clone()) for c in net]
    to_groupnorm(net)
    for c, (w, b) in zip(net, want):
        assert isinstance(c.bn, nn.GroupNorm) and c.bn.eps == 1e-3
        assert torch.equal(c.bn.weight, w) and torch.equal(c.bn.bias, b)
    assert [c.bn.num_groups for c in net] == [8, 4] == [gn_groups(24), gn_groups(12)]
    gns = [c.bn for c in net]
    to_groupnorm(net)  # idempotent
    assert [c.bn for c in net] == gns
    m = camtl()
    assert not any(isinstance(x, nn.BatchNorm2d) for n in SEG_PARTS + ("ctam", "csam") for x in getattr(m, n).modules())


def test_dualbn_keeps_separate_running_stats_per_domain():
    m = camtl(dual_bn=True).train()
    bn = m.backbone[0].bn
    assert isinstance(bn, DualBatchNorm2d)
    assert all(isinstance(p, DualBatchNorm2d)
               for p in m.backbone.modules() for x in p.children() if isinstance(x, nn.BatchNorm2d))
    with m.domain("target"):
        assert bn.domain == "target"
        m(torch.rand(2, 3, 64, 64) * 0.2 + 0.8)
    assert bn.domain == "source"  # restored
    assert torch.equal(bn.source.running_mean, torch.zeros_like(bn.source.running_mean))  # untouched
    m.set_domain("source")(torch.rand(2, 3, 64, 64) * 0.2)
    assert not torch.allclose(bn.source.running_mean, bn.target.running_mean)
    assert bn.source.num_batches_tracked == bn.target.num_batches_tracked == 1


def test_dualbn_checkpoint_round_trip(tmp_path):
    m = camtl(dual_bn=True).train()
    with m.domain("target"):
        m(torch.rand(2, 3, 64, 64))
    open_gates(m)
    path = tmp_path / "camtl.pt"
    torch.save({"model": m.state_dict(), "config": {**m.cfg, "lr0": 0.01}}, path)  # a train config has more keys
    m2 = CAMTL.from_pretrained(stage_ckpt=str(path), verbose=False)
    assert m2.cfg["dual_bn"] and m2.state_dict().keys() == m.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad(), m.eval().domain("target"), m2.eval().domain("target"):
        assert torch.equal(m(x)[0], m2(x)[0])


def test_a_checkpoint_from_before_attn_query_stride_keeps_every_query(tmp_path):
    m = camtl(attn_query_stride=8).eval()
    open_gates(m)
    saved = {k: v for k, v in m.cfg.items() if k != "attn_query_stride"}  # written before the key existed
    torch.save({"model": m.state_dict(), "config": saved, "stage": "camtl"}, tmp_path / "old.pt")
    old, cfg = load_checkpoint(tmp_path / "old.pt")
    assert cfg["attn_query_stride"] == 8 and old.fpma3.qpool == 1  # what it was trained with, not today's default
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(old(x)[1]["full"], m(x)[1]["full"]) and torch.equal(old(x)[0], m(x)[0])
    assert CAMTL.from_pretrained(stage_ckpt=str(tmp_path / "old.pt"), verbose=False).ctam[0].qpool == 1
    torch.save({"model": m.state_dict(), "config": {**saved, "attn_query_stride": 16}}, tmp_path / "new.pt")
    assert load_checkpoint(tmp_path / "new.pt")[0].fpma3.qpool == 2  # a saved value wins


def test_plain_bn_checkpoint_seeds_both_dualbn_branches(tmp_path):
    ds1 = stage_setup(camtl(), "domainshift1").train()
    ds1(torch.rand(2, 3, 64, 64), tasks=("seg",))
    path = tmp_path / "ds1.pt"
    torch.save({"model": ds1.state_dict(), "config": ds1.cfg}, path)
    m = CAMTL.from_pretrained({"dual_bn": True}, stage_ckpt=str(path), stage="camtl", verbose=False)
    bn, ref = m.neck.n3.cv1.bn, ds1.neck.n3.cv1.bn
    for k in ("weight", "bias", "running_mean", "running_var"):
        assert (torch.equal(getattr(bn.source, k), getattr(ref, k))
                and torch.equal(getattr(bn.target, k), getattr(ref, k)))


def test_fuse_folds_the_active_dualbn_branch():
    c = Conv(4, 8, 3)
    c.bn = DualBatchNorm2d.from_bn(c.bn)
    c.train()(torch.rand(2, 4, 8, 8))  # source statistics
    c.bn.domain = "target"
    c(torch.rand(2, 4, 8, 8) + 3)  # different target statistics
    c.eval()
    x = torch.rand(1, 4, 8, 8)
    with torch.no_grad():
        ref = c(x)
        c.fuse()
        assert isinstance(c.bn, nn.Identity) and torch.allclose(c(x), ref, atol=1e-5)


# ----------------------------------------------------------------------------- stages


def test_stage_setup_domainshift1_freezes_detection_side():
    m = stage_setup(camtl(), "domainshift1")
    assert stage_setup(m, "domainshift1") is m  # idempotent
    assert all(not p.requires_grad for n in ("detect", "ctam", "csam") for p in getattr(m, n).parameters())
    assert all(p.requires_grad for n in ("backbone", "neck") + SEG_PARTS for p in getattr(m, n).parameters())
    m.train()
    assert all(not x.training for x in m.detect.modules() if isinstance(x, nn.BatchNorm2d))
    assert m.backbone[0].bn.training and m.detect.training  # Detect keeps its training graph (raw maps)
    before = m.detect.cv2[0][0].bn.running_mean.clone()
    det, _ = m(torch.rand(2, 3, 64, 64))
    assert isinstance(det, list) and torch.equal(m.detect.cv2[0][0].bn.running_mean, before)


def test_stage_setup_camtl_dualbn_and_everything_trainable():
    m = stage_setup(stage_setup(camtl(dual_bn=False), "domainshift1"), "camtl")
    assert all(p.requires_grad for n, p in m.named_parameters() if not n.startswith("detect.dfl."))
    m = camtl(dual_bn=True)  # the norm layout is the constructor's; the stage only decides what trains
    stage_setup(m.set_domain("target"), "camtl")
    sd = m.state_dict()
    stage_setup(m, "camtl")
    assert m.state_dict().keys() == sd.keys()  # idempotent
    for name in ("backbone", "neck", "detect"):
        assert any(isinstance(x, DualBatchNorm2d) for x in getattr(m, name).modules())
        assert all(x.domain == "target" for x in getattr(m, name).modules() if isinstance(x, DualBatchNorm2d))
    assert not any(isinstance(x, (nn.BatchNorm2d, DualBatchNorm2d)) for n in SEG_PARTS for x in getattr(m, n).modules())
    assert m.detect.training == m.training and not m.frozen


def test_summary_lists_parts_and_fuse_keeps_outputs():
    m = camtl()
    s = m.summary(64)
    for part in ("backbone", "neck", "seg stream", "CTAM", "CSAM", "seg head", "Detect", "GFLOPs at 64"):
        assert part in s
    to_dualbn(m.backbone)
    open_gates(m).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        det, seg = m(x)
        fdet, fseg = m.fuse()(x)
    assert torch.allclose(fdet, det, atol=1e-3) and torch.allclose(fseg["full"], seg["full"], atol=1e-4)


def test_seg_batch_attention_maps_skip_csam_and_detect():
    m = camtl(attn_tokens=16).train()
    calls = []
    for name in ("detect", "csam"):
        getattr(m, name).register_forward_hook(lambda mod, i, o, name=name: calls.append(name))
    x = torch.rand(2, 3, 128, 96)
    before = m.detect.cv2[0][0].bn.running_mean.clone()
    det, seg = m(x, tasks=("seg",), need_attn=True)
    assert det is None and not calls and torch.equal(m.detect.cv2[0][0].bn.running_mean, before)
    _, both = m(x, need_attn=True)  # the same maps as the full forward computes
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(seg["attn"], both["attn"]))
    sum(a.sum() for a in seg["attn"]).backward()
    assert m.ctam[0].q.weight.grad is not None and m.csam.attn[0].q.weight.grad is None
