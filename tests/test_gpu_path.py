"""What a GPU run executes, exercised on the CPU: collectives on the run's device, fp16 autocast with a GradScaler
(overflow skips, its state saved and resumed), a CPU checkpoint resumed with the scaler on, BatchNorm statistics
of a skipped micro-batch, the DDP timeout, YOLOv8's cuDNN settings, synchronized timing, optimizer state on
resume. Tiny models on 64 px synthetic images."""
import argparse
import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from test_ddp import seg_batch, tiny_run
from test_train import run

import config
import distributed
import evaluate
import synthetic
import train
from losses import MultiTaskLoss, TermMeter
from metrics import DetMeter, SegMeter, VesselMeter

pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY = ["scale=[0.33,0.125,1024]", "imgsz=64", "batch=2", "workers=0", "attn_dim=16", "attn_heads=2",
        "attn_tokens=16", "log_interval=1", "nbs=2", "warmup_min_iters=2", "plots=False"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu")
    synthetic.make_synthetic(tmp / "synth", n=6, imgsz=64, seed=0)
    return tmp


def camtl_run(tmp, *sets):
    """A real train.setup of a tiny camtl run (L2-SP, consistency, alignment, DualBN, replay) -> Run."""
    cfg = config.load_config("camtl", None, TINY + [f"data={tmp / 'synth'}", f"project={tmp / 'runs'}",
                                                    f"weights_dir={tmp / 'w'}", "camtl_ratio=[1,1,1]", *sets])
    return train.setup(cfg, argparse.Namespace(device="cpu", resume=None, set_keys=set()), log=lambda *a: None)


def fake_two_ranks(monkeypatch, device):
    """Every torch.distributed collective replaced by one that asserts its tensor is on `device` and otherwise
    does nothing (two identical ranks); -> the list of (collective, tensor device) calls."""
    calls = []

    def check(name):
        def collective(t, *a, **k):
            calls.append((name, t.device))
            assert t.device == device, f"{name} on a {t.device} tensor in a run on {device}"
        return collective
    for name in ("all_reduce", "broadcast"):
        monkeypatch.setattr(dist, name, check(name))
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj] * len(out)))
    return calls


def test_every_collective_tensor_is_made_on_the_runs_device(synth, monkeypatch):
    """A tensor made without device= lands on torch's default device: on a GPU run that is the CPU, which an NCCL
    group refuses. Here the default device is "meta" and the run's the CPU, so such a tensor reaching a
    collective fails the assert, through train steps, an optimizer step and the end-of-run replica check."""
    r = camtl_run(synth, "name=meta")
    batches = list(itertools.islice(iter(r.loader), 3))  # det (target), seg (target), seg (source)
    assert [b["domain"] for b in batches] == ["target", "target", "source"]
    train.train_step(r, batches[0], where="warm-up")
    train.optimizer_step(r)  # the optimizer's own state (AdamW's step counts) exists from here on
    r.world, r.comm = 2, distributed.Comm(r.device, 2)
    calls = fake_two_ranks(monkeypatch, r.device)
    with torch.device("meta"):
        for i, b in enumerate(batches):
            assert train.train_step(r, b, where=f"micro-batch {i}") is not None
        train.optimizer_step(r)
        r.comm.replica_difference(r.model)
    names = [n for n, _ in calls]
    assert names.count("all_reduce") >= 3 + 2 + 1 and "broadcast" in names  # flags, grads+buffers, replica check


def test_comm_refuses_a_tensor_off_the_runs_device():
    comm = distributed.Comm(torch.device("cuda:0"), world=2)
    with pytest.raises(RuntimeError, match="a collective on a cpu tensor in a run on cuda:0"):
        comm.all_reduce(torch.zeros(3))
    assert distributed.Comm("cpu", 1).all_reduce(torch.ones(2)).tolist() == [1.0, 1.0]  # one process: as it is
    assert distributed.Comm("cpu", 1).any(torch.tensor(True)) is True


def test_ddp_process_group_waits_longer_than_nccls_default(monkeypatch):
    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **k: seen.update(backend=backend, **k))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    device, rank, world = train.setup_device(config.DEFAULTS, "cpu")
    assert (device.type, rank, world) == ("cpu", 1, 2) and seen["backend"] == "gloo"
    assert seen["timeout"] == distributed.TIMEOUT and distributed.TIMEOUT.total_seconds() >= 30 * 60
    # the NCCL lines, as torchrun starts the second process on a 2-GPU machine
    seen.clear()
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen.update(set_device=i))
    assert distributed.init("cuda") == (torch.device("cuda:1"), 1, 2)
    assert seen == {"set_device": 1, "backend": "nccl", "timeout": distributed.TIMEOUT,
                    "device_id": torch.device("cuda:1")}


def test_a_skipped_micro_batch_leaves_batchnorm_statistics_as_they_were():
    """One inf pixel: the loss is not finite and the micro-batch is skipped; the forward ran in train mode, so
    without the restore its BatchNorm running statistics would be NaN, and so every later output."""
    r = tiny_run(batch=2)
    for m in r.model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()  # tiny_run keeps them in eval; here they update, as in training
    before = {k: v.clone() for k, v in r.model.state_dict().items()}
    bad = seg_batch(2, seed=3)
    bad["img"][1, 0, 5, 5] = float("inf")
    assert train.train_step(r, bad, where="inf pixel") is None and r.nan_total == 1
    after = r.model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert changed and all(k.endswith("num_batches_tracked") for k in changed)  # counters, unused at momentum 0.03
    r.model.eval()
    with r.model.domain("source"):
        _, seg = r.model(seg_batch(2, seed=4)["img"], tasks=("seg",))
    assert torch.isfinite(seg["full"]).all()


def test_a_scalerless_checkpoint_resumes_with_the_scaler_on(tmp_path):
    """A CPU run's checkpoint holds its disabled GradScaler's state {}; on CUDA with fp16 the scaler is enabled,
    and GradScaler.load_state_dict({}) raises: the scaler starts afresh instead."""
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.rand(4, 3)).sum().backward()
    opt.step()
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": {}, "ema": None, "ema_updates": 0,
            "anchor": None, "epoch": 0, "best_fitness": 0.1, "rng": train.rng_state()}
    lines = []
    r = SimpleNamespace(ckpt=ckpt, device=torch.device("cpu"), model=nn.Linear(3, 2), ema=None, master=False,
                        opt=None, scaler=torch.amp.GradScaler("cpu", enabled=True), log=lines.append,
                        crit=SimpleNamespace(anchor=None), run_dir=tmp_path)
    r.opt = torch.optim.AdamW(r.model.parameters())
    train.restore(r)
    assert r.scaler.is_enabled() and r.scaler.get_scale() == 2.0 ** 16 and r.start_epoch == 1
    assert any("GradScaler: the checkpoint's run had none" in ln for ln in lines)


def test_adamw_step_counts_stay_on_the_cpu_on_resume(tmp_path):
    """torch keeps AdamW's `step` on the CPU (a device tensor would cost a sync per parameter per step); restore
    moves the moments to the run's device and leaves the steps where torch wants them."""
    src = nn.Linear(3, 4)
    opt = torch.optim.AdamW(src.parameters())
    src(torch.rand(5, 3)).sum().backward()
    opt.step()
    ckpt = {"model": src.state_dict(), "optimizer": opt.state_dict(), "scaler": {}, "ema": None, "ema_updates": 0,
            "anchor": None, "epoch": 0, "best_fitness": 0.0, "rng": train.rng_state()}
    dev = torch.device("meta")  # stands for the GPU
    model = nn.Linear(3, 4).to(dev)
    r = SimpleNamespace(ckpt=ckpt, device=dev, model=model, opt=torch.optim.AdamW(model.parameters()), ema=None,
                        scaler=torch.amp.GradScaler("cpu", enabled=False), crit=SimpleNamespace(anchor=None),
                        master=False, run_dir=tmp_path, log=print)
    train.restore(r)
    states = list(r.opt.state_dict()["state"].values())
    assert len(states) == 2 and all(s["exp_avg"].device == dev and s["exp_avg_sq"].device == dev for s in states)
    assert all(s["step"].device.type == "cpu" and s["step"].item() == 1 for s in states)


def test_fp16_gradscaler_epoch_resumes_a_cpu_run_skips_an_overflow_and_keeps_its_scale(synth, monkeypatch, capsys):
    """The path of every CUDA run with the default amp=True, amp_dtype=fp16, on the CPU: a CPU (fp32, no scaler)
    camtl run resumed under fp16 autocast with an enabled GradScaler; one step's gradients overflow (a finite
    loss whose scaled value is inf in fp32): the scaler skips it, the log and last.pt count it and every other
    skip (fp16 gradients can overflow at the initial scale 65536, as on a GPU), the scale halves at each;
    resumed again, the scaler continues from the saved scale."""
    first, _ = run("camtl", synth, "name=amp", "plots=False")
    assert torch.load(first / "weights" / "last.pt", weights_only=True)["scaler"] == {}
    monkeypatch.setattr(train, "FP16_ON_CPU", True)
    real, calls = MultiTaskLoss.__call__, {"n": 0}

    def one_overflow(self, *a, **k):
        total, terms = real(self, *a, **k)
        calls["n"] += 1
        return (total * 1e37, terms) if calls["n"] == 2 else (total, terms)  # finite; x the scale: inf
    monkeypatch.setattr(MultiTaskLoss, "__call__", one_overflow)
    capsys.readouterr()
    run("camtl", synth, "epochs=2", resume=first)
    out = capsys.readouterr().out
    assert "AMP fp16" in out and "GradScaler: the checkpoint's run had none" in out
    skips = out.count("GradScaler: inf/NaN gradients, optimizer step at ")
    assert "GradScaler: inf/NaN gradients, optimizer step at epoch 2 iter 2 skipped" in out
    assert f"loss scale now {2 ** (16 - skips)}" in out and f"{skips} optimizer steps skipped (inf/NaN" in out
    last = torch.load(first / "weights" / "last.pt", weights_only=True)
    assert last["scaler"]["scale"] == 2.0 ** (16 - skips) and last["skipped_steps"] == skips
    assert last["nan_steps"] == 0
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert all(v.dtype != torch.float16 for v in last["model"].values())  # fp32 weights under fp16 autocast

    monkeypatch.setattr(MultiTaskLoss, "__call__", real)
    restored, real_restore = [], train.restore
    monkeypatch.setattr(train, "restore", lambda r: (real_restore(r), restored.append(r.scaler.get_scale())))
    run("camtl", synth, "epochs=3", resume=first)
    assert restored == [2.0 ** (16 - skips)]
    assert torch.load(first / "weights" / "last.pt", weights_only=True)["epoch"] == 2


def test_cuda_settings_are_yolov8s(monkeypatch):
    keep = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # so that monkeypatch undoes what set_cuda_backends sets
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    try:
        desc = train.set_cuda_backends(True)  # YOLOv8's default: deterministic=True
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert train.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert "cuDNN deterministic" in desc and "TF32 convolutions on" in desc and "matmuls highest" in desc
        assert "autotuned" in train.set_cuda_backends(False)
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(keep[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = keep[1:]
    assert config.DEFAULTS["deterministic"] is True


@pytest.mark.parametrize("world", [2, 3])
def test_merged_shards_give_the_metrics_of_all_images(world):
    """The mAP fixture's images dealt to `world` ranks as shard_loaders deals them (rank r: images r, r + W, ...):
    merge_shards puts the per-image statistics back in image order, so P, R and AP are one process's exactly."""
    case = torch.load(FIXTURES / "map_case.pt", weights_only=False)
    preds, targets = case["preds"], case["targets"]
    whole = DetMeter()
    whole.update(preds, targets)
    want = whole.compute(case["nc"])
    assert want["map50"] > 0.1
    shards = []
    for rank in range(world):
        det = DetMeter()
        det.update(preds[rank::world], targets[rank::world])
        seg = {"full": SegMeter()}
        seg["full"].inter, seg["full"].pred, seg["full"].true = rank, 10, 20
        vessels = VesselMeter()
        vessels.update(np.array([0.9, 0.2]), np.array([True, rank % 2 == 0]))
        shards.append((det, seg, TermMeter(), np.eye(2, dtype=np.int64), {"det": 1, "seg": 0}, np.ones(1), {"a": 1.0},
                       vessels))
    det, seg, _, cm, images, per_class, ms, vessels = evaluate.merge_shards(shards)
    got = det.compute(case["nc"])
    for k in ("precision", "recall", "map50", "map50_95"):
        assert got[k] == want[k], k
    assert (seg["full"].inter, seg["full"].pred, seg["full"].true) == (sum(range(world)), 10 * world, 20 * world)
    assert images == {"det": world, "seg": 0} and ms == {"a": float(world)} and cm[0, 0] == world
    assert vessels.tp == world and vessels.fn == (world + 1) // 2 and vessels.tn == world // 2  # 0.2: true on even


def test_validation_times_each_phase_after_the_device_is_done(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    evaluate.clock(torch.device("cpu"))
    assert synced == []
    evaluate.clock(torch.device("cuda:1"))
    assert synced == [torch.device("cuda:1")]
