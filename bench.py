"""Speed and memory of nanoCAMTL (not a test). Each section runs in its own subprocess so peak memory
does not leak from one into the next.

    python bench.py                      # every section, scale n
    python bench.py --only infer,loss    # some sections
    python bench.py --scale s --repeats 20

Times are medians over --repeats after warm-up; memory is the process's peak RSS growth during the timed
part (ru_maxrss), which on CPU is what a run actually costs.
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


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timeit(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    base = rss_mb()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "peak_mb": peak_mb() - base}


def random_targets(B, n, nc=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(B * n, 2, generator=g) * 0.8 + 0.1
    wh = torch.rand(B * n, 2, generator=g) * 0.15 + 0.02
    return {"batch_idx": torch.arange(B).repeat_interleave(n).float(), "cls": torch.randint(0, nc, (B * n, 1), generator=g).float(),
            "bboxes": torch.cat((xy, wh), 1)}


# -----------------------------------------------------------------------------
# sections: each returns a dict of figures


def bench_infer(a):
    """(a) fused YOLOv8 inference, 640 px, batch 1."""
    from model import YOLOv8
    m = YOLOv8(nc=80, scale=a.scale, verbose=False).fuse().eval()
    x = torch.rand(1, 3, 640, 640)
    with torch.inference_mode():
        r = timeit(lambda: m(x), a.repeats)
    return {"what": f"YOLOv8{a.scale} fused inference, 1x3x640x640", **r}


def bench_train(a):
    """(b) one YOLOv8 training step (forward + loss + backward), batch 8, 320 px."""
    from losses import DetectionLoss
    from model import YOLOv8
    m = YOLOv8(nc=80, scale=a.scale, verbose=False).train()
    crit = DetectionLoss(nc=80)
    x, t = torch.rand(8, 3, 320, 320), random_targets(8, 8, 80)

    def step():
        loss, _ = crit(m(x), t)
        loss.backward()
        m.zero_grad(set_to_none=True)
    return {"what": f"YOLOv8{a.scale} train step, 8x3x320x320, 8 boxes/img", **timeit(step, a.repeats)}


def bench_loss(a):
    """(c) the detection loss alone (assigner + box/cls/dfl + backward), batch 16, 640 px, 50 boxes per image."""
    from losses import DetectionLoss
    nc, B = 80, 16
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(B, 64 + nc, 640 // s, 640 // s, generator=g).requires_grad_(True) for s in (8, 16, 32)]
    crit, t = DetectionLoss(nc=nc), random_targets(B, 50, nc)

    def step():
        loss, _ = crit(feats, t)
        loss.backward()
    return {"what": "DetectionLoss + backward, 16 images x 50 boxes, 640 px (8400 anchors), nc 80", **timeit(step, a.repeats)}


SECTIONS = {"infer": bench_infer, "train": bench_train, "loss": bench_loss}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {list(SECTIONS)}")
    p.add_argument("--scale", default="n")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.child:  # run one section in this process and hand back JSON
        print(json.dumps(SECTIONS[a.child](a)))
        return
    print(f"torch {torch.__version__}, {a.threads} threads, {os.cpu_count()} cpus, scale {a.scale}, median of {a.repeats}")
    for name in a.only.split(","):
        if name not in SECTIONS:
            sys.exit(f"--only: unknown section {name!r}; choose from {list(SECTIONS)}")
        out = subprocess.run([sys.executable, __file__, "--child", name, "--scale", a.scale, "--repeats", str(a.repeats),
                              "--threads", str(a.threads)], capture_output=True, text=True)
        if out.returncode:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        extra = "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                          if k not in ("what", "median_ms", "min_ms", "peak_mb"))
        print(f"{name:8s} {r['median_ms']:9.1f} ms median ({r['min_ms']:.1f} min)  peak +{r['peak_mb']:.0f} MB  {r['what']}  {extra}")


if __name__ == "__main__":
    main()
