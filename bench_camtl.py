"""CAMTL vs YOLOv8 train step: time and peak memory at several image sizes (to move into bench.py).

Peak memory: each model in its own subprocess, so ru_maxrss is that configuration's alone.
Time: both models in one subprocess, steps alternating, ratio = median of the per-round ratios; on a
shared machine that cancels most of the load drift that separate runs would pick up.
    python bench_camtl.py                 # n scale, batch 4, sizes 320 512 640
    python bench_camtl.py --sizes 512 --repeats 3
    python bench_camtl.py --threads 1     # on a busy machine: a 2-thread OpenMP team stalls whenever a thread is descheduled
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def make_step(kind, size, batch, scale="n"):
    """A closure doing one train step (forward + simple det/seg loss + backward) of a fresh model."""
    from losses import DetectionLoss
    from model import CAMTL, YOLOv8

    torch.manual_seed(0)
    model = (CAMTL({"scale": scale, "nc": 1}, verbose=False) if kind == "camtl" else YOLOv8(1, scale, verbose=False)).train()
    crit = DetectionLoss(nc=1)
    x = torch.rand(batch, 3, size, size)
    n = 3 * batch  # three boxes per image, normalised xywh
    targets = {"batch_idx": torch.arange(batch).repeat_interleave(3), "cls": torch.zeros(n, 1),
               "bboxes": torch.cat((torch.rand(n, 2) * 0.6 + 0.2, torch.rand(n, 2) * 0.1 + 0.02), 1)}
    mask = (torch.rand(batch, 1, size, size) > 0.9).float()

    def step():
        if kind == "camtl":
            det, seg = model(x)
            loss = crit(det, targets)[0] + F.binary_cross_entropy_with_logits(seg["full"], mask) * batch
        else:
            loss = crit(model(x), targets)[0]
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def timed(step):
    """(wall, CPU) seconds of one call; CPU time is the steadier one when the machine is shared."""
    t, c = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - t, time.process_time() - c


def child_memory(kind, size, batch, repeats, scale):
    """Peak RSS: total, and above the state just before the first step (the step's own working memory)."""
    step = make_step(kind, size, batch, scale)
    base = maxrss_mib()
    for _ in range(repeats):
        step()
    peak = maxrss_mib()
    return {"peak_mib": peak, "step_mib": peak - base}


def child_time(size, batch, repeats, warmup, scale):
    """Median wall seconds per model and the medians of per-round CAMTL / YOLOv8 ratios (wall and CPU)."""
    steps = {k: make_step(k, size, batch, scale) for k in ("yolov8", "camtl")}
    t = {k: [] for k in steps}
    for i in range(warmup + repeats):
        for k, step in steps.items():
            t[k].append(timed(step))
    y, c = t["yolov8"][warmup:], t["camtl"][warmup:]
    return {"yolov8": statistics.median(w for w, _ in y), "camtl": statistics.median(w for w, _ in c),
            "ratio": statistics.median(a[0] / b[0] for a, b in zip(c, y)),
            "cpu_ratio": statistics.median(a[1] / b[1] for a, b in zip(c, y))}


def run_child(*args):
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, args)], cwd=here,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_camtl(sizes=(320, 512, 640), batch=4, repeats=5, warmup=2, scale="n", threads=2):
    """Print and return per size: step time of YOLOv8 and CAMTL with their ratio, and the step's peak memory."""
    common = ["--batch", batch, "--repeats", repeats, "--warmup", warmup, "--scale", scale, "--threads", threads]
    print(f"train step (forward + det/seg loss + backward), scale {scale}, batch {batch}, {threads} thread(s); "
          f"time: median of {repeats} alternating rounds after {warmup} warmup; memory: peak RSS above the pre-step state (total)")
    print(f"{'size':>5} {'YOLOv8 s':>9} {'CAMTL s':>8} {'time x':>7} {'cpu x':>6} {'YOLOv8 MiB':>16} {'CAMTL MiB':>16} {'mem x':>6}")
    rows = []
    for size in sizes:
        t = run_child("--child", "time", "--sizes", size, *common)
        y, c = (run_child("--child", k, "--sizes", size, *common) for k in ("yolov8", "camtl"))
        row = {"size": size, **t, "yolov8_mem": y, "camtl_mem": c, "mem_ratio": c["step_mib"] / y["step_mib"]}
        rows.append(row)
        print(f"{size:>5} {t['yolov8']:>9.3f} {t['camtl']:>8.3f} {t['ratio']:>7.2f} {t['cpu_ratio']:>6.2f} {y['step_mib']:>7.0f} ({y['peak_mib']:>6.0f}) "
              f"{c['step_mib']:>7.0f} ({c['peak_mib']:>6.0f}) {row['mem_ratio']:>6.2f}")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[320, 512, 640])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--scale", default="n")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=("time", "yolov8", "camtl"), help=argparse.SUPPRESS)  # one measurement
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.child == "time":
        print(json.dumps(child_time(a.sizes[0], a.batch, a.repeats, a.warmup, a.scale)))
    elif a.child:
        print(json.dumps(child_memory(a.child, a.sizes[0], a.batch, 2, a.scale)))
    else:
        bench_camtl(a.sizes, a.batch, a.repeats, a.warmup, a.scale, a.threads)
