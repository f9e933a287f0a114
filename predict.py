"""
Prediction on the user's own images, as YOLOv8's predict mode: boxes, vessel masks and a picture per image, at each
image's own size; optionally COCO result files. The weights: our .pt (a run's best.pt, a stage's
yolov8{S}-{stage}.pt), an Ultralytics yolov8*.pt, or an export.py .pt2 program. Metrics on a data split:
evaluate.py. More: docs/predict.md.

    python predict.py --weights runs/camtl/exp/weights/best.pt --source my_angiograms/   # -> runs/predict/exp
    python predict.py --weights best.pt --source fundus/ --domain source    # with the fundus BatchNorm branch
    python predict.py --weights best.pt2 --source my_images/ conf=0.5       # an export.py program; YOLOv8 settings
    python predict.py --weights best.pt --source one.png --save-json        # ... and COCO predictions.json
"""
import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import coco
import data
import export
import plots
from cli import check_flags, parse_settings, pick_device, settings_arg
from config import next_run_dir
from metrics import nms
from model import DOMAINS, class_names, default_domain, load_weights
from modules import DualBatchNorm2d


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
    """{stem}.png picture (plot_prediction), labels/{stem}.txt (cls xc yc w h conf, normalised to the image;
    empty = nothing found) and, for CA-MTL, masks/{stem}.png (vessels 255) at the image's own size."""
    h0, w0 = img.shape[:2]
    (save_dir / "labels").mkdir(parents=True, exist_ok=True)
    lines = [f"{int(c)} {(x1 + x2) / 2 / w0:.6f} {(y1 + y2) / 2 / h0:.6f} {(x2 - x1) / w0:.6f} {(y2 - y1) / h0:.6f} "
             f"{p:.4f}\n" for x1, y1, x2, y2, p, c in det.tolist()]
    (save_dir / "labels" / f"{stem}.txt").write_text("".join(lines))
    prob = logits.sigmoid() if logits is not None else None
    if prob is not None:
        (save_dir / "masks").mkdir(exist_ok=True)
        Image.fromarray(((prob > 0.5).numpy() * 255).astype(np.uint8)).save(save_dir / "masks" / f"{stem}.png")
    plot_prediction(torch.from_numpy(img).permute(2, 0, 1), det, prob, save_dir / f"{stem}.png", names)


def predict_folder(run, source, save_dir, imgsz, conf=0.25, iou=0.7, device="cpu", names=None,
                   save_json=False):
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
# the prediction picture: boxes and labels drawn at the image's own size, as YOLOv8 predicts


def annotation_sizes(w, h):
    """YOLOv8's line width and label font size (px) for a (w, h) image: readable from 200 px to 1400 px and beyond."""
    return max(round((w + h) / 2 * 0.003), 2), max(round((w + h) / 2 * 0.035), 12)


def _overlaps(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def label_box(box, tw, th, w, h, taken):
    """Where a (tw, th) label of box (x1, y1, x2, y2) goes in a (w, h) image: above its top-left corner as YOLOv8
    puts it, else inside the box under its top edge (at the image's top, or where an earlier label sits, as on
    nested near-duplicate boxes), else under the box, else inside above its bottom edge. -> (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = box
    x = min(max(x1, 0), max(w - tw, 0))  # shifted left so that it ends inside the image
    spots = [(x, y1 - th, x + tw, y1), (x, y1, x + tw, y1 + th), (x, y2, x + tw, y2 + th), (x, y2 - th, x + tw, y2)]
    inside = [r for r in spots if r[1] >= 0 and r[3] <= h] or spots[1:2]
    return next((r for r in inside if not any(_overlaps(r, t) for t in taken)), inside[0])


def plot_prediction(img, det, prob, out_path, names=None, thr=0.5):
    """
    One predicted image at its own size: the vessel probability > thr tinted, each box in its class colour with
    "name conf" on a filled label of that colour, labels placed so that none covers another (label_box).
    img (3, H, W) in [0, 1]; det (n, 6) x1, y1, x2, y2, conf, cls in its pixels, by descending conf (NMS order: the
    best boxes get the best places); prob (H, W) or None. -> out_path.
    """
    im = plots.tinted(img, None if prob is None else plots.to_numpy(prob) > thr)
    lw, size = annotation_sizes(*im.size)
    d, taken = ImageDraw.Draw(im), []
    rows = plots.to_numpy(det).reshape(-1, 6)
    for x1, y1, x2, y2, _, j in rows:  # every box first, so that no line crosses a label
        d.rectangle([x1, y1, x2, y2], outline=plots.colour(j), width=lw)
    for x1, y1, x2, y2, score, j in rows:
        s = f"{plots.name(names, int(j))} {score:.2f}"
        left, top, right, bottom = d.textbbox((0, 0), s, font=plots.font(size))
        r = label_box((x1, y1, x2, y2), right - left + 2 * lw, bottom - top + 2 * lw, *im.size, taken)
        taken.append(r)
        d.rectangle(r, fill=plots.colour(j))
        d.text((r[0] + lw - left, r[1] + lw - top), s, font=plots.font(size), fill=plots.WHITE)
    return plots.save(im, out_path)


# -----------------------------------------------------------------------------
# the CLI


def arg_parser():
    ap = argparse.ArgumentParser(description="nanoCAMTL: predictions on your images (boxes, vessel masks, "
                                 "pictures)", exit_on_error=False)
    settings_arg(ap)
    ap.add_argument("--weights", help="our .pt (run last/best.pt, yolov8{S}-{stage}.pt), an export.py .pt2, or an "
                    "Ultralytics yolov8*.pt; required")
    ap.add_argument("--source", help="a folder of images, or one image; required")
    ap.add_argument("--imgsz", type=int, help="letterbox size (default: the checkpoint's training size)")
    ap.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N or N")
    ap.add_argument("--domain", choices=tuple(DOMAINS), help="a DualBN model's BatchNorm branch: source (fundus "
                    "photographs) or target (angiograms); default the checkpoint's (camtl target, domainshift1 "
                    "source)")
    ap.add_argument("--save-json", action="store_true", help="also COCO result files of the predictions, in the "
                    "original images' pixels")
    ap.add_argument("--save-dir", help="exactly where predictions go (default: runs/predict/NAME)")
    ap.add_argument("--name", default="", help="runs/predict/NAME (default exp, exp2, ... as YOLOv8)")
    ap.add_argument("--exist-ok", action="store_true", help="reuse runs/predict/NAME")
    ap.add_argument("--conf", type=float, help="confidence threshold (default 0.25)")
    ap.add_argument("--iou", type=float, help="NMS IoU threshold (default 0.7)")
    return ap


def parse_args(argv=None):
    """The flags, then the KEY=VALUE settings over them (cli.parse_settings) -> argparse.Namespace."""
    a = parse_settings(arg_parser(), argv)
    if a.weights is None or a.source is None:
        raise SystemExit("--weights FILE and --source DIR (or weights=FILE source=DIR) are required")
    return a


def main(argv=None):
    """-> predict_folder's summary {"saved": [stems], "skipped": [paths]}."""
    a = parse_args(argv)
    device = pick_device(a.device, "predict.py")
    check_flags(a)
    try:
        run, imgsz, names = load_predictor(a.weights, device, a.imgsz, a.domain)
    except ValueError as e:  # not a checkpoint / program, or not what a program can do: one line
        raise SystemExit(str(e)) from None
    save_dir = a.save_dir or next_run_dir("runs", "predict", a.name, a.exist_ok)
    conf, iou = 0.25 if a.conf is None else a.conf, 0.7 if a.iou is None else a.iou
    return predict_folder(run, a.source, save_dir, imgsz, conf, iou, device, names, a.save_json)


if __name__ == "__main__":
    main()
