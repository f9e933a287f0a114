"""
COCO files of predictions and ground truth (`evaluate.py --save-json`), so that any COCO evaluator (pycocotools, a
challenge's own) scores them:

    instances_{split}.json     detection ground truth: images, box annotations (iscrowd 0), categories
    predictions.json           detection results: image_id, category_id, bbox [x, y, w, h], score
    vessels_{split}.json       vessel ground truth: one mask annotation per image that has vessels
    vessels_predictions.json   vessel results: image_id, category_id, segmentation, score
    images.json                folder prediction (--source): the image ids, {"images": [{id, file_name, width,
                               height}], "categories": [...]}

Boxes and masks are in pixels of the original image (the letterbox undone), boxes rounded to 1/1000 px. Image ids
are positions in the split (or in the predicted folder's sorted files), from 0; annotation ids count from 1 (COCO's
evaluator takes a matched id of 0 for "unmatched"). Category ids are class + 1, as YOLOv8 writes them for data sets
other than COCO; the vessel files have their own single category, 1 "vessel". A vessel result's score is the mean
vessel probability over its pixels.

Masks are COCO's compressed RLE, {"size": [h, w], "counts": str}: the run lengths of the mask read column by column
(Fortran order), starting with a run of 0s, written as pycocotools' mask.encode writes them (each count minus the
one two places before it from the fourth on, in 5-bit groups, 6 bits per character from "0"). rle_decode reads
that form and the uncompressed one (counts a list of ints).
"""
import json
import os
from pathlib import Path

import numpy as np
import torch

import data

VESSELS = [{"id": 1, "name": "vessel", "supercategory": "vessel"}]

# -----------------------------------------------------------------------------
# run-length encoding


def rle_encode(mask):
    """mask (h, w) bool -> COCO compressed RLE {"size": [h, w], "counts": str}."""
    m = np.asarray(mask, bool)
    flat = m.ravel(order="F")  # column-major, as COCO
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], edges, [flat.size]))).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs  # counts start with the 0s
    chars = []
    for i, x in enumerate(runs):
        x -= runs[i - 2] if i > 2 else 0
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic: a negative delta ends on -1
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr((c | 0x20 if more else c) + 48))
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": "".join(chars)}


def rle_counts(counts):
    """A compressed counts string -> the list of run lengths."""
    runs, p = [], 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            c = ord(counts[p]) - 48
            x |= (c & 0x1F) << 5 * k
            more, p, k = bool(c & 0x20), p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << 5 * k  # sign-extend
        runs.append(x + (runs[-2] if len(runs) > 2 else 0))
    return runs


def rle_decode(rle):
    """COCO RLE, compressed (counts a str) or not (a list) -> mask (h, w) bool."""
    h, w = rle["size"]
    runs = rle["counts"] if isinstance(rle["counts"], list) else rle_counts(rle["counts"])
    if sum(runs) != h * w:
        raise ValueError(f"RLE counts sum to {sum(runs)}, not {h} x {w} = {h * w}")
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)  # odd runs are 1s
    return flat.reshape((h, w), order="F")


def mask_bbox(mask):
    """mask (h, w) bool, not empty -> [x, y, w, h] of its pixels."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]

# -----------------------------------------------------------------------------
# results of one image


def box_results(det, image_id):
    """det (n, 6) x1, y1, x2, y2, conf, cls in original pixels -> COCO detection results."""
    return [{"image_id": image_id, "category_id": int(c) + 1,
             "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)], "score": p}
            for x1, y1, x2, y2, p, c in torch.as_tensor(det).double().tolist()]


def vessel_results(prob, image_id, thr=0.5):
    """prob (h0, w0) vessel probability in original pixels -> [one COCO segmentation result], [] if none."""
    prob = torch.as_tensor(prob).float().numpy()
    m = prob > thr
    if not m.any():
        return []
    return [{"image_id": image_id, "category_id": 1, "segmentation": rle_encode(m), "score": float(prob[m].mean())}]


def categories(names):
    return [{"id": i + 1, "name": n, "supercategory": "lesion"} for i, n in enumerate(names)]

# -----------------------------------------------------------------------------
# a split's ground truth, its predictions (collected by evaluate.validate's on_batch), the files


def image_record(i, path, shape, root=None):
    """{id, file_name, width, height}; file_name relative to the data root when the image is under it."""
    p = Path(path)
    try:
        name = p.relative_to(root).as_posix() if root is not None else p.name
    except ValueError:
        name = p.as_posix()
    return {"id": i, "file_name": name, "width": int(shape[1]), "height": int(shape[0])}


def ground_truth(ds, names=None):
    """A data.TaskDataset -> COCO ground truth of its images: boxes (detection) or vessel masks (segmentation),
    in original pixels. names: the detection classes (ignored for vessels)."""
    images, anns = [], []
    for i, it in enumerate(ds.items):
        (h, w), ann = it["shape"], {"image_id": i, "iscrowd": 0}
        images.append(image_record(i, it["image"], (h, w), ds.root))
        if it["mask"] is not None:
            m = data.read_mask(it["mask"])
            if m.any():
                anns.append({"id": len(anns) + 1, **ann, "category_id": 1, "segmentation": rle_encode(m),
                             "area": int(m.sum()), "bbox": mask_bbox(m)})
            continue
        for c, xc, yc, bw, bh in it["boxes"].tolist():
            box = [round(v, 3) for v in ((xc - bw / 2) * w, (yc - bh / 2) * h, bw * w, bh * h)]
            anns.append({"id": len(anns) + 1, **ann, "category_id": int(c) + 1, "bbox": box,
                         "area": round(box[2] * box[3], 3)})
    cats = VESSELS if ds.task == "seg" else categories(names)
    return {"images": images, "annotations": anns, "categories": cats}


class Results:
    """A split's predictions as COCO results: call it with (batch, preds, seg_out), as evaluate.validate's
    on_batch does. preds: per image (n, 6) x1, y1, x2, y2, conf, cls in canvas pixels (detection batches);
    seg_out["full"]: vessel logits (B, 1, S, S) (segmentation batches). Images are identified by their path."""

    def __init__(self, loaders):
        self.loaders = loaders
        self.ids = {t: {str(it["image"]): i for i, it in enumerate(ld.dataset.items)} for t, ld in loaders.items()}
        self.results = {t: [] for t in loaders}

    def __call__(self, batch, preds, seg_out):
        task = batch["task"]
        for i, path in enumerate(batch["paths"]):
            ratio, pad, shape = batch["ratio"][i].tolist(), batch["pad"][i].tolist(), batch["orig_shape"][i].tolist()
            image_id = self.ids[task][path]
            if task == "det":
                det = preds[i].double().clone()  # (n, 6)
                det[:, :4] = data.unletterbox_boxes(det[:, :4], ratio, pad, shape).double()
                self.results[task] += box_results(det, image_id)
            else:
                logits = data.unletterbox_mask(seg_out["full"][i, 0].float().cpu(), ratio, pad, shape)
                self.results[task] += vessel_results(logits.sigmoid(), image_id)

    def write(self, save_dir, split, names):
        """The ground truth and results files of each task -> the paths written."""
        out = []
        for task, ld in self.loaders.items():
            gt, res = (f"instances_{split}.json", "predictions.json") if task == "det" else \
                (f"vessels_{split}.json", "vessels_predictions.json")
            out += [write_json(ground_truth(ld.dataset, names), Path(save_dir) / gt),
                    write_json(self.results[task], Path(save_dir) / res)]
        return out


def write_json(obj, path):
    """json.dump to a temporary file, then rename: an interrupted run never leaves half a file. -> path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")))
    os.replace(tmp, path)
    return path
