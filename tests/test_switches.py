"""Every part of CA-MTL can be switched off (ctam, csam, fpma; stage1 for the camtl stage's init) and the two-way
exchange (xtam) switched on: what each switch removes, that what is left trains, that checkpoints rebuild the same
model, and the det-only camtl_ratio [1, 0]. Tiny widths and 64 px keep each test to seconds."""
import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import synthetic
import train
from config import DEFAULTS, load_config, saved_config
from losses import MultiTaskLoss
from model import CAMTL, YOLOv8, count_params, load_checkpoint, stage_setup
from modules import CrossAttention
from test_camtl import nonzero_grad, open_gates

FIX = Path(__file__).parent / "fixtures"
T = (1 / 3, 0.125, 1024)  # the fixtures' tiny scale
SMALL = {"scale": T, "attn_dim": 16, "attn_heads": 2, "attn_tokens": 16}
TINY = ["scale=[0.33,0.125,1024]", "imgsz=64", "batch=2", "workers=0", "attn_dim=16", "attn_heads=2",
        "attn_tokens=16", "log_interval=1", "nbs=2", "warmup_min_iters=2", "plots=False"]
OFF = {"ctam": ("ctam.",), "csam": ("csam.",), "fpma": ("fpma4.", "fpma3.")}  # switch -> its state-dict prefixes

pytestmark = pytest.mark.usefixtures("one_thread")


def camtl(**cfg):
    torch.manual_seed(0)
    return CAMTL({**SMALL, **cfg}, verbose=False)


def batches(B=2, S=64):
    """A detection batch (two boxes) and a segmentation batch (a horizontal band of vessel), target domain."""
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(B, 1, S, S)
    mask[:, :, 24:40, 8:56] = 1
    seg = {"task": "seg", "domain": "target", "img": torch.rand(B, 3, S, S, generator=g), "mask": mask,
           **{f"mask_{k}": F.avg_pool2d(mask, s) for k, s in (("p3", 8), ("p4", 16), ("p5", 32))}}
    det = {"task": "det", "domain": "target", "img": torch.rand(B, 3, S, S, generator=g),
           "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.zeros(2, 1),
           "bboxes": torch.tensor([[0.5, 0.5, 0.25, 0.25], [0.3, 0.3, 0.2, 0.2]])}
    return det, seg


def step(model, cfg, batch):
    """Forward what train.py computes for this batch, the loss, backward -> (loss, terms)."""
    tasks, need_attn = train.tasks_for(batch, cfg)
    with model.domain(batch["domain"]):
        det_out, seg_out = model(batch["img"], tasks=tasks, need_attn=need_attn)
    loss, terms = MultiTaskLoss(cfg)(det_out, seg_out, batch, model)
    loss.backward()
    return loss, terms


# ----------------------------------------------------------------------------- what each switch removes


@pytest.mark.parametrize("switch", list(OFF))
def test_each_switch_removes_its_part_and_its_parameters(switch):
    full, off = camtl(), camtl(**{switch: False})
    prefixes = OFF[switch]
    gone = {k for k in full.state_dict() if k.startswith(prefixes)}
    assert gone and not any(k.startswith(prefixes) for k in off.state_dict())
    assert set(full.state_dict()) - set(off.state_dict()) == gone  # nothing else went
    full_p = dict(full.named_parameters())
    added = {k: p for k, p in off.named_parameters() if k not in full_p}
    removed = sum(p.numel() for k, p in full_p.items() if k.startswith(prefixes))
    assert count_params(off) == count_params(full) - removed + sum(p.numel() for p in added.values())
    if switch != "fpma":
        assert not added and getattr(off, switch) is None
        assert {"CTAM": "ctam", "CSAM": "csam"}.keys() - off.parts().keys() == {switch.upper()}
        return
    # a plain FPN top-down path: one 1x1 projection per step (conv + GroupNorm affine), no attention
    c3, c4, _ = full.channels
    cs5 = full.s5.conv.out_channels
    assert set(added) == {f"fpn{k}.proj.{p}" for k in (4, 3) for p in ("conv.weight", "bn.weight", "bn.bias")}
    assert sum(p.numel() for p in added.values()) == cs5 * c4 + 2 * c4 + c4 * c3 + 2 * c3
    assert not any(isinstance(m, CrossAttention) for name in ("s5", "fpn4", "fpn3", "seg_head")
                   for m in getattr(off, name).modules())


def test_fpma_off_seg_stream_is_a_plain_fpn_with_the_same_shapes():
    m = camtl(fpma=False).train()
    x = torch.rand(2, 3, 128, 96)
    n3, n4, n5 = m.features(x)
    s3, s4, s5 = m.seg_stream(n3, n4, n5)
    c3, c4, _ = m.channels
    cs5 = m.s5.conv.out_channels
    assert [tuple(t.shape) for t in (s3, s4, s5)] == [(2, c3, 16, 12), (2, c4, 8, 6), (2, cs5, 4, 3)]
    assert torch.allclose(s4, n4 + F.interpolate(m.fpn4.proj(s5), scale_factor=2, mode="nearest"), atol=1e-6)
    assert torch.allclose(s3, n3 + F.interpolate(m.fpn3.proj(s4), scale_factor=2, mode="nearest"), atol=1e-6)
    _, seg = m(x)
    assert {k: tuple(v.shape) for k, v in seg.items()} == {
        "p3": (2, 1, 16, 12), "p4": (2, 1, 8, 6), "p5": (2, 1, 4, 3), "full": (2, 1, 128, 96)}


def test_ctam_and_csam_off_detect_exactly_as_yolov8_even_with_open_gates():
    ref = YOLOv8.from_ultralytics(str(FIX / "det.pt"), verbose=False).eval()
    m = CAMTL.from_ultralytics(str(FIX / "det.pt"), ctam=False, csam=False, xtam=True, verbose=False)
    open_gates(m).eval()  # the seg stream's FPMA and xTAM are live; nothing of them reaches Detect
    x = torch.load(FIX / "det_io.pt", weights_only=True)["x"]
    with torch.no_grad():
        assert torch.equal(m(x)[0], ref(x))
        assert torch.equal(m(x, tasks=("det",))[0], ref(x))


def test_det_task_without_ctam_runs_no_seg_stream():
    m = camtl(ctam=False).eval()
    calls = []
    for name in ("s5", "fpma4", "fpma3", "seg_head"):
        getattr(m, name).register_forward_hook(lambda *a, name=name: calls.append(name))
    with torch.no_grad():
        det, seg = m(torch.rand(1, 3, 64, 64), tasks=("det",))
        assert seg is None and not calls  # CTAM's keys were the only reason to run it
        _, seg = m(torch.rand(1, 3, 64, 64), tasks=("seg",), need_attn=True)
    assert "attn" not in seg  # no CTAM, no attention maps: the alignment term has nothing to align


# ----------------------------------------------------------------------------- what is left trains


@pytest.mark.parametrize("switches", [{"ctam": False}, {"csam": False}, {"fpma": False}, {"xtam": True},
                                      {"ctam": False, "csam": False, "fpma": False, "xtam": True}])
def test_one_training_step_with_switches_reaches_every_remaining_parameter(switches):
    cfg = {**DEFAULTS, **SMALL, **switches, "stage": "camtl"}
    model = open_gates(stage_setup(camtl(**switches), "camtl")).train()  # open gates: attention params learn too
    det, seg = batches()
    loss_det, terms_det = step(model, cfg, det)
    loss_seg, terms_seg = step(model, cfg, seg)
    assert torch.isfinite(loss_det) and torch.isfinite(loss_seg) and loss_det > 0 and loss_seg > 0
    assert {"det", "cons"} <= set(terms_det) and "seg" in terms_seg
    assert ("align" in terms_seg) == cfg["ctam"] and ("align" in terms_det) == cfg["ctam"]
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    assert not [k for k, p in trainable.items() if not nonzero_grad(p)]
    assert not any(k.startswith(tuple(p for s, ps in OFF.items() if not cfg[s] for p in ps)) for k in trainable)


# ----------------------------------------------------------------------------- the two-way exchange (xTAM)


def test_a_fresh_xtam_leaves_every_output_unchanged():
    ref = open_gates(camtl())  # FPMA, CTAM, CSAM live, so the streams carry real cross-task signal
    m = camtl(xtam=True)
    missing, unexpected = m.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("xtam.") for k in missing)
    x = torch.rand(2, 3, 64, 96)
    for mode in (True, False):
        with torch.no_grad():
            (d0, s0), (d1, s1) = ref.train(mode)(x), m.train(mode)(x)
        assert all(torch.equal(a, b) for a, b in zip(d0, d1)) if mode else torch.equal(d0, d1)
        assert all(torch.equal(s0[k], s1[k]) for k in s0)


def test_xtam_uses_features_a_seg_only_forward_has():
    m = open_gates(camtl(xtam=True)).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        full = m(x)[1]
        seg_only = m(x, tasks=("seg",))[1]
        assert all(torch.equal(full[k], seg_only[k]) for k in full)  # the same vessels whatever the tasks
        closed = camtl(xtam=True)
        closed.load_state_dict(m.state_dict())
        for a in closed.xtam:
            a.gate.data.zero_()
        assert not torch.equal(closed.eval()(x)[1]["full"], full["full"])  # the exchange is live when open


def test_xtam_gates_learn_first_then_everything_in_it():
    m = camtl(xtam=True).train()
    cfg = {**DEFAULTS, **SMALL, "xtam": True}
    det, seg = batches()
    m(det["img"], tasks=("det",))[0][0].sum().backward()
    assert all(p.grad is None for p in m.xtam.parameters())  # it feeds the seg head only
    step(m, cfg, seg)
    assert all(nonzero_grad(a.gate) for a in m.xtam)
    assert not any(nonzero_grad(p) for a in m.xtam for n, p in a.named_parameters() if n != "gate")  # gate 0
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    assert all(a.gate.abs().sum() > 0 for a in m.xtam)
    step(m, cfg, seg)
    assert all(nonzero_grad(p) for p in m.xtam.parameters())


# ----------------------------------------------------------------------------- checkpoints carry the switches


@pytest.mark.parametrize("switches", [{"ctam": False}, {"csam": False}, {"fpma": False}, {"xtam": True}])
def test_checkpoint_round_trip_rebuilds_the_same_architecture(tmp_path, switches):
    m = open_gates(camtl(**switches)).eval()
    path = tmp_path / "camtl.pt"
    torch.save({"model": m.state_dict(), "config": {**DEFAULTS, **m.cfg, "stage": "camtl"}, "stage": "camtl"}, path)
    m2, cfg = load_checkpoint(path)  # strict: every tensor has its place
    assert all(cfg[k] == v for k, v in switches.items())
    assert {k: v.shape for k, v in m2.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    m3 = CAMTL.from_pretrained(stage_ckpt=str(path), verbose=False)
    assert m3.state_dict().keys() == m.state_dict().keys()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        (d, s), (d2, s2) = m(x), m2(x)
        assert torch.equal(d, d2) and torch.equal(s["full"], s2["full"])


def test_a_checkpoint_from_before_the_switches_builds_the_full_model(tmp_path):
    m = open_gates(camtl()).eval()
    saved = {k: v for k, v in m.cfg.items() if k not in ("ctam", "csam", "fpma", "xtam")}
    torch.save({"model": m.state_dict(), "config": saved, "stage": "camtl"}, tmp_path / "old.pt")
    old, cfg = load_checkpoint(tmp_path / "old.pt")
    assert (cfg["ctam"], cfg["csam"], cfg["fpma"], cfg["xtam"]) == (True, True, True, False)
    assert saved_config({})["xtam"] is False and old.xtam is None and old.ctam is not None
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(old(x)[0], m(x)[0])


# ----------------------------------------------------------------------------- stage1, and the det-only ratio


def stage1_file(tmp_path, **switches):
    """A yolov8c-domainshift1.pt in tmp_path/weights (its seg head's weights all 0.5) -> (path, camtl config)."""
    m = camtl(**switches)
    m.seg_head.heads[0][-1].weight.data.fill_(0.5)
    path = tmp_path / "weights" / "yolov8c-domainshift1.pt"
    path.parent.mkdir()
    torch.save({"model": m.state_dict(), "config": {**DEFAULTS, **m.cfg, "stage": "domainshift1"}}, path)
    sets = TINY + [f"weights_dir={path.parent}", f"project={tmp_path / 'runs'}"]
    return path, sets


def test_stage1_false_ignores_an_existing_stage1_checkpoint_and_says_so(tmp_path):
    path, sets = stage1_file(tmp_path)
    logs = []
    model, found = train.build_model(load_config("camtl", None, sets), "camtl", logs.append, verbose=False)
    assert found == path and torch.equal(model.seg_head.heads[0][-1].weight, torch.full_like(
        model.seg_head.heads[0][-1].weight, 0.5))
    logs.clear()
    model, found = train.build_model(load_config("camtl", None, sets + ["stage1=False"]), "camtl", logs.append,
                                     verbose=False)
    assert found is None and not (model.seg_head.heads[0][-1].weight == 0.5).all()
    said = [line for line in logs if "stage1=False" in line]
    assert len(said) == 1 and str(path) in said[0] and "COCO" in said[0]
    assert not any("WARNING" in line for line in logs)  # nothing is missing: it was asked for


@pytest.mark.parametrize("key, was", [("fpma", False), ("ema_attention", True)])
def test_a_stage1_checkpoint_with_other_stage1_switches_is_warned_about(tmp_path, key, was):
    path, sets = stage1_file(tmp_path, **{key: was})
    logs = []
    train.build_model(load_config("camtl", None, sets), "camtl", logs.append, verbose=False)
    warned = [line for line in logs if line.startswith("WARNING") and str(path) in line]
    assert len(warned) == 1 and f"{key}={was}" in warned[0] and f"{key}={not was}" in warned[0]
    logs.clear()
    train.build_model(load_config("camtl", None, sets + [f"{key}={was}"]), "camtl", logs.append, verbose=False)
    assert not any(line.startswith("WARNING") for line in logs)


def test_a_stage1_checkpoint_with_another_attention_is_warned_about(tmp_path):
    # heads, tokens, query stride and GroupNorm groups change no weight shape: such a checkpoint loads silently
    # unless told, and its attention then computes something else than in stage 1
    path, sets = stage1_file(tmp_path, attn_heads=4, attn_tokens=32)
    logs = []
    train.build_model(load_config("camtl", None, sets), "camtl", logs.append, verbose=False)
    warned = [line for line in logs if line.startswith("WARNING") and str(path) in line]
    assert len(warned) == 1 and "attn_heads=4 attn_tokens=32" in warned[0]
    assert "this run has attn_heads=2 attn_tokens=16" in warned[0] and "--set attn_heads=4 attn_tokens=32" in warned[0]
    logs.clear()
    train.build_model(load_config("camtl", None, sets + ["attn_heads=4", "attn_tokens=32"]), "camtl", logs.append,
                      verbose=False)
    assert not any(line.startswith("WARNING") for line in logs)


def test_det_only_ratio_and_ctam_off_skip_the_terms_that_need_seg_or_ctam():
    det, seg = batches()
    cfg = {**DEFAULTS, "stage": "camtl"}
    assert train.tasks_for(det, cfg) == (("det", "seg"), True)
    assert train.tasks_for(det, {**cfg, "camtl_ratio": [1, 0]}) == (("det",), False)  # no seg batch, no seg terms
    assert train.tasks_for(det, {**cfg, "camtl_ratio": [1, 0, 1]}) == (("det", "seg"), True)  # replay: seg batches
    assert train.tasks_for(seg, {**cfg, "ctam": False}) == (("seg",), False)  # no CTAM maps to align
    assert train.tasks_for(det, {**cfg, "ctam": False}) == (("det", "seg"), False)  # cons still needs the vessels


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("switches")
    synthetic.make_synthetic(tmp / "synth", n=6, imgsz=64, seed=0)
    return tmp


def run_camtl(tmp, name, *sets):
    run_dir, metrics = train.main(["--stage", "camtl", "--set", *TINY, f"data={tmp / 'synth'}", f"name={name}",
                                   f"project={tmp / 'runs'}", f"weights_dir={tmp / 'weights'}", "epochs=1", *sets])
    with open(run_dir / "results.csv", newline="") as f:
        return run_dir, metrics, next(csv.DictReader(f))


def test_camtl_det_only_trains_detection_alone(synth):
    _, metrics, row = run_camtl(synth, "det_only", "camtl_ratio=[1,0]")
    assert float(row["train/det"]) > 0
    assert not {"train/seg", "train/cons", "train/align"} & set(row)  # no seg batch, no term that needs seg
    assert "map50" in metrics
    # best.pt is chosen by detection alone: the seg head's Dice (validated, reported) is no task of this run
    assert float(row["metrics/dice_full"]) > 0
    assert float(row["fitness"]) == pytest.approx(0.1 * metrics["map50"] + 0.9 * metrics["map50_95"])


def test_camtl_with_every_part_switched_off_trains_and_its_checkpoint_rebuilds_it(synth, capsys):
    run_dir, _, row = run_camtl(synth, "off", "ctam=False", "csam=False", "fpma=False", "xtam=True")
    assert capsys.readouterr().out.count("align term is skipped") == 1
    assert float(row["train/seg"]) > 0 and "train/align" not in row
    model, cfg = load_checkpoint(run_dir / "weights" / "yolov8c-camtl.pt")
    assert model.ctam is None and model.csam is None and model.xtam is not None and not cfg["fpma"]
    assert not any(k.startswith(("ctam.", "csam.", "fpma")) for k in model.state_dict())
