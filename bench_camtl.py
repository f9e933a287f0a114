"""CAMTL vs YOLOv8 train step: time and peak memory at several image sizes (to move into bench.py).

Each (model, size) runs in its own subprocess so peak RSS (ru_maxrss) is that configuration's alone.
    python bench_camtl.py                 # n scale, batch 4, sizes 320 512 640
    python bench_camtl.py --sizes 512 --repeats 3
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


def train_step_once(kind, size, batch, repeats, warmup, scale="n"):
    """Median seconds of forward + loss + backward, and peak RSS (total, and above the state before step 1)."""
    from losses import DetectionLoss
    from model import CAMTL, YOLOv8

    torch.set_num_threads(2)
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

    base = maxrss_mib()
    times = []
    for i in range(warmup + repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = maxrss_mib()
    return {"kind": kind, "size": size, "batch": batch, "time": statistics.median(times[warmup:]),
            "peak_mib": peak, "step_mib": peak - base}


def bench_camtl(sizes=(320, 512, 640), batch=4, repeats=5, warmup=2, scale="n"):
    """Print and return per size: YOLOv8 and CAMTL step time and peak memory, and CAMTL / YOLOv8 ratios."""
    here = os.path.dirname(os.path.abspath(__file__))
    rows = []
    print(f"train step (forward + det/seg loss + backward), scale {scale}, batch {batch}, 2 threads, "
          f"median of {repeats} after {warmup} warmup; memory = peak RSS above the pre-step state (total in brackets)")
    print(f"{'size':>5} {'YOLOv8 s':>9} {'CAMTL s':>8} {'time x':>7} {'YOLOv8 MiB':>16} {'CAMTL MiB':>16} {'mem x':>6}")
    for size in sizes:
        r = {}
        for kind in ("yolov8", "camtl"):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", kind, "--sizes", str(size),
                                  "--batch", str(batch), "--repeats", str(repeats), "--warmup", str(warmup),
                                  "--scale", scale], cwd=here, capture_output=True, text=True, check=True)
            r[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        y, c = r["yolov8"], r["camtl"]
        row = {"size": size, "yolov8": y, "camtl": c, "time_ratio": c["time"] / y["time"],
               "mem_ratio": c["step_mib"] / y["step_mib"]}
        rows.append(row)
        print(f"{size:>5} {y['time']:>9.3f} {c['time']:>8.3f} {row['time_ratio']:>7.2f} "
              f"{y['step_mib']:>7.0f} ({y['peak_mib']:>6.0f}) {c['step_mib']:>7.0f} ({c['peak_mib']:>6.0f}) {row['mem_ratio']:>6.2f}")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[320, 512, 640])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--scale", default="n")
    ap.add_argument("--one", choices=("yolov8", "camtl"), help=argparse.SUPPRESS)  # child process: one configuration
    a = ap.parse_args()
    if a.one:
        print(json.dumps(train_step_once(a.one, a.sizes[0], a.batch, a.repeats, a.warmup, a.scale)))
    else:
        bench_camtl(a.sizes, a.batch, a.repeats, a.warmup, a.scale)
