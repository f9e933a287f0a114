"""Compress a trained network for deployment: prune whole channels, or train it for int8 (QAT), or both; then
fine-tune it through train.py's loop on its own data, and print what it gained and what it cost.

    python compress.py --weights runs/camtl/exp/weights/yolov8n-camtl.pt --prune 0.3     # -> runs/camtl/exp-prune30
    python compress.py --weights runs/camtl/exp/weights/yolov8n-camtl.pt --qat           # -> runs/camtl/exp-qat
    python compress.py --weights best.pt --prune 0.5 --qat --epochs 20 --set batch=16 device=0

--prune R removes the fraction R of the channels of every prunable layer outside the seg head (prune.py lists them:
the hidden widths of the bottlenecks, SPPF and Detect's branches, and the backbone's strided convs; widths kept in
multiples of 8), the ones whose BN-folded filters are smallest; --prune-seg narrows the seg head's hidden widths too
(left whole by default: they are about 4% of the FLOPs, and narrowing them cost vessel Dice that fine-tuning did not
bring back). The network is physically smaller: its checkpoint keeps its widths in its config (`widths`), so
evaluate.py, predict.py, export.py (also --int8) and --resume load it as any other. The pruned network before
fine-tuning is saved as {run}/pruned.pt.
--qat fine-tunes with fake quantisation (the key `qat`): every convolution export.py --int8 makes int8 computes with
int8 weights and uint8 inputs in training, so the weights learn to live with the rounding. Then the product is
exported with export.py --int8 (needs the optional package torchao), and so is --weights, as the post-training int8
program to compare with.

Fine-tuning: train.py's loop, with the stage, data and config of --weights (a camtl checkpoint: the network that is
deployed); `init` = the network to fine-tune, --epochs (default 10), lr0 a tenth of the run's, no warmup, and
--set KEY=VALUE for any other key (configs/defaults.py). The run goes beside the run of --weights
({runs}/camtl/{name}-prune30, -qat, -prune30-qat; ./runs/camtl/ for a file outside a run folder). Interrupted, it
continues with `python train.py --stage camtl --resume RUN`; then export and score its product with export.py.

At the end, on --val validation images of the data (as export.py --int8 scores): mAP50, mAP50-95, Dice(full),
ms per image at batch 1 on this machine (fp32: the fused eager model; int8: its compiled program; bench.py times
the compiled fp32 program), parameters, GFLOPs and file size of --weights (fp32; with --qat also its post-training
int8 program) and of the result (fp32; with --qat its int8 program), and compress.json in the run. --weights is not
fine-tuned: the difference includes what --epochs more of training gives any network.
"""
import argparse
import copy
import json
import os
import signal
import sys
from argparse import Namespace
from pathlib import Path

import export
import train
from checkpoints import CheckpointError, save_checkpoint
from config import check_config, check_key, next_run_dir, parse_set
from model import count_params, gflops, load_checkpoint
from prune import WHOLE, prune

FINE_TUNE = {"warmup_epochs": 0.0, "warmup_min_iters": 0, "exist_ok": True}  # the weights are trained already


def fine_tune_config(cfg, a, tag):
    """The fine-tuning run's config: --weights' own (its data, stage, recipe), then FINE_TUNE, then --set. The run
    goes beside the run of --weights ({project}/{stage}/{name}/weights/W), named {name}-{tag}."""
    w = Path(a.weights).resolve()
    in_run = len(w.parents) > 3 and w.parent.name == "weights" and w.parents[2].name == cfg["stage"]
    cfg = {**cfg, **FINE_TUNE, "epochs": a.epochs, "qat": a.qat, "init": str(w),
           "lr0": 0.1 * (cfg["lr0"] or train.LR0[cfg["optimizer"]]),
           "project": str(w.parents[3]) if in_run else "runs",
           "name": f"{w.parents[1].name if in_run else 'exp'}-{tag}"}
    for k, v in parse_set(a.set).items():
        cfg[k] = check_key(k, v, "--set")
    return check_config(cfg)


def score(rows, model, cfg, imgsz, n):
    """rows {name: (callable x -> outputs, checkpoint or program path, fp32 model or None)} -> {name: metrics} on up
    to n validation images of cfg's data, with params, GFLOPs and file size."""
    root = export.data_root(cfg)
    loaders, limits, nms_kw = export.val_images(model, cfg, root, imgsz, n)
    if not loaders:
        print(f"{root} has no validation images: nothing scored")
        return {}
    out = {}
    for name, (run, path, net) in rows.items():
        m = export.measure(run, loaders, model.nc, limits, nms_kw)
        m["mb"] = Path(path).stat().st_size / 2**20
        if net is not None:
            m["params"], m["gflops"] = count_params(net), gflops(net, imgsz)
        out[name] = m
    return out


def table(res):
    cols = [("map50", "mAP50", ".4f"), ("map50_95", "mAP50-95", ".4f"), ("dice_full", "Dice(full)", ".4f"),
            ("ms", "ms/img", ".1f"), ("params", "params", ",d"), ("gflops", "GFLOPs", ".2f"), ("mb", "MB", ".1f")]
    cols = [c for c in cols if any(c[0] in m for m in res.values())]
    w = max(len(k) for k in res) + 2
    lines = [" " * w + "".join(f"{h:>12}" for _, h, _ in cols)]
    for name, m in res.items():
        lines.append(f"{name:<{w}}" + "".join(f"{format(m[k], f):>12}" if k in m else f"{'-':>12}" for k, _, f in cols))
    return "\n".join(lines)


def compress(a):
    try:
        model, cfg = load_checkpoint(a.weights)
    except CheckpointError as e:
        raise SystemExit(f"{e} (compress.py fine-tunes on the run's own data and config, so it takes train.py's "
                         "checkpoints)") from None
    stage, imgsz = cfg["stage"], cfg["imgsz"]
    if stage != "camtl":
        raise SystemExit(f"--weights {a.weights}: a {stage} checkpoint; compress.py compresses the network that is "
                         "deployed, a camtl checkpoint (train.py --stage camtl)")
    tag = "-".join(([f"prune{round(100 * a.prune)}"] if a.prune else []) + (["seg"] if a.prune_seg else [])
                   + (["qat"] if a.qat else []))
    ft = fine_tune_config(cfg, a, tag)
    run_dir = next_run_dir(ft["project"], stage, ft["name"])
    ft["name"] = run_dir.name
    if a.prune:
        whole = () if a.prune_seg else WHOLE
        ft["init"] = str(prune_checkpoint(copy.deepcopy(model), cfg, a.prune, run_dir / "pruned.pt", whole).resolve())
    lr_from = "--set" if "lr0" in parse_set(a.set) else "a tenth of the run's"
    print(f"fine-tuning {ft['init']}{' with fake quantisation' if a.qat else ''}: {ft['epochs']} epochs, lr0 "
          f"{ft['lr0']:.3g} ({lr_from}), warmup {ft['warmup_epochs']:g} epochs, in {run_dir}")
    run_dir, _ = train.train(ft, Namespace(resume=None, device=a.device, set_keys=set()))
    product = run_dir / "weights" / f"yolov8{train.scale_tag(cfg)}-{stage}.pt"
    small, _ = load_checkpoint(product)
    rows = {"fp32": (export.deployable(model), a.weights, model),
            f"{tag} fp32": (export.deployable(small), product, small)}
    if a.qat:
        images = calibration(model, cfg, imgsz, a.calib)
        for name, net, path in (("int8 (post-training)", model, run_dir / "weights" / "post-training.int8.pt2"),
                                (f"{tag} int8", small, product.with_suffix(".int8.pt2"))):
            try:
                export.export_int8(net, imgsz, path, images, verbose=False)
            except ValueError as e:  # no C++ compiler here: the fine-tuned checkpoint is written all the same
                raise SystemExit(f"{e}; the fine-tuned checkpoint is {product}") from None
            rows[name] = (export.load_program(path)[0], path, net)
    res = score(rows, model, cfg, imgsz, a.val)
    print(f"{a.weights} against {product} on the validation images of {cfg['data'] or 'the synthetic set'} "
          f"at {imgsz} px (ms: batch 1 on this machine):\n" + table(res))
    (run_dir / "compress.json").write_text(json.dumps({"weights": str(a.weights), "product": str(product),
                                                       "prune": a.prune, "qat": a.qat, "results": res}, indent=1))
    return res


def prune_checkpoint(net, cfg, ratio, path, whole=WHOLE):
    """net (a loaded checkpoint's network, config cfg) pruned by `ratio` in place (prune.prune; sites under `whole`
    left whole), saved at path as a checkpoint of its stage whose config has the new widths (and those of layers
    pruned before) -> path."""
    before = count_params(net)
    widths = prune(net, ratio, cfg["gn_groups"], whole)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"model": net.state_dict(), "weights": "ema", "stage": cfg["stage"],
                     "config": {**cfg, "widths": {**cfg["widths"], **widths}}}, path)
    print(f"--prune {ratio}: {len(widths)} layers narrowed, {before:,} -> {count_params(net):,} parameters")
    return path


def calibration(model, cfg, imgsz, n):
    root = export.data_root(cfg)
    images, counts = export.calibration_images(model, cfg, root, imgsz, n)
    print(f"int8: calibrating on {sum(counts.values())} training images of {root}")
    return list(images)  # twice: --weights' post-training program, then the result's


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="a checkpoint train.py wrote (yolov8{S}-{stage}.pt, best.pt)")
    ap.add_argument("--prune", type=float, metavar="R", help="remove this fraction of each prunable layer's channels "
                    "(0 < R < 1), then fine-tune")
    ap.add_argument("--prune-seg", action="store_true", help="--prune: narrow the seg head's hidden widths too "
                    "(default: left whole)")
    ap.add_argument("--qat", action="store_true", help="fine-tune with fake quantisation, then export int8 "
                    "(needs torchao)")
    ap.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (default 10)")
    ap.add_argument("--device", help="auto, cpu, cuda, cuda:N or a GPU index N (default: the checkpoint's)")
    ap.add_argument("--calib", type=int, default=64, metavar="N", help="--qat: calibration images (default 64)")
    ap.add_argument("--val", type=int, default=64, metavar="N", help="validation images to score on (default 64)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="fine-tuning config keys")
    a = ap.parse_args(argv)
    if a.prune is not None and not 0 < a.prune < 1:
        raise SystemExit(f"--prune {a.prune}: the fraction of channels to remove, between 0 and 1 (e.g. 0.3)")
    if a.prune_seg and not a.prune:
        raise SystemExit("--prune-seg narrows the seg head as --prune R does the rest: pass --prune R with it")
    if not (a.prune or a.qat):
        raise SystemExit("compress.py: nothing to do; pass --prune R (0 < R < 1), --qat, or both")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("compress.py runs as one process; under torchrun, fine-tune its pruned.pt with train.py: "
                         "torchrun ... train.py --stage camtl --config SOURCE_RUN/config.py --set init=RUN/pruned.pt "
                         "... (docs/predict.md)")
    for flag, v in (("--epochs", a.epochs), ("--calib", a.calib), ("--val", a.val)):
        if v < 1:
            raise SystemExit(f"{flag} {v}: must be >= 1")
    if not Path(a.weights).is_file():
        raise SystemExit(f"--weights {a.weights}: no such file; expected a checkpoint train.py wrote")
    if a.qat:
        try:
            export.torchao_pt2e()
        except ImportError:
            raise SystemExit("--qat exports an int8 program, which needs the optional package torchao: "
                             "pip install torchao") from None
    if sys.stdout.isatty() is False and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    try:
        return compress(a)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, train.on_sigterm)  # a preempted fine-tune stops after its step, resumable
    main()
