"""Scale-out and robustness of the loop: DDP maths equal to one process, skips agreed across ranks, a NaN inside
an accumulation window, resume onto the run's device, bf16 autocast on CPU, torchrun end to end for camtl with
every default loss term and replay. Two gloo ranks, tiny models, one thread each."""
import os
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import config
import data
import distributed
import evaluate
import synthetic
import train
from losses import MultiTaskLoss
from model import CAMTL, stage_setup

ROOT = Path(__file__).resolve().parent.parent
TINY = {"scale": [0.33, 0.125, 1024], "imgsz": 64, "attn_dim": 16, "attn_heads": 2, "attn_tokens": 16}
gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo backend not built")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seg_batch(n, seed):
    """n segmentation images with vessel-like masks, in the collated layout train_step expects."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(n, 3, 64, 64, generator=g)
    mask = (torch.rand(n, 1, 64, 64, generator=g) > 0.7).float()
    b = {"img": img, "mask": mask, "task": "seg", "domain": "source", "paths": [f"im{i}.png" for i in range(n)],
         "batch_idx": torch.zeros(0), "cls": torch.zeros(0, 1), "bboxes": torch.zeros(0, 4)}
    for k, s in (("p3", 8), ("p4", 16), ("p5", 32)):
        b[f"mask_{k}"] = nn.functional.avg_pool2d(mask, s)
    return b


def slice_batch(b, lo, hi):
    return {k: v[lo:hi] if torch.is_tensor(v) and v.dim() == 4 or k == "paths" else v for k, v in b.items()}


def tiny_run(batch, world=1, rank=0, accumulate=1, l2sp=0.0):
    """The namespace train_step/optimizer_step use, around a domainshift1 CAMTL whose BatchNorms run on their
    running statistics (a half batch's statistics differ from the whole batch's, so DDP could not equal one
    process with BN in train mode), SGD with weight decay, and the config's seg loss (+ optional L2-SP)."""
    cfg = {**config.DEFAULTS, **TINY, "stage": "domainshift1", "batch": batch, "nbs": 64, "lr0": 0.05,
           "lambda_det": 0.0, "lambda_cons": 0.0, "lambda_align": 0.0, "lambda_l2sp": l2sp, "weight_decay": 0.05}
    torch.manual_seed(0)  # the same initial weights in every process
    model = stage_setup(CAMTL({k: cfg[k] for k in TINY}, verbose=False), "domainshift1").train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    anchor = {k: p.detach() + 0.01 for k, p in model.named_parameters() if k.startswith("backbone.")}
    opt, _, _ = train.build_optimizer(model, cfg, accumulate, world)
    train.set_lr(opt, 0.05, 0.05, 0.9)
    return SimpleNamespace(cfg=cfg, device=torch.device("cpu"), world=world, rank=rank, master=rank == 0,
                           comm=distributed.Comm("cpu", world), log=print, model=model, opt=opt,
                           crit=MultiTaskLoss(cfg, anchor if l2sp else None),
                           scaler=torch.amp.GradScaler("cpu", enabled=False), ema=None, ctx=nullcontext(),
                           window=0, nan_run=0, nan_total=0, skipped_steps=0)


L2SP = {"equal": 1.0, "nan": 1e-2}  # "equal": strong enough that a doubled L2-SP step shows


def _worker(rank, world, port, out, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        r = tiny_run(batch=2, world=world, rank=rank, accumulate=3 if mode == "nan" else 1, l2sp=L2SP[mode])
        if mode == "nan" and rank == 1:  # only rank 1 sees a non-finite loss, on its second micro-batch
            real, calls = r.crit, []

            def crit(*a, **k):
                total, terms = real(*a, **k)
                calls.append(1)
                return (total * float("nan"), terms) if len(calls) == 2 else (total, terms)
            r.crit = crit
            r.crit.add_l2sp_grad_ = real.add_l2sp_grad_
        for step in range(3 if mode == "nan" else 1):
            full = seg_batch(4, seed=step)
            train.train_step(r, slice_batch(full, 2 * rank, 2 * rank + 2), where=f"micro-batch {step}")
        train.optimizer_step(r)
        torch.save({"model": r.model.state_dict(), "nan_total": r.nan_total}, out / f"rank{rank}.pt")
        if mode == "equal":  # the same two processes also validate, each its share of the images
            metrics = validate_tiny_camtl(out / "synth", rank, world, r.comm.gather_objects)
            torch.save(metrics, out / f"val{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Two gloo ranks: one step on 2 images each (seg_batch(4, seed=0) halved), then a validation of a tiny camtl
    model on 9 synthetic images per task -> the folder of rank{r}.pt (weights) and val{r}.pt (metrics)."""
    out = tmp_path_factory.mktemp("equal")
    synthetic.make_synthetic(out / "synth", n=9, imgsz=64, seed=0)  # 3 val images per task
    mp.spawn(_worker, args=(2, free_port(), out, "equal"), nprocs=2, join=True)
    return out


@pytest.fixture(scope="module")
def two_ranks_one_step(two_ranks):
    return [torch.load(two_ranks / f"rank{rank}.pt", weights_only=True)["model"] for rank in (0, 1)]


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in b if b[k].is_floating_point())


@gloo
def test_ddp_step_equals_one_process_on_the_same_images(two_ranks_one_step):
    one = tiny_run(batch=4, l2sp=L2SP["equal"])  # one process, both ranks' images in one batch
    train.train_step(one, seg_batch(4, seed=0), where="whole batch")
    before = deepcopy(one.model.state_dict())
    train.optimizer_step(one)
    ref = one.model.state_dict()
    moved = max_diff(ref, before)
    assert moved > 1e-3  # the step (with weight decay and L2-SP) really moved the weights
    for rank, got in enumerate(two_ranks_one_step):
        diff = max_diff(got, ref)
        assert diff < 1e-5, f"rank {rank} differs from one process by {diff}"


@gloo
def test_l2sp_pulls_as_hard_on_one_gpu_as_on_two(two_ranks_one_step):
    """nbs images per step on 1 GPU (accumulating 2 micro-batches) or 2 (1 each): the same step, L2-SP included
    (it enters once per optimizer step, weighted like weight decay, not once per micro-batch)."""
    def one_gpu(l2sp):
        r = tiny_run(batch=2, accumulate=2, l2sp=l2sp)
        full = seg_batch(4, seed=0)
        for lo in (0, 2):
            train.train_step(r, slice_batch(full, lo, lo + 2), where=f"micro-batch {lo // 2}")
        train.optimizer_step(r)
        return r.model.state_dict()
    ref = one_gpu(L2SP["equal"])
    assert max_diff(one_gpu(0.0), ref) > 1e-4  # L2-SP's share of the step is far above the tolerance below
    for rank, got in enumerate(two_ranks_one_step):
        diff = max_diff(got, ref)
        assert diff < 1e-5, f"rank {rank} differs from one GPU by {diff}"


def test_l2sp_leaves_the_dualbn_branch_a_window_never_used():
    """A window of source-domain (replay) batches: the target BN branch had no data, so no gradient: L2-SP adds
    none, and AdamW neither moves it nor keeps moments for it."""
    cfg = {**config.DEFAULTS, **TINY, "stage": "camtl", "batch": 2, "nbs": 2, "optimizer": "AdamW",
           "lambda_det": 0.0, "lambda_cons": 0.0, "lambda_align": 0.0, "lambda_l2sp": 1.0, "dual_bn": True}
    torch.manual_seed(0)
    model = stage_setup(CAMTL({**{k: cfg[k] for k in TINY}, "dual_bn": True}, verbose=False), "camtl").train()
    anchor = {k: p.detach() + 0.01 for k, p in model.named_parameters() if k.startswith(("backbone.", "neck."))}
    opt, _, _ = train.build_optimizer(model, cfg, 1)
    r = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), world=1, comm=distributed.Comm("cpu", 1), log=print,
                        model=model, opt=opt, crit=MultiTaskLoss(cfg, anchor), scaler=torch.amp.GradScaler("cpu",
                        enabled=False), ema=None, ctx=nullcontext(), window=0, nan_run=0, nan_total=0,
                        skipped_steps=0)
    train.set_lr(opt, 0.01, 0.01, 0.9)
    target = {k: p.detach().clone() for k, p in model.named_parameters() if ".target." in k and k in anchor}
    source = {k: p.detach().clone() for k, p in model.named_parameters() if ".source." in k and k in anchor}
    assert target and source
    train.train_step(r, seg_batch(2, seed=0), where="replay batch")  # seg_batch is a source-domain batch
    train.optimizer_step(r)
    named = dict(model.named_parameters())
    assert all(torch.equal(named[k], v) for k, v in target.items())
    assert all(named[k] not in opt.state for k in target)
    assert all(not torch.equal(named[k], v) for k, v in source.items())  # the used branch did move


@gloo
def test_nan_on_one_rank_is_skipped_by_both_without_hanging(tmp_path):
    ctx = mp.spawn(_worker, args=(2, free_port(), tmp_path, "nan"), nprocs=2, join=False)
    deadline = time.time() + 180
    while not ctx.join(timeout=5):  # True once every rank has exited (an error in one raises here)
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the ranks did not finish within 180 s: a hang")
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["nan_total"] == b["nan_total"] == 1  # both skipped micro-batch 2, though only rank 1 saw the NaN
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # replicas identical


def test_nan_inside_an_accumulation_window_keeps_the_other_micro_batches():
    r = tiny_run(batch=2, accumulate=2)
    good = seg_batch(2, seed=1)
    train.train_step(r, good, where="micro-batch 1")
    real = r.crit
    r.crit = lambda *a, **k: (lambda t, terms: (t * float("nan"), terms))(*real(*a, **k))
    r.crit.add_l2sp_grad_ = real.add_l2sp_grad_
    assert train.train_step(r, seg_batch(2, seed=2), where="micro-batch 2") is None
    train.optimizer_step(r)
    ref = tiny_run(batch=2, accumulate=2)  # the same window with only the good micro-batch
    train.train_step(ref, good, where="micro-batch 1")
    train.optimizer_step(ref)
    sd, want = r.model.state_dict(), ref.model.state_dict()
    assert all(torch.equal(sd[k], want[k]) for k in want)
    assert r.nan_total == 1 and r.window == 0


def validate_tiny_camtl(root, rank=0, world=1, gather=None):
    """The metrics of a tiny camtl model (the same weights in every process) on this rank's share of root's val
    images."""
    cfg = {**config.DEFAULTS, **TINY, "stage": "camtl", "dual_bn": True}
    torch.manual_seed(0)
    model = stage_setup(CAMTL({**{k: cfg[k] for k in TINY}, "dual_bn": True}, verbose=False), "camtl")
    nn.init.constant_(model.seg_head.refine.bias, 1.0)  # vessels predicted somewhere: a Dice neither 0 nor 1
    loaders = train.shard_loaders(data.val_loaders(root, "camtl", "val", 64, 2, 0, 1), rank, world)
    return evaluate.validate(model, loaders, cfg, torch.device("cpu"), MultiTaskLoss(cfg), gather=gather)


@gloo
def test_every_rank_validates_its_share_and_all_get_one_process_metrics(two_ranks):
    """3 val images per task on 2 ranks (2 + 1): the merged metrics are one process's on all 3, on both ranks
    (the detection statistics' merge on a case with real AP: tests/test_gpu_path.py)."""
    want = validate_tiny_camtl(two_ranks / "synth")
    assert {"map50", "map50_95", "precision", "recall", "dice_full", "val/det", "val/seg"} <= set(want)
    assert 0 < want["dice_full"] < 1
    for rank in (0, 1):
        got = torch.load(two_ranks / f"val{rank}.pt", weights_only=False)
        assert got.keys() == want.keys()
        for k, v in want.items():
            exact = not k.startswith("val/")  # losses: sums in another order
            assert got[k] == v if exact else abs(got[k] - v) <= 1e-6 * max(abs(v), 1), (rank, k, got[k], v)


def test_restore_moves_every_tensor_to_the_runs_device(tmp_path):
    src = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = torch.optim.SGD(src.parameters(), lr=0.1, momentum=0.9)
    src(torch.rand(5, 3)).sum().backward()
    opt.step()
    ckpt = {"model": src.state_dict(), "optimizer": opt.state_dict(), "scaler": {}, "ema": None, "ema_updates": 0,
            "anchor": {k: p.detach().clone() for k, p in src.named_parameters()}, "epoch": 0, "best_fitness": 0.5,
            "rng": train.rng_state()}
    dev = torch.device("meta")  # stands for "another device than the checkpoint's" on a CPU-only machine
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(dev)
    r = SimpleNamespace(ckpt=ckpt, device=dev, model=model, opt=torch.optim.SGD(model.parameters(), lr=0.1,
                        momentum=0.9), scaler=torch.amp.GradScaler("cpu", enabled=False), ema=None,
                        crit=SimpleNamespace(anchor=None), master=False, run_dir=tmp_path)
    train.restore(r)
    assert all(v.device == dev for v in r.crit.anchor.values())  # the L2-SP anchor follows the model
    opt_tensors = [t for st in r.opt.state_dict()["state"].values() for t in st.values() if torch.is_tensor(t)]
    assert opt_tensors and all(t.device == dev for t in opt_tensors)
    assert all(t.device == dev for t in r.model.state_dict().values())
    assert r.start_epoch == 1 and r.best_fitness == 0.5 and r.ckpt is None


def test_bf16_autocast_on_cpu_trains_a_camtl_epoch(tmp_path, capsys):
    synthetic.make_synthetic(tmp_path / "synth", n=6, imgsz=64, seed=0)
    sets = [f"{k}={v}" for k, v in TINY.items()] + ["batch=2", "workers=0", "nbs=2", "warmup_min_iters=2",
                                                    f"data={tmp_path / 'synth'}", f"project={tmp_path / 'runs'}",
                                                    f"weights_dir={tmp_path / 'w'}", "epochs=1", "amp=True",
                                                    "amp_dtype=bf16", "plots=False"]
    sets = [s.replace(" ", "") for s in sets]
    run_dir, metrics = train.main(["--stage", "camtl", "--device", "cpu", "--set", *sets])
    out = capsys.readouterr().out
    assert "AMP bf16" in out  # the autocast path really ran
    ck = torch.load(run_dir / "weights" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert all(v.dtype != torch.bfloat16 for v in ck["model"].values())  # weights stay fp32 under autocast
    rows = (run_dir / "results.csv").read_text().splitlines()
    header, row = rows[0].split(","), rows[1].split(",")
    assert float(row[header.index("train/det")]) > 0 and float(row[header.index("train/total")]) > 0
    assert all(v == "" or torch.isfinite(torch.tensor(float(v))) for v in row)


@gloo
def test_torchrun_camtl_with_every_default_term_and_replay(tmp_path):
    synthetic.make_synthetic(tmp_path / "synth", n=6, imgsz=64, seed=0)
    sets = [f"{k}={v}".replace(" ", "") for k, v in TINY.items()] + [
        "batch=2", "workers=0", "nbs=2", "warmup_min_iters=2", "log_interval=1", f"data={tmp_path / 'synth'}",
        f"project={tmp_path / 'runs'}", f"weights_dir={tmp_path / 'w'}", "epochs=1", "camtl_ratio=[1,1,1]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for stage in ("domainshift1", "camtl"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(ROOT / "train.py"), "--stage", stage, "--device", "cpu", "--set", *sets]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "max weight difference across 2 ranks 0" in out.stdout, out.stdout[-2000:]
    assert out.stdout.count("val det 1/1") == 2  # the epoch's and the final validation, shown by rank 0 alone
    # camtl ran with L2-SP, consistency, alignment (defaults), DualBN and replayed fundus batches
    assert "l2sp" in out.stdout and "cons" in out.stdout and "align" in out.stdout
    ck = torch.load(tmp_path / "runs" / "camtl" / "exp" / "weights" / "yolov8c-camtl.pt", weights_only=True)
    assert ck["config"]["dual_bn"] and ck["config"]["camtl_ratio"] == [1, 1, 1]
    assert any(".bn.target." in k for k in ck["model"])
