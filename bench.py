"""Speed and memory of nanoCAMTL (not a test), and the vessel head's resolution ceiling. Each section runs in its own
subprocess so peak memory does not leak from one into the next.

    python bench.py                      # every section, scale n
    python bench.py --only infer,loss    # some sections
    python bench.py --scale s --repeats 20
    python bench.py --only levers        # YOLOv8 640 px inference: eager, channels_last, torch.compile, the .pt2,
                                         # int8 (needs torchao), Ultralytics' own YOLOv8 (if installed), side by side
    python bench.py --only steplevers --compile   # YOLOv8 / CAMTL train step levers, with torch.compile (minutes)
    python bench.py --only compress              # compiled fp32 / int8 programs, pruned 0 to 0.6, at 256 and 512
    python bench.py --only ceiling --data ROOT    # the best vessel F1 a head of each seg_stride allows, on ROOT's
                                                  # fundus training masks (e.g. DRIVE's), at 576 px

Times are medians over --repeats after warm-up; memory is the process's peak RSS growth during the timed
part (VmHWM), which on CPU is what a run actually costs.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb():
    """This process image's peak RSS (VmHWM). Not ru_maxrss: that survives exec, so a child started from a big
    parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


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


def alternate(fns, rounds, warmup=2):
    """Each fn once per round, round-robin, so a drifting machine hits all alike -> {name: [ms per round]}."""
    t = {k: [] for k in fns}
    for _ in range(warmup + rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            t[k].append(1e3 * (time.perf_counter() - t0))
    return {k: v[warmup:] for k, v in t.items()}


def ratio(t, k, base):
    """Median of per-round ratios t[k] / t[base]."""
    return statistics.median(x / y for x, y in zip(t[k], t[base]))


def random_targets(B, n, nc=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(B * n, 2, generator=g) * 0.8 + 0.1
    wh = torch.rand(B * n, 2, generator=g) * 0.15 + 0.02
    return {"batch_idx": torch.arange(B).repeat_interleave(n).float(),
            "cls": torch.randint(0, nc, (B * n, 1), generator=g).float(),
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
    return {"what": "DetectionLoss + backward, 16 images x 50 boxes, 640 px (8400 anchors), nc 80",
            **timeit(step, a.repeats)}


def bench_loader(a):
    """(d) training loader throughput, 512 px, augmentation on (image + mask), 1 and 2 workers: images/s as the
    median over whole epochs after a warm-up epoch. Data: a 512 px synthetic set made once in data/synthetic512."""
    import data
    import synthetic
    root = synthetic.ensure_synthetic(synthetic.DEFAULT_ROOT.with_name("synthetic512"), n=64, imgsz=512)
    out, epoch = {}, 0
    for w in (1, 2):
        loader = data.build_loader(root, "angiography_segmentation", "train", 512, 8, augment=True, workers=w, seed=0,
                                   persistent=True)
        rates = []
        for r in range(min(a.repeats, 3) + 1):
            t, n = time.perf_counter(), 0
            while n < (240 if r else 1):
                loader.sampler.set_epoch(epoch)
                epoch += 1
                n += sum(len(b["img"]) for b in loader)
            if r:  # r == 0 is the warm-up (worker start-up, page cache)
                rates.append(n / (time.perf_counter() - t))
        out[f"img_s_{w}_workers"] = statistics.median(rates)
    ms = 1e3 / out["img_s_2_workers"]
    return {"what": "loader, angiography_segmentation 512 px batch 8, augment on", "median_ms": ms, "min_ms": ms,
            "peak_mb": 0.0, **out}


def bench_iter(a):
    """(e) one CA-MTL camtl-stage iteration on the synthetic data (256 px, batch 8, ratio [2, 1], DualBN, all loss
    terms) split into data, forward, loss, backward, optimizer + EMA; medians over iterations after warm-up."""
    import train
    from config import load_config
    from losses import MultiTaskLoss
    cfg = load_config("camtl", None, [f"scale={a.scale}", "workers=2"])
    _, loader, _ = train.build_data(cfg, 0, 1)
    model, _ = train.build_model(cfg, "camtl", lambda *x: None, verbose=False)
    model.train()
    anchor = {k: p.detach().clone() for k, p in model.named_parameters() if k.startswith(("backbone.", "neck."))}
    crit = MultiTaskLoss(cfg, anchor)
    opt, _, _ = train.build_optimizer(model, cfg, 1)
    ema = train.ModelEMA(model)
    phases = {k: [] for k in ("data", "forward", "loss", "backward", "optim_ema")}
    loader.set_epoch(0)
    it = iter(loader)
    for i in range(a.repeats + 3):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        tasks, need_attn = train.tasks_for(batch, cfg)
        with model.domain(batch["domain"]):
            det_out, seg_out = model(batch["img"], tasks=tasks, need_attn=need_attn)
        t2 = time.perf_counter()
        loss, _ = crit(det_out, seg_out, batch, model)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        crit.add_l2sp_grad_(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
        t5 = time.perf_counter()
        if i >= 3:
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                phases[k].append(1e3 * dt)
    med = {f"{k}_ms": statistics.median(v) for k, v in phases.items()}
    total = sum(med.values())
    return {"what": f"CAMTL{a.scale} camtl iteration (det:seg 2:1), 256 px, batch 8; split in ms", "median_ms": total,
            "min_ms": total, "peak_mb": 0.0, **med}


def bench_export(a):
    """(f) inference, batch 1: CAMTL and YOLOv8 at 512 px eager, eager fused (export.deployable), the portable .pt2
    and the compiled one (AOTInductor, export.py's default), with the time each export takes; then YOLOv8 at 640 px,
    fused eager against the compiled .pt2 alternating in one process (median of per-round ratios). Headline:
    CAMTL's compiled .pt2 at 512."""
    import tempfile
    from pathlib import Path

    import export
    from model import CAMTL, YOLOv8
    out = {}
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        x = torch.rand(1, 3, 512, 512)
        for name, model in (("camtl", CAMTL({"scale": a.scale, "dual_bn": True}, verbose=False)),
                            ("yolov8", YOLOv8(nc=1, scale=a.scale, verbose=False))):
            model.eval()
            runs = {"eager": model, "fused": export.deployable(model)}
            for kind, compiled in (("pt2", False), ("compiled", True)):
                t = time.perf_counter()
                export.export(model, 512, Path(d) / f"{name}_{kind}.pt2", verbose=False, compiled=compiled)
                out[f"{name}_{kind}_export_s"] = time.perf_counter() - t
                runs[kind] = export.load_program(Path(d) / f"{name}_{kind}.pt2")[0]
            for kind, fn in runs.items():
                out[f"{name}_{kind}_ms"] = timeit(lambda: fn(x), a.repeats)["median_ms"]
        model = YOLOv8(nc=80, scale=a.scale, verbose=False).eval()
        export.export(model, 640, Path(d) / "y640.pt2", verbose=False, compiled=True)
        fns = {"fused": export.deployable(model), "compiled": export.load_program(Path(d) / "y640.pt2")[0]}
        x = torch.rand(1, 3, 640, 640)
        times = alternate({k: (lambda fn=fn: fn(x)) for k, fn in fns.items()}, a.repeats)
        out.update({f"yolov8_640_{k}_ms": statistics.median(v) for k, v in times.items()})
        out["yolov8_640_compiled_vs_fused"] = ratio(times, "compiled", "fused")
    out["camtl_vs_yolov8_compiled"] = out["camtl_compiled_ms"] / out["yolov8_compiled_ms"]
    return {"what": f"CAMTL{a.scale} compiled .pt2 inference, 1x3x512x512", "median_ms": out["camtl_compiled_ms"],
            "min_ms": out["camtl_compiled_ms"], "peak_mb": 0.0, **out}


def camtl_step(kind, size, batch=4, scale="n", camtl_stage=False, channels_last=False, compiled=False, cfg=None):
    """One train step (forward + simple det/seg loss + backward) of a fresh CAMTL or YOLOv8, as a closure.
    camtl_stage: CAMTL as the camtl stage trains it (DualBN in the target domain, det+seg with CTAM's attention
    maps, whose squares stand in for the alignment term so they get a gradient too). channels_last: model and
    input in that memory format; compiled: Module.compile(dynamic=False), so the first call compiles. cfg: more
    CAMTL keys."""
    import torch.nn.functional as F
    from losses import DetectionLoss
    from model import CAMTL, YOLOv8, stage_setup
    torch.manual_seed(0)
    if kind == "camtl":
        model = CAMTL({"scale": scale, "nc": 1, **({"dual_bn": True} if camtl_stage else {}), **(cfg or {})},
                      verbose=False)
        if camtl_stage:
            stage_setup(model, "camtl").set_domain("target")
    else:
        model = YOLOv8(1, scale, verbose=False)
    model.train()
    crit, x, t = DetectionLoss(nc=1), torch.rand(batch, 3, size, size), random_targets(batch, 3)
    mask = (torch.rand(batch, 1, size, size) > 0.9).float()
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if compiled:
        model.compile(dynamic=False)
    kw = {"tasks": ("det", "seg"), "need_attn": True} if camtl_stage else {}

    def step():
        if kind == "camtl":
            det, seg = model(x, **kw)
            loss = crit(det, t)[0] + F.binary_cross_entropy_with_logits(seg["full"], mask) * batch
            if camtl_stage:
                loss = loss + sum(m.square().sum() for m in seg["attn"])
        else:
            loss = crit(model(x), t)[0]
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def bench_step_memory(a):
    """Peak RSS growth of one model's train step, alone in this process (called by bench_camtl). a.model: yolov8,
    camtl, or camtl-sK (CAMTL with seg_stride K)."""
    kind, _, k = a.model.partition("-s")
    step = camtl_step(kind, a.size, scale=a.scale, cfg={"seg_stride": int(k)} if k else None)
    base = rss_mb()
    for _ in range(2):
        step()
    return {"what": a.model, "median_ms": 0.0, "min_ms": 0.0, "peak_mb": peak_mb() - base}


def bench_camtl(a):
    """(g) CAMTL vs YOLOv8 train step, batch 4, at 320/512/640 px: time ratio as the median of per-round ratios with
    the two models alternating in one process (cancels load drift); peak memory of each in a process of its own
    (at 512 also CAMTL with seg_stride 4 and 2)."""
    out = {}
    for size in (320, 512, 640):
        steps = {k: camtl_step(k, size, scale=a.scale) for k in ("yolov8", "camtl")}
        t = alternate(steps, min(a.repeats, 5))
        out[f"yolov8_{size}_ms"], out[f"camtl_{size}_ms"] = (statistics.median(t[k]) for k in ("yolov8", "camtl"))
        out[f"time_x_{size}"] = ratio(t, "camtl", "yolov8")
        models = list(steps) + (["camtl-s4", "camtl-s2"] if size == 512 else [])  # the fine vessel path at 512
        mem = {k: child("step_memory", a, "--model", k, "--size", str(size))["peak_mb"] for k in models}
        out.update({f"{k.replace('-', '_')}_{size}_mb": v for k, v in mem.items()})
        out[f"mem_x_{size}"] = mem["camtl"] / max(mem["yolov8"], 1e-9)
    return {"what": f"CAMTL{a.scale} / YOLOv8{a.scale} train step, batch 4 (320/512/640 px)",
            "median_ms": out["camtl_512_ms"], "min_ms": out["camtl_512_ms"], "peak_mb": out["camtl_512_mb"], **out}


def int8_program(export, model, size, path):
    """export.py's int8 program (export_int8: torchao's PT2E quantiser, then AOTInductor) as a callable, or why not
    as a string (no torchao, or no compiler). Calibrated on random images: the speed does not depend on them."""
    try:
        export.export_int8(model, size, path, [torch.rand(1, 3, size, size) for _ in range(4)], verbose=False)
    except ImportError:
        return "n/a (needs torchao)"
    except ValueError as e:  # it cannot compile here: say so, the other levers still count
        return f"failed ({e})"
    return export.load_program(path)[0]


def reference_yolov8(scale, tmp):
    """Ultralytics' own fused YOLOv8 (random weights from its yaml, eager), or None when it is not installed. It is
    never a dependency: imported here only. Its settings file goes to tmp and its import-time online check is off,
    so it writes nothing outside tmp and touches no network."""
    os.environ.update(YOLO_CONFIG_DIR=str(tmp), YOLO_OFFLINE="1", YOLO_VERBOSE="False")
    try:
        from ultralytics.nn.tasks import DetectionModel
    except ImportError:
        return None
    return DetectionModel(f"yolov8{scale}.yaml", nc=80, verbose=False).fuse(verbose=False).eval()


def bench_levers(a):
    """(h) YOLOv8 inference levers, 640 px, batch 1, one random input: fused eager (export.deployable), the same in
    channels_last, torch.compile of it (first call apart), the compiled .pt2 (AOTInductor, export.py's deployable;
    export time apart), int8 if export.py offers it, and Ultralytics' fused YOLOv8 eager if installed. All alternate
    in one process; ratios are medians of per-round ratios against our eager and the reference. Headline: the .pt2."""
    import tempfile
    from pathlib import Path

    import export
    from model import YOLOv8
    S, out, fns = a.size or 640, {}, {}
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        model = YOLOv8(nc=80, scale=a.scale, verbose=False).eval()
        x = torch.rand(1, 3, S, S)
        xcl = x.contiguous(memory_format=torch.channels_last)
        fused = export.deployable(model)
        fns["eager"] = lambda: fused(x)
        cl = export.deployable(model).to(memory_format=torch.channels_last)  # a copy: eager stays contiguous
        fns["channels_last"] = lambda: cl(xcl)
        comp = torch.compile(fused)
        t = time.perf_counter()
        comp(x)
        out["compiled_first_call_s"] = time.perf_counter() - t
        fns["compiled"] = lambda: comp(x)
        t = time.perf_counter()
        export.export(model, S, Path(d) / "y.pt2", verbose=False, compiled=True)
        out["deployable_export_s"] = time.perf_counter() - t
        prog, meta = export.load_program(Path(d) / "y.pt2")
        if not meta.get("compiled"):  # export.py fell back to the portable program: say so, it is eager speed
            out["deployable_kind"] = "portable (AOTInductor failed)"
        fns["deployable"] = lambda: prog(x)
        t = time.perf_counter()
        q = int8_program(export, model, S, Path(d) / "y_int8.pt2")
        if isinstance(q, str):
            out["int8"] = q
        else:
            out["int8_export_s"] = time.perf_counter() - t
            fns["int8"] = lambda: q(x)
        ref = reference_yolov8(a.scale, d)
        if ref is None:
            out["reference"] = "n/a"
        else:
            fns["reference"] = lambda: ref(x)  # outputs not compared: different random weights
        times = alternate(fns, a.repeats)
    out.update({f"{k}_ms": statistics.median(v) for k, v in times.items()})
    out.update({f"{k}_vs_eager": ratio(times, k, "eager") for k in times if k not in ("eager", "reference")})
    if ref is not None:
        out.update({f"{k}_vs_reference": ratio(times, k, "reference") for k in times if k != "reference"})
    return {"what": f"YOLOv8{a.scale} inference levers, 1x3x{S}x{S}; headline the .pt2", "median_ms":
            out["deployable_ms"], "min_ms": min(times["deployable"]), "peak_mb": 0.0, **out}


def bench_steplevers(a):
    """(i) train step (forward + loss + backward), 512 px, batch 4: YOLOv8 and CAMTL in the camtl stage set-up
    (camtl_step), eager and channels_last, and with --compile Module.compile(dynamic=False) in channels_last (first
    call = compile, minutes per graph on a CPU, reported apart); also CAMTL in channels_last with one change to its
    defaults each: attn_heads=4 attn_tokens=256 (the ablation's full model), attn_query_stride=8 (every query kept),
    attn_query_stride=32, xtam=True, seg_stride=4 and 2 (the fine vessel path). All alternate in one process; ratios
    are medians of per-round ratios. Headline: CAMTL eager."""
    S, out = a.size or 512, {}
    levers = {"eager": {}, "channels_last": {"channels_last": True}}
    if a.compile:
        levers["compiled"] = {"channels_last": True, "compiled": True}
    steps = {f"{m}_{k}": camtl_step(m, S, scale=a.scale, camtl_stage=True, **kw)
             for k, kw in levers.items() for m in ("yolov8", "camtl")}
    # the default attention (2 heads, 128 tokens, P3's queries pooled 2x2) against the ablation's full model (4 heads,
    # 256 tokens), every query kept, P4's queries pooled too, and the two-way exchange
    variants = {"h4t256": {"attn_heads": 4, "attn_tokens": 256}, "all_queries": {"attn_query_stride": 8},
                "qs32": {"attn_query_stride": 32}, "xtam": {"xtam": True}, "seg_stride4": {"seg_stride": 4},
                "seg_stride2": {"seg_stride": 2}}
    for v, cfg in variants.items():
        steps[f"camtl_channels_last_{v}"] = camtl_step("camtl", S, scale=a.scale, camtl_stage=True,
                                                       channels_last=True, cfg=cfg)
    for k, step in steps.items():
        if k.endswith("_compiled"):
            t = time.perf_counter()
            step()
            out[f"{k}_first_call_s"] = time.perf_counter() - t
    times = alternate(steps, a.repeats)
    out.update({f"{k}_ms": statistics.median(v) for k, v in times.items()})
    for k in levers:
        out[f"camtl_vs_yolov8_{k}"] = ratio(times, f"camtl_{k}", f"yolov8_{k}")
    for v in variants:
        out[f"camtl_{v}_vs_yolov8_channels_last"] = ratio(times, f"camtl_channels_last_{v}", "yolov8_channels_last")
    if a.compile:
        out["camtl_compiled_vs_yolov8_eager"] = ratio(times, "camtl_compiled", "yolov8_eager")
    return {"what": f"YOLOv8{a.scale} / CAMTL{a.scale} (camtl stage) train step levers, 4x3x{S}x{S}; headline CAMTL "
            "eager", "median_ms": out["camtl_eager_ms"], "min_ms": min(times["camtl_eager"]), "peak_mb": 0.0, **out}


def bench_compress(a):
    """(k) What compress.py buys in speed, batch 1, CAMTL at 256 px (the demo's training size) and 512: the compiled
    fp32 .pt2 (export.py's default) and the int8 one (export.py --int8), each for the network as built and pruned
    by 0.3, 0.5 and 0.6 (compress.py --prune: the same widths whatever the weights, so random weights time it; QAT's
    program is the int8 one). Per size all alternate in one process; ratios are medians of per-round ratios against
    the unpruned compiled fp32. Also parameters, GFLOPs and the programs' sizes. Headline: 0.5 int8 at 256."""
    import tempfile
    from pathlib import Path

    import export
    from model import CAMTL, count_params, gflops
    from prune import prune
    out = {}
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        for S in ((a.size,) if a.size else (256, 512)):
            fns, x = {}, torch.rand(1, 3, S, S)
            for r in (0, 0.3, 0.5, 0.6):
                torch.manual_seed(0)
                model = CAMTL({"scale": a.scale, "dual_bn": True}, verbose=False).eval()
                if r:
                    prune(model, r)
                tag = f"p{round(100 * r)}"
                out[f"{tag}_params"], out[f"{tag}_gflops_{S}"] = count_params(model), gflops(model, S)
                path = Path(d) / f"{tag}_{S}.pt2"
                export.export(model, S, path, verbose=False, compiled=True)
                out[f"{tag}_fp32_{S}_mb"] = path.stat().st_size / 2**20
                prog = export.load_program(path)[0]
                fns[f"{tag}_fp32"] = lambda prog=prog: prog(x)
                q = int8_program(export, model, S, Path(d) / f"{tag}_{S}_int8.pt2")
                if isinstance(q, str):
                    out[f"{tag}_int8"] = q
                    continue
                out[f"{tag}_int8_{S}_mb"] = (Path(d) / f"{tag}_{S}_int8.pt2").stat().st_size / 2**20
                fns[f"{tag}_int8"] = lambda q=q: q(x)
            times = alternate(fns, a.repeats)
            out.update({f"{k}_{S}_ms": statistics.median(v) for k, v in times.items()})
            out.update({f"{k}_{S}_speedup": 1 / ratio(times, k, "p0_fp32") for k in times if k != "p0_fp32"})
    S = a.size or 256
    head = f"p50_int8_{S}_ms" if f"p50_int8_{S}_ms" in out else f"p50_fp32_{S}_ms"
    return {"what": f"CAMTL{a.scale} compiled programs, pruned 0/0.3/0.5/0.6 x fp32/int8, 1x3xSxS; headline {head}",
            "median_ms": out[head], "min_ms": out[head], "peak_mb": 0.0, **out}


def bench_ceiling(a):
    """(j) What the seg head's output stride allows: for each fundus mask of --data's train and val splits,
    letterboxed to --size (576), a free logit map at stride 8, 4 and 2 fitted to it (Adam, 1000 steps, BCE + Dice
    through the head's bilinear upsampling), thresholded at 0 and scored as evaluate.py scores vessels, at the
    original size inside the FOV. Its F1 is the best any network can reach through a head of that seg_stride."""
    import data
    import evaluate
    from losses import dice_bce
    from metrics import VesselMeter
    from modules import upsample_bilinear
    if not a.data:
        sys.exit("--only ceiling needs --data ROOT, a data root with fundus vessel masks (e.g. convert.py drive)")
    S, strides, t0 = a.size or 576, (8, 4, 2), time.perf_counter()
    meters = {s: VesselMeter() for s in strides}
    key = "retinography_segmentation"
    items = [ds[i] for split in ("train", "val") for ds in [data.TaskDataset(a.data, key, split, S, verbose=False)]
             for i in range(len(ds))]
    for item in items:
        batch = data.collate([item])
        for s in strides:
            z = torch.zeros(1, 1, S // s, S // s, requires_grad=True)  # (1, 1, S/s, S/s) the free logit map
            opt = torch.optim.Adam([z], lr=0.5)
            for _ in range(1000):  # 300 steps leave it short (stride 4: F1 0.888 against 0.907)
                loss = dice_bce(upsample_bilinear(z, (S, S)), batch["mask"]).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            evaluate.score_original_size(meters[s], upsample_bilinear(z.detach(), (S, S)), batch)
    out = {f"f1_stride{s}": m.compute()["f1"] for s, m in meters.items()}
    ms = (time.perf_counter() - t0) * 1e3
    return {"what": f"vessel F1 ceiling of each seg_stride, {len(items)} masks of {a.data} at {S} px",
            "median_ms": ms, "min_ms": ms, "peak_mb": 0.0, "images": len(items), **out}


def child(name, a, *extra):
    opt = [*(["--size", str(a.size)] if a.size else []), *(["--compile"] if a.compile else []),
           *(["--data", a.data] if a.data else [])]  # extra wins
    out = subprocess.run([sys.executable, __file__, "--child", name, "--scale", a.scale, "--repeats", str(a.repeats),
                          "--threads", str(a.threads), *opt, *extra], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


SECTIONS = {"infer": bench_infer, "train": bench_train, "loss": bench_loss, "loader": bench_loader, "iter": bench_iter,
            "export": bench_export, "camtl": bench_camtl, "levers": bench_levers, "steplevers": bench_steplevers,
            "compress": bench_compress, "ceiling": bench_ceiling}
CHILD_ONLY = {"step_memory": bench_step_memory}  # sections other sections run in a child process, not --only


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(k for k in SECTIONS if k != "ceiling"),
                   help=f"comma list of {list(SECTIONS)} (ceiling: only when named, with --data)")
    p.add_argument("--data", help="ceiling: a data root with fundus vessel masks")
    p.add_argument("--scale", default="n")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)  # levers/steplevers at this size: smoke tests
    p.add_argument("--compile", action="store_true", help="steplevers: also torch.compile (minutes per graph)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.child:  # run one section in this process and hand back JSON
        print(json.dumps({**SECTIONS, **CHILD_ONLY}[a.child](a)))
        return
    print(f"torch {torch.__version__}, {a.threads} threads, {os.cpu_count()} cpus, scale {a.scale}, "
          f"median of {a.repeats}")
    for name in a.only.split(","):
        if name not in SECTIONS:
            sys.exit(f"--only: unknown section {name!r}; choose from {list(SECTIONS)}")
        try:
            r = child(name, a)
        except RuntimeError as e:
            print(e)
            continue
        extra = "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                          if k not in ("what", "median_ms", "min_ms", "peak_mb"))
        print(f"{name:8s} {r['median_ms']:9.1f} ms median ({r['min_ms']:.1f} min)  peak +{r['peak_mb']:.0f} MB  "
              f"{r['what']}  {extra}")


if __name__ == "__main__":
    main()
