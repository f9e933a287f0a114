"""Data for nanoCAMTL: on-disk layout, splits, datasets, augmentation, loaders, synthetic data, converters.

Layout (DESIGN.md section 6), paths in splits.json relative to root (absolute accepted):

    root/retinography/{images,labels}/          source domain, image + same-stem PNG vessel mask
    root/angiography/segment/{images,labels}/   target domain, image + same-stem PNG vessel mask
    root/angiography/detect/{images,labels}/    target domain, image + same-stem YOLO txt (cls xc yc w h)
    root/splits.json                            {task_key: {train: [...], val: [...], test: [...]}}

Decisions where the brief is open:
- An empty label file is an image without stenoses (a valid negative). A *missing* label file is
  bad input (skipped): write an empty .txt to mark a negative, so a forgotten label never trains as one.
- A label file with a malformed line, a non-finite value or a class id >= nc is skipped whole (its other
  lines cannot be trusted either). A box reaching outside the image is clipped; one entirely
  outside (or of zero size) skips the file.
- Augmentation is axis-aligned (flips, scale, translate, brightness/contrast/gamma), so boxes stay
  exact and tight. Its randomness is a function of (seed, epoch, image index), handed over by the
  sampler, so batches do not depend on the number of workers or on persistent workers.
- A det batch has no vessel mask: its mask keys are None.

CLI: python data.py synth|arcade|folder|split|check|grid ...  (python data.py -h)
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader, Dataset, DistributedSampler

TASKS = {  # task key -> (directory under root, task, domain)
    "retinography_segmentation": ("retinography", "seg", "source"),
    "angiography_segmentation": ("angiography/segment", "seg", "target"),
    "angiography_detection": ("angiography/detect", "det", "target"),
}
IMG_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
PAD = 114 / 255  # letterbox fill, as YOLOv8
AUG = dict(fliplr=0.5, flipud=0.5, scale=0.5, translate=0.1, brightness=0.2, contrast=0.3, gamma=0.3)
DEFAULT_ROOT = Path(__file__).resolve().parent / "data" / "synthetic"
SYNTH = dict(n=300, imgsz=256, seed=0)  # the default synthetic set
SYNTH_VERSION = 1  # bump when the generator changes, so cached sets are regenerated


def log(msg):
    print(f"data: {msg}", file=sys.stderr, flush=True)

# -----------------------------------------------------------------------------
# reading files


def _pil_to_float(im, keep_gray=False):
    """PIL image of any mode/bit depth -> float32 (H, W, 3) in [0, 1] ((H, W, 1) if gray and keep_gray)."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode not in ("L", "LA", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L", "F"):
        im = im.convert("RGB")  # 1, CMYK, YCbCr, ...
    a = np.asarray(im)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255
    elif a.dtype.kind in "ui":
        a = a.astype(np.float32) / 65535  # 16-bit, whether PIL calls it I;16 or I
    else:
        a = a.astype(np.float32)  # float images are taken to be in [0, 1] already
    if a.ndim == 2:
        a = a[..., None]
    a = np.clip(a[..., :1] if a.shape[2] == 2 else a[..., :3], 0, 1)  # drop alpha
    return np.ascontiguousarray(np.repeat(a, 3, 2) if a.shape[2] == 1 and not keep_gray else a)


def read_image(path, keep_gray=False):
    """Any png/jpg/tif/bmp, 8/16-bit, gray/RGB/RGBA -> float32 (H, W, 3) in [0, 1]; ValueError if
    unreadable. keep_gray: a gray image stays (H, W, 1), a third of the work until the very end."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: truncated files fail here, not later
            return _pil_to_float(im, keep_gray)
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def read_mask(path):
    """Mask image -> bool (H, W), vessel = any colour channel > 0 (palette masks: index > 0)."""
    try:
        with Image.open(path) as im:
            im.load()
            a = np.asarray(im)
    except Exception as e:
        raise ValueError(f"cannot read mask {path}: {e}") from e
    if a.ndim == 3:
        a = a[..., :3].max(-1) if a.shape[2] >= 3 else a[..., 0]
    return a > 0


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


def task_files(root, key):
    """Every image of a task's folder (sorted) with the mask/label path that should go with it."""
    folder, task, domain = TASKS[key]
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
        else:  # prefer a PNG mask, accept any image type with the same stem
            found = [q for q in (d / "labels").glob(p.stem + ".*") if q.suffix.lower() in IMG_EXTS]
            found.sort(key=lambda q: q.suffix.lower() != ".png")
            e["mask"] = found[0].relative_to(root).as_posix() if found else f"{folder}/labels/{p.stem}.png"
        e["domain"] = domain
        out.append(e)
    return out


def split_entries(entries, ratios=(0.7, 0.3, 0.0), seed=42, group_regex=None):
    """Shuffle whole groups into train/val/test. With group_regex (searched in the file name; its
    first group, else the whole match, is the key) all images of a patient/video land in one split;
    without it every image is its own group. Each split's list is sorted."""
    def key(e):
        name = Path(e["image"]).name
        m = re.search(group_regex, name) if group_regex else None
        return (m.group(1) if m.groups() else m.group(0)) if m else name

    groups = {}
    for e in entries:
        groups.setdefault(key(e), []).append(e)
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
    return {k: split_entries(task_files(root, k), ratios, seed, group_regex) for k in TASKS}


def write_splits(root, splits):
    p = Path(root) / "splits.json"
    tmp = p.with_suffix(f".json.{os.getpid()}.tmp")  # per process: DDP ranks may all write
    tmp.write_text(json.dumps(splits, indent=1))
    tmp.replace(p)  # atomic: a reader never sees half a file


def load_splits(root, group_regex=None):
    """Read root/splits.json; when missing, write one (70/30/0, seed 42, optionally grouped) first."""
    p = Path(root) / "splits.json"
    if p.exists():
        if group_regex:
            log(f"{p} exists, group_regex ignored (delete it or run `python data.py split` to re-split)")
        return json.loads(p.read_text())
    splits = make_splits(root, group_regex=group_regex)
    write_splits(root, splits)
    log(f"wrote {p}: " + ", ".join(f"{k} {len(v['train'])}/{len(v['val'])}" for k, v in splits.items()))
    return splits


def _task_dir(root, key):
    """root/<the task's folder>, its images/ and labels/ created."""
    d = Path(root) / TASKS[key][0]
    for sub in ("images", "labels"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    return d


def _update_splits(root, key, split):
    splits = load_splits(root)
    splits[key] = split
    write_splits(root, splits)

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
    xs.sort(0), ys.sort(0)  # a flip swaps the corners
    area = (xs[1] - xs[0]) * (ys[1] - ys[0])
    xs, ys = xs.clip(0, S), ys.clip(0, S)
    w, h = xs[1] - xs[0], ys[1] - ys[0]
    keep = (w > 0) & (h > 0)
    if augmented:  # drop slivers left at the canvas edge (YOLOv8's box_candidates)
        keep &= (w > 2) & (h > 2) & (w * h > 0.1 * area)
    out = np.stack([c, xs.mean(0) / S, ys.mean(0) / S, w / S, h / S], 1)
    return out[keep].astype(np.float32)


def transform(img, mask, boxes, imgsz, rng=None, hyp=AUG):
    """Letterbox one sample to imgsz x imgsz and, given an rng, augment it; image, mask and boxes jointly.

    img (h0, w0, C) float, C = 3 or 1 (gray, expanded at the end), mask (h0, w0) bool or None,
    boxes (n, 5) cls+xywh normalised.
    Returns img (3, S, S), mask (1, S, S) 0/1 or None, boxes (m, 5) normalised to the canvas,
    ratio (rx, ry) and pad (px, py) with canvas_px = ratio * original_px + pad (negative ratio = flip)."""
    S, (h0, w0) = imgsz, img.shape[:2]
    r = min(S / h0, S / w0)
    s = rng.uniform(1 - hyp["scale"], 1 + hyp["scale"]) if rng is not None else 1.0
    h, w = max(round(h0 * r * s), 1), max(round(w0 * r * s), 1)
    ox, oy = (S - w) // 2, (S - h) // 2
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


def _check(root, e, task, nc):
    """Scan one splits entry -> (item or None, problem or None); problem = (path, kind, detail, action)."""
    img = Path(root) / e["image"]
    try:
        shape = _image_size(img)
    except Exception as ex:
        empty = img.exists() and img.stat().st_size == 0
        return None, (img, "empty image file" if empty else "unreadable image", "" if empty else str(ex), "skipped")
    item = dict(image=img, shape=shape, boxes=np.zeros((0, 5), np.float32), mask=None)
    if task == "seg":
        m = Path(root) / e["mask"]
        if not m.exists():
            return None, (m, "missing mask", "", "skipped")
        try:
            ms = _image_size(m)
        except Exception as ex:
            return None, (m, "unreadable mask", str(ex), "skipped")
        if ms != shape:
            return None, (m, "mask size mismatch", f"mask {ms} vs image {shape}", "skipped")
        item["mask"] = m
        return item, None
    lab = Path(root) / e["label"]
    if not lab.exists():
        return None, (lab, "missing label file", "an empty file marks a negative", "skipped")
    try:
        item["boxes"], clipped = parse_labels(lab.read_text(errors="replace"), nc)
    except ValueError as ex:
        return None, (lab, *ex.args, "skipped")
    return item, (lab, "box outside the image", "", "clipped") if clipped else None


class TaskDataset(Dataset):
    """One task key's split: letterboxed (optionally augmented) samples with boxes and masks.

    Every file is checked once here; bad ones are reported and skipped (strict=True: raised).
    __getitem__ takes an index or (index, seed, epoch) from SeededSampler, which seeds augmentation."""

    def __init__(self, root, task_key, split="train", imgsz=256, augment=False, nc=1, strict=False,
                 hyp=None, verbose=True):
        assert imgsz % 32 == 0, f"imgsz must be a multiple of 32 (the P5 stride), got {imgsz}"
        if task_key not in TASKS:
            raise KeyError(f"unknown task key {task_key!r}, expected one of {list(TASKS)}")
        self.root, self.key, self.split, self.imgsz, self.augment = Path(root), task_key, split, imgsz, augment
        _, self.task, self.domain = TASKS[task_key]
        self.hyp = {**AUG, **(hyp or {})}
        entries = load_splits(root).get(task_key, {}).get(split, [])
        with ThreadPoolExecutor(8) as ex:  # decoding every file once; PIL releases the GIL
            results = list(ex.map(lambda e: _check(root, e, self.task, nc), entries))
        self.items = [it for it, _ in results if it is not None]
        self.problems = [p for _, p in results if p is not None]
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
            log(("WARNING " if not self.items else "") + "; ".join([head] + tally))

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
                    path=str(it["image"]), orig_shape=img.shape[:2], ratio=ratio, pad=pad)

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
             pad=torch.tensor([s["pad"] for s in samples]))  # (B, 2) canvas px of original x=0 / y=0
    for k in ("mask", "mask_p3", "mask_p4", "mask_p5"):  # (B, 1, S, S), (B, 1, S/8, S/8), ...; None for det
        b[k] = None if samples[0][k] is None else torch.stack([s[k] for s in samples])
    return b


class SeededSampler(DistributedSampler):
    """torch's DistributedSampler (same permutation on every rank, a disjoint share each) that also
    hands each index its augmentation seed, (seed, epoch): augmentation then is reproducible for any
    number of workers, persistent or not. Works without a process group (rank/world_size given)."""

    def __init__(self, dataset, shuffle=True, seed=0, rank=0, world_size=1):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)

    def __iter__(self):
        return ((i, self.seed, self.epoch) for i in super().__iter__())


def build_loader(root, task_key, split="train", imgsz=256, batch=16, augment=None, workers=0, seed=0,
                 rank=0, world_size=1, nc=1, shuffle=None, strict=False, persistent=False, hyp=None):
    """DataLoader for one task and split. augment and shuffle default to split == 'train'.
    Call loader.sampler.set_epoch(e) each epoch to reshuffle."""
    train = split == "train"
    ds = TaskDataset(root, task_key, split, imgsz, train if augment is None else augment, nc, strict, hyp,
                     verbose=rank == 0)
    sampler = SeededSampler(ds, train if shuffle is None else shuffle, seed, rank, world_size)
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available(), persistent_workers=persistent and workers > 0)


class AlternatingLoader:
    """Interleaves task loaders for the camtl stage: per cycle ratio[0] det batches, ratio[1] seg
    batches and ratio[2] source (retinography) batches. The epoch ends with the shortest stream
    (in cycles), identically on every rank; each stream is reshuffled by set_epoch."""

    def __init__(self, det_loader, seg_loader, src_loader=None, ratio=(1, 2)):
        ratio = [int(r) for r in ratio]
        if len(ratio) not in (2, 3) or min(ratio) < 0 or sum(ratio) == 0:
            raise ValueError(f"ratio must be [det, seg] or [det, seg, source] of counts >= 0, got {ratio}")
        if (len(ratio) == 3 and ratio[2] > 0) != (src_loader is not None):
            raise ValueError("a source loader needs a third ratio entry > 0, and vice versa")
        self.streams = [(ld, r) for ld, r in zip((det_loader, seg_loader, src_loader), ratio) if r > 0]
        self.pattern = [j for j, (_, r) in enumerate(self.streams) for _ in range(r)]  # e.g. [0, 1, 1]
        self.cycles = min(len(ld) // r for ld, r in self.streams)
        if self.cycles == 0:
            raise ValueError(f"streams of {[len(ld) for ld, _ in self.streams]} batches can't fill one cycle of {ratio}")
        self.epoch = 0

    def __len__(self):
        return self.cycles * len(self.pattern)

    def set_epoch(self, epoch):
        self.epoch = epoch
        for ld, _ in self.streams:
            ld.sampler.set_epoch(epoch)

    def __iter__(self):
        its = [iter(ld) for ld, _ in self.streams]
        for _ in range(self.cycles):
            for j in self.pattern:
                yield next(its[j])

# -----------------------------------------------------------------------------
# synthetic data: fundus photographs (source) and coronary angiograms (target), drawn from scratch


def _yolo_line(xyxy, W, H, cls=0):
    """A box in pixels -> one YOLO label line, normalised cls xc yc w h."""
    x1, y1, x2, y2 = xyxy
    return f"{cls} {(x1 + x2) / 2 / W:.6f} {(y1 + y2) / 2 / H:.6f} {(x2 - x1) / W:.6f} {(y2 - y1) / H:.6f}\n"


def _smooth_noise(rng, size, cells):
    """Low-frequency noise in about [0, 1]: a cells x cells random grid, bicubically upsampled."""
    g = Image.fromarray(rng.random((cells, cells)).astype(np.float32))
    return np.asarray(g.resize((size, size), Image.BICUBIC))


def _blur(a, sigma):
    """Gaussian blur of a [0, 1] map (through an 8-bit PIL image: plenty for pictures)."""
    im = Image.fromarray((a * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(sigma))
    return np.asarray(im, np.float32) / 255


def _grow(rng, p, ang, w, length, k, depth, out, bend=0.0, curl=0.012, thin=1.2):
    """Grow one vessel (a smooth random curve, one point per k px, tapering) and, recursively, its
    side branches. Appends dict(pts (n, 2) px, ws (n,) widths px) per vessel to out."""
    n = max(int(length / k), 4)
    g = np.exp(-0.5 * (np.arange(-45, 46) / 15) ** 2)  # smoothing over ~15 px: bends, not wiggles
    wobble = np.convolve(rng.normal(0, 1, n + 90), g / np.sqrt((g ** 2).sum()), "valid")  # (n,), unit std
    turn = k * (bend + curl * wobble)  # rad per step; curl 0.012: curvature radius mostly > 80 px
    angs = ang + np.cumsum(turn)
    pts = p + k * np.cumsum(np.stack([np.cos(angs), np.sin(angs)], 1), 0)  # (n, 2)
    ws = np.linspace(w, w * rng.uniform(0.4, 0.6), n)
    ws *= np.sqrt(np.clip((n - np.arange(n)) / (0.2 * n), 0, 1))  # the last 20% tapers to a tip
    out.append(dict(pts=pts, ws=ws))
    if depth == 0:
        return
    spots = np.arange(n // 6, 5 * n // 6)
    for i in np.sort(rng.choice(spots, min(rng.integers(2, 5), len(spots)), replace=False)):
        cw = ws[i] * rng.uniform(0.45, 0.75)
        if cw >= thin * k:  # no twigs thinner than `thin` px at 256
            side = rng.choice([-1, 1])
            _grow(rng, pts[i], angs[i] + side * rng.uniform(0.5, 1.1), cw, (n - i) * k * rng.uniform(0.5, 0.9),
                  k, depth - 1, out, curl=curl, thin=thin)


def _draw(branches, size, ss=2):
    """Rasterise vessels anti-aliased (drawn ss x larger, box-downsampled) -> density (size, size) in [0, 1]."""
    im = Image.new("L", (size * ss, size * ss), 0)
    d = ImageDraw.Draw(im)
    lim = size * ss
    for b in branches:
        P, R = (b["pts"] * ss).tolist(), (b["ws"] * ss / 2).tolist()  # python floats: fast in the loop
        for (x, y), r, (x2, y2) in zip(P[:-1], R[:-1], P[1:]):  # segments with round caps
            if -r <= x <= lim + r and -r <= y <= lim + r:
                d.line([(x, y), (x2, y2)], fill=255, width=max(round(2 * r), 1))
                d.ellipse([x - r, y - r, x + r, y + r], fill=255)
    return np.asarray(im.reduce(ss), np.float32) / 255


def _add_stenoses(rng, branches, count, k, size):
    """Narrow up to `count` spots of thick vessels (a Gaussian dip in width, severity 60-90%) where
    no other vessel touches (a crossing or a branch would hide the narrowing) and away from the
    border. Returns boxes (m, 4) xyxy px, tight around each narrowing."""
    cands = []
    for bi, b in enumerate(branches):
        idx = np.arange(len(b["pts"]))
        ok = (b["ws"] >= 6 * k) & (idx > 14) & (idx < len(idx) - 14)
        ok &= ((b["pts"] > 0.08 * size) & (b["pts"] < 0.92 * size)).all(1)
        cands += [(bi, i) for i in idx[ok]]
    q = np.concatenate([b["pts"] for b in branches])  # every vessel point (Q, 2), its width, its vessel
    wq = np.concatenate([b["ws"] for b in branches])
    owner = np.concatenate([np.full(len(b["ws"]), j) for j, b in enumerate(branches)])
    boxes, centres = [], []
    for _ in range(count * 20):
        if len(boxes) == count or not cands:
            break
        bi, i = cands[rng.integers(len(cands))]
        b = branches[bi]
        if any(np.hypot(*(b["pts"][i] - c)) < 32 * k for c in centres):  # keep stenoses apart
            continue
        sev, L = rng.uniform(0.6, 0.9), rng.uniform(2.5, 6) * k  # depth and Gaussian length (px)
        s = (np.arange(len(b["pts"])) - i) * k  # arc length from the centre
        near = np.abs(s) <= 2 * L
        o = (owner != bi) & (np.abs(q - b["pts"][i]).max(1) < 2 * L + 30 * k)  # other vessels close by
        gap = np.linalg.norm(b["pts"][near][:, None] - q[o][None], axis=2)  # (m, O) centre distances
        if (gap < b["ws"][near][:, None] / 2 + wq[o][None] / 2 + 3 * k).any():
            continue
        w0 = b["ws"][i]
        b["ws"] = b["ws"] * (1 - sev * np.exp(-0.5 * (s / L) ** 2))
        half = max(w0 / 2 + k, 6 * k)  # the vessel's walls, and at least 12 px at 256
        x1, y1 = b["pts"][near].min(0) - half
        x2, y2 = b["pts"][near].max(0) + half
        boxes.append(np.clip([x1, y1, x2, y2], 0, size))
        centres.append(b["pts"][i])
    return np.array(boxes, np.float32).reshape(-1, 4)


def synth_angiogram(rng, size=256, stenoses=0):
    """Angiogram-like image: noisy gray background, dark contrast-filled coronary trees.
    -> (gray uint8 (size, size), vessel mask bool, stenosis boxes (m, 4) xyxy px)."""
    k = size / 256
    branches = []
    for _ in range(rng.integers(2, 4)):  # 2-3 trees entering from the border
        side = rng.integers(4)
        t = rng.uniform(0.15, 0.85) * size
        p = (np.array([(t, 0), (size, t), (t, size), (0, t)][side]) - size / 2) * 1.1 + size / 2  # root off-frame
        ang = math.atan2(size / 2 - p[1], size / 2 - p[0]) + rng.uniform(-0.5, 0.5)
        _grow(rng, p, ang, rng.uniform(8, 12) * k, rng.uniform(0.9, 1.3) * size, k, 3, branches)
    boxes = _add_stenoses(rng, branches, stenoses, k, size)
    dens = _draw(branches, size)  # (size, size)
    bg = rng.uniform(0.5, 0.7) + 0.3 * (_smooth_noise(rng, size, 4) - 0.5) + 0.1 * (_smooth_noise(rng, size, 12) - 0.5)
    img = bg * (1 - rng.uniform(0.45, 0.7) * _blur(dens, 0.7 * k))  # contrast agent absorbs X-rays
    img += rng.uniform(0.015, 0.035) * rng.standard_normal((size, size), np.float32)  # quantum noise
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), dens >= 0.5, boxes


def synth_fundus(rng, size=256):
    """Fundus-photo-like image: round field of view, orange-red retina, bright optic disc, darker
    macula, thin dark-red vessel arcades leaving the disc. -> (RGB uint8 (size, size, 3), mask bool)."""
    k = size / 256
    yy, xx = (np.mgrid[:size, :size] + 0.5).astype(np.float32)
    r = np.hypot(xx - size / 2, yy - size / 2) / (0.46 * size)
    fov = r <= 1
    s = rng.choice([-1, 1])  # optic disc right (+1) or left (-1) of the macula
    disc = np.array([size / 2 + s * 0.27 * size, size / 2 + rng.uniform(-0.04, 0.04) * size])
    t = math.pi if s == 1 else 0.0  # direction disc -> macula
    branches = []
    for ang, bend in ((t + s * 1.1, -s * 0.006), (t - s * 1.1, s * 0.006),  # temporal arcades curl round the macula
                      (t + math.pi + 0.8, 0.0), (t + math.pi - 0.8, 0.0)):
        _grow(rng, disc, ang + rng.uniform(-0.2, 0.2), rng.uniform(3.5, 4.5) * k, rng.uniform(0.55, 0.8) * size,
              k, 3, branches, bend, thin=0.8)
    dens = _draw(branches, size)
    ves = _blur(dens, 0.5 * k)[..., None]
    light = (1 - 0.45 * r ** 2) * (0.9 + 0.2 * _smooth_noise(rng, size, 5))
    col = np.array([0.82, 0.34, 0.13], np.float32) * light[..., None]  # (size, size, 3)
    mac = np.hypot(xx - size / 2 + s * 0.02 * size, yy - size / 2) / (0.07 * size)
    col *= 1 - 0.35 * np.exp(-0.5 * mac ** 2)[..., None]
    dr = rng.uniform(0.06, 0.08) * size
    a = np.clip((dr - np.hypot(xx - disc[0], yy - disc[1])) / (0.3 * dr), 0, 1)[..., None]  # soft-edged disc
    col = col * (1 - a) + np.array([1.0, 0.88, 0.58], np.float32) * a
    col = col * (1 - 0.8 * ves) + np.array([0.42, 0.07, 0.04], np.float32) * 0.8 * ves
    col += 0.01 * rng.standard_normal(col.shape, np.float32)
    col[~fov] = 0.02
    return (np.clip(col, 0, 1) * 255).astype(np.uint8), (dens >= 0.5) & fov


def _synth_one(job):
    """Generate and write one image (+ mask or labels); seeded by (seed, task, i) alone."""
    root, key, i, size, seed = job
    rng = np.random.default_rng([seed, list(TASKS).index(key), i])
    d = Path(root) / TASKS[key][0]
    name = {"retinography_segmentation": "fundus", "angiography_segmentation": "angio",
            "angiography_detection": "sten"}[key] + f"_{i:04d}"
    if key == "retinography_segmentation":
        img, mask = synth_fundus(rng, size)
    else:
        img, mask, boxes = synth_angiogram(rng, size, rng.choice(4, p=[0.15, 0.4, 0.3, 0.15]))
    Image.fromarray(img).save(d / "images" / f"{name}.png", compress_level=1)
    if key == "angiography_detection":
        (d / "labels" / f"{name}.txt").write_text("".join(_yolo_line(b, size, size) for b in boxes))
    else:
        Image.fromarray(mask.astype(np.uint8) * 255).save(d / "labels" / f"{name}.png", compress_level=1)


def make_synthetic(root, n=SYNTH["n"], imgsz=SYNTH["imgsz"], seed=SYNTH["seed"], workers=None):
    """Write n images per task key (deterministic in seed) in the layout, splits.json and a marker
    (written first, marked done last, so an interrupted run is recognised and redone)."""
    root, params = Path(root), dict(n=n, imgsz=imgsz, seed=seed, version=SYNTH_VERSION)
    for key in TASKS:
        _task_dir(root, key)
    (root / "synthetic.json").write_text(json.dumps({**params, "done": False}))
    jobs = [(str(root), key, i, imgsz, seed) for key in TASKS for i in range(n)]
    if workers is None:  # process start-up costs more than a handful of images
        workers = min(os.cpu_count() or 1, 8) if len(jobs) >= 64 else 1
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            list(ex.map(_synth_one, jobs, chunksize=16))
    else:
        for j in jobs:
            _synth_one(j)
    (root / "splits.json").unlink(missing_ok=True)
    load_splits(root)
    (root / "synthetic.json").write_text(json.dumps({**params, "done": True}))
    return root


def ensure_synthetic(root=None, **params):
    """The synthetic set at root (default data/synthetic), generated unless one with these params
    exists. Safe to call from every DDP rank of one machine: one generates, the others wait."""
    import fcntl  # POSIX only, like torchrun

    root = Path(root or DEFAULT_ROOT)
    params = {**SYNTH, **params}
    marker = root / "synthetic.json"
    want = dict(n=params["n"], imgsz=params["imgsz"], seed=params["seed"], version=SYNTH_VERSION, done=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            if json.loads(marker.read_text()) == want:
                return root
            for d in ("retinography", "angiography", "splits.json", "synthetic.json"):  # only what we wrote
                p = root / d
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        elif root.exists() and any(root.iterdir()):
            raise FileExistsError(f"{root} is not empty and holds no synthetic.json: not overwriting it")
        log(f"generating synthetic data in {root} ({want})")
        return make_synthetic(root, **params)

# -----------------------------------------------------------------------------
# converters: ARCADE (COCO-style JSON) and plain folders of images + masks


def convert_coco(json_path, images_dir, root, task="detect", prefix=""):
    """One COCO-style split -> the angiography layout; returns its splits entries.

    detect: stenosis boxes (categories named 'stenosis' if any, else all) -> class 0 YOLO labels,
    images without one get an empty label file (negatives). segment: all polygons -> vessel mask."""
    coco = json.loads(Path(json_path).read_text())
    key = "angiography_detection" if task == "detect" else "angiography_segmentation"
    folder, d = TASKS[key][0], _task_dir(root, key)
    cats = {c["id"] for c in coco.get("categories", []) if c.get("name", "").lower() == "stenosis"}
    anns = {}
    for a in coco.get("annotations", []):
        anns.setdefault(a["image_id"], []).append(a)
    entries = []
    for im in coco["images"]:
        src = Path(images_dir) / im["file_name"]
        if not src.exists():
            log(f"{src}: listed in {json_path} but missing -> skipped")
            continue
        W, H, name = im["width"], im["height"], prefix + Path(im["file_name"]).name
        shutil.copy2(src, d / "images" / name)
        e = {"image": f"{folder}/images/{name}", "domain": "target"}
        if task == "detect":
            lines = []
            for a in anns.get(im["id"], []):
                if cats and a["category_id"] not in cats:
                    continue
                x, y, w, h = a["bbox"]
                x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
                if x2 > x1 and y2 > y1:
                    lines.append(_yolo_line((x1, y1, x2, y2), W, H))
            e["label"] = f"{folder}/labels/{Path(name).stem}.txt"
            (Path(root) / e["label"]).write_text("".join(lines))
        else:
            mask = Image.new("L", (W, H), 0)
            draw = ImageDraw.Draw(mask)
            for a in anns.get(im["id"], []):
                for poly in a.get("segmentation") or []:
                    if isinstance(poly, list) and len(poly) >= 6:  # RLE dicts are not used by ARCADE
                        draw.polygon([tuple(poly[j:j + 2]) for j in range(0, len(poly) - 1, 2)], fill=255)
            e["mask"] = f"{folder}/labels/{Path(name).stem}.png"
            mask.save(Path(root) / e["mask"])
        entries.append(e)
    return entries


def convert_arcade(src, root, task="detect"):
    """ARCADE release folder (src/{train,val,test}/{images, annotations/*.json}) -> layout; keeps
    ARCADE's own splits in splits.json. File names get the split as prefix (ARCADE reuses 1.png...)."""
    split = {}
    for s in ("train", "val", "test"):
        jsons = sorted((Path(src) / s / "annotations").glob("*.json"))
        split[s] = convert_coco(jsons[0], Path(src) / s / "images", root, task, f"{s}_") if jsons else []
    key = "angiography_detection" if task == "detect" else "angiography_segmentation"
    _update_splits(root, key, split)
    log(f"ARCADE {task}: " + ", ".join(f"{s} {len(v)}" for s, v in split.items()) + f" images -> {root}")
    return split


def convert_folder(images, masks, root, task_key, group_regex=None):
    """A folder of images + same-stem masks (seg keys; YOLO .txt for detection) -> root's task
    folder (masks rewritten as 0/255 PNG), then that task is re-split 70/30 (grouped if asked)."""
    task, d, n = TASKS[task_key][1], _task_dir(root, task_key), 0
    for p in sorted(Path(images).iterdir()):
        if p.suffix.lower() not in IMG_EXTS:
            continue
        if task == "det":
            lab = Path(masks) / f"{p.stem}.txt"
            if not lab.exists():
                log(f"{p}: no {lab.name} in {masks} -> skipped")
                continue
            shutil.copy2(lab, d / "labels" / lab.name)
        else:
            found = [q for q in Path(masks).glob(p.stem + ".*") if q.suffix.lower() in IMG_EXTS]
            if not found:
                log(f"{p}: no same-stem mask in {masks} -> skipped")
                continue
            Image.fromarray(read_mask(found[0]).astype(np.uint8) * 255).save(d / "labels" / f"{p.stem}.png")
        shutil.copy2(p, d / "images" / p.name)
        n += 1
    _update_splits(root, task_key, split_entries(task_files(root, task_key), group_regex=group_regex))
    log(f"{n} images -> {d}")
    return n

# -----------------------------------------------------------------------------
# a picture of the data, and the CLI


def save_grid(root=None, out=None, cols=3, tile=192):
    """Rows: fundus, angiogram (seg), angiogram (det), angiogram (det, augmented); for each sample
    the letterboxed image and the same with its mask (green) and boxes (red) drawn on it."""
    root = ensure_synthetic(root) if root is None else Path(root)
    out = Path(out or Path(__file__).resolve().parent / "assets" / "synthetic_grid.png")
    rows = [("retinography_segmentation", "val", False), ("angiography_segmentation", "val", False),
            ("angiography_detection", "val", False), ("angiography_detection", "train", True)]
    grid = Image.new("RGB", (2 * cols * tile, len(rows) * tile))
    for r, (key, split, aug) in enumerate(rows):
        ds = TaskDataset(root, key, split, tile, aug, verbose=False)
        picks = [i for i in range(len(ds)) if TASKS[key][1] == "seg" or len(ds.items[i]["boxes"])][:cols]
        for c, i in enumerate(picks):
            s = ds[(i, 0, 0)]
            raw = (s["img"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            ann = raw.astype(np.float32)
            if s["mask"] is not None:
                m = s["mask"][0].numpy()[..., None]
                ann = ann * (1 - 0.45 * m) + np.array([0, 255, 0]) * 0.45 * m
            ann = Image.fromarray(ann.astype(np.uint8))
            draw = ImageDraw.Draw(ann)
            for _, x, y, w, h in s["boxes"].tolist():
                draw.rectangle([(x - w / 2) * tile, (y - h / 2) * tile, (x + w / 2) * tile, (y + h / 2) * tile],
                               outline=(255, 0, 0), width=2)
            grid.paste(Image.fromarray(raw), (2 * c * tile, r * tile))
            grid.paste(ann, ((2 * c + 1) * tile, r * tile))
        ImageDraw.Draw(grid).text((4, r * tile + 2), f"{key}/{split}" + (" aug" if aug else ""), fill=(255, 255, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    log(f"wrote {out}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="nanoCAMTL data tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("synth", help="generate the synthetic set")
    a.add_argument("--root", default=None)
    for k, v in SYNTH.items():
        a.add_argument(f"--{k}", type=int, default=v)
    a = sub.add_parser("arcade", help="convert an ARCADE release folder")
    a.add_argument("src"), a.add_argument("--root", required=True)
    a.add_argument("--task", choices=("detect", "segment"), default="detect")
    a = sub.add_parser("folder", help="convert a folder of images + same-stem masks (or .txt labels)")
    a.add_argument("images"), a.add_argument("masks"), a.add_argument("--root", required=True)
    a.add_argument("--task", choices=list(TASKS), required=True), a.add_argument("--group", default=None)
    a = sub.add_parser("split", help="(re)write splits.json, optionally grouped by a file-name regex")
    a.add_argument("--root", required=True), a.add_argument("--group", default=None)
    a = sub.add_parser("check", help="scan every split for bad inputs")
    a.add_argument("--root", required=True), a.add_argument("--nc", type=int, default=1)
    a = sub.add_parser("grid", help="save a picture of synthetic samples")
    a.add_argument("--root", default=None), a.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "synth":
        ensure_synthetic(args.root, n=args.n, imgsz=args.imgsz, seed=args.seed)
    elif args.cmd == "arcade":
        convert_arcade(args.src, args.root, args.task)
    elif args.cmd == "folder":
        convert_folder(args.images, args.masks, args.root, args.task, args.group)
    elif args.cmd == "split":
        (Path(args.root) / "splits.json").unlink(missing_ok=True)
        load_splits(args.root, args.group)
    elif args.cmd == "check":
        for key in TASKS:
            for s in ("train", "val", "test"):
                TaskDataset(args.root, key, s, nc=args.nc)
    elif args.cmd == "grid":
        save_grid(args.root, args.out)


if __name__ == "__main__":
    main()
