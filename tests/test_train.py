"""Both training stages end to end on a tiny synthetic set: artefacts, stage hand-over, SIGTERM, config errors,
NaN handling (resume and torchrun: test_restarts.py, test_ddp.py). Tiny widths and 64 px images keep each run to
seconds on 2 CPU cores."""
import contextlib
import io
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import config
import synthetic
import train
from losses import MultiTaskLoss
from model import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY = ["scale=[0.33,0.125,1024]", "imgsz=64", "batch=2", "workers=0", "attn_dim=16", "attn_heads=2",
        "attn_tokens=16", "log_interval=1", "nbs=2", "warmup_min_iters=2"]


def run(stage, tmp, *extra, resume=None):
    argv = ["--stage", stage, "--set", *TINY, f"data={tmp / 'synth'}", f"project={tmp / 'runs'}",
            f"weights_dir={tmp / 'weights'}", "epochs=1", *extra]
    if resume is not None:
        argv += ["--resume", str(resume)]
    return train.main(argv)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    synthetic.make_synthetic(tmp / "synth", n=6, imgsz=64, seed=0)
    return tmp


@pytest.fixture(scope="module")
def stages(synth):
    ds1_dir, ds1_metrics = run("domainshift1", synth)
    camtl_dir, camtl_metrics = run("camtl", synth)
    return ds1_dir, camtl_dir, ds1_metrics, camtl_metrics


PICTURES = {"domainshift1": ["results.png", "train_batch0.png", "train_batch1.png", "val_seg_batch0.png"],
            "camtl": ["results.png", "labels.png", "train_batch0.png", "train_batch1.png", "train_batch2.png",
                      "val_batch0_labels.png", "val_batch0_pred.png", "val_seg_batch0.png", "confusion_matrix.png",
                      "PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png"]}


def test_each_stage_writes_every_artefact(stages):
    ds1_dir, camtl_dir, ds1_m, camtl_m = stages
    for d, stage in ((ds1_dir, "domainshift1"), (camtl_dir, "camtl")):
        for f in ("results.csv", "config.py", "weights/last.pt", "weights/best.pt", f"weights/yolov8c-{stage}.pt"):
            assert (d / f).is_file() and (d / f).stat().st_size > 0, f"{d / f} missing"
        for f in PICTURES[stage]:  # readable PNGs of a plausible size, not blank
            with Image.open(d / f) as im:
                im.load()
                assert im.width >= 200 and im.height >= 150, f
                assert np.asarray(im.convert("L")).std() > 5, f"{f} is blank"
        assert not list(d.glob("weights/*.tmp")), "a temp checkpoint was left behind"
        last = torch.load(d / "weights" / "last.pt", weights_only=True)  # plain tensors and containers only
        assert {"model", "ema", "optimizer", "scaler", "epoch", "config", "rng"} <= set(last)
        assert last["config"]["stage"] == stage
        best = torch.load(d / "weights" / "best.pt", weights_only=True)  # small: weights, config, metrics
        assert set(best) == {"model", "weights", "config", "stage", "epoch", "metrics"}
        with contextlib.redirect_stdout(io.StringIO()) as said:
            load_checkpoint(d / "weights" / "best.pt")
        assert said.getvalue().strip().endswith(f"{stage} checkpoint, epoch {best['epoch'] + 1}, ema weights")
        assert (d / "weights" / "best.pt").stat().st_size < (d / "weights" / "last.pt").stat().st_size / 2
        # config.py fed back with --config reproduces the run's resolved config
        assert config.load_config(stage, str(d / "config.py")) == last["config"]
        header = (d / "results.csv").read_text().splitlines()[0].split(",")
        assert {"epoch", "train/total", "metrics/dice_full", "metrics/iou_p3", "fitness", "lr/pg0", "lr/pg1",
                "lr/pg2"} <= set(header)
    header = (camtl_dir / "results.csv").read_text().splitlines()[0].split(",")
    assert {"train/box_loss", "train/cls_loss", "train/dfl_loss", "train/det", "train/seg", "val/box_loss",
            "metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)"} <= set(header)
    assert {"dice_full", "iou_full", "dice_p3", "dice_p4", "dice_p5"} <= set(ds1_m) and "map50" not in ds1_m
    assert {"map50", "map50_95", "precision", "recall", "dice_full", "val/det", "val/seg"} <= set(camtl_m)
    assert 0 <= camtl_m["dice_full"] <= 1 and 0 <= camtl_m["map50"] <= 1


@pytest.mark.parametrize("exist_ok", [False, True])
def test_config_py_repeats_a_run_in_a_new_folder(tmp_path, exist_ok):
    # config.py's own command must not write over the run it describes, also when the run reused its folder
    # (exist_ok=True, as study.py's runs do)
    cfg = config.load_config("camtl", None, [f"project={tmp_path}", f"exist_ok={exist_ok}"])
    d = config.next_run_dir(cfg["project"], "camtl", cfg["name"], cfg["exist_ok"])
    d.mkdir(parents=True)
    train.write_run_config(d / "config.py", cfg)
    cmd = (d / "config.py").read_text().splitlines()[1].split()
    assert cmd[:6] == ["python", "train.py", "--stage", "camtl", "--config", str(d / "config.py")]
    again = config.load_config("camtl", cmd[5], cmd[6:])
    assert {k: v for k, v in again.items() if k != "exist_ok"} == {k: v for k, v in cfg.items() if k != "exist_ok"}
    assert config.next_run_dir(again["project"], "camtl", again["name"], again["exist_ok"]) == d.parent / "exp2"


def test_key_value_arguments_after_the_command_are_set_keys(synth):
    run_dir, _ = train.main(["--stage", "domainshift1", *TINY, f"data={synth / 'synth'}",
                             f"project={synth / 'runs_kv'}", f"weights_dir={synth / 'weights'}", "epochs=1",
                             "name=kv", "plots=False", "--set", "seed=3"])
    cfg = torch.load(run_dir / "weights" / "last.pt", weights_only=True)["config"]
    assert cfg["seed"] == 3 and cfg["plots"] is False and cfg["imgsz"] == 64 and run_dir.name == "kv"


def test_camtl_starts_from_the_domainshift1_checkpoint(stages):
    ds1_dir, camtl_dir, _, _ = stages
    ds1 = torch.load(ds1_dir / "weights" / "yolov8c-domainshift1.pt", weights_only=True)
    last_cfg = torch.load(camtl_dir / "weights" / "last.pt", weights_only=True)["config"]
    model, found = train.build_model(last_cfg, "camtl", print)
    assert found == ds1_dir / "weights" / "yolov8c-domainshift1.pt"
    sd = model.state_dict()
    # a stage-1 BatchNorm loads into both DualBN branches; the seg stream keeps its GroupNorm weights
    assert torch.equal(sd["backbone.0.bn.source.running_mean"], ds1["model"]["backbone.0.bn.running_mean"])
    assert torch.equal(sd["backbone.0.bn.target.running_mean"], ds1["model"]["backbone.0.bn.running_mean"])
    assert torch.equal(sd["backbone.0.conv.weight"], ds1["model"]["backbone.0.conv.weight"])
    seg_keys = [k for k in ds1["model"] if k.startswith("seg_head.")]
    assert seg_keys and all(torch.equal(sd[k], ds1["model"][k]) for k in seg_keys)


def test_domainshift1_keeps_detection_parts_frozen(stages):
    ds1_dir = stages[0]
    ck = torch.load(ds1_dir / "weights" / "last.pt", weights_only=True)
    torch.manual_seed(ck["config"]["seed"])  # the same random init as the run (no COCO weights here)
    model, _ = train.build_model(ck["config"], "domainshift1", print)
    init = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("detect.", "ctam.", "csam."))}
    assert all(torch.equal(ck["model"][k], v) for k, v in init.items())  # Detect/CTAM/CSAM untouched, BN stats too


def test_sigterm_stops_a_background_run_after_its_step_naming_its_last_checkpoint(synth, tmp_path):
    """`nohup python train.py ... &` ignores SIGINT; `kill` (SIGTERM, also study.py's and a scheduler's stop) must
    still end it: within seconds, after the optimizer step under way, one line naming last.pt, which resumes
    inside the epoch it stopped in."""
    cmd = [sys.executable, str(Path(train.__file__)), "--stage", "domainshift1", "--set", *TINY, "epochs=500",
           f"data={synth / 'synth'}", f"project={tmp_path}", "name=bg"]
    ignore_int = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731  (a background job's signals)
    log = open(tmp_path / "bg.log", "w")  # a file, not a pipe: a full pipe would stall the run
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=ignore_int)
    last = tmp_path / "domainshift1" / "bg" / "weights" / "last.pt"
    t0 = time.monotonic()
    while not last.is_file() and proc.poll() is None and time.monotonic() - t0 < 240:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    log.close()
    out = (tmp_path / "bg.log").read_text()
    assert proc.returncode != 0, out[-500:]
    said = [line for line in out.splitlines() if line.startswith("interrupted:")]
    assert len(said) == 1 and str(last) in said[0] and "--resume" in said[0] and "Traceback" not in out
    mid = torch.load(last, weights_only=True)["mid_epoch"]
    assert f"holds epoch {mid['epoch'] + 1} to batch {mid['batch']}/" in said[0] and mid["epoch"] >= 1


@pytest.mark.parametrize("bad,msg", [
    (["epochs=abc"], "key 'epochs' expects int"),
    (["lr=0.1"], "unknown key 'lr'; did you mean .*lr0"),
    (["dual_bn=1"], "key 'dual_bn' expects bool"),
    (["camtl_ratio=[1]"], "camtl_ratio"),
    (["imgsz=100"], "multiple of 32"),
    (["epochs"], "expected key=value"),
])
def test_config_errors_name_the_key(bad, msg):
    with pytest.raises(SystemExit, match=msg.replace("[", r"\[")):
        config.load_config("camtl", None, bad)


def test_config_layers_and_set_values():
    cfg = config.load_config("camtl", None, ["camtl_ratio=[1,2,1]", "lr0=1", "cons_mode=bce", "scale=s"])
    defaults = config.DEFAULTS
    assert cfg["camtl_ratio"] == [1, 2, 1] and cfg["lr0"] == 1.0 and isinstance(cfg["lr0"], float)
    assert cfg["cons_mode"] == "bce" and cfg["scale"] == "s"
    assert cfg["imgsz"] == 256 and defaults["imgsz"] == 512  # configs/synthetic.py applies by default
    assert config.load_config("domainshift1", None, [])["lambda_det"] == 0.0  # configs/domainshift1.py
    with pytest.raises(SystemExit, match="no such file"):
        config.load_config("camtl", "configs/nope.py", [])


def test_non_finite_loss_is_skipped_and_repeated_ones_stop_the_run(synth, monkeypatch, capsys):
    real = MultiTaskLoss.__call__
    state = {"n": 0}

    def one_nan(self, *a, **k):
        total, vec = real(self, *a, **k)
        state["n"] += 1
        return (total * float("nan"), vec) if state["n"] == 2 else (total, vec)
    monkeypatch.setattr(MultiTaskLoss, "__call__", one_nan)
    run_dir, _ = run("domainshift1", synth, "name=nan1")
    out = capsys.readouterr().out
    assert "micro-batch skipped" in out and "1 skipped non-finite steps" in out
    last = torch.load(run_dir / "weights" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())

    monkeypatch.setattr(MultiTaskLoss, "__call__",
                        lambda self, *a, **k: (lambda t, v: (t * float("nan"), v))(*real(self, *a, **k)))
    with pytest.raises(SystemExit, match="non-finite losses in a row"):
        run("domainshift1", synth, "name=nan2", "max_nan_steps=2")


@pytest.mark.skipif(not hasattr(torch.distributed, "is_gloo_available") or not torch.distributed.is_gloo_available(),
                    reason="gloo backend not built")
def test_a_run_that_fails_in_set_up_leaves_no_run_folder(synth):
    with pytest.raises(SystemExit, match="batch"):
        run("camtl", synth, "batch=64", "name=toobig")  # 4 training images cannot fill a batch of 64
    assert not (synth / "runs" / "camtl" / "toobig").exists()


def test_a_configs_synthetic_preset_is_the_set_it_trains_on(monkeypatch, tmp_path):
    """configs/hard.py names the hard preset: training (and so evaluation and int8 calibration, which look the set
    up the same way, synthetic.ensure_config) must use that set, not the Quickstart's."""
    seen = []

    def fake(root=None, preset="default", **params):
        seen.append((preset, params))
        return tmp_path / "missing"

    monkeypatch.setattr(synthetic, "ensure_synthetic", fake)
    for file, preset in (("configs/hard.py", "hard"), (None, "default")):
        cfg = {**config.load_config("camtl", file and str(ROOT / file), []), "stage": "camtl"}
        with pytest.raises(SystemExit, match="is not a directory"):
            train.build_data(cfg, 0, 1)
        assert seen[-1] == (preset, {"n": cfg["synthetic_n"], "imgsz": cfg["imgsz"]})
