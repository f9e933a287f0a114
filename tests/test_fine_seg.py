"""The fine vessel path (seg_stride 4 and 2), vessel scores at the original size inside the FOV, and what keeps a
small real set's run honest: the few-steps warning and best.pt's epoch."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import evaluate
import train
from config import DEFAULTS, load_config
from losses import MultiTaskLoss
from metrics import VesselMeter
from model import CAMTL, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURES = Path(__file__).parent / "fixtures"
TINY = {"scale": [0.33, 0.25, 64], "imgsz": 64}


def seg_batch(size, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, 1, size, size, generator=g) > 0.8).float()
    return {"task": "seg", "mask": mask, **{f"mask_p{k}": F.avg_pool2d(mask, s) for k, s in ((3, 8), (4, 16), (5, 32))}}


@pytest.mark.parametrize("stride, keys", [(4, ("p2",)), (2, ("p2", "p1"))])
def test_the_fine_path_gives_logits_at_its_strides_and_learns_from_its_skips(stride, keys):
    torch.manual_seed(0)
    m = CAMTL({**TINY, "seg_stride": stride}, verbose=False).train()
    x = torch.rand(2, 3, 64, 64)
    _, seg = m(x, tasks=("seg",))
    assert set(seg) == {"p3", "p4", "p5", "full", *keys}
    for k in keys:
        s = {"p2": 4, "p1": 2}[k]
        assert seg[k].shape == (2, 1, 64 // s, 64 // s)
    assert seg["full"].shape == (2, 1, 64, 64)
    crit, opt = MultiTaskLoss({**DEFAULTS}), torch.optim.SGD(m.parameters(), lr=0.1)
    crit(None, seg, seg_batch(64))[0].backward()
    fine = m.seg_head.fine
    assert len(fine.blocks) == len(keys)
    for head in fine.logits:  # zero at init, so only they learn in the first step
        assert head.weight.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    # after it, every weight of the path learns, and the loss reaches the backbone's early maps through the skips
    n, skips = m.features_and_skips(x)
    assert [t.shape[-1] for t in skips] == [16, 32][: len(keys)]  # layer 2 (stride 4), then layer 0 (stride 2)
    skips = [t.detach().requires_grad_() for t in skips]
    seg = m.seg_head(m.seg_stream(*n), x.shape[-2:], skips)
    crit(None, seg, seg_batch(64))[0].backward()
    for p in fine.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    for t in skips:
        assert t.grad.abs().sum() > 0


def test_a_new_fine_path_draws_the_stride8_logits_upsampled():
    """Its 1x1 logit convs start at zero, so p2 is the stride-8 head's refined logit map, bilinear x2."""
    torch.manual_seed(0)
    m = CAMTL({**TINY, "seg_stride": 4}, verbose=False).eval()
    got = {}
    m.seg_head.refine.register_forward_hook(lambda mod, i, o: got.setdefault("r", o))
    _, seg = m(torch.rand(1, 3, 64, 64), tasks=("seg",))
    want = F.interpolate(got["r"], scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(seg["p2"], want)


def test_seg_stride_8_is_the_network_before_the_fine_path():
    """tests/fixtures/seg_stride8.pt: a tiny CAMTL's weights, input and outputs, written by the code before the fine
    path existed. The same file loads strictly and gives the same outputs."""
    ref = torch.load(FIXTURES / "seg_stride8.pt", weights_only=True)
    m = CAMTL({**ref["cfg"], "seg_stride": 8}, verbose=False)
    m.load_state_dict(ref["state"])  # strict: no key added or missing at seg_stride 8
    det, seg = m.eval()(ref["x"])
    torch.testing.assert_close(det, ref["det"])
    assert set(seg) == set(ref["seg"])
    for k in seg:
        torch.testing.assert_close(seg[k], ref["seg"][k])


def test_a_checkpoint_written_before_seg_stride_loads_as_stride_8(tmp_path):
    ref = torch.load(FIXTURES / "seg_stride8.pt", weights_only=True)
    cfg = {k: v for k, v in CAMTL({**ref["cfg"]}, verbose=False).cfg.items() if k != "seg_stride"}
    torch.save({"model": ref["state"], "config": {**cfg, "workers": 0}, "stage": "camtl"}, tmp_path / "old.pt")
    model, got = load_checkpoint(tmp_path / "old.pt")  # strict: a fine path would leave keys unfilled
    assert got["seg_stride"] == 8 and model.seg_head.fine is None
    torch.testing.assert_close(model(ref["x"])[0], ref["det"])


def test_a_bad_seg_stride_is_one_line_naming_the_key():
    with pytest.raises(SystemExit, match="seg_stride"):
        load_config("domainshift1", None, ["seg_stride=3"])
    with pytest.raises(ValueError, match="seg_stride 16"):
        CAMTL({**TINY, "seg_stride": 16}, verbose=False)


# -----------------------------------------------------------------------------
# vessel scores at the original size, inside the FOV


def test_vessel_meter_against_a_hand_computation():
    prob = np.array([[0.9, 0.8, 0.3],
                     [0.6, 0.2, 0.1],
                     [0.7, 0.45, 0.05]])
    true = np.array([[1, 1, 0],
                     [0, 1, 0],
                     [1, 0, 0]], bool)
    fov = np.array([[1, 1, 1],
                    [1, 1, 1],
                    [1, 1, 0]], bool)  # the corner (a true negative, prob 0.05) is outside: not counted
    m = VesselMeter()
    m.update(prob[:2], true[:2], fov[:2])  # two images, pooled
    m.update(prob[2:], true[2:], fov[2:])
    # inside the FOV: vessels 0.9, 0.8, 0.2, 0.7 (predicted: 3 of 4); background 0.3, 0.6, 0.1, 0.45 (predicted: 0.6)
    tp, fn, fp, tn = 3, 1, 1, 3
    s = m.compute()
    assert s["se"] == pytest.approx(tp / (tp + fn))
    assert s["sp"] == pytest.approx(tn / (tn + fp))
    assert s["acc"] == pytest.approx((tp + tn) / 8)
    assert s["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    pos, neg = [0.9, 0.8, 0.2, 0.7], [0.3, 0.6, 0.1, 0.45]
    pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / 16  # the ROC area by its definition
    assert s["auc"] == pytest.approx(pairs)
    other = VesselMeter()
    other.update(prob, true)  # without the FOV: 9 pixels
    assert other.tp + other.fp + other.fn + other.tn == 9
    assert m.merge(other).tp == tp + 3


def write_seg_root(root, h0, w0, fov=True):
    """One fundus image of h0 x w0 with its vessel mask and (optionally) FOV mask in val; -> (mask, fov) arrays."""
    rng = np.random.default_rng(0)
    d = Path(root) / "retinography"
    for sub in ("images", "labels", "fov"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (h0, w0, 3), dtype=np.uint8)).save(d / "images" / "a.png")
    mask = rng.random((h0, w0)) > 0.7
    Image.fromarray(mask.astype(np.uint8) * 255).save(d / "labels" / "a.png")
    yy, xx = np.mgrid[:h0, :w0]
    f = (yy - h0 / 2) ** 2 + (xx - w0 / 2) ** 2 < (min(h0, w0) / 2.2) ** 2
    Image.fromarray(f.astype(np.uint8) * 255).save(d / "fov" / "a.png")
    e = {"image": "retinography/images/a.png", "mask": "retinography/labels/a.png", "domain": "source"}
    if fov:
        e["fov"] = "retinography/fov/a.png"
    splits = {"retinography_segmentation": {"train": [e], "val": [e], "test": []}}
    (Path(root) / "splits.json").write_text(json.dumps(splits))
    return mask, f if fov else np.ones_like(f)


class Canvas(nn.Module):
    """A stand-in network whose `full` logits are given canvas maps: what validate does with them is under test."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.p = logits, nn.Parameter(torch.zeros(()))

    def domain(self, d):
        import contextlib
        return contextlib.nullcontext()

    def forward(self, x, **kw):
        full = self.logits[: x.shape[0]]
        return None, {"full": full, **{f"p{k}": F.avg_pool2d(full, s) for k, s in ((3, 8), (4, 16), (5, 32))}}


def validate_with(root, logits, imgsz):
    cfg = {**DEFAULTS, "imgsz": imgsz}
    loader = data.build_loader(root, "retinography_segmentation", "val", imgsz=imgsz, batch=1)
    return evaluate.validate(Canvas(logits), {"seg": loader}, cfg, "cpu")


def test_vessel_scores_are_computed_at_the_original_size_inside_the_fov(tmp_path):
    # the original is the canvas (64 x 64): the canvas probabilities are the original's, pixel for pixel
    mask, fov = write_seg_root(tmp_path, 64, 64)
    logits = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    m = validate_with(tmp_path, logits, 64)
    want = VesselMeter()
    want.update(logits[0, 0].sigmoid().numpy(), mask, fov)
    for k, v in want.compute().items():
        assert m[f"vessel_{k}"] == pytest.approx(v, abs=1e-6), k


def test_letterbox_padding_is_not_scored(tmp_path):
    """A 40 x 64 image on a 64 canvas: the scores count its 40 x 64 pixels inside the FOV, none of the padding's."""
    mask, fov = write_seg_root(tmp_path, 40, 64)
    loader = data.build_loader(tmp_path, "retinography_segmentation", "val", imgsz=64, batch=1)
    batch = next(iter(loader))
    canvas = batch["mask"] * 20 - 10  # the letterboxed mask as confident logits: a perfect prediction
    meter = VesselMeter()
    evaluate.score_original_size(meter, canvas, batch)
    assert meter.tp + meter.fp + meter.fn + meter.tn == fov.sum()
    assert meter.compute()["f1"] > 0.95  # only resampling at the vessel edges costs anything


# -----------------------------------------------------------------------------
# small real sets: the few-steps warning, and best.pt's epoch


def test_a_run_of_few_optimizer_steps_is_warned_about_naming_the_keys():
    # configs/angiography.py on DRIVE: 16 images, batch 8 -> 2 batches/epoch, nbs 64 -> accumulate 8, 50 epochs
    cfg = load_config("domainshift1", "configs/angiography.py")
    nw = train.make_get_lr(cfg, 0.01, 2)[1]
    line = train.few_steps_warning({**cfg, "epochs": 50}, 2, 8, nw)
    assert "12 optimizer steps" in line and "12 of them in the warmup" in line
    assert all(k in line for k in ("nbs=8", "epochs", "warmup_epochs"))
    assert "\n" not in line
    fundus = load_config("domainshift1", "configs/fundus.py")  # DRIVE's 16 training images, a step every batch
    nb, accumulate = 16 // fundus["batch"], max(round(fundus["nbs"] / fundus["batch"]), 1)
    assert train.few_steps_warning(fundus, nb, accumulate, train.make_get_lr(fundus, 0.002, nb)[1]) == ""


def fake_run(tmp_path, cfg):
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (tmp_path / "weights").mkdir(exist_ok=True)
    return SimpleNamespace(cfg=cfg, ema=None, model=model, val_shards={}, device="cpu", crit=SimpleNamespace(
        anchor=None), log=lambda *a: None, master=True, comm=SimpleNamespace(gather_objects=None), metrics={},
        best_fitness=-1.0, run_dir=tmp_path, opt=opt, scaler=torch.amp.GradScaler("cpu", enabled=False),
        nan_total=0, skipped_steps=0)


@pytest.mark.parametrize("fitness, val_interval, best_epoch", [
    ([0.0, 0.0, 0.0, 0.0], 1, 4),  # all zero: the latest, not the first epoch
    ([0.0, 0.3, 0.0, 0.2], 1, 2),
    ([None, 0.0, 0.0], 2, 3),  # epoch 1 has no validation (val_interval 2): never best.pt, even against zeros
    ([None, 0.6, 0.4], 2, 2),
])
def test_best_pt_is_a_validated_epoch_and_ties_go_to_the_later(tmp_path, monkeypatch, fitness, val_interval,
                                                               best_epoch):
    cfg = {**DEFAULTS, "stage": "domainshift1", "epochs": len(fitness), "val_interval": val_interval}
    run = fake_run(tmp_path, cfg)
    scores = iter(f for f in fitness if f is not None)  # what each validation scores, in epoch order
    monkeypatch.setattr(evaluate, "validate", lambda *a, **k: {"fitness": next(scores), "dice_full": 0.0})
    monkeypatch.setattr(evaluate, "format_metrics", lambda *a, **k: "")
    for epoch in range(len(fitness)):
        train.validate_and_save(run, epoch, {})
    assert next(scores, "all used") == "all used"
    best = torch.load(tmp_path / "weights" / "best.pt", weights_only=True)
    assert best["epoch"] + 1 == best_epoch


def test_a_fine_path_model_exports_and_its_program_equals_eager(tmp_path):
    """export.py at seg_stride 4: the .pt2 program (portable) gives the eager model's detections and full-size
    vessel logits exactly."""
    import export
    torch.manual_seed(0)
    m = CAMTL({**TINY, "seg_stride": 4}, verbose=False).eval()
    with torch.no_grad():
        for conv in m.seg_head.fine.logits:  # the fine path's own contribution, not its zero start
            conv.weight.normal_(0, 0.1)
    ck = tmp_path / "s4.pt"
    torch.save({"model": m.state_dict(), "config": {**m.cfg, "workers": 0}, "stage": "domainshift1"}, ck)
    export.main(["--weights", str(ck), "--portable", "--out", str(tmp_path / "s4.pt2")])
    run, meta = export.load_program(tmp_path / "s4.pt2")
    eager = export.deployable(load_checkpoint(ck)[0])
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        (det, full), (ref_det, ref_full) = run(x), eager(x)
    assert full.shape == (1, 1, 64, 64) and meta["config"]["seg_stride"] == 4
    torch.testing.assert_close(det, ref_det)
    torch.testing.assert_close(full, ref_full)
