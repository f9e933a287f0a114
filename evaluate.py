"""
Evaluation for nanoCAMTL: the validation loop (loss terms, vessel Dice/IoU per scale, detection P/R/mAP with
YOLOv8's per-class table; the metrics themselves are in metrics.py), and a CLI for the metrics of a checkpoint and
for predictions on the user's own images.

    python evaluate.py --weights runs/camtl/exp/weights/best.pt [--data ROOT] [--split val]   # metrics
    python evaluate.py --weights best.pt conf=0.5 iou=0.6 imgsz=256 split=test                # ... YOLOv8-style
    python evaluate.py --weights best.pt --save-json          # ... and COCO files of predictions and ground truth
    python evaluate.py --weights best.pt --source my_images/ --save-dir runs/predict          # predict a folder
    python evaluate.py --weights best.pt --source fundus/ --domain source     # ... with the fundus BatchNorm branch
    python evaluate.py --weights best.pt2 --source my_images/                 # ... with an export.py program
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import coco
import data
import export
import plots
import synthetic
from config import check_device, did_you_mean, next_run_dir
from losses import MultiTaskLoss, TermMeter
from metrics import DetMeter, SegMeter, VesselMeter, confusion_matrix, detection_metrics, nms, targets_xyxy  # noqa: F401
# (detection_metrics: the one-call score of a list of predictions, kept importable from here as from metrics)
from model import load_checkpoint, load_weights
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


def class_names(nc):
    """Detection class names: the one class of the angiography sets is a stenosis."""
    return ["stenosis"] if nc == 1 else [f"class{i}" for i in range(nc)]


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
                for k, meter in seg_meters.items():
                    meter.update(seg_out[k].float().cpu(), batch["mask"])
                score_original_size(vessels, seg_out["full"].float().cpu(), batch)
                if plot_dir is not None and bi == 0:
                    plots.plot_seg_batch(batch["img"], batch["mask"], seg_out["full"].float().cpu(), batch["paths"],
                                         Path(plot_dir) / "val_seg_batch0.png")
            if on_batch is not None:
                on_batch(batch, preds if task == "det" else None, seg_out)
            for k, dt in zip(SPEED, (t1 - t0, t2 - t1, t3 - t2, clock(device) - t3)):
                ms[k] += dt * 1e3
    shard = det_meter, seg_meters, losses, cm, images, per_class_images, ms, vessels  # DDP: each rank's share, merged
    det_meter, seg_meters, losses, cm, images, per_class_images, ms, vessels = (merge_shards(gather(shard)) if gather
                                                                                else shard)
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


def score_original_size(meter, logits, batch):
    """Each image of a vessel batch into a VesselMeter: its `full` logits (B, 1, S, S) resampled from the canvas onto
    the original pixel grid, against the full-size mask file, inside the FOV mask file when the set has one."""
    for i, path in enumerate(batch["mask_paths"]):
        shape = batch["orig_shape"][i].tolist()
        prob = data.unletterbox_mask(logits[i, 0], batch["ratio"][i], batch["pad"][i], shape).sigmoid()  # (h0, w0)
        fov = batch["fov_paths"][i]
        meter.update(prob.numpy(), data.read_mask(path), data.read_mask(fov) if fov else None)


def merge_shards(shards):
    """validate's state (det meter, seg meters, loss meter, confusion matrix, image counts, per-class image counts,
    ms per phase) of each rank's share of the images -> one: counts and sums added, per-image match statistics
    interleaved back into image order (rank r held images r, r + W, ...), so the metrics are exactly those of one
    process over all images (losses up to float summation order)."""
    det, seg, losses, cm, images, per_class, ms, vessels = shards[0]
    W = len(shards)
    for a in ("tp", "conf", "pred_cls", "target_cls"):
        lists = [getattr(s[0], a) for s in shards]
        setattr(det, a, [lists[i % W][i // W] for i in range(sum(map(len, lists)))])
    for other in shards[1:]:
        _, seg2, losses2, cm2, images2, per_class2, ms2, vessels2 = other
        vessels.merge(vessels2)
        for k, meter in seg.items():
            meter.inter, meter.pred, meter.true = (meter.inter + seg2[k].inter, meter.pred + seg2[k].pred,
                                                   meter.true + seg2[k].true)
        for k in losses2.sum:
            losses.sum[k], losses.n[k] = losses.sum.get(k, 0.0) + losses2.sum[k], losses.n.get(k, 0) + losses2.n[k]
        cm, per_class = cm + cm2, per_class + per_class2
        images = {k: images[k] + images2[k] for k in images}
        ms = {k: ms[k] + ms2[k] for k in ms}
    return det, seg, losses, cm, images, per_class, ms, vessels


def progress(loader, desc, log):
    """Iterate a val loader; with a log (a final or CLI validation), show the progress line."""
    bar = plots.Progress(len(loader), desc, every=max(len(loader) // 4, 1), enabled=log is not None)
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



# -----------------------------------------------------------------------------
# prediction on the user's own images

# the two domains of a DualBN model: its BatchNorm branches, and the data each is scored on (the tasks of the stage
# trained in it)
DOMAINS = {"source": "fundus photographs", "target": "angiograms"}
DOMAIN_STAGE = {"source": "domainshift1", "target": "camtl"}


def default_domain(cfg):
    """The domain a checkpoint was trained for last: camtl target, domainshift1 source."""
    return "source" if (cfg or {}).get("stage") == "domainshift1" else "target"


def branch_line(weights, dual, domain, asked):
    """The one log line that says which BatchNorm branch predicts."""
    if not dual:
        pre = f"--domain {asked}" if asked else "domain"
        return (f"{pre}: {weights} has one BatchNorm branch (trained without DualBN); it predicts every image, "
                "whatever its domain")
    other = "target" if domain == "source" else "source"
    return (f"domain: the {domain} BatchNorm branch of {weights} predicts, for {DOMAINS[domain]} "
            f"(--domain {other} for {DOMAINS[other]})")


def load_predictor(weights, device="cpu", imgsz=None, domain=None):
    """Our .pt checkpoint, an Ultralytics yolov8*.pt or an export.py .pt2 -> (run, imgsz, class names).
    run(x (B, 3, S, S)) -> (detections (B, 4+nc, A), vessel logits (B, 1, S, S)) for CA-MTL, (detections,) for a
    plain detector: the eager model goes through the same fused wrapper that export.py traces, so both predict
    alike. domain: the DualBN branch that predicts (default: the checkpoint's, camtl target, domainshift1 source);
    a .pt2 holds the target branch only. Prints the branch_line. ValueError (a CheckpointError for a .pt) naming
    the file when it is not one, or when a .pt2 cannot do what is asked."""
    if Path(weights).suffix == ".pt2":
        run, meta = export.load_program(weights, device)
        if imgsz and imgsz != meta["imgsz"]:
            raise ValueError(f"--imgsz {imgsz}: {weights} was exported for {meta['imgsz']} px; "
                             f"re-export with --imgsz {imgsz}")
        dual = bool(meta["config"].get("dual_bn"))
        if dual and domain == "source":
            raise ValueError(f"--domain source: {weights} is an exported program, and export.py exports the target "
                             "(angiography) branch only; predict fundus photographs with the .pt it came from")
        print(branch_line(weights, dual, "target", domain))
        return run, meta["imgsz"], class_names(meta["nc"])
    model, cfg = load_weights(weights)
    dual = any(isinstance(m, DualBatchNorm2d) for m in model.modules())
    domain_used = domain or default_domain(cfg)
    print(branch_line(weights, dual, domain_used, domain))
    return export.deployable(model, domain_used).to(device), imgsz or (cfg or {}).get("imgsz", 640), \
        class_names(model.nc)


@torch.no_grad()
def predict_image(run, img, imgsz, conf=0.25, iou=0.7, device="cpu"):
    """One image (h0, w0, 3) float in [0, 1] -> (det (n, 6) x1, y1, x2, y2, conf, cls in the image's own pixels,
    vessel logits (h0, w0) or None). Letterboxed exactly as in training; boxes and mask mapped back through it."""
    x, _, _, ratio, pad = data.transform(img, None, np.zeros((0, 5), np.float32), imgsz)
    out = run(x[None].to(device))
    det = nms(out[0].float(), conf, iou)[0].cpu()
    det[:, :4] = data.unletterbox_boxes(det[:, :4], ratio, pad, img.shape[:2])
    det = det[(det[:, 2] > det[:, 0]) & (det[:, 3] > det[:, 1])]  # a box lying wholly in the padding clips to nothing
    logits = data.unletterbox_mask(out[1][0, 0].float().cpu(), ratio, pad, img.shape[:2]) if len(out) > 1 else None
    return det, logits


def save_prediction(img, det, logits, save_dir, stem, names=None):
    """{stem}.png picture (plots.plot_prediction), labels/{stem}.txt (cls xc yc w h conf, normalised to the image;
    empty = nothing found) and, for CA-MTL, masks/{stem}.png (vessels 255) at the image's own size."""
    from PIL import Image
    h0, w0 = img.shape[:2]
    (save_dir / "labels").mkdir(parents=True, exist_ok=True)
    lines = [f"{int(c)} {(x1 + x2) / 2 / w0:.6f} {(y1 + y2) / 2 / h0:.6f} {(x2 - x1) / w0:.6f} {(y2 - y1) / h0:.6f} "
             f"{p:.4f}\n" for x1, y1, x2, y2, p, c in det.tolist()]
    (save_dir / "labels" / f"{stem}.txt").write_text("".join(lines))
    prob = logits.sigmoid() if logits is not None else None
    if prob is not None:
        (save_dir / "masks").mkdir(exist_ok=True)
        Image.fromarray(((prob > 0.5).numpy() * 255).astype(np.uint8)).save(save_dir / "masks" / f"{stem}.png")
    plots.plot_prediction(torch.from_numpy(img).permute(2, 0, 1), det, prob, save_dir / f"{stem}.png", names)


def predict_folder(run, source, save_dir, imgsz, conf=0.25, iou=0.7, device="cpu", names=None, save_json=False):
    """Predict every image in a folder (or one file). A file data.read_image cannot read is named and skipped,
    never fatal. save_json: also predictions.json (boxes), vessels_predictions.json (CA-MTL) and images.json (the
    ids: position among the predicted files) as COCO results (coco.py). Returns {"saved": [stems], "skipped":
    [paths]}."""
    source, save_dir = Path(source), Path(save_dir)
    if not source.exists():
        raise SystemExit(f"--source {source}: no such file or folder")
    files = [source]
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    save_dir.mkdir(parents=True, exist_ok=True)
    saved, skipped, images, results = [], [], [], {"boxes": [], "vessels": None}
    for p in files:
        try:
            img = data.read_image(p)
        except ValueError as e:
            print(f"{p}: skipped, not a readable image ({e.__cause__ or e})")
            skipped.append(p)
            continue
        stem = p.stem if p.stem not in saved else p.name  # a.png and a.jpg: the second keeps its extension
        det, logits = predict_image(run, img, imgsz, conf, iou, device)
        save_prediction(img, det, logits, save_dir, stem, names)
        if save_json:
            images.append(coco.image_record(len(saved), p, img.shape[:2], source if source.is_dir() else None))
            results["boxes"] += coco.box_results(det, len(saved))
            if logits is not None:  # CA-MTL
                results["vessels"] = (results["vessels"] or []) + coco.vessel_results(logits.sigmoid(), len(saved))
        saved.append(stem)
        top = f", max conf {det[0, 4]:.2f}" if len(det) else ""
        print(f"{p}: {img.shape[1]}x{img.shape[0]}, {len(det)} boxes{top}")
    if save_json:
        coco.write_json({"images": images, "categories": coco.categories(names or [])}, save_dir / "images.json")
        coco.write_json(results["boxes"], save_dir / "predictions.json")
        if results["vessels"] is not None:
            coco.write_json(results["vessels"], save_dir / "vessels_predictions.json")
    print(f"{len(saved)} images predicted -> {save_dir} (pictures, labels/*.txt, CA-MTL vessel masks/*.png"
          + (", COCO predictions.json" if save_json else "") + ")"
          + (f"; {len(skipped)} unreadable files skipped: {', '.join(p.name for p in skipped)}" if skipped else ""))
    return {"saved": saved, "skipped": skipped}


# -----------------------------------------------------------------------------
# the CLI: metrics of a checkpoint on a data split, or predictions on a folder of the user's own images


def arg_parser():
    ap = argparse.ArgumentParser(description="nanoCAMTL: metrics of a checkpoint, or predictions on your images",
                                 exit_on_error=False)
    ap.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                    help="any flag as YOLOv8 takes it: its name without -- and with _ for - (conf=0.5 split=test "
                    "save_json=true); these come after the flags and win over them")
    ap.add_argument("--weights", help="our .pt (run last/best.pt, yolov8{S}-{stage}.pt), an export.py .pt2, or "
                    "(to predict) an Ultralytics yolov8*.pt; required")
    ap.add_argument("--data", help="processed data root (default: the checkpoint's, else the built-in synthetic set)")
    ap.add_argument("--split", default="val", choices=("train", "val", "test"))
    ap.add_argument("--imgsz", type=int, help="letterbox size (default: the checkpoint's training size)")
    ap.add_argument("--batch", type=int, help="default: the checkpoint's")
    ap.add_argument("--workers", type=int, help="data loader workers (default: the checkpoint's)")
    ap.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N or N")
    ap.add_argument("--domain", choices=tuple(DOMAINS), help="a DualBN model's BatchNorm branch: source (fundus "
                    "photographs) or target (angiograms); default the checkpoint's (camtl target, domainshift1 "
                    "source). Metrics: the domain scored, its data and its branch")
    ap.add_argument("--source", help="a folder of images (or one image) to predict, instead of computing metrics")
    ap.add_argument("--save-json", action="store_true", help="also COCO files: the predictions (and, for metrics, "
                    "the split's ground truth), in the original images' pixels")
    ap.add_argument("--save-dir", help="exactly where predictions go (default: runs/predict/NAME); with metrics: "
                    "where the validation pictures go (default: none) and the COCO files (default: runs/val/NAME)")
    ap.add_argument("--name", default="", help="runs/predict/NAME, runs/val/NAME (default exp, exp2, ... as YOLOv8)")
    ap.add_argument("--exist-ok", action="store_true", help="reuse runs/predict/NAME or runs/val/NAME")
    ap.add_argument("--conf", type=float, help="confidence threshold (default: 0.25 to predict; for metrics the "
                    "checkpoint's val_conf, 0.001)")
    ap.add_argument("--iou", type=float, help="NMS IoU threshold (default: 0.7 to predict; for metrics the "
                    "checkpoint's val_iou, 0.7)")
    return ap


def parse_args(argv=None):
    """The flags, then the KEY=VALUE settings over them -> argparse.Namespace. A key is a flag's name (without --,
    with _ for -); its value goes through that flag's type and choices; a switch takes true, false or the bare key.
    A mistake is one line naming the setting (an unknown key: the keys it was probably meant to be)."""
    ap = arg_parser()
    try:
        a = ap.parse_intermixed_args(argv)
    except argparse.ArgumentError as e:
        ap.error(str(e))
    keys = [k for k in vars(a) if k != "settings"]
    for item in a.settings:
        k, eq, v = item.partition("=")
        if k not in keys:
            hint = did_you_mean(k, keys) if eq else "; expected KEY=VALUE"
            raise SystemExit(f"{item}: unknown key '{k}'{hint} (keys: {', '.join(keys)})")
        if ap.get_default(k) is False:  # a switch
            if eq and v.lower() not in ("true", "false"):
                raise SystemExit(f"{item}: {k} is a switch: {k}=true, {k}=false, or {k} alone")
            setattr(a, k, not eq or v.lower() == "true")
        elif not eq:
            raise SystemExit(f"{item}: expected {k}=VALUE")
        else:
            try:
                ap.parse_args([f"--{k.replace('_', '-')}={v}"], namespace=a)
            except argparse.ArgumentError as e:
                raise SystemExit(f"{item}: {e.message}") from None
    if a.weights is None:
        raise SystemExit("--weights FILE (or weights=FILE) is required: a .pt checkpoint, or a .pt2 to predict")
    return a


def pick_device(flag):
    """--device as typed -> torch.device, or one line saying why it cannot be had here."""
    if "," in flag:
        raise SystemExit(f"--device {flag}: evaluate.py runs on one device; pick one, e.g. --device cuda:0")
    want = check_device(flag, "--device")  # cpu, cuda, cuda:N; a bare GPU index N means cuda:N
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {flag}: CUDA is not available here (no GPU, or a CPU-only torch); "
                         "use --device cpu")
    if want.startswith("cuda:") and int(want[5:]) >= torch.cuda.device_count():
        raise SystemExit(f"--device {flag}: this machine has {torch.cuda.device_count()} GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device(want)


def predict_cli(a, device):
    """--source: predictions on the user's images -> predict_folder's summary."""
    try:
        run, imgsz, names = load_predictor(a.weights, device, a.imgsz, a.domain)
    except ValueError as e:  # not a checkpoint / program, or not what a program can do: one line
        raise SystemExit(str(e)) from None
    save_dir = a.save_dir or next_run_dir("runs", "predict", a.name, a.exist_ok)
    conf, iou = 0.25 if a.conf is None else a.conf, 0.7 if a.iou is None else a.iou
    return predict_folder(run, a.source, save_dir, imgsz, conf, iou, device, names, a.save_json)


def metrics_cli(a, device):
    """Metrics of a checkpoint on a split of its data (or --data) in one domain (--domain), the COCO files with
    --save-json -> validate's metrics dict."""
    if Path(a.weights).suffix == ".pt2":
        raise SystemExit(f"{a.weights}: an exported program only predicts (--source DIR); "
                         "for metrics give the .pt it came from")
    try:
        model, cfg = load_checkpoint(a.weights, device)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    # the synthetic set is looked up with the training parameters (other ones would regenerate it), whatever --imgsz
    root = Path(a.data or cfg["data"] or synthetic.ensure_config(cfg))
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
    results = coco.Results(loaders) if a.save_json else None
    m = validate(model, loaders, cfg, device, MultiTaskLoss(cfg), plot_dir=a.save_dir, log=print, on_batch=results)
    print(f"{a.weights} on {root} ({a.split}, {cfg['imgsz']} px):\n{results_table(m)}")
    if results is not None:
        out = Path(a.save_dir or next_run_dir("runs", "val", a.name, a.exist_ok))
        written = results.write(out, a.split, class_names(cfg["nc"]))
        print(f"COCO files -> {out}: {', '.join(p.name for p in written)}")
    return m


def main(argv=None):
    a = parse_args(argv)
    device = pick_device(a.device)
    if not Path(a.weights).is_file():
        what = "a directory, not a file" if Path(a.weights).is_dir() else "no such file"
        raise SystemExit(f"--weights {a.weights}: {what}; expected a .pt checkpoint (or a .pt2 to predict)")
    if a.imgsz is not None and (a.imgsz <= 0 or a.imgsz % 32):
        raise SystemExit(f"--imgsz {a.imgsz}: must be a positive multiple of 32")
    for flag, v, ok, allowed in (("--batch", a.batch, a.batch is None or a.batch >= 1, ">= 1"),
                                 ("--workers", a.workers, a.workers is None or a.workers >= 0, ">= 0"),
                                 ("--conf", a.conf, a.conf is None or 0 <= a.conf <= 1, "in [0, 1]"),
                                 ("--iou", a.iou, a.iou is None or 0 <= a.iou <= 1, "in [0, 1]")):
        if not ok:
            raise SystemExit(f"{flag} {v}: must be {allowed}")
    return predict_cli(a, device) if a.source else metrics_cli(a, device)


if __name__ == "__main__":
    main()
