"""Temporary home of bench.py's `export` section (to be merged into bench.py): eager vs torch.export inference.

    python bench_export.py [--scale n] [--repeats 10] [--threads 2]
"""
import argparse
import tempfile
from pathlib import Path

import torch

from bench import timeit


def bench_export(a):
    """(d) inference at 512 px, batch 1: CAMTL and YOLOv8 eager (as trained), eager fused (export.deployable) and
    the exported .pt2 program; plus the time torch.export takes. Headline: CAMTL's .pt2."""
    import time

    import export
    from model import CAMTL, YOLOv8
    x = torch.rand(1, 3, 512, 512)
    out = {}
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        for name, model in (("camtl", CAMTL({"scale": a.scale, "dual_bn": True}, verbose=False)),
                            ("yolov8", YOLOv8(nc=80, scale=a.scale, verbose=False))):
            model.eval()
            t = time.perf_counter()
            export.export(model, 512, Path(d) / f"{name}.pt2", verbose=False)
            out[f"{name}_export_s"] = time.perf_counter() - t
            prog, _ = export.load_program(Path(d) / f"{name}.pt2")
            for kind, fn in (("eager", model), ("fused", export.deployable(model)), ("pt2", prog)):
                out[f"{name}_{kind}"] = timeit(lambda: fn(x), a.repeats)
    head = out.pop("camtl_pt2")
    extra = {k: v["median_ms"] if isinstance(v, dict) else v for k, v in out.items()}
    return {"what": f"CAMTL{a.scale} .pt2 (torch.export) inference, 1x3x512x512", **head,
            **{k + ("_ms" if not k.endswith("_s") else ""): v for k, v in extra.items()}}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="n")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    r = bench_export(a)
    print(f"{r.pop('what')}: {r.pop('median_ms'):.1f} ms median ({r.pop('min_ms'):.1f} min), peak +{r.pop('peak_mb'):.0f} MB")
    for k, v in r.items():
        print(f"  {k:22s} {v:9.1f}")
