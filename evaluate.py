"""
Evaluation for nanoCAMTL: the validation loop (loss terms, vessel Dice/IoU per scale and the vessel scores at each
image's original size, detection P/R/mAP with YOLOv8's per-class table; the metrics themselves are in metrics.py),
and a CLI for the metrics of a checkpoint on a data split. Predictions on your own images: predict.py.

    python evaluate.py --weights runs/camtl/exp/weights/best.pt [--data ROOT] [--split val]
    python evaluate.py --weights best.pt conf=0.5 iou=0.6 imgsz=256 split=test   # YOLOv8-style settings
    python evaluate.py --weights best.pt --save-json     # ... and COCO files of predictions and ground truth
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import data
import plots
from cli import Progress, check_flags, parse_settings, pick_device, settings_arg
from config import next_run_dir
from losses import MultiTaskLoss, TermMeter
from metrics import DetMeter, SegMeter, VesselMeter, confusion_matrix, nms, targets_xyxy
from metrics import detection_metrics  # noqa: F401  (the one-call detection score, public here as in YOLOv8)
from model import DOMAINS, class_names, default_domain, load_checkpoint
from modules import DualBatchNorm2d


# -----------------------------------------------------------------------------
# validation loop (per epoch in train.py, and the CLI below)


def fitness(m, tasks=("det", "seg")):
    """best.pt criterion: 0.1 mAP50 + 0.9 mAP50-95 for detection, Dice(full) for segmentation, mean of those
    present among the run's tasks (fitness_tasks)."""
    parts = []
    if "map50" in m and "det" in tasks:
        parts.append(0.1 * m["map50"] + 0.9 * m["map50_95"])
    if "dice_full" in m and "seg" in tasks:
        parts.append(m["dice_full"])
    return float(np.mean(parts)) if parts else 0.0


def fitness_tasks(cfg):
    """The tasks a run trains: a det-only camtl run (camtl_ratio [k, 0]) does not train the vessels, so their Dice,
    still validated and reported, does not choose its best.pt."""
    return ("det",) if cfg.get("stage") == "camtl" and not any(cfg["camtl_ratio"][1:]) else ("det", "seg")


@torch.no_grad()
def validate(model, loaders, cfg, device, crit=None, plot_dir=None, log=None, gather=None,
             on_batch=None):
    """Loss terms, Dice/IoU per scale and detection P/R/mAP on the val loaders {"det": ..., "seg": ...}, without
    augmentation, each batch in its own domain. The detection head returns its raw maps (BN running statistics)
    so the loss can be computed, and they are decoded here. Loss terms are per-image means over the images of
    the batches that report them (val/det over detection images, ...), computed as in training, the alignment term
    included; L2-SP, a property of the weights, is not a val term. plot_dir: also write the pictures (curves,
    confusion matrix, first batches). log: also print the per-class table and the speed per image, as YOLOv8 does.
    gather (DDP): obj -> [every rank's obj]; each rank validated its share of the images (merge_shards).
    on_batch: called with (batch, preds, seg_out) per batch: the CPU batch, its NMS detections in canvas pixels (a
    detection batch; None for a vessel batch) and the model's seg_out (e.g. coco.Results collects them)."""
    model.eval()
    det_meter, seg_meters, losses = DetMeter(), {k: SegMeter() for k in ("p3", "p4", "p5", "full")}, TermMeter()
    vessels = VesselMeter()  # at each image's original size, inside its FOV mask
    nms_kw = dict(conf=cfg["val_conf"], iou=cfg["val_iou"], max_det=cfg["max_det"], multi_label=True)
    names, nc = class_names(cfg["nc"]), cfg["nc"]
    cm, images, ms = np.zeros((nc + 1, nc + 1), np.int64), {"det": 0, "seg": 0}, dict.fromkeys(SPEED, 0.0)
    per_class_images, need_attn = np.zeros(nc, np.int64), crit is not None and bool(cfg["lambda_align"])
    for task, loader in loaders.items():
        for bi, batch in enumerate(progress(loader, f"val {task}", log)):
            t0 = clock(device)
            dev_batch = data.to_device(batch, device)  # the CPU batch stays for metrics and pictures
            img = dev_batch["img"]
            t1 = clock(device)
            with model.domain(batch["domain"]):  # raw head maps for the loss, every BN in eval
                det_out, seg_out = model(img, tasks=VAL_TASKS[task], need_attn=need_attn, raw=True)
            t2 = clock(device)
            if crit is not None:  # per-image means: each batch weighs by its image count
                losses.update(crit(det_out, seg_out, dev_batch)[1], img.shape[0])
            t3 = clock(device)
            images[task] += img.shape[0]
            if task == "det":
                h, w = img.shape[-2:]
                preds = [p.cpu() for p in nms(model.detect.decode(det_out), **nms_kw)]
                targets = [targets_xyxy(batch, i, h, w) for i in range(len(preds))]
                det_meter.update(preds, targets)
                for t in targets:
                    per_class_images[np.unique(t[:, 0].long().numpy())] += 1
                if plot_dir is not None:
                    cm += confusion_matrix(preds, targets, nc)
                    if bi == 0:
                        plot_det_batch(batch, preds, seg_out, Path(plot_dir), names)
            else:
                score_vessels(seg_meters, vessels, seg_out, batch)
                if plot_dir is not None and bi == 0:
                    plots.plot_seg_batch(batch["img"], batch["mask"], seg_out["full"].float().cpu(), batch["paths"],
                                         Path(plot_dir) / "val_seg_batch0.png")
            if on_batch is not None:
                on_batch(batch, preds if task == "det" else None, seg_out)
            for k, dt in zip(SPEED, (t1 - t0, t2 - t1, t3 - t2, clock(device) - t3)):
                ms[k] += dt * 1e3
    shard = det_meter, seg_meters, losses, cm, images, per_class_images, ms, vessels  # DDP: each rank's share, merged
    shard = merge_shards(gather(shard)) if gather else shard
    det_meter, seg_meters, losses, cm, images, per_class_images, ms, vessels = shard
    m = {f"val/{k}": v for k, v in losses.means().items()}
    if "seg" in loaders:
        for k, meter in seg_meters.items():
            m[f"dice_{k}"], m[f"iou_{k}"] = (float(v) for v in meter.compute())
        m.update({f"vessel_{k}": float(v) for k, v in vessels.compute().items()})
    r = None
    if "det" in loaders:
        r = det_meter.compute(nc)
        m.update({k: float(r[k]) for k in ("precision", "recall", "map50", "map50_95")})
        if plot_dir is not None:
            plots.plot_confusion_matrix(cm, names, Path(plot_dir) / "confusion_matrix.png")
            plot_det_curves(r, Path(plot_dir), names)
    m["fitness"] = fitness(m, fitness_tasks(cfg))
    if log is not None:
        log(per_class_table(m, r, images, per_class_images, names))
        n = max(sum(images.values()), 1)
        log("Speed: " + ", ".join(f"{v / n:.1f} ms {k}" for k, v in ms.items()) + " per image")
    return m


SPEED = ("preprocess", "inference", "loss", "postprocess")  # postprocess: decoding, NMS, matching, Dice counts
VAL_TASKS = {"det": ("det", "seg"), "seg": ("seg",)}  # a val loader's task -> the forward's (det: consistency, overlay)


def clock(device):
    """time.perf_counter() once the device's queued work is done (CUDA runs asynchronously: unsynchronized, a
    phase's time would be its launches, not its kernels)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def score_vessels(seg_meters, vessels, seg_out, batch):
    """A vessel batch into the meters: Dice/IoU of each scale on the canvas, and the original-size scores."""
    for k, meter in seg_meters.items():
        meter.update(seg_out[k].float().cpu(), batch["mask"])
    score_original_size(vessels, seg_out["full"].float().cpu(), batch)


def score_original_size(meter, logits, batch):
    """Each image of a vessel batch into a VesselMeter: its `full` logits (B, 1, S, S) resampled from the canvas onto
    the original pixel grid, against the full-size mask file, inside the FOV mask file when the set has one."""
    for i, path in enumerate(batch["mask_paths"]):
        shape = batch["orig_shape"][i].tolist()
        prob = data.unletterbox_mask(logits[i, 0], batch["ratio"][i], batch["pad"][i], shape).sigmoid()  # (h0, w0)
        fov = batch["fov_paths"][i]
        meter.update(prob.numpy(), data.read_mask(path), data.read_mask(fov) if fov else None)


def merge_shards(shards):
    """validate's state of each rank's share of the images (det meter, seg meters, loss meter, confusion matrix,
    image counts, per-class image counts, ms per phase, vessel meter) -> one, each meter merging itself, so the
    metrics are exactly those of one process over all images (losses up to float summation order)."""
    det, seg, losses, cm, images, per_class, ms, vessels = shards[0]
    det = DetMeter.interleaved([s[0] for s in shards])
    for _, seg2, losses2, cm2, images2, per_class2, ms2, vessels2 in shards[1:]:
        for k, meter in seg.items():
            meter.merge(seg2[k])
        losses.merge(losses2)
        vessels.merge(vessels2)
        cm, per_class = cm + cm2, per_class + per_class2
        images = {k: images[k] + images2[k] for k in images}
        ms = {k: ms[k] + ms2[k] for k in ms}
    return det, seg, losses, cm, images, per_class, ms, vessels


def progress(loader, desc, log):
    """Iterate a val loader; with a log (a final or CLI validation), show the progress line."""
    bar = Progress(len(loader), desc, every=max(len(loader) // 4, 1), enabled=log is not None)
    for i, batch in enumerate(loader):
        yield batch
        bar.update(i + 1, items=batch["img"].shape[0])


def plot_det_batch(batch, preds, seg_out, out, names):
    """val_batch0_labels.png (ground truth) and val_batch0_pred.png (predictions, predicted vessels)."""
    args = (batch["img"], batch["batch_idx"], batch["cls"], batch["bboxes"])
    plots.plot_batch(*args, batch["mask"], batch["paths"], out / "val_batch0_labels.png", names=names)
    vessels = seg_out["full"].float().sigmoid().cpu() if seg_out is not None else None
    plots.plot_batch(*args, vessels, batch["paths"], out / "val_batch0_pred.png", preds=preds, names=names)


def plot_det_curves(r, out, names):
    """PR_curve.png, F1_curve.png, P_curve.png, R_curve.png from DetMeter.compute's curves."""
    present = [names[c] for c in r["classes"]]
    plots.plot_curves(out, r["px"], r["p_curve"], r["r_curve"], r["f1_curve"], r["px"], r["pr_precision"],
                      r["ap50"], present)


VESSEL_SCORES = ("se", "sp", "acc", "f1", "auc")  # VesselMeter's, as m["vessel_se"], ...: original size, in the FOV


def per_class_table(m, r, images, per_class_images, names):
    """The validator's table: images, instances, P, R, mAP50, mAP50-95 for all classes and each; Dice/IoU."""
    head = f"{'Class':>22}{'Images':>11}{'Instances':>11}{'P':>11}{'R':>11}{'mAP50':>11}{'mAP50-95':>11}"
    lines = []
    if r is not None:
        lines += [head, f"{'all':>22}{images['det']:>11}{int(r['n_labels'].sum()):>11}{m['precision']:>11.3g}"
                        f"{m['recall']:>11.3g}{m['map50']:>11.3g}{m['map50_95']:>11.3g}"]
        if len(names) > 1:
            for i, c in enumerate(r["classes"]):
                lines.append(f"{names[c]:>22}{per_class_images[c]:>11}{int(r['n_labels'][i]):>11}{r['p'][i]:>11.3g}"
                             f"{r['r'][i]:>11.3g}{r['ap50'][i]:>11.3g}{r['ap'][i]:>11.3g}")
    if "dice_full" in m:
        scores = "  ".join(f"{k} {m[k]:.3g}" for k in ("dice_full", "iou_full", "dice_p3", "dice_p4", "dice_p5"))
        lines.append(f"{'vessels':>22}{images['seg']:>11}    {scores}")
        scores = "  ".join(f"{k} {m['vessel_' + k]:.4f}" for k in VESSEL_SCORES)
        lines.append(f"{'original size, in FOV':>22}{'':>11}    {scores}")
    return "\n".join(lines)


def format_metrics(m, prefix="val"):
    keys = ("dice_full", "iou_full", "dice_p3", "dice_p4", "dice_p5", "vessel_f1", "vessel_auc", "precision", "recall",
            "map50", "map50_95", "val/total")
    keys = [k for k in keys if k in m]
    return f"{prefix}: " + "  ".join(f"{k} {m[k]:.4f}" for k in keys)


def results_table(m):
    rows = [("Dice / IoU  full", "dice_full", "iou_full"), ("Dice / IoU  p3", "dice_p3", "iou_p3"),
            ("Dice / IoU  p4", "dice_p4", "iou_p4"), ("Dice / IoU  p5", "dice_p5", "iou_p5"),
            ("vessels Se / Sp", "vessel_se", "vessel_sp"), ("vessels Acc / AUC", "vessel_acc", "vessel_auc"),
            ("vessels F1", "vessel_f1", None), ("P / R", "precision", "recall"),
            ("mAP50 / mAP50-95", "map50", "map50_95")]
    lines = [f"  {'metric':18s} {'value':>17s}", "  " + "-" * 36]
    for name, a, b in rows:
        if a in m:
            lines.append(f"  {name:18s} {m[a]:8.4f}" + (f" {m[b]:8.4f}" if b else ""))
    names = [n for n in MultiTaskLoss.NAMES if f"val/{n}" in m]
    if names:  # the terms validation computed (per image of their task)
        lines.append("  val loss  " + "  ".join(f"{n} {m['val/' + n]:.4f}" for n in names))
    return "\n".join(lines)


DOMAIN_STAGE = {"source": "domainshift1", "target": "camtl"}  # the data a domain is scored on: its stage's tasks


# -----------------------------------------------------------------------------
# the CLI: metrics of a checkpoint on a data split


def arg_parser():
    ap = argparse.ArgumentParser(description="nanoCAMTL: metrics of a checkpoint on a data split",
                                 exit_on_error=False)
    settings_arg(ap)
    ap.add_argument("--weights", help="our .pt (run last/best.pt, yolov8{S}-{stage}.pt); required")
    ap.add_argument("--data", help="processed data root (default: the checkpoint's, else the built-in synthetic set)")
    ap.add_argument("--split", default="val", choices=("train", "val", "test"))
    ap.add_argument("--imgsz", type=int, help="letterbox size (default: the checkpoint's training size)")
    ap.add_argument("--batch", type=int, help="default: the checkpoint's")
    ap.add_argument("--workers", type=int, help="data loader workers (default: the checkpoint's)")
    ap.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N or N")
    ap.add_argument("--domain", choices=tuple(DOMAINS), help="a DualBN model's BatchNorm branch and the data scored: "
                    "source (fundus photographs) or target (angiograms); default the checkpoint's (camtl target, "
                    "domainshift1 source)")
    ap.add_argument("--source", help=argparse.SUPPRESS)  # prediction lives in predict.py: one line says so
    ap.add_argument("--save-json", action="store_true", help="also COCO files: the predictions and the split's "
                    "ground truth, in the original images' pixels")
    ap.add_argument("--save-dir", help="where the validation pictures go (default: none) and the COCO files "
                    "(default: runs/val/NAME)")
    ap.add_argument("--name", default="", help="runs/val/NAME (default exp, exp2, ... as YOLOv8)")
    ap.add_argument("--exist-ok", action="store_true", help="reuse runs/val/NAME")
    ap.add_argument("--conf", type=float, help="confidence threshold (default: the checkpoint's val_conf, 0.001)")
    ap.add_argument("--iou", type=float, help="NMS IoU threshold (default: the checkpoint's val_iou, 0.7)")
    return ap


def metrics_cli(a, device):
    """Metrics of a checkpoint on a split of its data (or --data) in one domain (--domain), the COCO files with
    --save-json -> validate's metrics dict."""
    if Path(a.weights).suffix == ".pt2":
        raise SystemExit(f"{a.weights}: an exported program only predicts (predict.py); "
                         "for metrics give the .pt it came from")
    try:
        model, cfg = load_checkpoint(a.weights, device)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    # the synthetic set is looked up with the training parameters (other ones would regenerate it), whatever --imgsz
    if not (a.data or cfg["data"]):
        import synthetic  # the built-in set: generated on first use, so a user's data never needs this file
        cfg["data"] = str(synthetic.ensure_config(cfg))
    root = Path(a.data or cfg["data"])
    if not root.is_dir():
        where = "--data" if a.data else "from the checkpoint config"
        raise SystemExit(f"data root {root} ({where}) is not a directory; pass --data ROOT")
    cfg["imgsz"] = a.imgsz or cfg["imgsz"]
    cfg.update({k: v for k, v in (("val_conf", a.conf), ("val_iou", a.iou)) if v is not None})
    domain = a.domain or default_domain(cfg)
    workers = cfg["workers"] if a.workers is None else a.workers
    loaders = data.val_loaders(root, DOMAIN_STAGE[domain], a.split, cfg["imgsz"], a.batch or cfg["batch"], workers,
                               cfg["nc"])
    dual = any(isinstance(m, DualBatchNorm2d) for m in model.modules())
    print(f"domain: {domain} ({DOMAINS[domain]}): {', '.join(ld.dataset.key for ld in loaders.values())} scored with "
          + (f"the {domain} BatchNorm branch" if dual else "its one BatchNorm branch (trained without DualBN)"))
    if a.save_json:
        import coco  # the COCO files only: validation itself needs none of it
    results = coco.Results(loaders) if a.save_json else None
    m = validate(model, loaders, cfg, device, MultiTaskLoss(cfg), plot_dir=a.save_dir, log=print, on_batch=results)
    print(f"{a.weights} on {root} ({a.split}, {cfg['imgsz']} px):\n{results_table(m)}")
    if results is not None:
        out = Path(a.save_dir or next_run_dir("runs", "val", a.name, a.exist_ok))
        written = results.write(out, a.split, class_names(cfg["nc"]))
        print(f"COCO files -> {out}: {', '.join(p.name for p in written)}")
    return m


def parse_args(argv=None):
    """The flags, then the KEY=VALUE settings over them (cli.parse_settings) -> argparse.Namespace."""
    a = parse_settings(arg_parser(), argv)
    if a.source is not None:
        raise SystemExit(f"--source {a.source}: predictions on your images are predict.py's: python predict.py "
                         f"--weights {a.weights or 'W'} --source {a.source}")
    if a.weights is None:
        raise SystemExit("--weights FILE (or weights=FILE) is required: a .pt checkpoint")
    return a


def main(argv=None):
    """-> validate's metrics dict."""
    a = parse_args(argv)
    device = pick_device(a.device, "evaluate.py")
    check_flags(a)
    return metrics_cli(a, device)


if __name__ == "__main__":
    main()
