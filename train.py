"""Train CA-MTL-YOLOv8 in two stages, on the built-in synthetic data or a processed data root.

    python train.py --stage domainshift1                 # retinography vessels (source domain)
    python train.py --stage camtl                        # angiography stenoses + vessels (target domain)
    python train.py --stage camtl --config configs/angiography.py --set data=/data/arcade epochs=50
    python train.py --stage camtl --resume               # continue the newest camtl run exactly
    torchrun --nproc_per_node=2 train.py --stage camtl   # DDP (NCCL on GPUs, gloo on CPU)

Configuration is plain dicts (config.py; configs/defaults.py lists every key). Read top to bottom: the pieces of
the loop (checkpoints, EMA, optimizer, get_lr), the set-up (device, run folder, data, model), then the run as a
short story at the end: setup -> restore -> train_one_epoch / validate_and_save per epoch -> finish_stage.
"""
import argparse
import csv
import math
import os
import random
import time
from contextlib import nullcontext
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import data
import evaluate
import synthetic
from config import STAGES, format_config, load_config, parse_set
from losses import MultiTaskLoss, TermMeter
from model import CAMTL, camtl_config, count_params

# -----------------------------------------------------------------------------
# pieces of the loop: checkpoints, EMA, optimizer, schedule


def save_atomic(obj, path):
    """Write to a temp file in the same directory, then rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "python": list(random.getstate()[1])}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(s["python"]), None))


class ModelEMA:
    """Exponential moving average of weights and buffers; decay ramps up as 0.9999 * (1 - exp(-updates / 2000))."""

    def __init__(self, model, decay=0.9999, tau=2000, updates=0):
        self.ema = deepcopy(model).eval().requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        msd = model.state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])


def build_optimizer(model, cfg, accumulate):
    """Three groups as YOLOv8: weights with decay, norm weights and biases (and attention gates) without."""
    decay, no_decay, bias = [], [], []
    norms = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name == "bias":
                bias.append(p)
            elif isinstance(mod, norms) or p.ndim <= 1:
                no_decay.append(p)
            else:
                decay.append(p)
    name = cfg["optimizer"]
    lr0 = cfg["lr0"] or {"SGD": 0.01, "AdamW": 0.002}.get(name, 0.01)
    wd = cfg["weight_decay"] * cfg["batch"] * accumulate / cfg["nbs"]
    if name == "SGD":
        opt = torch.optim.SGD(bias, lr=lr0, momentum=cfg["momentum"], nesterov=True)
    elif name == "AdamW":
        opt = torch.optim.AdamW(bias, lr=lr0, betas=(cfg["momentum"], 0.999), weight_decay=0.0)
    else:
        raise SystemExit(f"key 'optimizer': expected SGD or AdamW, got {name!r}")
    opt.add_param_group({"params": decay, "weight_decay": wd})
    opt.add_param_group({"params": no_decay, "weight_decay": 0.0})
    for g in opt.param_groups:
        g["is_bias"] = g["params"] is bias
    desc = (f"{name}(lr0={lr0}, momentum={cfg['momentum']}) groups: {len(decay)} weights (decay {wd:.2e}), "
            f"{len(no_decay)} norm/gate weights, {len(bias)} biases (no decay)")
    return opt, lr0, desc


def make_get_lr(cfg, lr0, nb):
    """get_lr(it) -> (lr of biases, lr of the rest, momentum). Warmup over max(warmup_epochs * nb, min iters)
    ramps lr from 0 (biases from warmup_bias_lr down) and momentum from warmup_momentum; then the lr
    decays per epoch, linearly or by cosine, to lr0 * lrf."""
    epochs, lrf = cfg["epochs"], cfg["lrf"]
    nw = max(round(cfg["warmup_epochs"] * nb), cfg["warmup_min_iters"]) if cfg["warmup_epochs"] > 0 else 0

    def lf(epoch):
        if cfg["cos_lr"]:
            return ((1 - math.cos(epoch * math.pi / epochs)) / 2) * (lrf - 1) + 1
        return (1 - epoch / epochs) * (1.0 - lrf) + lrf

    def get_lr(it):
        lr = lr0 * lf(it // nb)
        if it >= nw:
            return lr, lr, cfg["momentum"]
        f = it / nw
        return (cfg["warmup_bias_lr"] + f * (lr - cfg["warmup_bias_lr"]), f * lr,
                cfg["warmup_momentum"] + f * (cfg["momentum"] - cfg["warmup_momentum"]))
    return get_lr, nw


def set_lr(opt, lr_bias, lr, momentum):
    """Apply one get_lr(it) to every group (biases have their own warmup); returns the main lr."""
    for g in opt.param_groups:
        g["lr"] = lr_bias if g["is_bias"] else lr
        if "momentum" in g:
            g["momentum"] = momentum
        elif "betas" in g:
            g["betas"] = (momentum, g["betas"][1])
    return lr


def write_csv(path, row):
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


# -----------------------------------------------------------------------------
# set-up: device/DDP, run folder, data, model and its initial weights


def setup_device(cfg, arg_device):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    want = arg_device or cfg["device"]
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {want}: CUDA is not available here; use --device cpu")
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if want.startswith("cuda"):
            torch.cuda.set_device(local)
            want = f"cuda:{local}"
        dist.init_process_group("nccl" if want.startswith("cuda") else "gloo")
    return torch.device(want), rank, world


def new_run_dir(cfg):
    base = Path(cfg["project"]) / cfg["stage"]
    name = cfg["name"] or "exp"
    d, n = base / name, 2
    while d.exists():
        d, n = base / f"{name}{n}", n + 1
    return d


def resolve_resume(arg, cfg):
    """--resume (newest run of this stage), --resume RUN_DIR or --resume path/to/last.pt."""
    if arg == "":
        runs = sorted(Path(cfg["project"]).glob(f"{cfg['stage']}/*/weights/last.pt"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise SystemExit(f"--resume: no {cfg['project']}/{cfg['stage']}/*/weights/last.pt to resume")
        return runs[-1]
    p = Path(arg)
    p = p / "weights" / "last.pt" if p.is_dir() else p
    if not p.is_file():
        raise SystemExit(f"--resume: {p} not found")
    return p


def open_run(cfg, args, master, log):
    """-> (cfg, run folder, checkpoint or None). A new runs/{stage}/{name} folder; with --resume the run's own
    folder, last.pt and config (only `epochs` may change)."""
    if args.resume is None:
        return cfg, (new_run_dir(cfg) if master else None), None
    last = resolve_resume(args.resume, cfg)
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    set_keys = args.set_keys or set()
    cfg = {**ckpt["config"], "epochs": cfg["epochs"] if "epochs" in set_keys else ckpt["config"]["epochs"]}
    ignored = sorted(set_keys - {"epochs"})
    log(f"resuming {last.parent.parent} from epoch {ckpt['epoch'] + 2} with the run's own config"
        + (f" (--set {', '.join(ignored)} ignored: only epochs can change on resume)" if ignored else ""))
    return cfg, last.parent.parent, ckpt


def scale_tag(cfg):
    return cfg["scale"] if isinstance(cfg["scale"], str) else "c"


def find_stage1(cfg):
    """yolov8{S}-domainshift1.pt in weights_dir, else the newest domainshift1 run's."""
    name = f"yolov8{scale_tag(cfg)}-domainshift1.pt"
    p = Path(cfg["weights_dir"]) / name
    if p.is_file():
        return p
    runs = sorted(Path(cfg["project"]).glob(f"domainshift1/*/weights/{name}"), key=lambda q: q.stat().st_mtime)
    return runs[-1] if runs else None


def build_model(cfg, stage, log, verbose=True):
    """-> (CAMTL set up for the stage, the stage-1 checkpoint it started from or None). domainshift1 starts from
    COCO weights in weights_dir (or random init); camtl from yolov8{S}-domainshift1.pt (else COCO/random)."""
    wd, S = Path(cfg["weights_dir"]), scale_tag(cfg)
    coco = {"det": wd / f"yolov8{S}.pt", "seg": wd / f"yolov8{S}-seg.pt"}
    coco = {k: str(v) if v.is_file() else None for k, v in coco.items()}
    stage_ckpt = find_stage1(cfg) if stage == "camtl" else None
    if stage == "camtl" and stage_ckpt is None:
        log(f"WARNING: no yolov8{S}-domainshift1.pt in {wd}/ or {cfg['project']}/domainshift1/*/weights/; "
            "starting camtl from COCO weights or random init. Run `python train.py --stage domainshift1` first.")
    if stage_ckpt is None and not any(coco.values()):
        log(f"no COCO weights (yolov8{S}.pt, yolov8{S}-seg.pt) in {wd}/: random init")
    model = CAMTL.from_pretrained(camtl_config(cfg, stage), det=None if stage_ckpt else coco["det"],
                                  seg=None if stage_ckpt else coco["seg"],
                                  stage_ckpt=str(stage_ckpt) if stage_ckpt else None, stage=stage, verbose=verbose)
    return model, stage_ckpt


def build_data(cfg, rank, world):
    """-> (data root, the training loader, {task: validation loader}). camtl alternates det, seg (and replayed
    retinography) batches by camtl_ratio."""
    stage = cfg["stage"]
    root = Path(cfg["data"]) if cfg["data"] else synthetic.ensure_synthetic(n=cfg["synthetic_n"], imgsz=cfg["imgsz"])
    if not root.is_dir():
        raise SystemExit(f"key 'data': {root} is not a directory; give a processed data root (README: data layout), "
                         "or data='' for the built-in synthetic data")
    data.load_splits(root, group_regex=cfg["group_regex"] or None)  # writes splits.json when missing

    def train_loader(key):
        return data.build_loader(root, key, "train", imgsz=cfg["imgsz"], batch=cfg["batch"], augment=cfg["augment"],
                                 workers=cfg["workers"], seed=cfg["seed"], rank=rank, world_size=world,
                                 nc=cfg["nc"], shuffle=True)
    tasks, ratio = data.STAGE_TASKS[stage], cfg["camtl_ratio"]
    if stage == "domainshift1":
        loader = train_loader(tasks["seg"])
    else:
        replay = len(ratio) == 3 and ratio[2]
        loader = data.AlternatingLoader(train_loader(tasks["det"]), train_loader(tasks["seg"]),
                                        train_loader("retinography_segmentation") if replay else None, ratio=ratio)
    val = data.val_loaders(root, stage, "val", cfg["imgsz"], cfg["batch"], cfg["workers"], cfg["nc"])
    return root, loader, val


def tasks_for(batch, cfg):
    """What the forward must compute for this batch: seg outputs on det batches only feed the consistency
    and alignment terms; det outputs on seg batches only feed the alignment term."""
    if batch["task"] == "det":
        return ("det", "seg") if cfg["lambda_cons"] or cfg["lambda_align"] else ("det",)
    return ("det", "seg") if cfg["lambda_align"] else ("seg",)


# -----------------------------------------------------------------------------
# the run, step by step


def setup(cfg, args, log=print):
    """Everything one run needs, in one namespace r: cfg, device, rank/world/master, log, run_dir, the loaders,
    raw (the CAMTL) and model (raw, or its DDP wrapper), opt, get_lr, accumulate, ctx (autocast), scaler, ema,
    crit, nb (batches per epoch); the loop's state start_epoch, best_fitness, metrics, lr, NaN counters; and
    ckpt, the checkpoint to restore with --resume."""
    device, rank, world = setup_device(cfg, args.device)
    master = rank == 0
    log = log if master else (lambda *a, **k: None)
    torch.manual_seed(cfg["seed"] + rank)
    np.random.seed(cfg["seed"] + rank)
    random.seed(cfg["seed"] + rank)
    cfg, run_dir, ckpt = open_run(cfg, args, master, log)
    if master:
        (run_dir / "weights").mkdir(parents=True, exist_ok=True)
        log(format_config(cfg))

    root, loader, val_loaders = build_data(cfg, rank, world)
    raw, init_from = build_model(cfg, cfg["stage"], log, verbose=master)
    raw.to(device)
    anchor = None
    if cfg["lambda_l2sp"]:  # L2-SP pulls backbone+neck towards their stage-start values
        anchor = {k: p.detach().clone() for k, p in raw.named_parameters()
                  if k.startswith(("backbone.", "neck.")) and p.requires_grad}
    nb = len(loader)
    accumulate = max(round(cfg["nbs"] / (cfg["batch"] * world)), 1)
    opt, lr0, opt_desc = build_optimizer(raw, cfg, accumulate)
    get_lr, nw = make_get_lr(cfg, lr0, nb)
    use_amp = cfg["amp"] and device.type == "cuda"
    amp_dtype = torch.bfloat16 if cfg["amp_dtype"] == "bf16" else torch.float16
    model = raw
    if world > 1:
        # a det step leaves the seg head unused and a seg step Detect/CTAM/CSAM: DDP must be told to expect
        # parameters without gradients. Every rank runs the same task at the same step (same schedule), so
        # the reduced buckets always agree.
        model = nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None,
                                                    find_unused_parameters=True)
    log(f"{cfg['stage']}: {count_params(raw):,} parameters "
        f"({sum(p.numel() for p in raw.parameters() if p.requires_grad):,} trainable), "
        f"init from {init_from or 'COCO/random'}; data {root}")
    log(opt_desc + f"; accumulate {accumulate} (nominal batch {cfg['nbs']}), warmup {nw} iters, "
        f"AMP {'on' if use_amp else 'off'}")
    log(f"{nb} batches/epoch x {cfg['epochs']} epochs, batch {cfg['batch']} x {world} rank(s), imgsz {cfg['imgsz']}")
    return SimpleNamespace(
        cfg=cfg, device=device, rank=rank, world=world, master=master, log=log, run_dir=run_dir, ckpt=ckpt,
        loader=loader, val_loaders=val_loaders, raw=raw, model=model, opt=opt, get_lr=get_lr, nb=nb,
        accumulate=accumulate, ctx=torch.autocast(device.type, dtype=amp_dtype) if use_amp else nullcontext(),
        scaler=torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16),
        ema=ModelEMA(raw, cfg["ema_decay"], cfg["ema_tau"]) if cfg["ema"] and master else None,
        crit=MultiTaskLoss(cfg, anchor), start_epoch=0, best_fitness=-1.0, metrics={}, lr=0.0,
        nan_run=0, nan_total=0, t_start=time.time())


def restore(r):
    """--resume: weights, optimizer, scaler, EMA, the L2-SP anchor, epoch, best fitness and RNG from r.ckpt."""
    ckpt, r.ckpt = r.ckpt, None
    r.raw.load_state_dict(ckpt["model"])
    r.opt.load_state_dict(ckpt["optimizer"])
    r.scaler.load_state_dict(ckpt["scaler"])
    if r.ema is not None and ckpt.get("ema") is not None:
        r.ema.ema.load_state_dict(ckpt["ema"])
        r.ema.updates = ckpt["ema_updates"]
    r.crit.anchor = ckpt.get("anchor") or r.crit.anchor
    r.start_epoch, r.best_fitness = ckpt["epoch"] + 1, ckpt["best_fitness"]
    set_rng_state(ckpt["rng"])


def train_one_epoch(r, epoch):
    """One pass over the training batches -> running means of the loss terms by name (MultiTaskLoss's)."""
    cfg, nb = r.cfg, r.nb
    r.raw.train()
    (r.loader.set_epoch if hasattr(r.loader, "set_epoch") else r.loader.sampler.set_epoch)(epoch)
    meter, seen, t0 = TermMeter(), 0, time.time()
    r.opt.zero_grad(set_to_none=True)
    for i, batch in enumerate(r.loader):
        r.lr = set_lr(r.opt, *r.get_lr(epoch * nb + i))
        step_now = (i + 1) % r.accumulate == 0 or i + 1 == nb
        terms = train_step(r, batch, step_now, where=f"epoch {epoch} iter {i}")
        if terms is None:  # non-finite loss: skipped
            continue
        meter.update(terms)
        seen += batch["img"].shape[0]
        if r.master and ((i + 1) % cfg["log_interval"] == 0 or i + 1 == nb):
            dt = time.time() - t0
            eta = dt / (i + 1) * ((cfg["epochs"] - epoch) * nb - i - 1)
            losses = " ".join(f"{k} {v:.4f}" for k, v in meter.means().items())
            r.log(f"{cfg['stage']} {epoch + 1}/{cfg['epochs']} {i + 1:4d}/{nb} {losses}  lr {r.lr:.5f}  "
                  f"{seen / dt:.1f} img/s  ETA {eta / 60:.1f} min")
    return meter.means()


def train_step(r, batch, step_now, where):
    """Forward (in the batch's domain, under autocast), loss, backward; the optimizer step when step_now.
    -> the loss terms, or None when the loss was not finite (skipped; max_nan_steps in a row stop the run)."""
    img = batch["img"].to(r.device, non_blocking=True)
    sync = nullcontext() if r.world == 1 or step_now else r.model.no_sync()  # all-reduce once per optimizer step
    with sync:
        with r.raw.domain(batch["domain"]), r.ctx:
            det_out, seg_out = r.model(img, tasks=tasks_for(batch, r.cfg), need_attn=bool(r.cfg["lambda_align"]))
        loss, terms = r.crit(det_out, seg_out, data.to_device(batch, r.device), r.raw)
        if not torch.isfinite(loss):
            r.nan_run, r.nan_total = r.nan_run + 1, r.nan_total + 1
            r.log(f"WARNING: non-finite loss at {where} ({batch['task']} batch {batch.get('paths', [''])[:1]}): "
                  "step skipped")
            if r.nan_run >= r.cfg["max_nan_steps"]:
                raise SystemExit(f"{r.nan_run} non-finite losses in a row: stopping. Lower lr0, check the data, "
                                 "or set amp=False.")
            r.opt.zero_grad(set_to_none=True)
            return None
        r.nan_run = 0
        r.scaler.scale(loss).backward()
    if step_now:
        r.scaler.unscale_(r.opt)
        nn.utils.clip_grad_norm_(r.raw.parameters(), r.cfg["clip_grad"])
        r.scaler.step(r.opt)
        r.scaler.update()
        r.opt.zero_grad(set_to_none=True)
        if r.ema is not None:
            r.ema.update(r.raw)
    return terms


def validate_and_save(r, epoch, train_terms):
    """Rank 0 after each epoch: validate the EMA weights (every val_interval epochs and after the last), append a
    results.csv row, write last.pt, and best.pt when the fitness improved."""
    cfg = r.cfg
    if (epoch + 1) % cfg["val_interval"] == 0 or epoch + 1 == cfg["epochs"]:
        r.metrics = evaluate.validate(r.ema.ema if r.ema else r.raw, r.val_loaders, cfg, r.device, r.crit,
                                      plot_dir=r.run_dir if cfg["plots"] else None)
        r.log(evaluate.format_metrics(r.metrics, prefix=f"val {epoch + 1}/{cfg['epochs']}"))
    fitness = r.metrics.get("fitness", 0.0)
    row = {"epoch": epoch + 1, **{f"train/{k}": v for k, v in train_terms.items()},
           **{k: v for k, v in r.metrics.items() if isinstance(v, float)}, "lr": r.lr}
    write_csv(r.run_dir / "results.csv", row)
    ck = {"model": r.raw.state_dict(), "ema": r.ema.ema.state_dict() if r.ema else None,
          "ema_updates": r.ema.updates if r.ema else 0, "optimizer": r.opt.state_dict(),
          "scaler": r.scaler.state_dict(), "epoch": epoch, "best_fitness": max(r.best_fitness, fitness),
          "config": cfg, "stage": cfg["stage"], "rng": rng_state(), "anchor": r.crit.anchor, "metrics": r.metrics,
          "nan_steps": r.nan_total}
    save_atomic(ck, r.run_dir / "weights" / "last.pt")
    if fitness > r.best_fitness:
        r.best_fitness = fitness
        save_atomic(ck, r.run_dir / "weights" / "best.pt")


def check_replicas(r):
    """DDP: the replicas must have stayed identical; log the largest weight difference to rank 0's."""
    flat = torch.cat([p.detach().double().flatten() for p in r.raw.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = torch.tensor([(flat - ref).abs().max().item()], dtype=torch.float64)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    r.log(f"DDP: max weight difference across {r.world} ranks {diff.item():.3g}")
    dist.barrier()


def finish_stage(r):
    """The stage's product yolov8{S}-{stage}.pt (the best epoch's EMA weights + config: what the next stage,
    evaluate.py and export.py load), the curves, and the results table. -> (run folder, best metrics)."""
    cfg, stage, wdir = r.cfg, r.cfg["stage"], r.run_dir / "weights"
    best = torch.load(wdir / "best.pt", map_location="cpu", weights_only=True)
    final = {"model": best["ema"] or best["model"], "config": cfg, "stage": stage, "epoch": best["epoch"],
             "metrics": best["metrics"]}
    out = wdir / f"yolov8{scale_tag(cfg)}-{stage}.pt"
    save_atomic(final, out)
    if cfg["plots"]:
        evaluate.plot_results(r.run_dir / "results.csv", r.run_dir / "results.png")
    r.log(f"\n{stage} done in {(time.time() - r.t_start) / 60:.1f} min, {r.nan_total} skipped non-finite steps. "
          f"Best epoch {best['epoch'] + 1}:")
    r.log(evaluate.results_table(best["metrics"]))
    r.log(f"weights: {out}\nrun: {r.run_dir}")
    return r.run_dir, best["metrics"]


def train(cfg, args, log=print):
    """Run one stage. -> (run folder, best metrics) on rank 0; (None, last metrics) on the other ranks."""
    r = setup(cfg, args, log)  # device, run folder, data, model, optimizer, AMP, EMA, loss
    if r.ckpt is not None:
        restore(r)  # --resume: continue exactly where last.pt left off
    for epoch in range(r.start_epoch, r.cfg["epochs"]):
        train_terms = train_one_epoch(r, epoch)
        if r.master:
            validate_and_save(r, epoch, train_terms)
    if r.world > 1:
        check_replicas(r)
    return finish_stage(r) if r.master else (None, r.metrics)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--config", help="a config file (default configs/synthetic.py)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. epochs=5 camtl_ratio=[1,2]")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN",
                   help="continue a run (default: newest of this stage)")
    p.add_argument("--device", help="cpu, cuda, cuda:0 (default: the config's 'device')")
    args = p.parse_args(argv)
    cfg = load_config(args.stage, args.config, args.set)
    args.set_keys = set(parse_set(args.set))
    try:
        return train(cfg, args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
