"""Train CA-MTL-YOLOv8 in two stages, on the built-in synthetic data or a processed data root.

    python train.py --stage domainshift1                 # retinography vessels (source domain)
    python train.py --stage camtl                        # angiography stenoses + vessels (target domain)
    python train.py --stage camtl --config configs/angiography.py --set data=/data/arcade epochs=50
    python train.py --stage camtl --resume               # continue the newest camtl run exactly
    torchrun --nproc_per_node=2 train.py --stage camtl   # DDP (NCCL on GPUs, gloo on CPU)

Configuration is plain dicts: configs/defaults.py lists every key; configs/{stage}.py, then the data config
(configs/synthetic.py unless --config), then --set key=value apply on top. One loop, written out below.
"""
import argparse
import ast
import csv
import difflib
import math
import os
import random
import runpy
import time
from contextlib import nullcontext
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import data
import evaluate
from losses import MultiTaskLoss
from model import CAMTL, camtl_config, count_params, stage_setup

ROOT = Path(__file__).resolve().parent
STAGES = ("domainshift1", "camtl")
DET_NAMES = ("box", "cls", "dfl", "kpt", "kobj")

# -----------------------------------------------------------------------------
# configuration


def read_config_file(path, stage):
    """A config file's `config` dict, then its per-stage dict (e.g. `camtl = {...}`) for this stage."""
    if not Path(path).is_file():
        raise SystemExit(f"--config: no such file {path}")
    ns = runpy.run_path(str(path))
    return {**ns.get("config", {}), **ns.get(stage, {})}


def check_key(key, value, defaults, source):
    """Unknown keys and wrong types are errors that name the key (and suggest close matches)."""
    if key not in defaults:
        near = difflib.get_close_matches(key, defaults, n=3)
        raise SystemExit(f"{source}: unknown key '{key}'" + (f"; did you mean {', '.join(near)}?" if near else "")
                         + " (configs/defaults.py lists every key)")
    want = defaults[key]
    if isinstance(want, bool) or isinstance(value, bool):  # bool is an int subclass: compare exactly
        ok = type(value) is type(want)
    elif isinstance(want, float):
        ok = isinstance(value, (int, float))
    elif isinstance(want, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    else:  # a scale may also be a (depth, width, max_channels) triple
        ok = isinstance(value, type(want)) or key == "scale" and isinstance(value, (list, tuple)) and len(value) == 3
    if not ok:
        raise SystemExit(f"{source}: key '{key}' expects {type(want).__name__} (default {want!r}), got {value!r}")
    return float(value) if isinstance(want, float) else list(value) if isinstance(value, tuple) else value


def parse_set(items):
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k.strip()] = v  # a bare string such as cosine or /data/root
    return out


def load_config(stage, config_file=None, sets=()):
    defaults = runpy.run_path(str(ROOT / "configs" / "defaults.py"))["config"]
    cfg = dict(defaults)
    layers = [(ROOT / "configs" / f"{stage}.py", "configs/" + stage + ".py"),
              (Path(config_file) if config_file else ROOT / "configs" / "synthetic.py", config_file or "configs/synthetic.py")]
    for path, name in layers:
        for k, v in read_config_file(path, stage).items():
            cfg[k] = check_key(k, v, defaults, name)
    for k, v in parse_set(sets).items():
        cfg[k] = check_key(k, v, defaults, "--set")
    if cfg["imgsz"] % 32:
        raise SystemExit(f"key 'imgsz' must be a multiple of 32, got {cfg['imgsz']}")
    if len(cfg["camtl_ratio"]) not in (2, 3) or min(cfg["camtl_ratio"]) < 0:
        raise SystemExit(f"key 'camtl_ratio' expects [det, seg] or [det, seg, source], got {cfg['camtl_ratio']}")
    cfg["stage"] = stage
    return cfg, defaults


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
    return opt, lr0, (f"{name}(lr0={lr0}, momentum={cfg['momentum']}) groups: {len(decay)} weights (decay {wd:.2e}), "
                      f"{len(no_decay)} norm/gate weights, {len(bias)} biases (no decay)")


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


# -----------------------------------------------------------------------------
# set-up: device/DDP, data, model and its initial weights


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
    mcfg = camtl_config(cfg, stage)
    wd, S = Path(cfg["weights_dir"]), scale_tag(cfg)
    coco = {"det": wd / f"yolov8{S}.pt", "seg": wd / f"yolov8{S}-seg.pt"}
    coco = {k: str(v) if v.is_file() else None for k, v in coco.items()}
    stage_ckpt = find_stage1(cfg) if stage == "camtl" else None
    if stage == "camtl" and stage_ckpt is None:
        log(f"WARNING: no yolov8{S}-domainshift1.pt in {wd}/ or {cfg['project']}/domainshift1/*/weights/; "
            "starting camtl from COCO weights or random init. Run `python train.py --stage domainshift1` first.")
    if stage_ckpt is None and not any(coco.values()):
        log(f"no COCO weights (yolov8{S}.pt, yolov8{S}-seg.pt) in {wd}/: random init")
    model = CAMTL.from_pretrained(mcfg, det=None if stage_ckpt else coco["det"], seg=None if stage_ckpt else coco["seg"],
                                  stage_ckpt=str(stage_ckpt) if stage_ckpt else None, stage=stage, verbose=verbose)
    return stage_setup(model, stage), stage_ckpt


def build_data(cfg, stage, rank, world):
    root = Path(cfg["data"]) if cfg["data"] else data.ensure_synthetic(n=cfg["synthetic_n"], imgsz=cfg["imgsz"])
    if not root.is_dir():
        raise SystemExit(f"key 'data': {root} is not a directory; give a processed data root (README: data layout), "
                         "or data='' for the built-in synthetic data")
    data.load_splits(root, group_regex=cfg["group_regex"] or None)  # writes splits.json when missing
    common = dict(imgsz=cfg["imgsz"], batch=cfg["batch"], workers=cfg["workers"], seed=cfg["seed"], nc=cfg["nc"])
    train = lambda key: data.build_loader(root, key, "train", augment=cfg["augment"], rank=rank, world_size=world, shuffle=True, **common)
    val = lambda key: data.build_loader(root, key, "val", augment=False, shuffle=False, **common)
    if stage == "domainshift1":
        return root, train("retinography_segmentation"), {"seg": val("retinography_segmentation")}
    ratio = cfg["camtl_ratio"]
    loader = data.AlternatingLoader(train("angiography_detection"), train("angiography_segmentation"),
                                    train("retinography_segmentation") if len(ratio) == 3 and ratio[2] else None, ratio=ratio)
    return root, loader, {"det": val("angiography_detection"), "seg": val("angiography_segmentation")}


def tasks_for(batch, cfg):
    """What the forward must compute for this batch: seg outputs on det batches only feed the consistency
    and alignment terms; det outputs on seg batches only feed the alignment term."""
    if batch["task"] == "det":
        return ("det", "seg") if cfg["lambda_cons"] or cfg["lambda_align"] else ("det",)
    return ("det", "seg") if cfg["lambda_align"] else ("seg",)


# -----------------------------------------------------------------------------
# the loop


def train(cfg, args, log=print):
    stage = cfg["stage"]
    device, rank, world = setup_device(cfg, args.device)
    master = rank == 0
    log = log if master else (lambda *a, **k: None)
    torch.manual_seed(cfg["seed"] + rank)
    np.random.seed(cfg["seed"] + rank)
    random.seed(cfg["seed"] + rank)

    # run directory and (on --resume) the checkpoint to continue from
    ckpt = None
    if args.resume is not None:
        last = resolve_resume(args.resume, cfg)
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        cfg = {**ckpt["config"], "epochs": cfg["epochs"] if "epochs" in (args.set_keys or ()) else ckpt["config"]["epochs"]}
        run_dir = last.parent.parent
        ignored = sorted(set(args.set_keys or ()) - {"epochs"})
        log(f"resuming {run_dir} from epoch {ckpt['epoch'] + 2} with the run's own config"
            + (f" (--set {', '.join(ignored)} ignored: only epochs can change on resume)" if ignored else ""))
    else:
        run_dir = new_run_dir(cfg) if master else None
    if master:
        (run_dir / "weights").mkdir(parents=True, exist_ok=True)
        log(format_config(cfg))

    root, loader, val_loaders = build_data(cfg, stage, rank, world)
    model, init_from = build_model(cfg, stage, log, verbose=master)
    model.to(device)
    raw = model  # the module itself; `model` becomes the DDP wrapper when distributed
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
    ctx = torch.autocast(device.type, dtype=amp_dtype) if use_amp else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
    ema = ModelEMA(raw, cfg["ema_decay"], cfg["ema_tau"]) if cfg["ema"] and master else None
    start_epoch, best_fitness = 0, -1.0
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.ema.load_state_dict(ckpt["ema"])
            ema.updates = ckpt["ema_updates"]
        anchor = ckpt.get("anchor") or anchor
        start_epoch, best_fitness = ckpt["epoch"] + 1, ckpt["best_fitness"]
        set_rng_state(ckpt["rng"])
    if world > 1:
        # a det step leaves the seg head unused and a seg step Detect/CTAM/CSAM: DDP must be told to expect
        # parameters without gradients. Every rank runs the same task at the same step (same schedule), so
        # the reduced buckets always agree.
        model = nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None,
                                                    find_unused_parameters=True)
    crit = MultiTaskLoss(cfg, anchor)
    log(f"{stage}: {count_params(raw):,} parameters ({sum(p.numel() for p in raw.parameters() if p.requires_grad):,} trainable), "
        f"init from {init_from or 'COCO/random'}; data {root}")
    log(opt_desc + f"; accumulate {accumulate} (nominal batch {cfg['nbs']}), warmup {nw} iters, AMP {'on' if use_amp else 'off'}")
    log(f"{nb} batches/epoch x {cfg['epochs']} epochs, batch {cfg['batch']} x {world} rank(s), imgsz {cfg['imgsz']}")

    csv_path = run_dir / "results.csv" if master else None
    nan_run, nan_total, t_start, last_opt_it = 0, 0, time.time(), -1
    metrics = {}
    for epoch in range(start_epoch, cfg["epochs"]):
        raw.train()
        (loader.set_epoch if hasattr(loader, "set_epoch") else loader.sampler.set_epoch)(epoch)
        mloss, seen, t0 = torch.zeros(6), 0, time.time()
        mdet, ndet, crit.det_items = None, 0, None  # running mean of the det items (box, cls, dfl[, kpt, kobj])
        opt.zero_grad(set_to_none=True)
        for i, batch in enumerate(loader):
            it = epoch * nb + i
            lr_b, lr_w, mom = get_lr(it)
            for g in opt.param_groups:
                g["lr"] = lr_b if g["is_bias"] else lr_w
                if "momentum" in g:
                    g["momentum"] = mom
                elif "betas" in g:
                    g["betas"] = (mom, g["betas"][1])
            step_now = (i + 1) % accumulate == 0 or i + 1 == nb
            img = batch["img"].to(device, non_blocking=True)
            sync = nullcontext() if world == 1 or step_now else model.no_sync()
            with sync:
                with raw.domain(batch["domain"]), ctx:
                    det_out, seg_out = model(img, tasks=tasks_for(batch, cfg), need_attn=bool(cfg["lambda_align"]))
                loss, items = crit(det_out, seg_out, to_device(batch, device), raw)
                if not torch.isfinite(loss):
                    nan_run, nan_total = nan_run + 1, nan_total + 1
                    log(f"WARNING: non-finite loss at epoch {epoch} iter {i} ({batch['task']} batch {batch.get('paths', [''])[:1]}): step skipped")
                    if nan_run >= cfg["max_nan_steps"]:
                        raise SystemExit(f"{nan_run} non-finite losses in a row: stopping. Lower lr0, check the data, or set amp=False.")
                    opt.zero_grad(set_to_none=True)
                    continue
                nan_run = 0
                scaler.scale(loss).backward()
            if step_now:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(raw.parameters(), cfg["clip_grad"])
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(raw)
                last_opt_it = it
            mloss = (mloss * i + items.cpu()) / (i + 1)
            if crit.det_items is not None:
                mdet = crit.det_items.cpu() if mdet is None else (mdet * ndet + crit.det_items.cpu()) / (ndet + 1)
                ndet, crit.det_items = ndet + 1, None
            seen += img.shape[0]
            if master and ((i + 1) % cfg["log_interval"] == 0 or i + 1 == nb):
                dt = time.time() - t0
                left = (cfg["epochs"] - epoch) * nb - i - 1
                eta = dt / (i + 1) * left
                det_part = f" ({' '.join(f'{n} {v:.3f}' for n, v in zip(DET_NAMES, mdet))})" if mdet is not None else ""
                log(f"{stage} {epoch + 1}/{cfg['epochs']} {i + 1:4d}/{nb} " + " ".join(f"{n} {v:.4f}" for n, v in zip(MultiTaskLoss.NAMES, mloss))
                    + det_part + f"  lr {lr_w:.5f}  {seen / dt:.1f} img/s  ETA {eta / 60:.1f} min")

        if master:
            final = epoch + 1 == cfg["epochs"]
            if (epoch + 1) % cfg["val_interval"] == 0 or final:
                metrics = evaluate.validate(ema.ema if ema else raw, val_loaders, cfg, device, crit,
                                            plot_dir=run_dir if cfg["plots"] else None)
                log(evaluate.format_metrics(metrics, prefix=f"val {epoch + 1}/{cfg['epochs']}"))
            fitness = metrics.get("fitness", 0.0)
            row = {"epoch": epoch + 1, **{f"train/{n}": float(v) for n, v in zip(MultiTaskLoss.NAMES, mloss)},
                   **({f"train/{n}": float(v) for n, v in zip(DET_NAMES, mdet)} if mdet is not None else {}),
                   **{k: v for k, v in metrics.items() if isinstance(v, float)}, "lr": lr_w}
            write_csv(csv_path, row)
            ck = {"model": raw.state_dict(), "ema": ema.ema.state_dict() if ema else None, "ema_updates": ema.updates if ema else 0,
                  "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "best_fitness": max(best_fitness, fitness),
                  "config": cfg, "stage": stage, "rng": rng_state(), "anchor": anchor, "metrics": metrics, "nan_steps": nan_total}
            save_atomic(ck, run_dir / "weights" / "last.pt")
            if fitness > best_fitness:
                best_fitness = fitness
                save_atomic(ck, run_dir / "weights" / "best.pt")
    if world > 1:  # replicas must have stayed identical: compare every rank's weights with rank 0's
        flat = torch.cat([p.detach().double().flatten() for p in raw.parameters()])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        diff = torch.tensor([(flat - ref).abs().max().item()], dtype=torch.float64)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        log(f"DDP: max weight difference across {world} ranks {diff.item():.3g}")
        dist.barrier()
    if not master:
        return None, metrics
    # the stage's product: EMA weights + config, what the next stage / evaluate.py / export.py load
    best = torch.load(run_dir / "weights" / "best.pt", map_location="cpu", weights_only=True)
    final = {"model": best["ema"] or best["model"], "config": cfg, "stage": stage, "epoch": best["epoch"], "metrics": best["metrics"]}
    out = run_dir / "weights" / f"yolov8{scale_tag(cfg)}-{stage}.pt"
    save_atomic(final, out)
    if cfg["plots"]:
        evaluate.plot_results(csv_path, run_dir / "results.png")
    log(f"\n{stage} done in {(time.time() - t_start) / 60:.1f} min, {nan_total} skipped non-finite steps. Best epoch {best['epoch'] + 1}:")
    log(evaluate.results_table(best["metrics"]))
    log(f"weights: {out}\nrun: {run_dir}")
    return run_dir, best["metrics"]


def format_config(cfg, width=110):
    lines, line = [], "config:"
    for k, v in cfg.items():
        item = f" {k}={v!r}"
        if len(line) + len(item) > width:
            lines.append(line)
            line = "       "
        line += item
    return "\n".join(lines + [line])


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def write_csv(path, row):
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--config", help="a config file (default configs/synthetic.py)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys, e.g. epochs=5 camtl_ratio=[1,2]")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN", help="continue a run (default: newest of this stage)")
    p.add_argument("--device", help="cpu, cuda, cuda:0 (default: the config's 'device')")
    args = p.parse_args(argv)
    cfg, _ = load_config(args.stage, args.config, args.set)
    args.set_keys = set(parse_set(args.set))
    try:
        return train(cfg, args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
