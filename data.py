"""Data for nanoCAMTL: on-disk layout, splits, datasets, augmentation, loaders, checks.

Layout, paths in splits.json relative to root (absolute accepted):

    root/retinography/{images,labels}/          source domain, image + same-stem PNG vessel mask
    root/angiography/segment/{images,labels}/   target domain, image + same-stem PNG vessel mask
    root/angiography/detect/{images,labels}/    target domain, image + same-stem YOLO txt (cls xc yc w h)
    root/splits.json                            {task_key: {train: [...], val: [...], test: [...]}}

Decisions on inputs the layout leaves open (docs/design.md §8):
- An empty label file is an image without stenoses (a valid negative). A *missing* label file is
  bad input (skipped): write an empty .txt to mark a negative, so a forgotten label never trains as one.
- A label file with a malformed line, a non-finite value or a class id >= nc is skipped whole (its other
  lines cannot be trusted either). A box reaching outside the image is clipped; one entirely
  outside (or of zero size) skips the file.
- Augmentation is axis-aligned (flips, scale, translate, brightness/contrast/gamma), so boxes stay
  exact and tight. Its randomness is a function of (seed, epoch, image index), handed over by the
  sampler, so batches do not depend on the number of workers or on persistent workers.
- A det batch has no vessel mask: its mask keys are None.
- Images deeper than 8 bits are scaled by their real bit depth (`full_scale`): a 16-bit file holding 12-bit
  values (<= 4095, angiograms exported from DICOM) is divided by 4095, not 65535.
- A mask with 0 and one other value (or a palette mask) is vessel wherever it is > 0. Any other mask (JPEG-compressed,
  antialiased, soft) is vessel above half its largest value, and the scan reports it once ("thresholded").
- A directory where a file should be is a bad file (named and skipped). splits.json of the wrong shape stops the
  run naming it; images in the folders that it does not list get one warning (`python splits.py split` lists them).
- Entries written by convert.py record their set and official split ("set", "official"): `python splits.py split`
  re-splits only entries no set assigned (`--set NAME`: that set's too), keeping every official val/test split and
  every test listing that records none (`splits.pinned`), so no command moves test images into training.
- Too little data for a stage (a task missing, fewer training images than one batch, too few batches for one
  camtl_ratio cycle) stops the run before any loader is built: `check_stage_data`.

Split and check tools (training never calls them): splits.py, python splits.py split|check --root R (-h)
Converters of public data sets (ARCADE, CADICA, DRIVE, ...) into this layout: convert.py, python convert.py -h
Synthetic data (generator, cached default set, picture of samples): synthetic.py, python synthetic.py -h
"""
import itertools
import json
import math
import os
import random
import re
import signal
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

TASK_KEYS = {  # task key -> (directory under root, task, domain)
    "retinography_segmentation": ("retinography", "seg", "source"),
    "angiography_segmentation": ("angiography/segment", "seg", "target"),
    "angiography_detection": ("angiography/detect", "det", "target"),
}
# the data each training stage validates on / trains on; camtl may add retinography_segmentation as replay
STAGE_TASKS = {"domainshift1": {"seg": "retinography_segmentation"},
               "camtl": {"det": "angiography_detection", "seg": "angiography_segmentation"}}
IMG_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
PAD = 114 / 255  # letterbox fill, as YOLOv8
AUG = dict(fliplr=0.5, flipud=0.5, scale=0.5, translate=0.1, brightness=0.2, contrast=0.3, gamma=0.3)


def log(msg):
    print(f"data: {msg}", file=sys.stderr, flush=True)

# -----------------------------------------------------------------------------
# reading files


def pil_to_float(im, keep_gray=False):
    """PIL image of any mode/bit depth -> float32 (H, W, 3) in [0, 1] ((H, W, 1) if gray and keep_gray)."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode not in ("L", "LA", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L", "F"):
        im = im.convert("RGB")  # 1, CMYK, YCbCr, ...
    a = np.asarray(im)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255
    elif a.dtype.kind in "ui":  # 16-bit, whether PIL calls it I;16 or I
        a = a.astype(np.float32) / full_scale(a)
    else:
        a = a.astype(np.float32)  # float images are taken to be in [0, 1] already
    if a.ndim == 2:
        a = a[..., None]
    a = np.clip(a[..., :1] if a.shape[2] == 2 else a[..., :3], 0, 1)  # drop alpha
    return np.ascontiguousarray(np.repeat(a, 3, 2) if a.shape[2] == 1 and not keep_gray else a)


def full_scale(a):
    """The value that is white in an integer image deeper than 8 bits: 2^b - 1 for the smallest even bit depth
    b >= 8 that holds its largest value. A 16-bit file whose values stay <= 4095 (12-bit angiograms exported from
    DICOM) is read as 12-bit (/ 4095), not as near-black 16-bit; <= 1023 as 10-bit, <= 255 as 8-bit, above 16383
    as 16-bit (/ 65535). The rule looks at each image on its own: a very dark true 16-bit image comes out brighter."""
    top, b = int(a.max()) if a.size else 0, 8
    while top > 2**b - 1:
        b += 2
    return 2**b - 1


def read_image(path, keep_gray=False):
    """Any png/jpg/tif/bmp, 8/16-bit, gray/RGB/RGBA -> float32 (H, W, 3) in [0, 1]; ValueError if
    unreadable. keep_gray: a gray image stays (H, W, 1), a third of the work until the very end.
    8-bit values are divided by 255; deeper integer images by their real bit depth's full scale (`full_scale`:
    12-bit data in a 16-bit file by 4095); float images are taken to be in [0, 1]."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: truncated files fail here, not later
            return pil_to_float(im, keep_gray)
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def _mask_levels(path):
    """A mask file -> ((H, W) array of its values: the largest colour channel, or a palette mask's index, palette?)."""
    try:
        with Image.open(path) as im:
            im.load()
            a, palette = np.asarray(im), im.mode in ("P", "PA")
    except Exception as e:
        raise ValueError(f"cannot read mask {path}: {e}") from e
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.ndim == 3:
        a = a[..., :3].max(-1) if a.shape[2] >= 3 else a[..., 0]
    return a, palette


def mask_threshold(a, palette=False):
    """-> (t, two-valued?): a mask pixel is vessel when its value > t. A two-valued mask (0 and one other value, or
    a single value) or a palette mask (indices are labels): t = 0, so 0/1, 0/255 and palette masks all work.
    Anything else (JPEG-compressed, antialiased or soft masks): t = half the mask's largest value (127.5 for a
    0/255 JPEG), and the scan reports the file once as "thresholded"."""
    top = a.max() if a.size else 0
    if palette or not ((a > 0) & (a < top)).any():
        return 0, True
    return float(top) / 2, False


def read_mask(path):
    """Mask image -> bool (H, W), vessel = value > mask_threshold (two-valued and palette masks: any value > 0;
    the largest colour channel counts)."""
    a, palette = _mask_levels(path)
    return a > mask_threshold(a, palette)[0]


def _image_size(path):
    """(h, w) of an image, fully decoded so that corrupt files are caught at scan time."""
    with Image.open(path) as im:
        im.load()
        return im.size[::-1]


def parse_labels(text, nc):
    """YOLO label text -> (boxes (n, 5) cls+xywh normalised, clipped?). Boxes reaching outside the
    image are clipped; anything else wrong raises ValueError(kind, detail): the file can't be trusted."""
    rows, clipped = [], False
    for k, line in enumerate(text.splitlines(), 1):
        if not line.split():
            continue
        try:
            c, x, y, w, h = map(float, line.split())
        except ValueError:  # not numbers, or not 5 of them
            raise ValueError("malformed label line", f"line {k}: {line.strip()!r}") from None
        if not all(map(math.isfinite, (c, x, y, w, h))):
            raise ValueError("non-finite value", f"line {k}")
        if c < 0 or c != int(c):
            raise ValueError("malformed label line", f"class id {c} in line {k}")
        if c >= nc:
            raise ValueError("class id >= nc", f"{int(c)} >= {nc} in line {k}")
        x1, y1, x2, y2 = max(x - w / 2, 0), max(y - h / 2, 0), min(x + w / 2, 1), min(y + h / 2, 1)
        if x2 <= x1 or y2 <= y1:
            raise ValueError("box outside the image", f"nothing left after clipping, line {k}")
        clipped |= min(x - w / 2, y - h / 2) < -1e-6 or max(x + w / 2, y + h / 2) > 1 + 1e-6  # rounding is no crime
        rows.append([c, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
    return np.array(rows, np.float32).reshape(-1, 5), clipped

# -----------------------------------------------------------------------------
# splits


def _same_stem(folder, stem):
    """The image file in folder named stem.* (a PNG first, else any image type), or None."""
    found = sorted((q for q in folder.glob(stem + ".*") if q.suffix.lower() in IMG_EXTS),
                   key=lambda q: (q.suffix.lower() != ".png", q.name))
    return found[0] if found else None


def task_files(root, key):
    """Every image of a task's folder (sorted) with the mask/label path that should go with it."""
    folder, task, domain = TASK_KEYS[key]
    d = Path(root) / folder
    if not (d / "images").is_dir():
        return []
    out = []
    for p in sorted((d / "images").iterdir()):
        if p.suffix.lower() not in IMG_EXTS:
            continue
        e = {"image": p.relative_to(root).as_posix()}
        if task == "det":
            e["label"] = f"{folder}/labels/{p.stem}.txt"
        else:
            mask = _same_stem(d / "labels", p.stem)
            e["mask"] = mask.relative_to(root).as_posix() if mask else f"{folder}/labels/{p.stem}.png"
            fov = _same_stem(d / "fov", p.stem)
            if fov:  # the user's own field-of-view mask: vessels are scored inside it
                e["fov"] = fov.relative_to(root).as_posix()
        e["domain"] = domain
        out.append(e)
    return out


def group_key(e, group_regex=None):
    """The key that keeps an entry's patient/video together: group_regex searched in the file name (its first group,
    else the whole match), else the entry's own "group" (converters record it), else the file name."""
    name = Path(e["image"]).name
    m = re.search(group_regex, name) if group_regex else None
    return (m.group(1) if m.groups() else m.group(0)) if m else e.get("group") or name


def split_entries(entries, ratios=(0.7, 0.3, 0.0), seed=42, group_regex=None):
    """Shuffle whole groups (`group_key`) into train/val/test, so all images of a patient/video land in one split;
    without group_regex or "group" fields every image is its own group. Each split's list is sorted."""
    groups = {}
    for e in entries:
        groups.setdefault(group_key(e, group_regex), []).append(e)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    n = len(entries)
    ends = (round(ratios[0] * n), round((ratios[0] + ratios[1]) * n))  # cumulative image targets
    out, count = {"train": [], "val": [], "test": []}, 0
    for k in order:
        name = "train" if count < ends[0] else "val" if count < ends[1] else "test"
        out[name] += groups[k]
        count += len(groups[k])
    return {s: sorted(v, key=lambda e: e["image"]) for s, v in out.items()}


def make_splits(root, ratios=(0.7, 0.3, 0.0), seed=42, group_regex=None):
    return {k: split_entries(task_files(root, k), ratios, seed, group_regex) for k in TASK_KEYS}


def write_splits(root, splits):
    p = Path(root) / "splits.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".json.{os.getpid()}.tmp")  # per process: DDP ranks may all write
    tmp.write_text(json.dumps(splits, indent=1))
    tmp.replace(p)  # atomic: a reader never sees half a file


SPLITS = ("train", "val", "test")
SPLITS_SHAPE = '{task_key: {"train": [...], "val": [...], "test": [...]}}'
_warned_unlisted = set()  # roots already warned about in this process


def _splits_error(p, why):
    return SystemExit(f"{p}: {why}; expected {SPLITS_SHAPE}, task keys {', '.join(TASK_KEYS)}, each entry "
                      '{"image": path, "label": path (detection) or "mask": path (segmentation)}. Fix it, or '
                      "delete it, re-run the converters that wrote it (they record the official splits) and list "
                      f"the rest with `python splits.py split --root {p.parent}` (70/30/0)")


def read_splits(root):
    """root/splits.json, checked -> {task_key: {split: [entries]}} (a missing task or split is empty), or None
    when there is none. Unreadable or of the wrong shape: SystemExit naming the file and its expected shape."""
    p = Path(root) / "splits.json"
    if not p.exists():
        return None
    try:
        splits = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise _splits_error(p, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _splits_error(p, f"unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(splits, dict):
        raise _splits_error(p, f"a JSON {type(splits).__name__}, not an object of task keys")
    for key, per in splits.items():
        if key not in TASK_KEYS:
            raise _splits_error(p, f"unknown task key {key!r}")
        if not isinstance(per, dict) or set(per) - set(SPLITS):
            what = f"split names {sorted(set(per) - set(SPLITS))}" if isinstance(per, dict) else type(per).__name__
            raise _splits_error(p, f"{key} holds {what}; splits are train, val, test")
        need = "label" if TASK_KEYS[key][1] == "det" else "mask"
        for split, entries in per.items():
            if not isinstance(entries, list):
                raise _splits_error(p, f"{key}/{split} is a JSON {type(entries).__name__}, not a list of entries")
            for e in entries:
                if not (isinstance(e, dict) and isinstance(e.get("image"), str) and isinstance(e.get(need), str)):
                    raise _splits_error(p, f"{key}/{split} has an entry without 'image' and '{need}' paths: "
                                           f"{json.dumps(e)[:80]}")
    return splits


def _warn_unlisted(root, splits):
    """Images in a task's folder that splits.json does not list (added after it was written) are never used: say so
    once per root, with the count and the command that lists them."""
    root = Path(root)
    if root.resolve() in _warned_unlisted:
        return
    _warned_unlisted.add(root.resolve())
    for key, (folder, _, _) in TASK_KEYS.items():
        d = root / folder / "images"
        if not d.is_dir():
            continue
        listed = {os.path.normpath(root / e["image"]) for per in splits.get(key, {}).values() for e in per}
        on_disk = [p for p in sorted(d.iterdir()) if p.suffix.lower() in IMG_EXTS]
        extra = [p for p in on_disk if os.path.normpath(p) not in listed]
        if extra:
            log(f"WARNING {root / 'splits.json'} does not list {len(extra)} of the {len(on_disk)} images in {d} "
                f"(e.g. {extra[0].name}): they are not used. `python splits.py split --root {root}` lists them "
                "(70/30/0 with what no set assigned; --group REGEX keeps a patient's images together)")


def load_splits(root, group_regex=None):
    """Read root/splits.json (checked: read_splits; images it does not list: a warning); when missing, write one
    (70/30/0, seed 42, optionally grouped) first."""
    p = Path(root) / "splits.json"
    splits = read_splits(root)
    if splits is not None:
        if group_regex:
            log(f"{p} exists, group_regex ignored (delete it or run `python splits.py split --root {root} --group "
                "REGEX` to re-split)")
        _warn_unlisted(root, splits)
        return splits
    splits = make_splits(root, group_regex=group_regex)
    write_splits(root, splits)
    log(f"wrote {p}: " + ", ".join(f"{k} {len(v['train'])}/{len(v['val'])}" for k, v in splits.items()))
    return splits


def task_dir(root, key):
    """root/<the task's folder>, its images/ and labels/ created."""
    d = Path(root) / TASK_KEYS[key][0]
    for sub in ("images", "labels"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    return d


def yolo_line(xyxy, W, H, cls=0):
    """A box in pixels -> one YOLO label line, normalised cls xc yc w h."""
    x1, y1, x2, y2 = xyxy
    return f"{cls} {(x1 + x2) / 2 / W:.6f} {(y1 + y2) / 2 / H:.6f} {(x2 - x1) / W:.6f} {(y2 - y1) / H:.6f}\n"

# -----------------------------------------------------------------------------
# letterbox and augmentation (one axis-aligned map: canvas = ratio * original + pad, per axis)


def _photometric(im, rng, hyp):
    """Random gamma, then contrast (about mid-gray) and brightness, of a (C, H, W) image in [0, 1]."""
    g = math.exp(rng.uniform(-hyp["gamma"], hyp["gamma"]))  # log-uniform: as likely darker as brighter
    c = rng.uniform(1 - hyp["contrast"], 1 + hyp["contrast"])
    b = rng.uniform(-hyp["brightness"], hyp["brightness"])
    lut = ((torch.linspace(0, 1, 1024) ** g - 0.5) * c + 0.5 + b).clamp(0, 1)  # (1024,)
    return torch.take(lut, (im * 1023 + 0.5).long().clamp_(0, 1023))  # a table: 3x faster than pow


def _map_boxes(boxes, h0, w0, ratio, pad, S, augmented):
    """(n, 5) cls+xywh normalised to the original -> normalised to the canvas, clipped, filtered."""
    if not len(boxes):
        return boxes
    c, x, y, w, h = boxes.T
    xs = ratio[0] * np.stack([x - w / 2, x + w / 2]) * w0 + pad[0]  # (2, n) canvas px
    ys = ratio[1] * np.stack([y - h / 2, y + h / 2]) * h0 + pad[1]
    xs.sort(0)  # a flip swaps the corners
    ys.sort(0)
    area = (xs[1] - xs[0]) * (ys[1] - ys[0])
    xs, ys = xs.clip(0, S), ys.clip(0, S)
    w, h = xs[1] - xs[0], ys[1] - ys[0]
    keep = (w > 0) & (h > 0)
    if augmented:  # drop slivers left at the canvas edge (YOLOv8's box_candidates)
        keep &= (w > 2) & (h > 2) & (w * h > 0.1 * area)
    out = np.stack([c, xs.mean(0) / S, ys.mean(0) / S, w / S, h / S], 1)
    return out[keep].astype(np.float32)


def letterbox_size(h0, w0, imgsz, scale=1.0):
    """Where an (h0, w0) image lands on the imgsz x imgsz canvas: content size (h, w) and offset (ox, oy),
    the content scaled to fit (times `scale`, an augmentation), centred."""
    r = min(imgsz / h0, imgsz / w0)
    h, w = max(round(h0 * r * scale), 1), max(round(w0 * r * scale), 1)
    return h, w, (imgsz - w) // 2, (imgsz - h) // 2


def canvas_boxes(boxes, h0, w0, imgsz):
    """Labels (n, 5) cls + xywh normalised to an (h0, w0) image -> normalised to its letterboxed canvas, as the
    loader delivers them without augmentation."""
    h, w, ox, oy = letterbox_size(h0, w0, imgsz)
    return _map_boxes(np.asarray(boxes, np.float64).reshape(-1, 5), h0, w0, (w / w0, h / h0), (ox, oy), imgsz,
                      False)


def transform(img, mask, boxes, imgsz, rng=None, hyp=AUG):
    """Letterbox one sample to imgsz x imgsz and, given an rng, augment it; image, mask and boxes jointly.

    img (h0, w0, C) float, C = 3 or 1 (gray, expanded at the end), mask (h0, w0) bool or None,
    boxes (n, 5) cls+xywh normalised.
    Returns img (3, S, S), mask (1, S, S) 0/1 or None, boxes (m, 5) normalised to the canvas,
    ratio (rx, ry) and pad (px, py) with canvas_px = ratio * original_px + pad (negative ratio = flip)."""
    S, (h0, w0) = imgsz, img.shape[:2]
    s = rng.uniform(1 - hyp["scale"], 1 + hyp["scale"]) if rng is not None else 1.0
    h, w, ox, oy = letterbox_size(h0, w0, S, s)
    fx = fy = False
    if rng is not None:
        t = hyp["translate"] * S
        ox, oy = ox + round(rng.uniform(-t, t)), oy + round(rng.uniform(-t, t))
        fx, fy = rng.random() < hyp["fliplr"], rng.random() < hyp["flipud"]

    C = img.shape[2]
    x = torch.from_numpy(img).permute(2, 0, 1)  # (C, h0, w0)
    if mask is not None:
        x = torch.cat([x, torch.from_numpy(mask)[None].float()])  # (C+1, h0, w0): one resize for both
    if (h, w) != (h0, w0):  # antialias when shrinking: a 2-4x downscale must average pixels, not skip them
        x = F.interpolate(x[None], size=(h, w), mode="bilinear", antialias=h < h0, align_corners=False)[0]
    flips = [d for d, f in ((-1, fx), (-2, fy)) if f]
    if flips:
        x = x.flip(flips)
    im = _photometric(x[:C], rng, hyp) if rng is not None else x[:C]

    out = torch.full((x.shape[0], S, S), PAD)  # (C or C+1, S, S)
    out[C:] = 0
    x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + w, S), min(oy + h, S)  # part of the content on the canvas
    if x1 > x0 and y1 > y0:
        out[:C, y0:y1, x0:x1] = im[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
        out[C:, y0:y1, x0:x1] = x[C:, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    ratio = (-w / w0 if fx else w / w0, -h / h0 if fy else h / h0)
    pad = (ox + w if fx else ox, oy + h if fy else oy)
    boxes = _map_boxes(boxes, h0, w0, ratio, pad, S, rng is not None)
    m = (out[C:] > 0.5).float() if mask is not None else None
    return out[:C].expand(3, S, S), m, boxes, ratio, pad  # gray: an expanded view, collate's stack copies


def unletterbox_boxes(xyxy, ratio, pad, orig_shape=None):
    """Boxes (n, 4) xyxy in canvas px -> original image px (clipped when orig_shape=(h0, w0) given)."""
    b = torch.as_tensor(xyxy, dtype=torch.float32).clone()
    rx, ry, px, py = (float(v) for v in (*ratio, *pad))
    xs, ys = (b[:, [0, 2]] - px) / rx, (b[:, [1, 3]] - py) / ry
    xs, ys = xs.sort(1).values, ys.sort(1).values  # undo flips
    if orig_shape is not None:
        xs, ys = xs.clamp(0, float(orig_shape[1])), ys.clamp(0, float(orig_shape[0]))
    return torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1)


def unletterbox_mask(mask, ratio, pad, orig_shape, mode="bilinear"):
    """A canvas map (H, W) or (C, H, W) — 0/1, probabilities or logits — resampled onto the
    original image's pixel grid -> (h0, w0) or (C, h0, w0). Threshold afterwards, not before."""
    m = torch.as_tensor(mask, dtype=torch.float32)
    squeeze = m.dim() == 2
    m = m[None, None] if squeeze else m[None]  # (1, C, H, W)
    H, W = m.shape[-2:]
    h0, w0 = int(orig_shape[0]), int(orig_shape[1])
    gx = (float(ratio[0]) * (torch.arange(w0, device=m.device) + 0.5) + float(pad[0])) / W * 2 - 1  # [-1, 1]
    gy = (float(ratio[1]) * (torch.arange(h0, device=m.device) + 0.5) + float(pad[1])) / H * 2 - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None]  # (1, h0, w0, 2)
    out = F.grid_sample(m, grid, mode=mode, align_corners=False)[0]
    return out[0] if squeeze else out

# -----------------------------------------------------------------------------
# datasets


def scan_entry(root, e, task, nc):
    """Scan one splits entry -> (item or None, problem or None); problem = (path, kind, detail, action)."""
    img = Path(root) / e["image"]
    if img.is_dir():
        return None, (img, "a directory, not an image file", "", "skipped")
    try:
        shape = _image_size(img)
    except Exception as ex:
        empty = img.exists() and img.stat().st_size == 0
        return None, (img, "empty image file" if empty else "unreadable image", "" if empty else str(ex), "skipped")
    item = dict(image=img, shape=shape, boxes=np.zeros((0, 5), np.float32), mask=None, fov=None)
    if task == "seg":
        if e.get("fov"):  # the set's field-of-view mask (convert.py keeps DRIVE's and HRF's): vessel scores inside it
            f = Path(root) / e["fov"]
            if not f.is_file():
                return None, (f, "missing FOV mask", "listed in splits.json as the image's fov", "skipped")
            item["fov"] = f
        m = Path(root) / e["mask"]
        if m.is_dir():
            return None, (m, "a directory, not a mask file", "", "skipped")
        if not m.exists():
            return None, (m, "missing mask", "", "skipped")
        try:
            levels, palette = _mask_levels(m)
        except ValueError as ex:
            return None, (m, "unreadable mask", str(ex.__cause__ or ex), "skipped")
        if levels.shape != shape:
            return None, (m, "mask size mismatch", f"mask {levels.shape} vs image {shape}", "skipped")
        item["mask"] = m
        t, two_valued = mask_threshold(levels, palette)
        if not two_valued:  # e.g. a JPEG-compressed 0/255 mask
            return item, (m, "mask not two-valued", f"{len(np.unique(levels))} levels, e.g. JPEG-compressed; "
                                                    f"vessel = value > {t:g}", "thresholded")
        return item, None
    lab = Path(root) / e["label"]
    if lab.is_dir():
        return None, (lab, "a directory, not a label file", "", "skipped")
    if not lab.exists():
        return None, (lab, "missing label file", "an empty file marks a negative", "skipped")
    try:
        item["boxes"], clipped = parse_labels(lab.read_text(errors="replace"), nc)
    except ValueError as ex:
        return None, (lab, *ex.args, "skipped")
    except OSError as ex:
        return None, (lab, "unreadable label file", str(ex), "skipped")
    return item, (lab, "box outside the image", "", "clipped") if clipped else None


class TaskDataset(Dataset):
    """One task key's split: letterboxed (optionally augmented) samples with boxes and masks.

    Every file is checked once here; bad ones are reported and skipped (strict=True: raised).
    __getitem__ takes an index or (index, seed, epoch) from SeededSampler, which seeds augmentation.
    splits: the {task_key: {split: entries}} to use instead of reading (or writing) root/splits.json."""

    def __init__(self, root, task_key, split="train", imgsz=256, augment=False, nc=1, strict=False,
                 hyp=None, verbose=True, splits=None):
        assert imgsz % 32 == 0, f"imgsz must be a multiple of 32 (the P5 stride), got {imgsz}"
        if task_key not in TASK_KEYS:
            raise KeyError(f"unknown task key {task_key!r}, expected one of {list(TASK_KEYS)}")
        self.root, self.key, self.split, self.imgsz, self.augment = Path(root), task_key, split, imgsz, augment
        _, self.task, self.domain = TASK_KEYS[task_key]
        self.hyp = {**AUG, **(hyp or {})}
        entries = (load_splits(root) if splits is None else splits).get(task_key, {}).get(split, [])
        once, twice = {}, []  # an image listed twice would count twice, and its COCO id would be ambiguous
        for e in entries:
            p = os.path.normpath(Path(root) / e["image"])
            if p in once:
                twice.append((Path(p), "listed more than once", "`python splits.py split` lists it once",
                              "counted once"))
            once.setdefault(p, e)
        with ThreadPoolExecutor(8) as ex:  # decoding every file once; PIL releases the GIL
            results = list(ex.map(lambda e: scan_entry(root, e, self.task, nc), once.values()))
        self.items = [it for it, _ in results if it is not None]
        self.problems = twice + [p for _, p in results if p is not None]
        lines = [f"{p}: {kind}" + (f" ({detail})" if detail else "") + f" -> {act}"
                 for p, kind, detail, act in self.problems]
        if strict and self.problems:
            raise ValueError(f"{len(lines)} bad inputs in {task_key}/{split} (strict):\n" + "\n".join(lines))
        if verbose:
            for ln in lines:
                log(ln)
            counts = {}  # action -> kind -> count
            for _, kind, _, act in self.problems:
                counts.setdefault(act, Counter())[kind] += 1
            head = f"{task_key}/{split}: {len(self.items)} of {len(entries)} images used"
            if self.task == "det":
                head += f", {sum(len(it['boxes']) for it in self.items)} boxes"
            tally = [f"{act} {c.total()} (" + ", ".join(f"{k}: {n}" for k, n in sorted(c.items())) + ")"
                     for act, c in sorted(counts.items())]
            # a split that lists nothing (e.g. test at 70/30/0) is no news; one whose images all failed is
            log(("WARNING " if entries and not self.items else "") + "; ".join([head] + tally))

    def __len__(self):
        return len(self.items)

    def load(self, i, rng=None):
        it = self.items[i]
        img = read_image(it["image"], keep_gray=True)
        mask = read_mask(it["mask"]) if it["mask"] is not None else None
        if mask is not None and mask.shape != img.shape[:2]:
            raise ValueError(f"mask size {mask.shape} != image size {img.shape[:2]}")
        im, m, boxes, ratio, pad = transform(img, mask, it["boxes"], self.imgsz, rng, self.hyp)
        soft = {f"mask_p{k}": None if m is None else F.avg_pool2d(m, s)  # (1, S/s, S/s) vessel fraction per cell
                for k, s in ((3, 8), (4, 16), (5, 32))}
        return dict(img=im, mask=m, **soft, boxes=torch.from_numpy(boxes), task=self.task, domain=self.domain,
                    path=str(it["image"]), orig_shape=img.shape[:2], ratio=ratio, pad=pad,
                    mask_path=it["mask"] and str(it["mask"]), fov_path=it["fov"] and str(it["fov"]))

    def __getitem__(self, item):
        i, seed, epoch = item if isinstance(item, tuple) else (item, None, 0)
        rng = None
        if self.augment:
            rng = np.random.default_rng([seed, epoch, i]) if seed is not None else np.random.default_rng()
        for k in range(len(self.items)):  # a file broken after the scan: report, use the next one
            j = (i + k) % len(self.items)
            try:
                return self.load(j, rng)
            except Exception as e:
                log(f"{self.items[j]['image']}: failed at load time ({e}) -> substituted")
        raise RuntimeError(f"no loadable sample left in {self.key}/{self.split}")


def collate(samples):
    """List of samples -> batch dict; boxes flattened with batch_idx as the YOLOv8 loss expects."""
    img = torch.stack([s["img"] for s in samples])  # (B, 3, S, S)
    boxes = torch.cat([s["boxes"] for s in samples])  # (N, 5)
    batch_idx = torch.cat([torch.full((len(s["boxes"]),), float(i)) for i, s in enumerate(samples)])  # (N,)
    b = dict(img=img, batch_idx=batch_idx, cls=boxes[:, :1], bboxes=boxes[:, 1:],
             task=samples[0]["task"], domain=samples[0]["domain"], paths=[s["path"] for s in samples],
             orig_shape=torch.tensor([s["orig_shape"] for s in samples]),  # (B, 2) h0, w0
             ratio=torch.tensor([s["ratio"] for s in samples]),  # (B, 2) canvas px per original px, x/y
             pad=torch.tensor([s["pad"] for s in samples]),  # (B, 2) canvas px of original x=0 / y=0
             mask_paths=[s["mask_path"] for s in samples],  # the full-size vessel masks (None for det): scoring
             fov_paths=[s["fov_path"] for s in samples])  # the set's FOV masks, None where it has none
    for k in ("mask", "mask_p3", "mask_p4", "mask_p5"):  # (B, 1, S, S), (B, 1, S/8, S/8), ...; None for det
        b[k] = None if samples[0][k] is None else torch.stack([s[k] for s in samples])
    return b


def to_device(obj, device):
    """Every tensor in a batch dict (or any nest of dicts, lists and tuples, e.g. a checkpoint) moved to device,
    non-blocking; other values as they are. The one place tensors change device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


class SeededSampler(DistributedSampler):
    """torch's DistributedSampler (same permutation on every rank, a disjoint share each) that also
    hands each index its augmentation seed, (seed, epoch): augmentation then is reproducible for any
    number of workers, persistent or not. Works without a process group (rank/world_size given)."""

    def __init__(self, dataset, shuffle=True, seed=0, rank=0, world_size=1):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0  # indices the next pass leaves out from its start (a run resumed mid-epoch), then 0 again

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return ((i, self.seed, self.epoch) for i in itertools.islice(super().__iter__(), skip, None))


def skip_batches(loader, k):
    """The loader's next pass starts at its batch k, as that batch would have come in this epoch: only indices are
    skipped (augmentation is a function of (seed, epoch, index)), so no image is read to get there."""
    if isinstance(loader, AlternatingLoader):
        loader.start = k
    else:
        loader.sampler.skip = k * loader.batch_size


def build_loader(root, task_key, split="train", imgsz=256, batch=16, augment=None, workers=0, seed=0,
                 rank=0, world_size=1, nc=1, shuffle=None, strict=False, persistent=False, hyp=None):
    """DataLoader for one task and split. augment and shuffle default to split == 'train'.
    Call loader.sampler.set_epoch(e) each epoch to reshuffle."""
    train = split == "train"
    ds = TaskDataset(root, task_key, split, imgsz, train if augment is None else augment, nc, strict, hyp,
                     verbose=rank == 0)
    sampler = SeededSampler(ds, train if shuffle is None else shuffle, seed, rank, world_size)
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available(), persistent_workers=persistent and workers > 0,
                      worker_init_fn=leave_sigterm_to_the_trainer if workers else None)


def leave_sigterm_to_the_trainer(worker_id):
    """A loader worker ignores SIGTERM: a cluster's stop signals every process of the job, and the training process
    stops the run after its optimizer step (train.on_sigterm), which a worker killed first would end in a traceback.
    The worker still ends with its loader, or when the training process is gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class AlternatingLoader:
    """Interleaves task loaders for the camtl stage: per cycle ratio[0] det batches, ratio[1] seg
    batches and ratio[2] source (retinography) replay batches. The target-domain streams (det, seg) define
    the epoch: it ends with the shorter of them (in cycles), identically on every rank. The replay stream
    only cycles: when it runs out it starts over, reshuffled, so a small fundus set never shortens the
    epoch. Each stream is reshuffled by set_epoch."""

    def __init__(self, det_loader, seg_loader, src_loader=None, ratio=(1, 2)):
        ratio = [int(r) for r in ratio]
        if len(ratio) not in (2, 3) or min(ratio) < 0 or ratio[0] + ratio[1] == 0:
            raise ValueError(f"ratio must be [det, seg] or [det, seg, source] of counts >= 0 with det or seg > 0, "
                             f"got {ratio}")
        if (len(ratio) == 3 and ratio[2] > 0) != (src_loader is not None):
            raise ValueError("a source loader needs a third ratio entry > 0, and vice versa")
        self.streams = [(ld, r) for ld, r in zip((det_loader, seg_loader, src_loader), ratio) if r > 0]
        self.replay = len(self.streams) - 1 if src_loader is not None else None  # index of the cycling stream
        self.pattern = [j for j, (_, r) in enumerate(self.streams) for _ in range(r)]  # e.g. [0, 1, 1, 2]
        self.cycles = min(len(ld) // r for j, (ld, r) in enumerate(self.streams) if j != self.replay)
        if self.cycles == 0 or src_loader is not None and len(src_loader) == 0:
            sizes = [len(ld) for ld, _ in self.streams]
            raise ValueError(f"streams of {sizes} batches can't fill one cycle of {ratio}")
        self.epoch, self.start = 0, 0  # start: the batch the next pass begins at (skip_batches), then 0 again

    def __len__(self):
        return self.cycles * len(self.pattern)

    def set_epoch(self, epoch):
        self.epoch = epoch
        for ld, _ in self.streams:
            ld.sampler.set_epoch(epoch)

    def __iter__(self):
        """The streams' iterators are made here, not at the first batch, so they draw their worker seeds from the
        RNG when a DataLoader's would: at the start of the epoch."""
        start, self.start = self.start, 0
        n = len(self.pattern)
        taken = [sum(self.pattern[p % n] == j for p in range(start)) for j in range(len(self.streams))]
        restarts = 0
        if self.replay is not None:  # a cycling stream may have started over before `start`
            ld = self.streams[self.replay][0]
            restarts, taken[self.replay] = divmod(taken[self.replay], len(ld))
            if restarts:
                ld.sampler.set_epoch(self.epoch * 1000 + restarts)
        for (ld, _), t in zip(self.streams, taken):
            skip_batches(ld, t)
        return self._batches([iter(ld) for ld, _ in self.streams], start, restarts)

    def _batches(self, its, start, restarts):
        for p in range(start, len(self)):
            j = self.pattern[p % len(self.pattern)]
            try:
                yield next(its[j])
            except StopIteration:  # only the replay stream can run out: start it over, reshuffled
                restarts += 1
                ld = self.streams[j][0]
                ld.sampler.set_epoch(self.epoch * 1000 + restarts)  # a new order, the same on every rank
                its[j] = iter(ld)
                yield next(its[j])


def val_loaders(root, stage, split="val", imgsz=512, batch=8, workers=0, nc=1):
    """{task: loader} of what a stage is scored on (STAGE_TASKS), without augmentation: stage 1 fundus vessels,
    camtl stenoses and angiogram vessels. A task without images in this split is left out."""
    keys = STAGE_TASKS[stage]
    loaders = {t: build_loader(root, k, split, imgsz=imgsz, batch=batch, augment=False, shuffle=False,
                               workers=workers, nc=nc) for t, k in keys.items()}
    empty = [t for t, ld in loaders.items() if not len(ld.dataset)]  # e.g. an empty test split of one task
    if len(empty) == len(loaders):
        raise SystemExit(f"{root}: no images in split '{split}' of {', '.join(keys.values())}")
    for t in empty:
        log(f"{keys[t]}/{split}: no images, so its {'detection' if t == 'det' else 'segmentation'} metrics are "
            "absent (not 0)")
    return {t: ld for t, ld in loaders.items() if t not in empty}


def split_counts(splits):
    """{task_key: {split: images listed}} of a splits dict, every task and split present."""
    return {k: {s: len(splits.get(k, {}).get(s, [])) for s in SPLITS} for k in TASK_KEYS}


def check_stage_data(root, stage, batch, camtl_ratio=(1, 2), world_size=1, counts=None):
    """Does root hold enough data to train this stage? Call before building loaders. Each task the stage trains on
    needs at least one full batch of training images per rank (batch x world_size images); in camtl the det and
    seg streams need as many batches per epoch as one cycle of camtl_ratio takes from them; the stage's validation
    tasks need at least one val image between them. Otherwise SystemExit with one line: what is short, the image
    counts per task and split, and what to change (batch, camtl_ratio, the folder). counts {task_key: {split: n}}
    defaults to what splits.json lists (or would list: nothing is written); pass the datasets' sizes to check what
    is left after bad files were skipped."""
    root = Path(root)
    if counts is None:
        splits = read_splits(root)
        counts = split_counts(splits if splits is not None else make_splits(root))
    counts = {k: {s: (counts.get(k) or {}).get(s, 0) for s in SPLITS} for k in TASK_KEYS}  # any left out: 0
    ratio = list(camtl_ratio)
    if stage == "domainshift1":
        streams = [("retinography_segmentation", 1)]  # (task key, batches it must give per epoch)
    else:
        streams = [(STAGE_TASKS[stage]["det"], ratio[0]), (STAGE_TASKS[stage]["seg"], ratio[1])]
        if len(ratio) == 3 and ratio[2] > 0:
            streams.append(("retinography_segmentation", 1))  # the replay stream starts over when it runs out
    streams = [(k, nb) for k, nb in streams if nb > 0]

    def short(b):  # what is wrong with batch size b, one phrase per task
        out = []
        for key, nb in streams:
            n = counts[key]["train"]
            per_rank = math.ceil(n / world_size)
            ranks = f" per rank ({world_size} ranks)" if world_size > 1 else ""
            if n == 0:
                out.append(f"{key} has no training images (folder {root / TASK_KEYS[key][0] / 'images'})")
            elif per_rank < b:
                out.append(f"{key} has {n} training images, fewer than one batch of {b}{ranks}")
            elif math.ceil(per_rank / b) < nb:
                k = math.ceil(per_rank / b)
                out.append(f"{key} gives {k} batch{'es' if k > 1 else ''} of {b}{ranks} per epoch but camtl_ratio "
                           f"{ratio} takes {nb} per cycle")
        return out

    problems = short(batch)
    if not sum(counts[k]["val"] for k in STAGE_TASKS[stage].values()):
        problems.append(f"no validation images in {' or '.join(STAGE_TASKS[stage].values())}")
    if not problems:
        return
    table = ", ".join(f"{k} {c['train']}/{c['val']}/{c['test']}" for k, c in counts.items())
    fixes = []
    if any(counts[k]["train"] == 0 for k, _ in streams):
        fixes.append("put the missing task's images and labels in its folder (README: data layout; `python convert.py "
                     f"SET SRC --root {root}` converts a public set), then `python splits.py split --root {root}`")
    fit = next((b for b in range(batch - 1, 0, -1) if not short(b)), None)
    if fit:
        fixes.append(f"lower batch (--set batch={fit})")
    if any("camtl_ratio" in p for p in problems):  # as many batches per cycle as each stream gives per epoch
        gives = {k: math.ceil(math.ceil(counts[k]["train"] / world_size) / batch) for k, _ in streams}
        keys = (STAGE_TASKS[stage]["det"], STAGE_TASKS[stage]["seg"])
        fit_ratio = [min(r, gives.get(k, r)) for k, r in zip(keys, ratio)] + ratio[2:]
        if fit_ratio[0] + fit_ratio[1] > 0:
            fixes.append(f"take fewer batches per cycle (--set camtl_ratio={str(fit_ratio).replace(' ', '')})")
    if any(p.startswith("no validation") for p in problems) and not fixes:
        fixes.append(f"give val images: `python splits.py split --root {root}` (70/30/0)")
    raise SystemExit(f"data {root}: not enough to train {stage}: {'; '.join(problems)}. Images per task "
                     f"(train/val/test): {table}. To fix: {'; or '.join(fixes) or 'add images'}")


if __name__ == "__main__":  # the tools moved to splits.py; an old command line gets the new one, not a traceback
    sys.exit("data.py has no commands: the split and check tools are python splits.py split|check --root R")
