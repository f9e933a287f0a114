"""Train CA-MTL-YOLOv8 in two stages, on the built-in synthetic data or a processed data root.

    python train.py --stage domainshift1                 # retinography vessels (source domain)
    python train.py --stage camtl                        # angiography stenoses + vessels (target domain)
    python train.py --stage camtl --config configs/angiography.py --set data=/data/arcade epochs=50
    python train.py --stage camtl --resume               # continue the newest camtl run exactly
    python train.py --stage camtl --resume auto name=a   # a job script: continue runs/camtl/a, or start it
    torchrun --nproc_per_node=2 train.py --stage camtl   # DDP (NCCL on GPUs, gloo on CPU)

Configuration is plain dicts (config.py; configs/defaults.py lists every key). Read top to bottom: the pieces of
the loop (checkpoints, EMA, optimizer, get_lr), the set-up (device, run folder, data, model), then the run as a
short story at the end: setup -> restore -> train_one_epoch / validate_and_save per epoch -> finish_stage.
"""
import argparse
import csv
import math
import os
import pprint
import random
import signal
import socket
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader

import data
import distributed
import evaluate
import plots
from checkpoints import CheckpointError, read_checkpoint, save_checkpoint
from cli import Progress
from config import STAGES, check_device, format_config, load_config, next_run_dir, parse_set, saved_config
from export import fake_quantize
from losses import MultiTaskLoss, TermMeter
from model import STAGE1_FUNCTION, STAGE1_SWITCHES, CAMTL, camtl_config, class_names, count_params
from prune import WidthsError

# -----------------------------------------------------------------------------
# pieces of the loop: checkpoints, EMA, optimizer, schedule


def rng_state():
    np_state = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "python": list(random.getstate()[1])}


def set_rng_state(s):
    """RNG states are CPU byte tensors whatever the run's device (torch wants them so)."""
    torch.set_rng_state(s["torch"].cpu())
    if s.get("cuda") and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu() for t in s["cuda"]])
    np.random.set_state(("MT19937", s["numpy"].cpu().numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))
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


LR0 = {"SGD": 0.01, "AdamW": 0.002}  # lr0 = 0: the optimizer's default, as YOLOv8's


def build_optimizer(model, cfg, accumulate, world=1):
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
    lr0 = cfg["lr0"] or LR0[name]
    wd = cfg["weight_decay"] * cfg["batch"] * world * accumulate / cfg["nbs"]  # of the global batch, as YOLOv8
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


MIN_STEPS = 300  # fewer optimizer steps than this, or half of them in the warmup: a run too short to learn much


def few_steps_warning(cfg, nb, accumulate, nw):
    """One line when the run will take few optimizer steps (a small data set with a large nbs), else ''."""
    steps, warm = cfg["epochs"] * nb // accumulate, nw // accumulate
    if steps >= MIN_STEPS and warm <= steps / 2:
        return ""
    return (f"WARNING only {steps} optimizer steps ({cfg['epochs']} epochs x {nb} batches / accumulate {accumulate}), "
            f"{min(warm, steps)} of them in the warmup: set nbs={cfg['batch']} (a step every batch), raise epochs, or "
            f"lower warmup_epochs / warmup_min_iters (configs/fundus.py is a recipe for small sets)")


def set_lr(opt, lr_bias, lr, momentum):
    """Apply one get_lr(it) to every group (biases have their own warmup); returns the main lr."""
    for g in opt.param_groups:
        g["lr"] = lr_bias if g["is_bias"] else lr
        if "momentum" in g:
            g["momentum"] = momentum
        elif "betas" in g:
            g["betas"] = (momentum, g["betas"][1])
    return lr


# results.csv names the quantities it shares with YOLOv8 as YOLOv8 does; ours keep their own names
CSV_NAMES = {"train/box": "train/box_loss", "train/cls": "train/cls_loss", "train/dfl": "train/dfl_loss",
             "val/box": "val/box_loss", "val/cls": "val/cls_loss", "val/dfl": "val/dfl_loss",
             "precision": "metrics/precision(B)", "recall": "metrics/recall(B)", "map50": "metrics/mAP50(B)",
             "map50_95": "metrics/mAP50-95(B)"}


def csv_row(epoch, train_terms, metrics, opt):
    """One results.csv row: epoch, train/{term} (the loss terms), val/{term}, metrics/... (mAP as YOLOv8 names it,
    metrics/dice_full, metrics/iou_p3, ...), fitness, and lr/pg0..2 (biases, weights, norm weights)."""
    row = {"epoch": epoch + 1, **{f"train/{k}": v for k, v in train_terms.items()},
           **{k: v for k, v in metrics.items() if isinstance(v, float)}}
    row = {CSV_NAMES.get(k, f"metrics/{k}" if k.startswith(("dice_", "iou_", "vessel_")) else k): v
           for k, v in row.items()}
    return {**row, **{f"lr/pg{i}": g["lr"] for i, g in enumerate(opt.param_groups)}}


def write_run_config(path, cfg):
    """The run folder's config.py: the resolved config as a --config file that reproduces the run. Its command
    repeats the run in a new folder, also when this one was reused (exist_ok), so it never writes over the run."""
    body = pprint.pformat({k: v for k, v in cfg.items() if k != "stage"}, sort_dicts=False, width=110)
    fresh = " exist_ok=False" if cfg["exist_ok"] else ""
    path.write_text(f'"""The resolved config of a {cfg["stage"]} run. Reproduce it with\n'
                    f'    python train.py --stage {cfg["stage"]} --config {path}{fresh}\n"""\nconfig = {body}\n')


def write_csv(path, row, keep_epochs=None):
    """Append row to results.csv; a column seen for the first time widens the header (the file is rewritten).
    keep_epochs=N (on resume) first drops rows of epochs after N, written before a checkpoint that never came."""
    rows = []
    if path.exists():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    if keep_epochs is not None:
        rows = [r for r in rows if int(r["epoch"]) <= keep_epochs]
    if row is not None:
        rows.append(row)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# set-up: device/DDP, run folder, data, model and its initial weights


def setup_device(cfg, arg_device):
    """-> (device, rank, world); under torchrun also the process group (distributed.init)."""
    want = check_device(arg_device, "--device") if arg_device else cfg["device"]
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {want}: CUDA is not available here; use --device cpu")
    return distributed.init(want)


def set_cuda_backends(deterministic):
    """YOLOv8's CUDA settings: deterministic=True (its default) picks deterministic cuDNN and CUDA kernels, warning
    where an op has none; False lets cuDNN autotune its convolutions instead (every batch is imgsz x imgsz, the
    case autotuning is for). TF32 keeps torch's defaults, as YOLOv8 does: on for cuDNN convolutions, off for
    matmuls. -> a description for the log."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; read at its first use
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, not deterministic
    return (f"cuDNN {'deterministic' if deterministic else 'autotuned'}, TF32 convolutions "
            f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'}, matmuls {torch.get_float32_matmul_precision()}")


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


def torchrun_id():
    """-> the id of this torchrun launch, the same in every restart of its workers (--max-restarts): its rendezvous
    run id, host and agent process (the workers' parent); None outside torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return f"{os.environ['TORCHELASTIC_RUN_ID']} {socket.gethostname()} {os.getppid()}"


def same_command_run(cfg, args, comm):
    """-> the run folder the same command line continues, or None for a new one: --resume auto names
    runs/{stage}/{name}; a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) finds the folder its first start
    made (torchrun.id, written by setup), rank 0 deciding for every rank."""
    if args.resume == "auto":
        return Path(cfg["project"]) / cfg["stage"] / cfg["name"]
    if args.resume is not None or not int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)):
        return None
    found = None
    if comm.rank == 0:
        made = [p.parent for p in Path(cfg["project"]).glob(f"{cfg['stage']}/*/torchrun.id")
                if p.read_text().strip() == torchrun_id()]
        found = str(made[0]) if made else None
    found = comm.broadcast_object(found)
    return Path(found) if found else None


def open_run(cfg, args, master, log, comm):
    """-> (cfg, run folder, checkpoint or None). A new runs/{stage}/{name} folder; with --resume the run's own
    folder, last.pt and config (only `epochs` may change). --resume auto and a torchrun restart continue the run
    this command started when it has a last.pt, and start it in that folder otherwise (same_command_run)."""
    again = same_command_run(cfg, args, comm)
    if again is not None and not (again / "weights" / "last.pt").is_file():
        why = "--resume auto" if args.resume == "auto" else "torchrun restart"
        log(f"{why}: no {again / 'weights' / 'last.pt'} yet, so the run starts in {again}")
        if master and (again / "results.csv").exists():  # rows of a run killed before its first checkpoint
            (again / "results.csv").unlink()
        return cfg, again if master else None, None
    if again is None and args.resume is None:
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            log("torchrun restart: no run folder of this launch's first start, so a new run starts")
        return cfg, (next_run_dir(cfg["project"], cfg["stage"], cfg["name"], cfg["exist_ok"]) if master else None), None
    last = resolve_resume(str(again) if again is not None else args.resume, cfg)
    ckpt = read_checkpoint(last, "the last.pt of a run to resume", need=("model", "optimizer", "epoch", "config"))
    set_keys = args.set_keys or set()
    epochs = cfg["epochs"] if "epochs" in set_keys else ckpt["config"]["epochs"]
    if ckpt["epoch"] + 1 >= epochs and again is not None:  # the job ran to its end before this start
        log(f"{last.parent.parent} has trained its {epochs} epochs; its best weights are validated and saved again")
    elif ckpt["epoch"] + 1 >= epochs:
        raise SystemExit(f"--resume: {last.parent.parent} has finished its {ckpt['epoch'] + 1} epochs; to train on, "
                         f"add --set epochs=N with N > {ckpt['epoch'] + 1}")
    own = saved_config(ckpt["config"])  # keys added since: what the run computed
    ignored = sorted(k for k in set_keys - {"epochs"} if cfg.get(k) != own.get(k))  # e.g. a job script's own keys
    cfg = {**own, "epochs": epochs}
    mid = ckpt.get("mid_epoch")
    if ckpt["epoch"] + 1 < epochs:
        at = "" if not mid else f", batch {mid['batch'] + 1}" if mid["batch"] < mid["nb"] else ", its validation"
        log(f"resuming {last.parent.parent} from epoch {ckpt['epoch'] + 2}{at} with the run's own config"
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


def build_model(cfg, stage, log, verbose=True, resume=False):
    """-> (CAMTL set up for the stage, the checkpoint it started from or None). domainshift1 starts from COCO
    weights in weights_dir (or random init); camtl from yolov8{S}-domainshift1.pt (else, or with stage1=False,
    COCO/random); either from `init` when set. The checkpoint it starts from brings its widths (a pruned network's;
    written into cfg). `resume`: last.pt brings everything, so nothing else is read."""
    wd, S = Path(cfg["weights_dir"]), scale_tag(cfg)
    coco = {"det": wd / f"yolov8{S}.pt", "seg": wd / f"yolov8{S}-seg.pt"}
    coco = {k: str(v) if v.is_file() and not resume else None for k, v in coco.items()}
    found = find_stage1(cfg) if stage == "camtl" and not cfg["init"] and not resume else None
    stage_ckpt = None if resume else cfg["init"] or (found if cfg["stage1"] else None)
    was = None
    if stage_ckpt:
        try:
            was = saved_config(read_checkpoint(stage_ckpt).get("config", {}))
        except CheckpointError as e:
            raise CheckpointError(f"key init: {e}" if cfg["init"] else str(e)) from None
        cfg["widths"] = was["widths"]  # its weights, so its widths: a pruned network's checkpoint builds that network
    if cfg["init"]:
        log(f"init={cfg['init']}: this run starts from its weights"
            + (f" ({len(cfg['widths'])} pruned layers)" if cfg["widths"] else ""))
    elif stage == "camtl" and not cfg["stage1"]:
        log(f"stage1=False: camtl starts from COCO weights or random init{f', not from {found}' if found else ''}")
    elif stage == "camtl" and found is None:
        log(f"WARNING: no yolov8{S}-domainshift1.pt in {wd}/ or {cfg['project']}/domainshift1/*/weights/; "
            "starting camtl from COCO weights or random init. Run `python train.py --stage domainshift1` first.")
    if stage_ckpt is not None:
        effect = {STAGE1_SWITCHES: "what stage 1 trained there does not carry over, the parts this run has start fresh",
                  STAGE1_FUNCTION: "its weights load, but compute otherwise than in stage 1"}
        for keys, what in effect.items():
            diff = [k for k in keys if was[k] != cfg[k]]
            if diff:
                then, now = (" ".join(f"{k}={c[k]}" for k in diff) for c in (was, cfg))
                log(f"WARNING: {stage_ckpt} was trained with {then}, this run has {now}: {what} (--set {then} to "
                    "continue from it as trained)")
    if not cfg["ctam"] and cfg["lambda_align"]:
        log(f"ctam=False: the align term is skipped (it aligns CTAM's attention with the vessels; lambda_align "
            f"{cfg['lambda_align']} unused)")
    if stage_ckpt is None and not any(coco.values()) and not resume:
        log(f"no COCO weights (yolov8{S}.pt, yolov8{S}-seg.pt) in {wd}/: random init")
    try:
        model = CAMTL.from_pretrained(camtl_config(cfg, stage), det=None if stage_ckpt else coco["det"],
                                      seg=None if stage_ckpt else coco["seg"],
                                      stage_ckpt=str(stage_ckpt) if stage_ckpt else None, stage=stage, verbose=verbose)
    except WidthsError as e:  # widths naming a layer this network does not have
        raise SystemExit(f"key {e}") from None
    return model, stage_ckpt


FP16_ON_CPU = False  # tests: fp16 autocast and an enabled GradScaler on a CPU, the path every CUDA run takes
MAX_GRAPHS = 12  # compiled graphs of the forward at most (dynamo's recompile limit; see compile_models)
COMPILE_BACKEND = "inductor"  # tests: "aot_eager", which skips inductor's minutes-long C++ builds


def autocast_and_scaler(cfg, device):
    """-> (autocast context or a nullcontext, GradScaler, "fp16"/"bf16"/"off"). fp16 autocast, with the scaler
    enabled, on CUDA (on a CPU fp16 kernels are slower than fp32: it trains in fp32); bf16, which needs no scaler,
    on CUDA and CPU."""
    dtype = torch.bfloat16 if cfg["amp_dtype"] == "bf16" else torch.float16
    on = cfg["amp"] and (device.type == "cuda" or dtype == torch.bfloat16 or FP16_ON_CPU)
    ctx = torch.autocast(device.type, dtype=dtype) if on else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=on and dtype == torch.float16)
    return ctx, scaler, cfg["amp_dtype"] if on else "off"


def use_compile(cfg, device):
    """compile=auto means CUDA only: on a CPU, inductor takes minutes per graph (README: speed)."""
    return cfg["compile"] is True or (cfg["compile"] == "auto" and device.type == "cuda")


def compile_models(modules, backend="inductor", log=print):
    """torch.compile each module's forward in place (same modules, same state_dict keys; the loss stays eager: the
    assigner's shapes depend on each batch's boxes); -> modules. Dynamo guards on the forward's arguments (tasks,
    need_attn), on train/eval and on each DualBN's `domain`, so each combination a stage uses is compiled on
    first use and then reused: det+seg and seg in the target domain, seg in the source domain with replay (the
    model, training), det+seg and seg in validation (the EMA) -- 5 graphs, and one more for each smaller last
    batch (dynamic=False: a graph per batch size, not a symbolic one). Past MAX_GRAPHS a call runs eager instead
    of compiling again, so nothing storms. A compiler that fails (no C++ compiler, no Triton, an op it cannot
    lower) leaves one line in the log, and every module eager for the rest of the run."""
    torch._dynamo.config.recompile_limit = MAX_GRAPHS

    def eager_from_here(e):
        inner = getattr(e, "inner_exception", None) or e
        log(f"WARNING: torch.compile ({backend}) failed, training goes on eager: {type(inner).__name__}: "
            f"{(str(inner).strip().splitlines() or [''])[0][:200]}")
        for m in modules:
            m.__dict__.pop("forward", None)  # the class's eager forward again

    def fallback(m, compiled):
        def forward(*args, **kwargs):
            try:
                return compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as e:  # nothing of the forward ran: eager redoes it all
                eager_from_here(e)
                return m(*args, **kwargs)
        return forward
    for m in modules:  # the instance's forward, compiled: the module and its state_dict stay as they are
        m.forward = fallback(m, torch.compile(m.forward, dynamic=False, backend=backend))
    return modules


def build_data(cfg, rank, world):
    """-> (data root, the training loader, {task: validation loader}). camtl alternates det, seg (and replayed
    retinography) batches by camtl_ratio."""
    stage = cfg["stage"]
    try:
        if not cfg["data"]:
            import synthetic  # the built-in set, generated on first use: a user's own data never needs this file
        root = Path(cfg["data"] or synthetic.ensure_config(cfg))
    except FileExistsError as e:
        raise SystemExit(f"key 'data' is empty (the built-in synthetic set), but {e}") from None
    if not root.is_dir():
        raise SystemExit(f"key 'data': {root} is not a directory; give a processed data root (README: data layout), "
                         "or data='' for the built-in synthetic data")
    data.load_splits(root, group_regex=cfg["group_regex"] or None)  # writes splits.json when missing
    data.check_stage_data(root, stage, cfg["batch"], cfg["camtl_ratio"], world)  # one message if too little data

    def train_loader(key):
        aug = cfg["augment"]  # True, False or {strength: value} changing data.AUG's
        return data.build_loader(root, key, "train", imgsz=cfg["imgsz"], batch=cfg["batch"], augment=aug is not False,
                                 workers=cfg["workers"], seed=cfg["seed"], rank=rank, world_size=world,
                                 nc=cfg["nc"], shuffle=True, hyp=aug if isinstance(aug, dict) else None)
    tasks, ratio = data.STAGE_TASKS[stage], cfg["camtl_ratio"]
    if stage == "domainshift1":
        loader = train_loader(tasks["seg"])
    else:
        replay = len(ratio) == 3 and ratio[2]
        loader = data.AlternatingLoader(train_loader(tasks["det"]), train_loader(tasks["seg"]),
                                        train_loader("retinography_segmentation") if replay else None, ratio=ratio)
    val = data.val_loaders(root, stage, "val", cfg["imgsz"], cfg["batch"], cfg["workers"], cfg["nc"])
    return root, loader, val


def shard_loaders(loaders, rank, world):
    """{task: loader} -> this rank's share of each: images rank, rank + world, rank + 2 world, ... Every image is in
    exactly one share (a DistributedSampler would pad the last with repeats, and they would count twice)."""
    if world == 1:
        return loaders
    return {t: DataLoader(ld.dataset, batch_size=ld.batch_size, sampler=range(rank, len(ld.dataset), world),
                          num_workers=ld.num_workers, collate_fn=ld.collate_fn, pin_memory=ld.pin_memory)
            for t, ld in loaders.items()}


def plot_labels(loader, cfg, path):
    """labels.png of the detection training labels (camtl): counts, centres, sizes in canvas pixels."""
    sets = [ld.dataset for ld, _ in getattr(loader, "streams", [(loader, 1)]) if ld.dataset.task == "det"]
    if not sets:
        return
    S = cfg["imgsz"]
    b = np.concatenate([data.canvas_boxes(it["boxes"], *it["shape"], S) for it in sets[0].items] + [np.zeros((0, 5))])
    plots.plot_labels(b[:, 1:], b[:, 0], S, path, class_names(cfg["nc"]))


def tasks_for(batch, cfg):
    """-> (tasks, need_attn): what the forward must compute for this batch's losses. Seg outputs on det batches
    only feed the consistency and alignment terms; a seg batch's alignment term needs CTAM's attention maps,
    which the model computes without CSAM and Detect. Det only (camtl_ratio [k, 0]: no seg batch) trains no term
    that needs the seg head; without CTAM (ctam=False) there is no attention to align."""
    need_attn = bool(cfg["lambda_align"]) and cfg["ctam"]
    if batch["task"] == "det":
        if not any(cfg["camtl_ratio"][1:]):  # no seg batches: the vessels are not a task of this run
            return ("det",), False
        return (("det", "seg") if cfg["lambda_cons"] or need_attn else ("det",)), need_attn
    return ("seg",), need_attn


# -----------------------------------------------------------------------------
# the run, step by step


@dataclass
class Run:
    """One stage's run: what `setup` builds, fixed from then on, and the loop's counters, which change as it
    trains. The pieces below (restore, train_one_epoch, train_step, optimizer_step, validate_and_save,
    finish_stage) each take the Run and read or advance it."""
    # --- set-up, fixed for the run
    cfg: dict  # the resolved config (on --resume the run's own, with `epochs` possibly raised)
    device: torch.device  # where the model, each batch and every collective's tensors live
    rank: int  # this process's DDP rank; 0 without DDP
    world: int  # the number of DDP processes; 1 without DDP
    comm: distributed.Comm  # the collectives among them, on `device` (no-ops when world is 1)
    log: Callable  # print on rank 0, a no-op on the other ranks
    run_dir: Optional[Path]  # runs/{stage}/{name}; None on ranks > 0, which write nothing
    loader: Iterable  # the training batches: a DataLoader (domainshift1) or data.AlternatingLoader (camtl)
    val_loaders: dict  # {"det"/"seg": validation DataLoader}: all of the val images (the final validation)
    val_shards: dict  # the same, this rank's share of them (each epoch's validation; = val_loaders on 1 rank)
    model: nn.Module  # the CAMTL being trained (compiled in place when compile is on)
    opt: torch.optim.Optimizer  # three groups: biases, weights with decay, norm/gate weights (build_optimizer)
    get_lr: Callable  # iteration -> (lr of biases, lr of the rest, momentum) (make_get_lr)
    nb: int  # training batches per epoch on each rank
    accumulate: int  # micro-batches per optimizer step: nbs / (batch x world), at least 1
    ctx: AbstractContextManager  # autocast around the forward, or a nullcontext without AMP
    scaler: torch.amp.GradScaler  # enabled only under fp16 autocast; otherwise its calls pass through
    ema: Optional[ModelEMA]  # the EMA of the weights, identical on every rank (None with ema=False)
    crit: MultiTaskLoss  # the CA-MTL objective; its `anchor` holds L2-SP's stage-start weights
    ckpt: Optional[dict]  # --resume: the last.pt to continue from; restore() consumes it (then None)
    t_start: float = field(default_factory=time.time)  # wall-clock start, for the stage's duration
    # --- counters
    start_epoch: int = 0  # the first epoch to train: 0, or the one after the checkpoint's (restore)
    best_fitness: float = -1.0  # the best validation fitness so far; raised by validate_and_save
    metrics: dict = field(default_factory=dict)  # the latest validation's metrics (validate_and_save)
    lr: float = 0.0  # the weights' current lr, set every iteration (train_one_epoch)
    window: int = 0  # finite micro-batches since the last optimizer step (train_step; optimizer_step resets)
    nan_run: int = 0  # non-finite losses in a row; a finite one resets it (train_step)
    nan_total: int = 0  # skipped non-finite micro-batches in this process's run (train_step)
    skipped_steps: int = 0  # optimizer steps skipped for inf/NaN gradients, the GradScaler's too (optimizer_step)
    mid_epoch: Optional[dict] = None  # resuming inside an epoch: where, its running loss sums, the RNG (restore)
    epoch_rng: Optional[dict] = None  # the RNG as the current epoch began, for a checkpoint inside it

    @property
    def master(self):
        """Rank 0 validates, logs and writes the run folder."""
        return self.rank == 0


def setup(cfg, args, log=print):
    """-> the Run of this config and command line: device, run folder, data, model, optimizer, AMP, EMA, loss."""
    device, rank, world = setup_device(cfg, args.device)
    master, comm = rank == 0, distributed.Comm(device, world)
    log = log if master else (lambda *a, **k: None)
    if device.type == "cuda":
        log(set_cuda_backends(cfg["deterministic"]))
    torch.manual_seed(cfg["seed"] + rank)
    np.random.seed(cfg["seed"] + rank)
    random.seed(cfg["seed"] + rank)
    cfg, run_dir, ckpt = open_run(cfg, args, master, log, comm)
    log(format_config(cfg))
    root, loader, val_loaders = build_data(cfg, rank, world)
    quiet = lambda *a, **k: None  # noqa: E731  (a resumed run's weights come from last.pt: no init messages)
    model, init_from = build_model(cfg, cfg["stage"], log if ckpt is None else quiet, verbose=master and not ckpt,
                                   resume=ckpt is not None)
    if cfg["qat"]:  # before the EMA's copy: validation scores the weights as int8 sees them too
        log(f"qat: {fake_quantize(model)} convolutions see int8 weights and uint8 inputs, as in export.py --int8")
    model.to(device, memory_format=torch.channels_last if cfg["channels_last"] else torch.contiguous_format)
    for t in model.state_dict().values():  # every replica starts from rank 0's weights and buffers
        comm.broadcast(t, 0)
    anchor = None
    if cfg["lambda_l2sp"]:  # L2-SP pulls backbone+neck towards their stage-start values
        anchor = {k: p.detach().clone() for k, p in model.named_parameters()
                  if k.startswith(("backbone.", "neck.")) and p.requires_grad}
    nb = len(loader)
    accumulate = max(round(cfg["nbs"] / (cfg["batch"] * world)), 1)
    opt, lr0, opt_desc = build_optimizer(model, cfg, accumulate, world)
    get_lr, nw = make_get_lr(cfg, lr0, nb)
    ctx, scaler, amp = autocast_and_scaler(cfg, device)
    if master:  # the run folder appears only once everything it describes could be built
        (run_dir / "weights").mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            write_run_config(run_dir / "config.py", cfg)
            if torchrun_id():  # how a torchrun restart of this command finds this folder (same_command_run)
                (run_dir / "torchrun.id").write_text(torchrun_id() + "\n")
            if cfg["plots"]:
                plot_labels(loader, cfg, run_dir / "labels.png")
    init = "last.pt (resume)" if ckpt is not None else init_from or "COCO/random"
    log(f"{cfg['stage']}: {count_params(model):,} parameters "
        f"({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable), "
        f"init from {init}; data {root}")
    ema = ModelEMA(model, cfg["ema_decay"], cfg["ema_tau"]) if cfg["ema"] else None  # every rank validates
    compiled = use_compile(cfg, device)
    if compiled:  # after the EMA's copy, which gets its own validation graphs
        compile_models([model] + ([ema.ema] if ema else []), COMPILE_BACKEND, log)
    log(opt_desc + f"; accumulate {accumulate} (nominal batch {cfg['nbs']}), warmup {nw} iters, "
        f"AMP {amp}, channels_last {'on' if cfg['channels_last'] else 'off'}, "
        f"compile {'on' if compiled else 'off'}{' (auto: CUDA only)' if cfg['compile'] == 'auto' else ''}")
    log(f"{nb} batches/epoch x {cfg['epochs']} epochs, batch {cfg['batch']} x {world} rank(s) "
        f"= {cfg['batch'] * world} images per iteration, imgsz {cfg['imgsz']}")
    if warning := few_steps_warning(cfg, nb, accumulate, nw):
        log(warning)
    return Run(cfg=cfg, device=device, rank=rank, world=world, comm=comm, log=log, run_dir=run_dir, loader=loader,
               val_loaders=val_loaders, val_shards=shard_loaders(val_loaders, rank, world), model=model, opt=opt,
               get_lr=get_lr, nb=nb, accumulate=accumulate, ctx=ctx, scaler=scaler, ema=ema,
               crit=MultiTaskLoss(cfg, anchor), ckpt=ckpt)


def restore(run):
    """--resume: weights, optimizer, scaler, EMA, the L2-SP anchor, epoch, best fitness and RNG from run.ckpt, every
    tensor on the run's device (wherever the checkpoint was saved); results.csv trimmed to match. A checkpoint of
    a run without a GradScaler (CPU, bf16, amp=False) resumed where one is on starts the scaler afresh."""
    ckpt, run.ckpt = run.ckpt, None
    state = data.to_device({k: ckpt.get(k) for k in ("model", "ema", "anchor")}, run.device)
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(ckpt["optimizer"])  # onto each parameter's device; AdamW's step counts stay on the CPU
    if ckpt["scaler"] or not run.scaler.is_enabled():
        run.scaler.load_state_dict(ckpt["scaler"])
    else:
        run.log(f"GradScaler: the checkpoint's run had none; it starts at scale {run.scaler.get_scale():g}")
    run.nan_total, run.skipped_steps = ckpt.get("nan_steps", 0), ckpt.get("skipped_steps", 0)
    if run.ema is not None and state["ema"] is not None:
        run.ema.ema.load_state_dict(state["ema"])
        run.ema.updates = ckpt["ema_updates"]
    run.crit.anchor = state["anchor"] or run.crit.anchor
    run.start_epoch, run.best_fitness = ckpt["epoch"] + 1, ckpt["best_fitness"]
    run.metrics = ckpt.get("metrics") or {}  # what epochs without a validation repeat in results.csv
    run.mid_epoch = ckpt.get("mid_epoch")  # a checkpoint written inside an epoch (SIGTERM) continues that epoch
    if run.mid_epoch and run.mid_epoch.get("world", run.world) != run.world:
        run.mid_epoch = resharded(run, run.mid_epoch)
    set_rng_state(ckpt["rng"])  # inside an epoch: the RNG as that epoch began
    if run.master and (run.run_dir / "results.csv").exists():  # a row written after this checkpoint is redone
        write_csv(run.run_dir / "results.csv", None, keep_epochs=ckpt["epoch"] + 1)


def resharded(run, mid):
    """A checkpoint written inside an epoch by another number of ranks: every rank takes its share of one
    permutation of the images, so the same images are done after batch x old ranks / new ranks of this run's
    batches. The RNG and accumulation windows differ, so the run is no longer the uninterrupted one's."""
    batch = min(round(mid["batch"] * mid["world"] / run.world), run.nb)
    run.log(f"resuming inside epoch {mid['epoch'] + 1} on {run.world} rank(s), written on {mid['world']}: its "
            f"batch {mid['batch']}/{mid['nb']} there is batch {batch}/{run.nb} here (the same images; the result "
            "is not the uninterrupted run's to the bit)")
    return {**mid, "batch": batch}


def train_one_epoch(run, epoch):
    """One pass over the training batches -> running means of the loss terms by name, each over the batches
    that report it (MultiTaskLoss: det over det batches, seg over seg batches, ...)."""
    cfg, nb = run.cfg, run.nb
    run.model.train()
    (run.loader.set_epoch if hasattr(run.loader, "set_epoch") else run.loader.sampler.set_epoch)(epoch)
    meter, mid, run.mid_epoch, start = TermMeter(), run.mid_epoch, None, 0
    if mid:  # resumed inside this epoch: its first `batch` batches are trained; their loss sums come along
        start, meter.sum, meter.n = mid["batch"], mid["sum"], mid["n"]
        data.skip_batches(run.loader, start)
    run.epoch_rng = rng_state()
    batches = iter(run.loader)  # the loader's workers take their seeds from the RNG here, as the epoch begins
    if mid:
        set_rng_state(mid["rng"])  # ... and from here on the RNG is where the interrupted run left it
    bar = Progress(nb, f"{cfg['stage']} {epoch + 1}/{cfg['epochs']}", cfg["log_interval"], enabled=run.master,
                   start=start)
    run.opt.zero_grad(set_to_none=True)
    run.window = 0
    for i, batch in enumerate(batches, start):
        if run.master and cfg["plots"] and epoch == 0 and i < 3:  # what the network is fed, augmented
            plots.plot_batch(batch["img"], batch["batch_idx"], batch["cls"], batch["bboxes"], batch["mask"],
                             batch["paths"], run.run_dir / f"train_batch{i}.png", names=class_names(cfg["nc"]))
        run.lr = set_lr(run.opt, *run.get_lr(epoch * nb + i))
        where = f"epoch {epoch + 1} iter {i + 1}"
        terms = train_step(run, batch, where)
        if terms is not None:  # None: non-finite loss, skipped
            meter.update(terms)
        if (i + 1) % run.accumulate == 0 or i + 1 == nb:
            optimizer_step(run, where)
            if run.comm.any(stop_asked):  # SIGTERM on any rank: every rank stops after this same step
                stop_inside_epoch(run, epoch, i + 1, meter)
        losses = " ".join(f"{k} {v:.4f}" for k, v in meter.means().items())
        bar.update(i + 1, f"{losses}  lr {run.lr:.5f}", items=batch["img"].shape[0] if terms is not None else 0)
    return meter.means()


def train_step(run, batch, where):
    """Forward (in the batch's domain, under autocast), loss and backward of one micro-batch; its gradients add
    to the window's. -> the loss terms, or None when the loss was not finite on any rank: then every rank skips
    this micro-batch alike (the window keeps its other gradients, BatchNorm the statistics it had before this
    forward); max_nan_steps in a row stop the run."""
    tasks, need_attn = tasks_for(batch, run.cfg)
    batch = data.to_device(batch, run.device)  # image, targets and masks, once
    stats = torch.cat([b.flatten() for b in distributed.float_buffers(run.model)])  # (n,) BN statistics before
    with run.model.domain(batch["domain"]), run.ctx:
        det_out, seg_out = run.model(batch["img"], tasks=tasks, need_attn=need_attn)
    loss, terms = run.crit(det_out, seg_out, batch, run.model)
    if run.comm.any(~torch.isfinite(loss)):  # one rank's NaN is every rank's: nobody waits in a skipped all-reduce
        # a NaN in one image would reach every running mean, then the EMA
        distributed.set_float_buffers(run.model, stats)
        run.nan_run, run.nan_total = run.nan_run + 1, run.nan_total + 1
        run.log(f"WARNING: non-finite loss at {where} ({batch['task']} batch {batch['paths'][:1]}"
                f"{' on some rank' if run.world > 1 else ''}): micro-batch skipped, {run.window} earlier ones of "
                "this accumulation window kept")
        if run.nan_run >= run.cfg["max_nan_steps"]:
            raise SystemExit(f"{run.nan_run} non-finite losses in a row: stopping. Lower lr0, check the data, "
                             "or set amp=False.")
        return None
    run.nan_run = 0
    run.scaler.scale(loss).backward()
    run.window += 1
    return terms


def optimizer_step(run, where="the end of the window"):
    """End of an accumulation window: (DDP) sum the window's gradients over the ranks — one process on all ranks'
    images gets the same sum — unscale, add L2-SP's gradient, clip, step, update the EMA. L2-SP enters once per
    step, weighted like weight decay by the step's images over nbs, so lambda_l2sp pulls as hard on any number of
    GPUs. A window whose micro-batches were all skipped, or whose gradient is not finite (under fp16 the
    GradScaler's own skip), makes no step; skipped_steps counts the latter."""
    if run.window:  # the ranks agreed on every skip, so they agree on this
        run.comm.all_reduce_grads(run.model)
        run.scaler.unscale_(run.opt)
        run.crit.add_l2sp_grad_(run.model, run.cfg["batch"] * run.world * run.window / run.cfg["nbs"])
        norm = nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg["clip_grad"])
        amp = run.scaler.is_enabled()
        if amp:  # the scaler skips a step with inf/NaN gradients itself, and only then lowers its scale
            scale = run.scaler.get_scale()
            run.scaler.step(run.opt)
            run.scaler.update()
            stepped = run.scaler.get_scale() >= scale
        elif stepped := bool(torch.isfinite(norm)):
            run.opt.step()
        if stepped and run.ema is not None:
            run.ema.update(run.model)
        elif not stepped:
            run.skipped_steps += 1
            run.log(f"{'GradScaler' if amp else 'WARNING'}: inf/NaN gradients, optimizer step at {where} skipped "
                    f"({run.window} micro-batches; {run.skipped_steps} steps so far"
                    + (f", loss scale now {run.scaler.get_scale():g})" if amp else ")"))
    run.opt.zero_grad(set_to_none=True)
    run.window = 0


def validate_and_save(run, epoch, train_terms):
    """After each epoch (every val_interval epochs and after the last): every rank validates the EMA weights on
    its share of the val images, and each gets the metrics of all of them. Then rank 0 appends a results.csv row,
    writes last.pt, and best.pt when this epoch was validated and its fitness is at least the best so far: a tie
    goes to the later epoch, as in YOLOv8, so a run whose scores are all zero until some epoch does not keep its
    first epoch, and an epoch without a validation never becomes best.pt."""
    cfg = run.cfg
    validated = (epoch + 1) % cfg["val_interval"] == 0 or epoch + 1 == cfg["epochs"]
    if validated:
        net = run.ema.ema if run.ema else run.model
        run.metrics = evaluate.validate(net, run.val_shards, cfg, run.device, run.crit,
                                        log=run.log if run.master else None, gather=run.comm.gather_objects)
        run.log(evaluate.format_metrics(run.metrics, prefix=f"val {epoch + 1}/{cfg['epochs']}"))
    fitness = run.metrics.get("fitness", 0.0)
    better = validated and fitness >= run.best_fitness
    if better:
        run.best_fitness = fitness
    if not run.master:
        return
    write_csv(run.run_dir / "results.csv", csv_row(epoch, train_terms, run.metrics, run.opt))
    ck = checkpoint(run, epoch)
    save_checkpoint(ck, run.run_dir / "weights" / "last.pt")
    if better:
        save_checkpoint(ck, run.run_dir / "weights" / "best.pt")


def checkpoint(run, epoch):
    """last.pt's dict after `epoch` (0-based): everything `restore` needs to continue exactly."""
    return {"model": run.model.state_dict(), "ema": run.ema.ema.state_dict() if run.ema else None,
            "ema_updates": run.ema.updates if run.ema else 0, "optimizer": run.opt.state_dict(),
            "scaler": run.scaler.state_dict(), "epoch": epoch, "best_fitness": run.best_fitness,
            "config": run.cfg, "stage": run.cfg["stage"], "rng": rng_state(), "anchor": run.crit.anchor,
            "metrics": run.metrics, "nan_steps": run.nan_total, "skipped_steps": run.skipped_steps}


def stop_inside_epoch(run, epoch, done, meter):
    """SIGTERM: after the optimizer step of batch `done`, rank 0 writes a last.pt that resumes inside this epoch
    (the completed epochs, the epoch's position, its running loss sums, the RNG at the epoch's start and now);
    then every rank exits naming the command that continues the run. The resumed run equals an uninterrupted
    one (a preempted cluster job, requeued, loses no training)."""
    if run.master:
        ck = {**checkpoint(run, epoch - 1), "rng": run.epoch_rng,
              "mid_epoch": {"epoch": epoch, "batch": done, "nb": run.nb, "world": run.world, "sum": meter.sum,
                            "n": meter.n, "rng": rng_state()}}
        save_checkpoint(ck, run.run_dir / "weights" / "last.pt")
    run.comm.barrier()  # no rank exits while rank 0 saves: a launcher would stop the rest of the job at once
    raise SystemExit(interrupted(run))


def finish_stage(run):
    """The best epoch's weights, validated once more with every picture (curves, confusion matrix, batches) and the
    per-class table; results.png; then best.pt and the stage's product yolov8{S}-{stage}.pt made small: the EMA
    weights, config and metrics (what evaluate.py, export.py and the next stage load), no optimizer. last.pt keeps
    everything, so a finished run can still be extended with --resume --set epochs=N. -> (run folder, metrics)."""
    cfg, stage, wdir = run.cfg, run.cfg["stage"], run.run_dir / "weights"
    best = torch.load(wdir / "best.pt", map_location="cpu", weights_only=True)
    if "optimizer" in best:  # not made small yet (a resumed run that had finished)
        small = {"model": best["ema"] or best["model"], "weights": "ema" if best["ema"] else "model", "config": cfg,
                 "stage": stage, "epoch": best["epoch"], "metrics": best["metrics"]}
        save_checkpoint(small, wdir / "best.pt")
        best = small
    out = wdir / f"yolov8{scale_tag(cfg)}-{stage}.pt"
    save_checkpoint(best, out)
    if cfg["plots"]:
        net = run.ema.ema if run.ema else run.model
        net.load_state_dict(data.to_device(best["model"], run.device))
        evaluate.validate(net, run.val_loaders, cfg, run.device, run.crit, plot_dir=run.run_dir, log=run.log)
        plots.plot_results(run.run_dir / "results.csv", run.run_dir / "results.png")
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MB" for p in (wdir / "last.pt", wdir / "best.pt"))
    run.log(f"\n{stage} done in {(time.time() - run.t_start) / 60:.1f} min, {run.nan_total} skipped non-finite "
            f"steps, {run.skipped_steps} optimizer steps skipped (inf/NaN gradients). Best epoch {best['epoch'] + 1}:")
    run.log(evaluate.results_table(best["metrics"]))
    run.log(f"weights: {out} ({sizes})\nrun: {run.run_dir}")
    return run.run_dir, best["metrics"]


stop_asked = False  # set by SIGTERM (on_sigterm); the loop stops after its next optimizer step
training = False  # the epochs are running (train); outside them SIGTERM stops at once


def on_sigterm(signum, frame):
    """SIGTERM (`kill`, a cluster's preemption, torchrun stopping its workers, study.py): while the epochs run, the
    optimizer step under way finishes, then a checkpoint that resumes inside the epoch is written
    (stop_inside_epoch); more SIGTERMs meanwhile change nothing (a cluster signals every process of a job, and
    torchrun signals its workers once more). Before or after the epochs (set-up, a process group waiting for its
    peers) the run stops at once, as Ctrl-C always does. A process started in the background (nohup ... &)
    ignores SIGINT, so SIGTERM is the signal that reaches it."""
    global stop_asked
    if not training:
        raise KeyboardInterrupt
    stop_asked = True


def interrupted(run):
    """The one line a Ctrl-C ends with: where the last checkpoint is and the command that continues the run."""
    if not run.master:
        return 130
    last = run.run_dir / "weights" / "last.pt"
    if not last.is_file():
        return f"\ninterrupted before the first checkpoint: nothing to resume in {run.run_dir}"
    ck = torch.load(last, map_location="cpu", weights_only=True)
    mid = ck.get("mid_epoch")
    where = f"epoch {ck['epoch'] + 1}" if mid is None else f"epoch {mid['epoch'] + 1} to batch {mid['batch']}/{run.nb}"
    return (f"\ninterrupted: {last} holds {where}; continue with  "
            f"python train.py --stage {run.cfg['stage']} --resume {run.run_dir}")


def train(cfg, args, log=print):
    """Run one stage. -> (run folder, best metrics) on rank 0; (None, last metrics) on the other ranks."""
    run = setup(cfg, args, log)  # device, run folder, data, model, optimizer, AMP, EMA, loss
    if run.ckpt is not None:
        restore(run)  # --resume: continue exactly where last.pt left off
    global training
    try:
        training = True
        for epoch in range(run.start_epoch, run.cfg["epochs"]):
            train_terms = train_one_epoch(run, epoch)
            validate_and_save(run, epoch, train_terms)
    except KeyboardInterrupt:
        raise SystemExit(interrupted(run)) from None
    finally:
        training = False
    if run.world > 1:
        diff = run.comm.replica_difference(run.model)  # the replicas must have stayed identical
        run.log(f"DDP: max weight difference across {run.world} ranks {diff:.3g}")
    return finish_stage(run) if run.master else (None, run.metrics)


def main(argv=None):
    p = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter, description="""\
Train CA-MTL-YOLOv8 in two stages: domainshift1 (fundus vessels, the source domain) first, then camtl (angiogram
stenoses and vessels, the target domain), which starts from domainshift1's weights.

  python train.py --stage domainshift1 && python train.py --stage camtl     # the demo, on built-in synthetic data
  python train.py --stage camtl --config configs/angiography.py --set data=/data/arcade epochs=50
  python train.py --stage camtl epochs=30 batch=16 device=0                 # key=value, as YOLOv8 takes them
  python train.py --stage camtl --resume                                    # continue the newest camtl run
  torchrun --nproc_per_node=2 train.py --stage camtl                        # several GPUs or processes

Every config key and its default: configs/defaults.py. Each run writes runs/{stage}/exp (then exp2, ...):
config.py, results.csv, pictures, weights/last.pt, best.pt and yolov8{S}-{stage}.pt. A mistake is answered with
one line saying what to change (docs/troubleshooting.md).""")
    p.add_argument("--stage", choices=STAGES, required=True,
                   help="domainshift1 (fundus vessels, run first) or camtl (angiogram stenoses and vessels)")
    p.add_argument("--config", help="a Python config file, config = {...}, e.g. configs/angiography.py "
                   "(default: configs/synthetic.py, the built-in synthetic data)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. epochs=5 camtl_ratio=[1,2] data=/data/root")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN",
                   help="continue a run exactly: the newest of this stage, or RUN (a run folder or its last.pt); "
                   "add --set epochs=N to extend a finished one. auto: continue runs/{stage}/{name} when it has a "
                   "last.pt and start it otherwise, for a job script that may be preempted and requeued "
                   "(also as resume=auto)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or a GPU index N (default: the config's device, auto)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="the same as --set, YOLOv8-style: epochs=30 device=0")
    args = p.parse_args(argv)
    args.set = list(args.overrides) + list(args.set)
    for a in [a for a in args.set if a.startswith("resume=")]:  # YOLOv8's habit: resume=auto, resume=True, resume=RUN
        args.set.remove(a)
        args.resume = {"True": "", "true": "", "False": None, "false": None}.get(a[7:], a[7:])
    if sys.stdout.isatty() is False and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # | tee, nohup: every line as it comes
    cfg = load_config(args.stage, args.config, args.set)
    args.set_keys = set(parse_set(args.set))
    try:
        return train(cfg, args)
    except CheckpointError as e:  # a weights file that is not what it should be: one line, no traceback
        raise SystemExit(str(e)) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_sigterm)
    main()
