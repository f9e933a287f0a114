"""Studies: named arms (config overrides) x seeds, each run as train.py subprocesses, resumable, summarised.

    python study.py --list                                    # studies and their arms
    python study.py ablation                                  # every arm of the ablation, its seeds (0, 1, 2)
    python study.py ablation --only full,det-only --seeds 0   # some arms, one seed
    python study.py ablation --dry-run                        # the runs, which are done, the estimated cost
    python study.py ablation --jobs 2                         # two runs at once, each with half the cores
    python study.py ablation --record results/ablation        # the results kept there too; what they hold is done

A run of an arm is its camtl stage, started from a stage-1 (domainshift1) product: the study's shared one of
that seed, or the arm's own when it changes what stage 1 trains (SEG_STREAM keys), or none (`stage1=False`).
Same seed = same data order and initialisation, so each arm's difference to the reference arm is paired per seed,
and per stage1_id: the fingerprint of the seed's shared stage 1 as this machine trains it (another CPU rounds
otherwise, and its runs take their own path).

    runs/study/NAME/_shared/sSEED/domainshift1/exp/     the shared stage 1 of a seed
    runs/study/NAME/ARM/sSEED/{domainshift1,camtl}/exp/ an arm's runs; study.json in each marks it finished
    runs/study/NAME/study.csv, study.md, study.png      one row per arm x seed; mean +- std table; the picture

A finished run is skipped, an interrupted one resumed (`train.py --resume`) or, killed before its first
checkpoint, restarted; the outputs are rewritten after every run, so a killed study loses at most the runs in
flight. With --record DIR the results are also kept in DIR, a folder that can travel (the repository's
results/ablation): an arm x seed whose row is there counts as finished, so a study continues on another machine
from its record alone (a seed with runs to do trains its shared stage 1 again, and its reference run too where
that stage 1 comes out otherwise than the recorded one). --dry-run estimates the cost from the wall times of this
study's finished runs (the pilot's first).
Reported per run: the best epoch's metrics from results.csv (the epoch best.pt holds), and, computed here on
best.pt, the mAP50 of the small stenoses (longest side < 32 px at the run's imgsz) and the vessel Dice on the
source domain's val images (what camtl kept of stage 1). More: docs/study.md.
"""
import argparse
import csv
import fcntl
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import evaluate
import metrics
import plots
import synthetic
from config import DEFAULTS, load_config
from model import STAGE1_FUNCTION, STAGE1_SWITCHES, load_checkpoint
from train import scale_tag

ROOT = Path(__file__).resolve().parent
SHARED = "_shared"  # the folder of the shared stage-1 runs (arm names never start with _)
DONE = "study.json"  # in a run folder: written once the run and its scoring have finished
SMALL = 32  # px: a stenosis box with a longer side is not "small"
# keys that change what stage 1 trains (the seg stream, the data): an arm setting one trains its own stage 1
# (train.py's STAGE1_* keys, which it warns about, and those that change weight shapes or stage 1's data)
SEG_STREAM = (*STAGE1_SWITCHES, *STAGE1_FUNCTION, "scale", "attn_dim", "imgsz", "data", "synthetic_preset",
              "synthetic_n")
# (key in study.csv, results.csv column or None when computed here, name in the table)
METRICS = (("map50", "metrics/mAP50(B)", "mAP50"), ("map50_95", "metrics/mAP50-95(B)", "mAP50-95"),
           ("map50_small", None, f"mAP50 <{SMALL}px"), ("dice_full", "metrics/dice_full", "Dice(full)"),
           ("dice_source", None, "Dice(source)"))

STUDIES = {
    "ablation": dict(
        # set: the full model's attention and vessel stride as results/ablation measured it (the defaults' 2 heads and
        # 128 tokens are its arm speed-h2t128; seg_stride explicit, whatever the default), so it repeats its record
        config="configs/hard.py", reference="full", seeds=[0, 1, 2],
        set=dict(attn_heads=4, attn_tokens=256, seg_stride=8),
        arms={
            "full": {},
            "-CTAM": dict(ctam=False),
            "-CSAM": dict(csam=False),
            "-FPMA": dict(fpma=False),
            "-DualBN": dict(dual_bn=False),
            "-cons": dict(lambda_cons=0.0),
            "-align": dict(lambda_align=0.0),
            "-L2-SP": dict(lambda_l2sp=0.0),
            "-stage1": dict(stage1=False),
            "det-only": dict(camtl_ratio=[1, 0]),
            "+xtam": dict(xtam=True),
            "speed-qs32": dict(attn_query_stride=32),
            "speed-h2t128": dict(attn_heads=2, attn_tokens=128),
            # DualBN acts only when fundus batches enter camtl: the two arms that show what it buys there
            "replay": dict(camtl_ratio=[2, 1, 1]),
            "replay-DualBN": dict(camtl_ratio=[2, 1, 1], dual_bn=False),
            # the fine vessel path against the record's stride-8 head: vessels, and what it does to the stenoses
            "fine-s4": dict(seg_stride=4),
            "fine-s2": dict(seg_stride=2),
        }),
}

# -----------------------------------------------------------------------------
# the plan: which stage runs an arm x seed needs, in which folders, with which --set


def set_args(sets):
    """{key: value} -> train.py --set arguments (Python literals, as config.parse_set reads them)."""
    return [f"{k}={v!r}" for k, v in sets.items()]


def layout(out, name, spec, arm, seed):
    """-> (the arm x seed's camtl run folder, its stage-1 run folder or None, "shared" / "own" / "none")."""
    over, project = spec["arms"][arm], out / name / arm / f"s{seed}"
    if over.get("stage1", True) is False:
        return project / "camtl" / "exp", None, "none"
    own = bool(set(over) & set(SEG_STREAM))
    s1 = (project if own else out / name / SHARED / f"s{seed}") / "domainshift1" / "exp"
    return project / "camtl" / "exp", s1, "own" if own else "shared"


def plan(name, spec, arms, seeds, out):
    """-> {job key: job} in dependency order (a job: stage, arm, --set dict, deps, resolved cfg, run folder).
    Every config is resolved (and so checked) here: a bad key stops the study before anything runs, in one line
    naming the arm."""
    base, config = dict(spec.get("set", {})), spec["config"] and str(ROOT / spec["config"])
    cfg0 = load_config("camtl", config, set_args(base))
    if not cfg0["data"]:  # the synthetic set, named by path so every run (and the scoring) finds the same one
        base["data"] = str(synthetic.preset_root(cfg0["synthetic_preset"]))
    jobs = {}

    def add(stage, arm, run_dir, sets, deps):
        key = f"{run_dir.parent.parent.parent.name}/{run_dir.parent.parent.name}/{stage}"  # ARM/sSEED/stage
        if key not in jobs:
            sets = {**sets, "project": str(run_dir.parent.parent), "name": "exp", "exist_ok": True}
            try:
                cfg = load_config(stage, config, set_args(sets))
            except SystemExit as e:
                raise SystemExit(f"study {name}, arm {arm}: {e}") from None
            jobs[key] = SimpleNamespace(key=key, stage=stage, arm=run_dir.parent.parent.parent.name, sets=sets,
                                        deps=deps, cfg=cfg, dir=run_dir, config=config)
        return key

    for seed in seeds:
        for arm in arms:
            over, common = spec["arms"][arm], {**base, "seed": seed}
            camtl_dir, s1_dir, kind = layout(out, name, spec, arm, seed)
            # the shared stage 1 first, in every arm: its fingerprint names the machine a run's numbers come from
            deps, wd = [add("domainshift1", SHARED, shared_stage1(out, name, seed), common, [])], {}
            if kind == "own":
                deps.append(add("domainshift1", arm, s1_dir, {**common, **over}, []))
            if s1_dir is not None:
                wd = {"weights_dir": str(s1_dir / "weights")}
            add("camtl", arm, camtl_dir, {**common, **over, **wd}, deps)
    return jobs


def shared_stage1(out, name, seed):
    return out / name / SHARED / f"s{seed}" / "domainshift1" / "exp"


def fingerprint(weights):
    """12 hex digits of the sha256 of a weights file's tensors in key order: the same stage 1 trained on another
    machine has another one as soon as one float sum rounded otherwise there."""
    h = hashlib.sha256()
    for k, v in torch.load(weights, map_location="cpu", weights_only=True)["model"].items():
        h.update(k.encode())
        h.update(v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


# keys that say where a run writes, on which device, or how it reports, not what it computes: in no config_id
NOT_COMPUTED = ("project", "name", "exist_ok", "device", "workers", "plots", "log_interval", "weights_dir", "data")


def config_id(cfg):
    """12 hex digits naming what a run computes: the sha256 of its resolved config less NOT_COMPUTED and less every
    key at its default. So a key added later, whose default keeps the old behaviour, changes no recorded id; a
    changed default changes none either, which is why a study that must repeat its record sets such keys (`set`).
    A row or run whose id is not its job's is of another config: kept in study.csv, never counted or summarised."""
    kept = {k: v for k, v in sorted(cfg.items()) if k not in NOT_COMPUTED and v != DEFAULTS.get(k)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def product(job):
    return job.dir / "weights" / f"yolov8{scale_tag(job.cfg)}-{job.stage}.pt"


def epochs_logged(job):
    p = job.dir / "results.csv"
    if not p.is_file():
        return 0
    with open(p, newline="") as f:
        return len(list(csv.DictReader(f)))


def changed(job):
    """The config keys whose value differs from the one the job's run folder was started with ([] if none or no
    run): a study or config file edited since."""
    clock = job.dir / "time.json"
    if not clock.is_file():
        return []
    was, now = json.loads(clock.read_text()).get("config", {}), json.loads(json.dumps(job.cfg))
    return [f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]


def state(job):
    """done (its marker is there); score (trained, not yet scored and marked: killed in between); resume (a
    checkpoint before the last epoch); fresh (nothing, or nothing to continue from); stale (its folder holds a
    run of another config)."""
    if changed(job):
        return "stale"
    if (job.dir / DONE).is_file():
        return "done"
    if product(job).is_file() and epochs_logged(job) >= job.cfg["epochs"]:
        return "score"
    last = job.dir / "weights" / "last.pt"
    if last.is_file():
        epoch = torch.load(last, map_location="cpu", weights_only=True)["epoch"] + 1
        if epoch < job.cfg["epochs"]:
            return "resume"
    return "fresh"

# -----------------------------------------------------------------------------
# running one stage run: a train.py subprocess, its clock, its marker


def launch(argv, log_path, threads):
    """Start `python train.py ...` with its output in log_path and `threads` torch threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log_path, "a") as log:
        return subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, env=env)


def start(job, how, threads):
    """Launch a job (how: fresh, resume). Its clock (time.json) sums the attempts: an interrupted attempt counts
    up to its last checkpoint."""
    clock = job.dir / "time.json"
    spent = 0.0
    if how == "resume" and clock.is_file():
        prev = json.loads(clock.read_text())
        spent = prev["spent"] + max((job.dir / "weights" / "last.pt").stat().st_mtime - prev["start"], 0.0)
    elif job.dir.exists():  # killed before its first checkpoint, or at the very end: start over
        shutil.rmtree(job.dir)
    job.dir.mkdir(parents=True, exist_ok=True)
    clock.write_text(json.dumps({"spent": spent, "start": time.time(), "config": job.cfg}))
    argv = [str(ROOT / "train.py"), "--stage", job.stage]
    if job.config:
        argv += ["--config", job.config]
    argv += ["--resume", str(job.dir)] if how == "resume" else ["--set", *set_args(job.sets)]
    return launch(argv, job.dir / "train.log", threads)


def machine():
    """The CPU this process runs on, as a short label: what a wall time depends on (a stage1_id names the
    arithmetic, which two CPUs of one instruction set can share at different speeds)."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        return f"{info['model name']}, family {info['cpu family']} model {info['model']}"
    except (OSError, KeyError, ValueError):
        return platform.processor() or platform.machine()


def finish(job, end=None):
    """Score a trained job (camtl: the SCORES of best.pt) and write its marker, with the stage1_id the run has
    from its seed's shared stage 1 (a stage-1 run: that of its own product) and the machine -> the marker."""
    clock = json.loads((job.dir / "time.json").read_text())
    mark = {"seconds": clock["spent"] + (end or time.time()) - clock["start"], "machine": machine(),
            "config_id": config_id(job.cfg)}
    if job.stage == "camtl":
        mark.update(score(job.dir, job.cfg["data"]))
    mark["stage1_id"] = run_stage1_id(job.dir)
    return write_mark(job.dir, mark)


def run_stage1_id(run_dir):
    """A run's stage1_id: a camtl run's is that of its seed's shared stage 1, a stage-1 run's the fingerprint of
    its own product. Kept in the marker; a run finished before ids gets it from the disk, written into its marker
    ('' when that stage 1 is gone)."""
    mark = json.loads((run_dir / DONE).read_text()) if (run_dir / DONE).is_file() else {}
    if "stage1_id" in mark:
        return mark["stage1_id"]
    if run_dir.parent.name == "camtl":  # OUT/NAME/ARM/sSEED/camtl/exp
        out, name, seed = run_dir.parents[4], run_dir.parents[3].name, run_dir.parents[1].name[1:]
        sid = run_stage1_id(shared_stage1(out, name, seed))
    else:
        found = sorted((run_dir / "weights").glob("yolov8*-domainshift1.pt"))
        sid = fingerprint(found[0]) if found else ""
    if mark and sid:
        write_mark(run_dir, {**mark, "stage1_id": sid})
    return sid


def score(run_dir, root, have=()):
    """{key: value} of the SCORES of a camtl run's best.pt not in `have`."""
    return {k: f(run_dir / "weights" / "best.pt", root) for k, f in SCORES.items() if k not in have}


def write_mark(run_dir, mark):
    """Write a run's marker (DONE) atomically -> mark."""
    tmp = run_dir / (DONE + ".tmp")
    tmp.write_text(json.dumps(mark))
    os.replace(tmp, run_dir / DONE)
    return mark


@torch.no_grad()
def small_box_map50(weights, root, max_side=SMALL):
    """mAP50 of a checkpoint on the val stenoses whose longest side is < max_side px (at its imgsz, letterboxed):
    ground truth and predictions are both filtered by that size. NaN when the split has no such stenosis."""
    model, cfg = load_checkpoint(weights)
    loader = data.val_loaders(root, "camtl", "val", cfg["imgsz"], cfg["batch"], 0, cfg["nc"])["det"]
    meter = metrics.DetMeter()
    small = lambda b: (b[:, 2:4] - b[:, :2]).amax(1) < max_side  # noqa: E731  (N, 4) xyxy -> (N,) bool
    for batch in loader:
        with model.domain(batch["domain"]):
            det, _ = model(batch["img"], tasks=("det",))  # (B, 4+nc, A) decoded in eval mode
        preds = metrics.nms(det, cfg["val_conf"], cfg["val_iou"], cfg["max_det"], multi_label=True)
        h, w = batch["img"].shape[-2:]
        targets = [evaluate.targets_xyxy(batch, i, h, w) for i in range(len(preds))]
        meter.update([p[small(p[:, :4])] for p in preds], [t[small(t[:, 1:])] for t in targets])
    if not sum(len(t) for t in meter.target_cls):
        return math.nan
    return float(meter.compute(cfg["nc"])["map50"])


@torch.no_grad()
def source_dice(weights, root):
    """Dice(full) of a camtl checkpoint on the val fundus photographs (the source domain), through its source
    BatchNorm branch: what camtl kept of stage 1. Without DualBN its one BatchNorm has followed the angiograms."""
    model, cfg = load_checkpoint(weights)
    stage = evaluate.DOMAIN_STAGE["source"]  # the stage whose val data is the source domain's
    loaders = data.val_loaders(root, stage, "val", cfg["imgsz"], cfg["batch"], 0, cfg["nc"])
    return float(evaluate.validate(model, loaders, cfg, torch.device("cpu"))["dice_full"])


SCORES = {"map50_small": small_box_map50, "dice_source": source_dice}  # computed on best.pt, not in results.csv

# -----------------------------------------------------------------------------
# the results: rows per arm x seed, mean/std and paired differences, table and picture


def best_row(csv_path, val_interval=1):
    """The results.csv row of the best epoch as train.py picks best.pt: among the validated epochs (every
    val_interval-th and the last; the others repeat the last validation's metrics), the last of highest fitness."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows = [r for i, r in enumerate(rows) if (i + 1) % val_interval == 0 or i + 1 == len(rows)]
    fit = np.nan_to_num(np.array([float(r.get("fitness") or "nan") for r in rows]), nan=-np.inf)
    return rows[len(fit) - 1 - int(np.argmax(fit[::-1]))]


def run_row(out, name, spec, arm, seed):
    """One study.csv row of a finished arm x seed: its camtl run's best epoch, the SCORES, wall times."""
    camtl_dir, s1_dir, kind = layout(out, name, spec, arm, seed)
    cfg = json.loads((camtl_dir / "time.json").read_text())["config"]
    r, mark = best_row(camtl_dir / "results.csv", cfg["val_interval"]), json.loads((camtl_dir / DONE).read_text())
    if set(SCORES) - set(mark):  # a run scored before a score was added: score it now, once
        mark = write_mark(camtl_dir, {**mark, **score(camtl_dir, cfg["data"], have=mark)})
    s1 = json.loads((s1_dir / DONE).read_text()) if s1_dir is not None and (s1_dir / DONE).is_file() else {}
    metrics = {k: float(r.get(col) or "nan") if col else float(mark[k]) for k, col, _ in METRICS}
    cid = mark.get("config_id") or config_id(cfg)
    return dict(study=name, arm=arm, seed=seed, stage1_id=run_stage1_id(camtl_dir), config_id=cid,
                epoch=int(r["epoch"]),
                **metrics, camtl_s=round(mark["seconds"], 1), machine=mark.get("machine", ""),
                stage1=kind, stage1_s=round(s1.get("seconds", math.nan), 1), run=str(camtl_dir))


def mean_std(values):
    """(mean, sample std, count) of the finite values; std is NaN below two."""
    v = [x for x in values if math.isfinite(x)]
    return (float(np.mean(v)) if v else math.nan, float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, len(v))


def summarize(rows, arms, reference):
    """{arm: {metric: (mean, std, n), "d_" + metric: the same of the per-seed differences arm - reference,
    camtl_min, seeds, pairs: [(seed, {metric: difference, time: wall-time ratio})], unpaired: [(seed, stage1_id)]}}
    for the arms that have rows, in the order of arms. A run pairs with the reference run of its seed and stage1_id
    (the same stage-1 product: the same arithmetic); its time ratio is NaN unless both ran on one known machine."""
    ref = {(r["seed"], r["stage1_id"]): r for r in rows if r["arm"] == reference}
    out = {}
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        paired = [(r, ref[r["seed"], r["stage1_id"]]) for r in mine if (r["seed"], r["stage1_id"]) in ref]
        s = {"seeds": [r["seed"] for r in mine], "camtl_min": mean_std([r["camtl_s"] / 60 for r in mine]),
             "pairs": [(r["seed"], {**{k: r[k] - f[k] for k, _, _ in METRICS}, "time": time_ratio(r, f)})
                       for r, f in paired],
             "unpaired": [(r["seed"], r["stage1_id"]) for r in mine if (r["seed"], r["stage1_id"]) not in ref]}
        for k, _, _ in METRICS:
            s[k] = mean_std([r[k] for r in mine])
            s["d_" + k] = mean_std([d[k] for _, d in s["pairs"]])
        s["time"] = mean_std([d["time"] for _, d in s["pairs"]])
        out[arm] = s
    return out


def time_ratio(run, ref):
    """A run's camtl wall time over its reference's, NaN unless both name the same machine."""
    same = run.get("machine") and run.get("machine") == ref.get("machine")
    return run["camtl_s"] / ref["camtl_s"] if same else math.nan


def fmt(ms, sign=False, digits=3):
    m, s, n = ms
    if not n:
        return "-"
    v = f"{m:+.{digits}f}" if sign else f"{m:.{digits}f}"
    return v if n < 2 else f"{v} ± {s:.{digits}f}"


def write_table(path, name, spec, summary, other=(), legacy=0):
    """study.md: per arm mean ± std over seeds, and the paired difference to the reference arm."""
    ref = spec["reference"]
    heads = [label for _, _, label in METRICS]
    lines = [f"# Study `{name}`", "",
             f"Config `{spec['config'] or 'configs/synthetic.py'}`"
             + (f" with `{' '.join(set_args(spec['set']))}`" if spec.get("set") else "")
             + "; each run's best epoch; mean ± sample standard "
             f"deviation over the runs. Δ: per run the arm minus the `{ref}` run of the same seed and stage1_id "
             "(the seed's shared stage 1 as trained there: same data order, initialisation and machine arithmetic; "
             "an arm with its own stage 1 differs in that too), mean ± std over such pairs. camtl min: the camtl "
             "stage's wall time, over every machine; time ×: per pair the arm's camtl wall time over the "
             "reference's, over the pairs run on one machine (study.csv's machine), which can be fewer.", "",
             "| arm | seeds | pairs | " + " | ".join(heads) + " | camtl min | " + " | ".join(f"Δ {h}" for h in heads)
             + " | time × |", "|" + " --- |" * 3 + " ---: |" * (2 * len(heads) + 2)]
    for arm, s in summary.items():
        cells = [fmt(s[k]) for k, _, _ in METRICS] + [fmt(s["camtl_min"], digits=1)]
        cells += ["ref" if arm == ref else fmt(s["d_" + k], sign=True) for k, _, _ in METRICS]
        cells += ["ref" if arm == ref else fmt(s["time"], digits=2)]
        pairs = "-" if arm == ref else str(len(s["pairs"]))
        lines.append(f"| {arm} | {','.join(map(str, s['seeds']))} | {pairs} | " + " | ".join(cells) + " |")
    lines += ["", f"Each pair: the arm's run minus the `{ref}` run of the same seed and stage1_id.", "",
              "| arm | seed | " + " | ".join(f"Δ {h}" for h in heads) + " | time × |",
              "|" + " --- |" * 2 + " ---: |" * (len(heads) + 1)]
    lines += [f"| {arm} | {seed} | " + " | ".join(fmt((d[k], math.nan, 1), sign=True) for k, _, _ in METRICS)
              + (f" | {d['time']:.2f} |" if math.isfinite(d["time"]) else " | - |")
              for arm, s in summary.items() if arm != ref for seed, d in s["pairs"]]
    alone = [f"{arm} s{seed} ({sid or 'no stage1_id'})" for arm, s in summary.items() if arm != ref
             for seed, sid in s["unpaired"]]
    if alone:
        lines += ["", f"Without a `{ref}` run of the same seed and stage1_id, so in no Δ: {', '.join(alone)}."]
    if other:
        runs = ", ".join(f"{r['arm']} s{r['seed']} ({r['config_id']})" for r in other)
        lines += ["", f"Left out: {len(other)} runs of another config than this study's (config_id in study.csv): "
                  f"{runs}."]
    if legacy:
        lines += ["", f"{legacy} rows were recorded before runs carried a config_id; they count as this study's "
                  "config, the one their record was made with."]
    path.write_text("\n".join(lines) + "\n")


def plot_study(path, name, summary, rows, reference, panel=230, row_h=24):
    """study.png: one panel per metric, one line per arm: mean (dot) ± std (bar), each seed a grey dot; the
    reference arm's mean a vertical line."""
    arms = list(summary)
    n, size = len(arms), 12
    left = max(plots.text_width(a, size) for a in arms) + 16
    top, bottom = 48, 52
    img = Image.new("RGB", (left + len(METRICS) * (panel + 34), top + n * row_h + bottom), plots.WHITE)
    d = ImageDraw.Draw(img)
    plots.text(d, (8, 8), f"study {name}: mean ± std over seeds (grey: each seed); line: {reference}", size + 1)
    for j, (k, _, label) in enumerate(METRICS):
        vals = [r[k] for r in rows if math.isfinite(r[k])] or [0.0, 1.0]
        x0 = left + j * (panel + 34)
        lo, hi = plots.nice_limits(min(vals), max(vals))
        ax = plots.Axes(img, (x0, top, x0 + panel, top + n * row_h), (max(lo, 0.0), min(hi, 1.0)), (n - 0.5, -0.5))
        ax.frame(label, yticks=[], size=size)
        if reference in summary and math.isfinite(summary[reference][k][0]):
            m = summary[reference][k][0]
            ax.line([m, m], [-0.5, n - 0.5], plots.GREY, width=1)
        for i, arm in enumerate(arms):
            m, s, c = summary[arm][k]
            seeds = [r[k] for r in rows if r["arm"] == arm]
            ax.dots(seeds, [i] * len(seeds), plots.GREY, r=2)
            if c > 1:
                ax.line([m - s, m + s], [i, i], plots.colour(i), width=2)
            ax.dots([m], [i], plots.colour(i), r=4)
            if j == 0:
                plots.text(d, (left - 8, ax.px(0, i)[1]), arm, size, anchor=(1, 0.5))
    return plots.save(img, path)


def read_record(record, name):
    """The rows of a study's record (RECORD/study.csv as write_results wrote it) -> [row]; a column an older
    study.py did not write is NaN ('' for stage1_id, config_id and machine)."""
    path = Path(record) / "study.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    other = sorted({r["study"] for r in rows} - {name})
    if other:
        raise SystemExit(f"--record {record}: its study.csv holds study {other[0]!r}, not {name!r}; give another "
                         "folder")
    ints, floats = ("seed", "epoch"), [k for k, _, _ in METRICS] + ["camtl_s", "stage1_s"]
    return [{"stage1_id": "", "config_id": "", "machine": "", **{k: math.nan for k in floats},
             **{k: int(v) if k in ints else float(v or "nan") if k in floats else v for k, v in r.items()}}
            for r in rows]


def write_results(out, name, spec, record=None):
    """study.csv (every finished arm x seed of the study on disk, and the record's other rows, in the study's
    arm order; rows of arms the study no longer has last, kept but not summarised), study.md and study.png,
    rewritten whole in out/name and in the record (and its curves/, keep_curves) -> the rows. A run on disk and
    in the record (same arm, seed, stage1_id and config_id) is the disk's, unless its stage1_id is unknown ('').
    Only rows of the config the study now describes (`current_ids`) are summarised, and rows recorded before config
    ids; study.md says how many others were left out and why."""
    d = out / name
    seeds = sorted({int(p.name[1:]) for p in d.glob("*/s*") if p.name[1:].isdigit()})
    rows = [run_row(out, name, spec, arm, seed) for arm in spec["arms"] for seed in seeds
            if (layout(out, name, spec, arm, seed)[0] / DONE).is_file()]
    recorded = read_record(record, name) if record else []

    def key(r):
        return r["arm"], r["seed"], r["stage1_id"], r["config_id"]
    rows = [r for r in rows if r["stage1_id"] or key(r) not in set(map(key, recorded))]
    rows += [r for r in recorded if key(r) not in set(map(key, rows))]
    if not rows:
        return None
    order = list(spec["arms"])
    rows.sort(key=lambda r: (order.index(r["arm"]) if r["arm"] in order else len(order), r["arm"], r["seed"]))
    ids = current_ids(out, name, spec, sorted({r["seed"] for r in rows}))
    other = [r for r in rows if r["arm"] in ids and r["config_id"] not in ("", ids[r["arm"]][r["seed"]])]
    summary = summarize([r for r in rows if r not in other], order, spec["reference"])
    legacy = sum(not r["config_id"] for r in rows)
    for folder in [d] + ([Path(record)] if record else []):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "study.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(["study", "arm", "seed", "stage1_id", "config_id",
                                                                   *(k for r in rows for k in r)])))
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, folder / "study.csv")
        write_table(folder / "study.md", name, spec, summary, other, legacy)
        if summary:  # nothing of this config yet: no picture
            plot_study(folder / "study.png", name, summary, rows, spec["reference"])
    if other:
        print(f"{len(other)} runs of another config left out of the summary (kept in study.csv): "
              + ", ".join(f"{r['arm']} s{r['seed']}" for r in other[:6]) + (" ..." if len(other) > 6 else ""))
    if record:
        keep_curves(out, name, Path(record) / "curves")
    return rows


def current_ids(out, name, spec, seeds):
    """{arm: {seed: the config_id of its camtl run as the study now describes it}} for every arm and these seeds."""
    ids = {}
    for j in plan(name, spec, list(spec["arms"]), seeds, out).values():
        if j.stage == "camtl":
            ids.setdefault(j.arm, {})[j.cfg["seed"]] = config_id(j.cfg)
    return ids


def keep_curves(out, name, curves):
    """Copy every finished run's results.csv (its validations epoch by epoch) to curves/ARM-sSEED-ID.csv (camtl)
    or curves/ARM-sSEED-ID-domainshift1.csv (ARM _shared for a shared stage 1); ID: the run's stage1_id."""
    curves.mkdir(parents=True, exist_ok=True)
    for mark in (out / name).glob(f"*/s*/*/exp/{DONE}"):
        arm, s, stage = mark.parts[-5], mark.parts[-4], mark.parts[-3]
        stem = f"{arm}-{s}-{run_stage1_id(mark.parent)}" + ("" if stage == "camtl" else f"-{stage}")
        shutil.copyfile(mark.parent / "results.csv", curves / f"{stem}.csv")


def unrecorded(jobs, rows, reference):
    """The jobs without the camtl runs the record's rows of their config (config_id) hold, and without the stage-1
    runs only those needed.
    A recorded reference run is kept while its seed has other runs to do: they pair with a reference run from the
    same stage 1 (stage1_id), so it runs again unless the record holds one of the id this machine trains (known)."""
    ids = {k: config_id(j.cfg) for k, j in jobs.items()}
    # this config's rows only; a row recorded before config ids ('') is taken as this config's, as it always was
    rows = [r for r in rows if r["config_id"] in ("", ids.get(f"{r['arm']}/s{r['seed']}/camtl"))]
    have = {f"{r['arm']}/s{r['seed']}/camtl" for r in rows}
    todo = {j.cfg["seed"] for k, j in jobs.items() if j.stage == "camtl" and k not in have}
    left = {}
    for k, j in jobs.items():
        if j.stage == "camtl" and j.arm == reference and k in have and j.cfg["seed"] in todo:
            j.known = {r["stage1_id"] for r in rows if r["arm"] == reference and r["seed"] == j.cfg["seed"]}
            left[k] = j
        elif k not in have:
            left[k] = j
    needed = {dep for j in left.values() for dep in j.deps}
    return {k: j for k, j in left.items() if j.stage == "camtl" or k in needed}

# -----------------------------------------------------------------------------
# the CLI: list, dry run, run


def timings(out, name, recorded=()):
    """{(arm, stage): [seconds]} of this study's finished runs (the pilot's and every run since), on disk or
    recorded."""
    t = {}
    for r in recorded:
        t.setdefault((r["arm"], "camtl"), []).append(r["camtl_s"])
        if math.isfinite(r["stage1_s"]):
            t.setdefault((SHARED if r["stage1"] == "shared" else r["arm"], "domainshift1"), []).append(r["stage1_s"])
    for mark in (out / name).glob(f"*/s*/*/exp/{DONE}"):
        arm, stage = mark.parts[-5], mark.parts[-3]
        t.setdefault((arm, stage), []).append(json.loads(mark.read_text())["seconds"])
    return t


def estimate(t, job, reference):
    """Seconds a job should take: the mean of its arm's finished runs of that stage, else the reference arm's,
    else any arm's; None without any."""
    for keys in ([(job.arm, job.stage)], [(reference, job.stage)], [k for k in t if k[1] == job.stage]):
        v = [s for k in keys for s in t.get(k, [])]
        if v:
            return float(np.mean(v))
    return None


def dry_run(out, name, spec, jobs, n_jobs, recorded=()):
    t = timings(out, name, recorded)
    if recorded:
        print(f"  {len(recorded)} rows are in the record, of {', '.join(sorted({r['arm'] for r in recorded}))}")
    todo, unknown, pending = 0.0, 0, 0
    for job in jobs.values():
        st = state(job)
        if st != "done" and getattr(job, "known", None) is not None and product(jobs[job.deps[0]]).is_file():
            st = "done" if fingerprint(product(jobs[job.deps[0]])) in job.known else st  # recorded from this stage 1
        pending += st != "done"
        est = estimate(t, job, spec["reference"]) if st != "done" else None
        unknown += st != "done" and est is None
        todo += est or 0.0
        cost = "" if st == "done" else f"  ~{est / 60:.1f} min" if est is not None else "  (no timing yet)"
        print(f"  {st:7s} {job.key}{cost}")
    print(f"{pending} of {len(jobs)} runs to do, about {todo / 60 / n_jobs:.0f} min with --jobs {n_jobs}"
          + (f" plus {unknown} runs without a timing (run the pilot first: --only {spec['reference']} --seeds 0)"
             if unknown else ""))


def execute(jobs, n_jobs, threads, on_done, log=print):
    """Run the jobs not done, at most n_jobs at once, each after the jobs it depends on; on_done(job) after each.
    A failed job is named (with its log) and skips its dependants; the others go on. Interrupted (Ctrl-C, or
    SIGTERM), the runs in flight are given time to stop at a clean point. -> the failed or skipped job keys."""
    done = {k for k, j in jobs.items() if state(j) == "done"}
    pending, running, failed = [j for j in jobs.values() if j.key not in done], {}, []
    try:
        while pending or running:
            for job in list(pending):
                if any(d in failed for d in job.deps):
                    pending.remove(job)
                    failed.append(job.key)
                    log(f"{job.key}: skipped, it needs {', '.join(d for d in job.deps if d in failed)}")
                elif len(running) < n_jobs and all(d in done for d in job.deps):
                    pending.remove(job)
                    how = state(job)
                    if getattr(job, "known", None) is not None and how != "score" and (
                            fingerprint(product(jobs[job.deps[0]])) in job.known):
                        log(f"{job.key}: in the record, from this machine's stage 1")
                        done.add(job.key)
                        continue
                    if how == "score":  # trained; killed before it was scored
                        finish(job, end=product(job).stat().st_mtime)
                        done.add(job.key)
                        on_done(job)
                        continue
                    log(f"{job.key}: {'resumed' if how == 'resume' else 'started'}, log {job.dir / 'train.log'}")
                    running[job.key] = (job, start(job, how, threads))
            for key, (job, proc) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[key]
                if proc.returncode:
                    failed.append(key)
                    log(f"{key}: FAILED (exit {proc.returncode}); see {job.dir / 'train.log'}")
                    continue
                log(f"{key}: done in {finish(job)['seconds'] / 60:.1f} min")
                done.add(key)
                on_done(job)
            time.sleep(0.5 if running else 0)
    finally:
        for job, proc in running.values():  # a terminal's Ctrl-C reached them too; a SIGTERM did not
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)  # train.py stops and says where its last checkpoint is
                proc.wait()
    return failed


def ensure_data(jobs):
    """Generate the synthetic sets the jobs name (once, here, rather than in parallel runs)."""
    want = {}
    for j in jobs.values():
        c = j.cfg
        if Path(c["data"]) == synthetic.preset_root(c["synthetic_preset"]):
            want.setdefault(c["data"], set()).add((c["synthetic_preset"], c["synthetic_n"], c["imgsz"]))
    for root, params in want.items():
        if len(params) > 1:  # one folder, two sets: every run would regenerate it
            raise SystemExit(f"the study's arms need {len(params)} synthetic sets (preset, synthetic_n, imgsz "
                             f"{sorted(params)}) in one folder {root}; give the arms that differ their own data=")
        preset, n, imgsz = params.pop()
        synthetic.ensure_synthetic(preset=preset, n=n, imgsz=imgsz)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", nargs="?", help=f"one of {', '.join(STUDIES)}")
    ap.add_argument("--list", action="store_true", help="list the studies and their arms")
    ap.add_argument("--seeds", help="comma list, e.g. 0,1,2 (default: the study's)")
    ap.add_argument("--only", action="append", metavar="ARM",
                    help="these arms only (repeatable, or a comma list; an arm starting with - as --only=-CTAM)")
    ap.add_argument("--dry-run", action="store_true", help="list the runs, which are done, and the estimated cost")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, each with cores / jobs threads")
    ap.add_argument("--out", default="runs/study", help="where studies are written (default runs/study)")
    ap.add_argument("--record", metavar="DIR", help="keep the results in DIR too (study.csv, .md, .png, curves/); "
                    "an arm x seed whose row is in DIR/study.csv counts as finished, on this machine or another (the "
                    "reference arm runs again where this machine's stage 1 differs: docs/study.md)")
    return ap.parse_args(argv)


def selection(a):
    """-> (name, spec, arms, seeds) of the command line; a mistake is one line."""
    if a.study not in STUDIES:
        raise SystemExit(f"study {a.study!r}: no such study; studies: {', '.join(STUDIES)} (python study.py --list)")
    spec = STUDIES[a.study]
    arms = [x.strip() for o in a.only or [] for x in o.split(",") if x.strip()] or list(spec["arms"])
    bad = [x for x in arms if x not in spec["arms"]]
    if bad:
        raise SystemExit(f"--only {','.join(bad)}: not an arm of {a.study}; arms: {', '.join(spec['arms'])}")
    try:
        seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else list(spec["seeds"])
    except ValueError:
        raise SystemExit(f"--seeds {a.seeds!r}: expected a comma list of integers, e.g. 0,1,2") from None
    if not seeds or min(seeds) < 0:
        raise SystemExit(f"--seeds {a.seeds!r}: expected integers >= 0")
    if a.jobs < 1:
        raise SystemExit(f"--jobs {a.jobs}: expected >= 1")
    return a.study, spec, [x for x in spec["arms"] if x in arms], list(dict.fromkeys(seeds))


def main(argv=None):
    a = parse_args(argv)
    if a.list:
        for name, spec in STUDIES.items():
            common = f", set {' '.join(set_args(spec['set']))}" if spec.get("set") else ""
            print(f"{name} (config {spec['config']}{common}, seeds {','.join(map(str, spec['seeds']))}, reference "
                  f"{spec['reference']}):")
            for arm, over in spec["arms"].items():
                print(f"  {arm:14s} {' '.join(set_args(over)) or '(the config and set as they are)'}")
        return
    name, spec, arms, seeds = selection(a)
    if spec["reference"] not in arms:  # every arm's runs pair with it
        print(f"--only: the reference arm {spec['reference']} is run too where its run of a seed is missing")
        arms = [x for x in spec["arms"] if x in arms or x == spec["reference"]]
    out = Path(a.out)
    jobs = plan(name, spec, arms, seeds, out)
    recorded = read_record(a.record, name) if a.record else []
    jobs = unrecorded(jobs, recorded, spec["reference"])
    if a.dry_run:
        return dry_run(out, name, spec, jobs, a.jobs, recorded)
    (out / name).mkdir(parents=True, exist_ok=True)
    with open(out / name / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"{out / name}: another study.py is running this study; wait for it or stop it") from None
        run(out, name, spec, jobs, a.jobs, a.record)


def run(out, name, spec, jobs, n_jobs, record=None):
    """Data first, then the jobs; the results rewritten after every camtl run."""
    stale = [j for j in jobs.values() if changed(j)]
    if stale:
        raise SystemExit(f"{len(stale)} runs in {out / name} were started with another config ({stale[0].key}: "
                         f"{', '.join(changed(stale[0])[:3])}); move them away (or give --out) to run them again")
    ensure_data(jobs)
    threads = max(len(os.sched_getaffinity(0)) // n_jobs, 1)
    torch.set_num_threads(threads)  # the scoring done here, next to the runs
    write_results(out, name, spec, record)
    term = signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the study as Ctrl-C does
    try:
        failed = execute(jobs, n_jobs, threads,
                         lambda job: job.stage == "camtl" and write_results(out, name, spec, record))
    except KeyboardInterrupt:
        raise SystemExit(f"\ninterrupted; the same command continues the study ({out / name})") from None
    finally:
        signal.signal(signal.SIGTERM, term)
    print(f"results: {out / name / 'study.md'}")
    if failed:
        raise SystemExit(f"{len(failed)} runs failed or were skipped: {', '.join(failed)}")


if __name__ == "__main__":
    main()
