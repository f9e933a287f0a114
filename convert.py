"""Converters for nanoCAMTL: public angiography and fundus data sets, as downloaded and extracted, into data.py's
layout with a splits.json, in one command each, followed by a summary of what was written.

    python convert.py SET SRC --root OUT [--val F] [--preprocess fov,green,resize=S] [--group REGEX] [--imgsz S]
    python convert.py folder IMAGES MASKS --root OUT --task TASK_KEY [--prefix P]   images + same-stem masks
    python convert.py summary --root OUT [--imgsz S]                                 the summary alone

SET (docs/convert.md has the table of the layouts and download variants each accepts, and what it writes):
    angiography  arcade (stenosis boxes + syntax vessel segments), cadica (stenosis boxes, non-lesion negatives),
                 xcad, dca1 (vessel masks)
    fundus       drive, chase, stare, hrf, fives (vessel masks)

Why a file of its own: data.py stays one concern (layout, splits, loading, checks), and the converters need data's
writer helpers and layout (TASK_KEYS, task_dir, yolo_line, read_splits, write_splits) and splits.py's split_root, so
data importing convert would be an import cycle. It sits next to data.py as synthetic.py does; imports go
data <- splits <- convert, never back.

Every converter is one small function that finds the set's files and hands them, as {official split: samples}, to
`finish`, which writes each with one writer, `write_sample`: it copies the image (or saves it as PNG when the source
format is not one the loader reads, or when preprocessing changes it), writes the vessel mask as a 0/255 PNG or the
boxes as a YOLO .txt (an empty file for a negative), and returns the sample's splits.json entry with a grouping key
("group"): all images of one patient, video or eye pair share it. A sample met twice (one image in two files) is
read once; an unreadable one is skipped.

Splits (`assign_splits`): a set's official split is kept (official train -> train, val -> val, test -> test) and
recorded in each entry ("set": "DRIVE", "official": "test"; null for sets without one); a fraction --val of the
official train's images, whole groups at a time (seeded), becomes val. Defaults: 0 for a set with an official val
split (ARCADE), 0.2 for sets with only train/test (DRIVE, FIVES), 0.3 for sets without any (CADICA, XCAD, DCA1,
CHASE_DB1, STARE, HRF). So frames of one patient or video never straddle train and val. `folder` and
`python splits.py split` re-split only what no set assigned (splits.resplit), so no official val or test image reaches
train.

Several sets and folders share a root and a task folder. Output names carry the set, e.g. drive_21_training.tif,
cadica_p3_v2_00022.png (ARCADE keeps {split}_{n}.png); entries record their owner, a set ("set") or a folder
("folder"). A conversion never overwrites what splits.json lists for another owner: it stops before writing anything,
naming the clash (`refuse_clashes`; folder --prefix names a folder's images apart). Converting a set or folder again
replaces its own entries and deletes the files it wrote before and no longer writes, nothing else (`drop_own`).

Preprocessing (--preprocess, comma-separated, numpy/PIL only, images saved as 8-bit PNG):
    fov       fundus only: pixels outside the field of view set to black (image and mask) and both cropped to the
              FOV's bounding box; the FOV is the set's own mask where it ships one (DRIVE, HRF), else the red
              channel above 10% of its maximum (`fov_mask`)
    green     the green channel (gray images: the image itself) contrast-enhanced by CLAHE (`clahe`: 8 x 8 tiles,
              clip limit 2), saved as a gray image
    resize=S  longest side = S, aspect ratio kept (never stretched); masks resized bilinearly and re-thresholded
"""
import argparse
import gzip
import io
import json
import os
import random
import re
import shutil
import sys
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data import (IMG_EXTS, SPLITS, TASK_KEYS, TaskDataset, pil_to_float, task_dir, yolo_line, log, make_splits,
                  mask_threshold, read_splits, write_splits)
from splits import split_root

DET, SEG, SRC = "angiography_detection", "angiography_segmentation", "retinography_segmentation"

# -----------------------------------------------------------------------------
# reading the sources


def open_image(path):
    """A PIL image from any format PIL reads, also gzip-compressed (STARE ships im0001.ppm.gz), loaded."""
    path = Path(path)
    data = gzip.decompress(path.read_bytes()) if path.suffix.lower() == ".gz" else path.read_bytes()
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def read_binary(src):
    """A mask as a path (any PIL format, .gz too), PIL image or array -> bool (H, W). A palette image is read by its
    colours, not its indices (a GIF's index 0 may well be white); colour masks by their largest channel; vessel =
    value > data.mask_threshold (0 for two-valued masks: 0/1, 0/255; half the maximum for JPEG-like masks)."""
    if not isinstance(src, np.ndarray):
        im = src if isinstance(src, Image.Image) else open_image(src)
        if im.mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        src = np.asarray(im)
    a = src.astype(np.uint8) if src.dtype == bool else src
    if a.ndim == 3:
        a = a[..., :3].max(-1)
    return a > mask_threshold(a)[0]


def find_dir(src, *names):
    """src/name, or src/<one folder>/name (archives often add one level), for the first name that exists; else None."""
    for name in names:
        for d in [Path(src) / name, *sorted(Path(src).glob(f"*/{name}"))]:
            if d.is_dir():
                return d
    return None


def need_dir(src, set_name, *names, expected=""):
    """find_dir, or SystemExit naming what the set's layout should look like."""
    d = find_dir(src, *names)
    if d is None:
        raise SystemExit(f"{set_name}: no {' or '.join(names)}/ in {src}; expected {expected}")
    return d


def _read_list(path):
    """The non-empty lines of a text file ([] when it does not exist)."""
    return [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()] if Path(path).exists() else []

# -----------------------------------------------------------------------------
# preprocessing (numpy/PIL only)


def parse_preprocess(spec):
    """'fov,green,resize=512' -> {'fov': True, 'green': True, 'resize': 512}; '' or None -> {}.
    ValueError naming an unknown step."""
    out = {}
    for tok in (spec or "").replace(" ", "").split(","):
        if tok in ("fov", "green"):
            out[tok] = True
        elif tok.startswith("resize=") and tok[7:].isdigit() and int(tok[7:]) > 0:
            out["resize"] = int(tok[7:])
        elif tok:
            raise ValueError(f"--preprocess: unknown step {tok!r}; steps are fov, green, resize=S (S > 0 pixels)")
    return out


def fov_mask(img):
    """Field of view of a fundus photograph: float (H, W, C) in [0, 1] -> bool (H, W), the red channel (the only one
    of a gray image) above 10% of its maximum. The camera aperture's surround is near 0 in red, the retina is not."""
    red = img[..., 0]
    return red > 0.1 * float(red.max()) if red.size else red > 0


def clahe(g, tiles=8, clip=2.0):
    """Contrast-limited adaptive histogram equalisation (Zuiderveld 1994) of a uint8 (H, W) image -> uint8 (H, W).

    The image is cut into tiles x tiles tiles (edge-padded to a whole number); each tile's 256-bin histogram is
    clipped at clip x its mean bin count and the clipped excess spread evenly over all bins; its cumulative histogram
    is the tile's grey-level map. Each pixel's value blends the maps of its four nearest tile centres bilinearly,
    so there are no seams. With tiles=1 and a large clip it is global histogram equalisation."""
    H, W = g.shape
    tiles = max(1, min(tiles, H, W))
    th, tw = -(-H // tiles), -(-W // tiles)  # tile size, ceil
    p = np.pad(g, ((0, th * tiles - H), (0, tw * tiles - W)), mode="edge").astype(np.int64)
    blocks = p.reshape(tiles, th, tiles, tw).transpose(0, 2, 1, 3).reshape(tiles * tiles, th * tw)  # (T, th*tw)
    offset = 256 * np.arange(tiles * tiles)[:, None]
    hist = np.bincount((blocks + offset).ravel(), minlength=256 * tiles * tiles).reshape(-1, 256).astype(np.float64)
    limit = max(clip * th * tw / 256, 1.0)
    hist = np.minimum(hist, limit) + (hist - limit).clip(0).sum(1, keepdims=True) / 256
    lut = (hist.cumsum(1) / hist.sum(1, keepdims=True) * 255).reshape(tiles, tiles, 256)  # (ty, tx, level)

    def axis(n, size):  # per pixel along one axis: lower tile, upper tile, weight of the upper one
        c = (np.arange(n) + 0.5) / size - 0.5  # position in tile-centre units
        lo = np.floor(c).clip(0, tiles - 1).astype(np.int64)
        return lo, np.minimum(lo + 1, tiles - 1), (c - lo).clip(0, 1)

    (y0, y1, wy), (x0, x1, wx) = axis(H, th), axis(W, tw)
    v, wy = g.astype(np.int64), wy[:, None]
    top = lut[y0[:, None], x0[None], v] * (1 - wx) + lut[y0[:, None], x1[None], v] * wx
    bottom = lut[y1[:, None], x0[None], v] * (1 - wx) + lut[y1[:, None], x1[None], v] * wx
    return (top * (1 - wy) + bottom * wy + 0.5).clip(0, 255).astype(np.uint8)


def resize_longest(im, size, mask=False):
    """A PIL image with its longest side scaled to size, aspect ratio kept (never stretched); bilinear (antialiased
    when shrinking). mask=True: a 0/255 mask, re-thresholded at 128 after resampling."""
    W, H = im.size
    r = size / max(W, H)
    new = (max(round(W * r), 1), max(round(H * r), 1))
    if new == (W, H):
        return im
    out = im.resize(new, Image.BILINEAR)
    return out.point(lambda v: 255 if v >= 128 else 0) if mask else out


def preprocess(img, mask, prep, fov=None):
    """Apply the --preprocess steps to one sample. img float (H, W, C) in [0, 1] (C = 1 or 3), mask bool (H, W) or None,
    fov the set's own FOV mask (bool (H, W)) or None (then `fov_mask`). -> (PIL image 8-bit L or RGB, PIL 0/255 L mask
    or None). Boxes are not touched: resizing keeps their normalised coordinates (fov is refused for detection)."""
    if prep.get("fov"):
        f = fov if fov is not None and fov.shape == img.shape[:2] else fov_mask(img)
        img = img * f[..., None]
        mask = mask & f if mask is not None else None
        ys, xs = np.flatnonzero(f.any(1)), np.flatnonzero(f.any(0))
        if len(ys):  # crop to the FOV's bounding box
            crop = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
            img, f, mask = img[crop], f[crop], mask[crop] if mask is not None else None
    if prep.get("green"):
        g = clahe((img[..., 1 if img.shape[2] == 3 else 0] * 255 + 0.5).astype(np.uint8))
        img = (g * f if prep.get("fov") else g)[..., None].astype(np.float32) / 255
    a = (img * 255 + 0.5).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)
    m = Image.fromarray(mask.astype(np.uint8) * 255) if mask is not None else None
    if prep.get("resize"):
        im = resize_longest(im, prep["resize"])
        m = resize_longest(m, prep["resize"], mask=True) if m is not None else None
    return im, m

# -----------------------------------------------------------------------------
# the one writer


def box_lines(boxes, W, H):
    """Boxes (x1, y1, x2, y2) in pixels of a W x H image -> YOLO lines (class 0), clipped to the image; boxes with
    nothing left inside are dropped."""
    out = []
    for x1, y1, x2, y2 in boxes:
        x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, W), min(y2, H)
        if x2 > x1 and y2 > y1:
            out.append(yolo_line((x1, y1, x2, y2), W, H))
    return out


def write_sample(root, key, name, image, mask=None, boxes=None, group=None, prep=None, fov=None):
    """One sample into root's layout -> its splits.json entry {image, mask | label, domain, group}, or None (skipped,
    logged) when the image or mask is unreadable or the mask's size differs from the image's.

    key: task key (data.TASK_KEYS); name: output stem, unique in the task folder; image: source path (any PIL format,
    .gz too). Copied as it is when the loader reads its format and prep is empty, else saved as PNG.
    mask (segmentation): path, PIL image, bool (H, W) array, or a function returning one (drawn only when written)
    -> labels/{name}.png, 0/255 8-bit.
    boxes (detection): list of (x1, y1, x2, y2) pixels of the source image -> labels/{name}.txt, YOLO class 0,
    normalised; [] writes an empty file (a negative); a str is YOLO label text, written as it is.
    group: grouping key for splits (default: name). prep: parse_preprocess dict. fov: the set's FOV mask (path) ->
    fov/{name}.png beside images/ and labels/, 0/255, through the same preprocessing as the mask."""
    prep, folder, d = prep or {}, TASK_KEYS[key][0], task_dir(root, key)
    if prep.get("fov") and key != SRC:
        raise ValueError("--preprocess fov is for fundus sets (retinography) only: it crops, which would move boxes")
    image = Path(image)
    try:
        src_im = open_image(image) if prep or image.suffix.lower() not in IMG_EXTS else None
        if src_im is None:
            with Image.open(image) as im:  # the header is enough
                W, H = im.size
        else:
            W, H = src_im.size
        m = read_binary(mask() if callable(mask) else mask) if mask is not None else None
    except (OSError, ValueError) as ex:  # PIL's UnidentifiedImageError and gzip's BadGzipFile are OSErrors
        log(f"{image}: unreadable ({ex}) -> skipped")
        return None
    if m is not None and m.shape != (H, W):
        log(f"{image}: mask {mask} is {m.shape[1]}x{m.shape[0]}, the image {W}x{H} -> skipped")
        return None
    f = read_binary(fov) if fov is not None and Path(fov).exists() else None
    f = f if f is not None and f.shape == (H, W) else None
    out_f = None
    if prep:
        out_im, out_m = preprocess(pil_to_float(src_im, keep_gray=True), m, prep, f)
        if f is not None:  # the FOV mask through the same crop and resize as the vessel mask
            out_f = preprocess(pil_to_float(src_im, keep_gray=True), f, prep, f)[1]
    else:
        out_im, out_m = src_im, Image.fromarray(m.astype(np.uint8) * 255) if m is not None else None
        out_f = Image.fromarray(f.astype(np.uint8) * 255) if f is not None else None
    dst = d / "images" / (f"{name}{image.suffix}" if out_im is None else f"{name}.png")
    for old in (q for q in (d / "images").glob(f"{name}.*") if q.stem == name and q != dst):
        old.unlink()  # an earlier conversion's copy in another format: one image per stem
    if out_im is None:
        shutil.copy2(image, dst)
    else:
        out_im.save(dst)
    e = {"image": f"{folder}/images/{dst.name}", "domain": TASK_KEYS[key][2], "group": group or name}
    if TASK_KEYS[key][1] == "det":
        e["label"] = f"{folder}/labels/{name}.txt"
        text = boxes if isinstance(boxes, str) else "".join(box_lines(boxes or [], W, H))
        (Path(root) / e["label"]).write_text(text)
    else:
        e["mask"] = f"{folder}/labels/{name}.png"
        out_m.save(Path(root) / e["mask"])
        if out_f is not None:  # the set's field of view: vessel scores count only inside it (evaluate.py)
            e["fov"] = f"{folder}/fov/{name}.png"
            (Path(root) / e["fov"]).parent.mkdir(parents=True, exist_ok=True)
            out_f.save(Path(root) / e["fov"])
    return e

# -----------------------------------------------------------------------------
# who wrote what: owners, clashes, replacing a conversion


def owns(owner, e, prefixes=()):
    """Is a splits.json entry this converter's? owner: {"set": NAME} or {"folder": PATH}. An entry that records neither
    (an older convert.py's) is a set's when its file name starts with one of the set's prefixes (e.g. "drive_")."""
    if "set" in e or "folder" in e:
        return all(e.get(k) == v for k, v in owner.items())
    return bool(prefixes) and Path(e["image"]).name.startswith(tuple(prefixes))


def refuse_clashes(root, key, owner, names, splits, prefixes=()):
    """SystemExit, before anything is written, when one of a conversion's output names (stems) is listed in splits's
    task folder for another owner: another set, another folder, or no converter (by hand, `splits.py split`). Files
    splits.json does not list belong to no one (the loader ignores them) and may be overwritten."""
    images = os.path.normpath(Path(root) / TASK_KEYS[key][0] / "images")
    taken = {}
    for e in (e for v in (splits or {}).get(key, {}).values() for e in v):
        p = Path(os.path.normpath(Path(root) / e["image"]))
        if str(p.parent) == images and not owns(owner, e, prefixes):
            taken[p.stem] = e
    clash = sorted(set(names) & set(taken))
    if not clash:
        return
    e = taken[clash[0]]
    who = f"set {e['set']}" if e.get("set") else f"folder {e['folder']}" if e.get("folder") else "no converter"
    me, fix = (f"folder {owner['folder']}", "give --prefix P to name this folder's images apart") if "folder" in owner \
        else (owner["set"], "move those files and their splits.json entries away, or convert their folder again with "
              "--prefix P")
    raise SystemExit(f"{me}: {len(clash)} output names are taken in {images}, e.g. {clash[0]} (listed in splits.json "
                     f"for {who}); nothing written: {fix}")


def write_all(root, key, owner, by_split, prep=None, prefixes=()):
    """Write one conversion's samples -> {split: entries}. by_split: {split: [write_sample keyword dicts]}. A name met
    twice (one image in two files, e.g. im0001.ppm and im0001.ppm.gz) is read once; names another owner holds stop
    the conversion before anything is written (refuse_clashes)."""
    todo, seen = {}, {}
    for s, samples in by_split.items():
        for smp in samples:
            if smp["name"] in seen:
                log(f"{smp['image']}: the same sample as {seen[smp['name']]} -> read once")
                continue
            seen[smp["name"]] = smp["image"]
            todo.setdefault(s, []).append(smp)
    refuse_clashes(root, key, owner, seen, read_splits(root), prefixes)
    return {s: [e for e in (write_sample(root, key, prep=prep, **smp) for smp in v) if e] for s, v in todo.items()}


def drop_own(root, per, owner, prefixes, written):
    """A task's {split: entries} without this converter's earlier entries and those of the images just written ->
    (per, files deleted). The files of its earlier entries that it no longer writes are deleted, for entries that
    record this owner only: never a file it cannot show it wrote."""
    root = Path(root)
    keep = {os.path.normpath(root / e[k]) for e in written for k in ("image", "mask", "label", "fov") if k in e}
    out, gone = {s: [] for s in SPLITS}, 0
    for s in SPLITS:
        for e in per.get(s, []):
            files = [os.path.normpath(root / e[k]) for k in ("image", "mask", "label", "fov") if k in e]
            if not owns(owner, e, prefixes) and files[0] not in keep:
                out[s].append(e)
            elif "set" in e or "folder" in e:
                for f in (f for f in files if f not in keep and os.path.exists(f)):
                    os.unlink(f)
                    gone += 1
    return out, gone

# -----------------------------------------------------------------------------
# splits


def assign_splits(by_split, val=0.0, seed=42, group_regex=None):
    """{official split: entries with a 'group'} -> {train, val, test}, each sorted by image. Official val and test
    stay; about a fraction val of the official train's images becomes val, whole groups at a time (groups shuffled
    with seed; at least one group when val > 0, never all of them). group_regex, searched in the output file name
    (its first group, else the whole match, is the key), overrides the entries' own groups."""
    out = {s: list(by_split.get(s, [])) for s in SPLITS}
    if group_regex:
        for e in (e for v in out.values() for e in v):
            m = re.search(group_regex, Path(e["image"]).name)
            e["group"] = (m.group(1) if m.groups() else m.group(0)) if m else e["group"]
    groups = {}
    for e in out["train"]:
        groups.setdefault(e["group"], []).append(e)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    target, taken, moved = max(round(val * len(out["train"])), 1) if val > 0 else 0, set(), 0
    for k in order[:-1]:  # one group at least stays in train
        if moved >= target:
            break
        taken.add(k)
        moved += len(groups[k])
    out["val"] += [e for e in out["train"] if e["group"] in taken]
    out["train"] = [e for e in out["train"] if e["group"] not in taken]
    return {s: sorted(v, key=lambda e: e["image"]) for s, v in out.items()}


def finish(root, key, set_name, by_split, prep=None, val=0.0, seed=42, group_regex=None, official=False,
           prefixes=()):
    """Write one set's samples into root and record them in splits.json -> {split: entries} written.

    by_split: {official split: [write_sample keyword dicts]} ("train" for a set without official splits:
    official=False). Each entry records its "set" and "official" split (None without one); assign_splits keeps the
    official splits and moves a fraction val of the train to val. The set's earlier entries are replaced and the
    files it wrote before and no longer writes deleted (drop_own); other sets' and folders' entries stay. prefixes:
    the set's output name prefixes, which claim entries of a splits.json written before sets were recorded."""
    owner = {"set": set_name}
    recorded = read_splits(root)
    splits = recorded if recorded is not None else make_splits(root)  # before writing: what else is on disk
    written = write_all(root, key, owner, by_split, prep, prefixes)
    for s, es in written.items():
        for e in es:
            e.update(set=set_name, official=s if official else None)
    split = assign_splits(written, val, seed, group_regex)
    per, gone = drop_own(root, splits.get(key, {}), owner, prefixes, [e for v in split.values() for e in v])
    splits[key] = {s: sorted(per[s] + split[s], key=lambda e: e["image"]) for s in SPLITS}
    write_splits(root, splits)
    groups = len({e["group"] for v in split.values() for e in v})
    log(f"{set_name} -> {key}: " + ", ".join(f"{s} {len(v)}" for s, v in split.items()) + f" images in {groups} "
        f"groups" + (f"; {gone} files it wrote before and no longer lists deleted" if gone else "")
        + f" -> {Path(root) / 'splits.json'}")
    return split

# -----------------------------------------------------------------------------
# angiography: ARCADE (COCO-style JSON), CADICA, XCAD, DCA1


def polygon_mask(anns, W, H):
    """COCO annotations -> bool (H, W), every polygon filled (RLE dicts: ARCADE uses none)."""
    mask = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(mask)
    for a in anns:
        for poly in a.get("segmentation") or []:
            if isinstance(poly, list) and len(poly) >= 6:
                draw.polygon([tuple(poly[j:j + 2]) for j in range(0, len(poly) - 1, 2)], fill=255)
    return np.asarray(mask) > 0


def coco_samples(json_path, images_dir, task="detect", prefix=""):
    """One COCO-style split -> write_sample keyword dicts (each image its own group). detect: the stenosis boxes
    (categories named 'stenosis' if any, else all) -> class 0; an image without one is a negative. segment: all its
    polygons filled into one vessel mask, drawn when written."""
    coco = json.loads(Path(json_path).read_text())
    cats = {c["id"] for c in coco.get("categories", []) if str(c.get("name", "")).lower() == "stenosis"}
    anns = {}
    for a in coco.get("annotations", []):
        anns.setdefault(a["image_id"], []).append(a)
    out = []
    for im in coco["images"]:
        src, own = Path(images_dir) / im["file_name"], anns.get(im["id"], [])
        if not src.exists():
            log(f"{src}: listed in {json_path} but missing -> skipped")
            continue
        smp = dict(name=prefix + Path(im["file_name"]).stem, image=src)
        if task == "detect":
            smp["boxes"] = [(x, y, x + w, y + h) for a in own if not cats or a["category_id"] in cats
                            for x, y, w, h in [a["bbox"]]]
        else:
            smp["mask"] = partial(polygon_mask, own, im["width"], im["height"])
        out.append(smp)
    return out


def _coco_json(d, split, jsons):
    """The annotation file of an ARCADE split folder d: the only one, or the one named {split}, {d.name} or
    instances_default; else SystemExit naming them."""
    named = [p for p in jsons if p.stem.lower() in (split, d.name.lower(), "instances_default")]
    if len(named) == 1 or len(jsons) == 1:
        return (named or jsons)[0]
    listed = ", ".join(p.name for p in jsons)
    raise SystemExit(f"arcade: {len(jsons)} annotation files in {d / 'annotations'} ({listed}); expected one, "
                     f"or one named {split}.json, {d.name}.json or instances_default.json")


def arcade_folders(src):
    """ARCADE's split folders at any depth below src -> [(task or None, split, folder, annotation file)]. A split folder
    holds images/ and annotations/*.json; its split is the train/val/test word of its name (train, sten_train,
    test_cases_stenosis); its task the innermost folder name, from src's own on, that names one: "sten" -> detect,
    "syntax" or "seg" -> segment."""
    src, out = Path(src).resolve(), []
    for ann in sorted(p for p in src.rglob("annotations") if p.is_dir()):
        d = ann.parent
        jsons = sorted(p for p in ann.iterdir() if p.suffix.lower() == ".json")
        split = next((w for w in re.split(r"[^a-z]+", d.name.lower()) if w in SPLITS), None)
        if not jsons or split is None or not (d / "images").is_dir():
            continue
        names = [n.lower() for n in reversed(d.relative_to(src.parent).parts)]
        task = next(("detect" if "sten" in n else "segment" for n in names if re.search("sten|syntax|seg", n)), None)
        out.append((task, split, d, _coco_json(d, split, jsons)))
    return out


def convert_arcade(src, root, task=None, val=0.0, prep=None, group=None, seed=42):
    """ARCADE, either release as extracted, from any folder above its split folders (arcade_folders): the Zenodo one
    (10390295), arcade/{stenosis,syntax}/{train,val,test}/{images/N.png, annotations/{split}.json}; the challenge one
    (8386059), arcade_challenge_datasets/dataset_phase_1/{stenosis_dataset/sten_{train,val}, segmentation_dataset/
    seg_{train,val}}/ and dataset_final_phase/{test_cases_stenosis,test_case_segmentation}/, annotations sten_train.json
    ... instances_default.json; or one part of either. stenosis -> detection boxes; syntax, segmentation -> vessel
    masks of all segment polygons. task: that part only where both are there, else the task of the part (a lone part's
    polygons may be read as the other task). ARCADE's own train/val/test are kept; names get the split as prefix (ARCADE
    reuses 1.png ...): train_1.png. Both parts are checked for clashes before either is written.
    -> {split: entries} of the last part converted."""
    found = arcade_folders(src)
    if not found:
        raise SystemExit(f"arcade: no train/val/test folder with images/ and annotations/*.json below {src}; expected "
                         "ARCADE's arcade/{stenosis,syntax}/ (Zenodo) or arcade_challenge_datasets/ (challenge)")
    both, parts = {t for t, *_ in found} >= {"detect", "segment"}, {}
    for t, s, d, js in found:
        t = (t if both or not task else task) or "detect"
        if both and task and t != task:
            continue
        if (t, s) in parts:
            raise SystemExit(f"arcade: two ARCADE {s} folders for {t}: {parts[t, s][0]} and {d}; give one release's "
                             "folder as SRC")
        parts[t, s] = d, js
    by_task = {}
    for (t, s), (d, js) in sorted(parts.items()):
        by_task.setdefault(t, {})[s] = coco_samples(js, d / "images", t, f"{s}_")
    keys, prefixes, recorded = {"detect": DET, "segment": SEG}, ("train_", "val_", "test_"), read_splits(root)
    for t, by_split in by_task.items():
        refuse_clashes(root, keys[t], {"set": "ARCADE"}, [x["name"] for v in by_split.values() for x in v], recorded,
                       prefixes)
    out = {}
    for t, by_split in by_task.items():
        out = finish(root, keys[t], "ARCADE", by_split, prep, val, seed, group, official=True, prefixes=prefixes)
    return out


def _cadica_boxes(path, drop):
    """A CADICA groundtruth file (one 'x y w h grade' line per lesion: pixels, top-left corner, the stenosis grade
    such as p70_90) -> (x1, y1, x2, y2) boxes of the lesions whose grade is not in drop."""
    boxes = []
    for ln in _read_list(path):
        parts = ln.replace(",", " ").split()
        if len(parts) < 4:
            log(f"{path}: line {ln!r} is not 'x y w h grade' -> left out")
        elif len(parts) == 4 or parts[4] not in drop:
            x, y, w, h = map(float, parts[:4])
            boxes.append((x, y, x + w, y + h))
    return boxes


def convert_cadica(src, root, val=0.3, prep=None, group=None, seed=42, drop=()):
    """CADICA (Mendeley p9bpx9ctcv): src/selectedVideos/pX/{lesionVideos.txt, nonlesionVideos.txt, vY/{input/
    pX_vY_000ZZ.png, pX_vY_selectedFrames.txt, groundtruth/pX_vY_000ZZ.txt}} -> detection. The key frames
    (selectedFrames) of lesion videos with their boxes; those of non-lesion videos as negatives (empty labels).
    Unannotated frames of lesion videos are never used (the lesion is there, just not boxed), nor are frames whose
    every box has a grade in drop (e.g. p0_20), nor videos in neither list (not known to be lesion-free).
    Group: the patient, so no patient straddles train and val."""
    base = need_dir(src, "cadica", "selectedVideos", expected="CADICA's selectedVideos/pX/vY/{input,groundtruth}")
    samples, skipped = [], 0
    for pdir in sorted((p for p in base.iterdir() if re.fullmatch(r"p\d+", p.name)), key=lambda p: int(p.name[1:])):
        lesion = [v.split("_")[-1] for v in _read_list(pdir / "lesionVideos.txt")]
        clean = [v.split("_")[-1] for v in _read_list(pdir / "nonlesionVideos.txt")]
        for v in lesion + clean:
            vdir = pdir / v
            for f in _read_list(vdir / f"{pdir.name}_{v}_selectedFrames.txt"):
                stem = f"{pdir.name}_{v}_{int(f):05d}" if f.isdigit() else f
                img, gt = vdir / "input" / f"{stem}.png", vdir / "groundtruth" / f"{stem}.txt"
                boxes = _cadica_boxes(gt, drop) if v in lesion else []
                if not img.exists() or v in lesion and not boxes:  # a lesion video's frame is never a negative
                    skipped += 1
                    continue
                samples.append(dict(name=f"cadica_{stem}", image=img, boxes=boxes, group=f"cadica_{pdir.name}"))
    if skipped:
        log(f"cadica: {skipped} key frames skipped (image or groundtruth missing, or every box dropped)")
    return finish(root, DET, "CADICA", {"train": samples}, prep, val, seed, group, prefixes=("cadica_",))


def _pairs(images, masks, mask_name):
    """(image, mask) paths: every image in images/ (any PIL format, .gz too) whose mask, masks/mask_name(stem), is there
    (any extension when mask_name gives no suffix); images without one are logged."""
    out = []
    for p in sorted(q for q in Path(images).iterdir() if q.is_file()):
        stem = p.name[:-3] if p.name.lower().endswith(".gz") else p.name
        stem = Path(stem).stem
        want = mask_name(stem)
        found = [want] if Path(want).suffix else [q.name for q in Path(masks).glob(want + ".*")]
        found = [Path(masks) / n for n in found if (Path(masks) / n).is_file()]
        if found:
            out.append((p, stem, found[0]))
        else:
            log(f"{p}: no mask {want} in {masks} -> skipped")
    return out


def convert_xcad(src, root, val=0.3, prep=None, group=None, seed=42):
    """XCAD (Ma et al., ICCV 2021): src/test/{images,masks}/<name>.png, its annotated angiograms (train/ holds only
    unlabelled ones and synthetic vessels: not used) -> vessel masks. No patient ids in the names: one group each.
    Its test/ is all there is to train on, not a test split: no official split."""
    test = need_dir(src, "xcad", "test", expected="XCAD's test/{images,masks}")
    pairs = _pairs(need_dir(test, "xcad", "images", expected="test/images"), need_dir(test, "xcad", "masks",
                   expected="test/masks"), lambda s: s)
    samples = [dict(name=f"xcad_{s}", image=p, mask=m) for p, s, m in pairs]
    return finish(root, SEG, "XCAD", {"train": samples}, prep, val, seed, group, prefixes=("xcad_",))


def convert_dca1(src, root, val=0.3, prep=None, group=None, seed=42):
    """DCA1 (Cervantes-Sanchez et al. 2019, 134 angiograms, 300 x 300): src holds <n>.pgm images and <n>_gt.pgm vessel
    masks (in one folder, found at any depth) -> vessel masks. No official split, no patient ids: one group each."""
    images = [p for p in sorted(Path(src).rglob("*.pgm")) if not p.stem.endswith("_gt")]
    if not images:
        raise SystemExit(f"dca1: no *.pgm images in {src}; expected DCA1's <n>.pgm + <n>_gt.pgm")
    samples = []
    for p in images:
        gt = p.with_name(f"{p.stem}_gt.pgm")
        if gt.exists():
            samples.append(dict(name=f"dca1_{p.stem}", image=p, mask=gt))
        else:
            log(f"{p}: no {gt.name} -> skipped")
    return finish(root, SEG, "DCA1", {"train": samples}, prep, val, seed, group, prefixes=("dca1_",))

# -----------------------------------------------------------------------------
# fundus: DRIVE, CHASE_DB1, STARE, HRF, FIVES


def convert_drive(src, root, val=0.2, prep=None, group=None, seed=42):
    """DRIVE: src/{training,test}/{images/NN_{training,test}.tif, 1st_manual/NN_manual1.gif,
    mask/NN_{training,test}_mask.gif} -> vessel masks (first observer; the FOV mask feeds --preprocess fov). Official
    training -> train (minus --val), test -> test (skipped where 1st_manual is absent). One subject per image."""
    by_split = {}
    for s, part in (("train", "training"), ("test", "test")):
        d = find_dir(src, part)
        if d is None or not (d / "images").is_dir() or not (d / "1st_manual").is_dir():
            if d is not None and (d / "images").is_dir():  # copies without the test labels exist
                log(f"drive: {d} has images/ but no 1st_manual/ (the manual vessels) -> no {s} split from it; "
                    f"{'evaluate.py --split test needs them' if s == 'test' else 'nothing to train on'}")
            continue
        pairs = _pairs(d / "images", d / "1st_manual", lambda stem: f"{stem.split('_')[0]}_manual1.gif")
        by_split[s] = [dict(name=f"drive_{stem}", image=p, mask=m, group=f"drive_{stem.split('_')[0]}",
                            fov=d / "mask" / f"{stem}_mask.gif") for p, stem, m in pairs]
    if not any(by_split.values()):
        raise SystemExit(f"drive: no training/ or test/ with images/ and 1st_manual/ in {src}")
    return finish(root, SRC, "DRIVE", by_split, prep, val, seed, group, official=True, prefixes=("drive_",))


def convert_chase(src, root, val=0.3, prep=None, group=None, seed=42, observer="1st"):
    """CHASE_DB1: src (at any depth) holds Image_NN{L,R}.jpg + Image_NN{L,R}_1stHO.png (_2ndHO: --observer 2nd)
    -> vessel masks. No official split; the two eyes of one child (Image_01L, Image_01R) are one group."""
    images = sorted(p for p in Path(src).rglob("Image_*") if re.fullmatch(r"Image_\d+[LR]\.jpe?g", p.name, re.I))
    if not images:
        raise SystemExit(f"chase: no Image_NN[LR].jpg in {src}; expected CHASE_DB1's Image_01L.jpg + _1stHO.png")
    samples = []
    for p in images:
        m = p.with_name(f"{p.stem}_{observer}HO.png")
        child = re.match(r"Image_(\d+)", p.stem).group(1)
        if m.exists():
            samples.append(dict(name=f"chase_{p.stem}", image=p, mask=m, group=f"chase_{child}"))
        else:
            log(f"{p}: no {m.name} -> skipped")
    return finish(root, SRC, "CHASE_DB1", {"train": samples}, prep, val, seed, group, prefixes=("chase_",))


def convert_stare(src, root, val=0.3, prep=None, group=None, seed=42, observer="ah"):
    """STARE: src (at any depth) holds imNNNN.ppm images and imNNNN.ah.ppm vessel labels (Hoover; .vk.ppm:
    --observer vk), each possibly gzip-compressed (.ppm.gz as distributed; both, as `gunzip -k` leaves them, are
    read once) -> vessel masks. No official split; one group per image."""
    files = {p.name.lower(): p for p in Path(src).rglob("im*") if p.is_file()}
    images = sorted(n for n in files if re.fullmatch(r"im\d+\.ppm(\.gz)?", n))
    if not images:
        raise SystemExit(f"stare: no imNNNN.ppm(.gz) in {src}; expected STARE's im0001.ppm + im0001.{observer}.ppm")
    samples = []
    for n in images:
        stem = n.split(".")[0]
        lab = files.get(f"{stem}.{observer}.ppm") or files.get(f"{stem}.{observer}.ppm.gz")
        if lab is None:
            log(f"{files[n]}: no {stem}.{observer}.ppm(.gz) -> skipped")
            continue
        samples.append(dict(name=f"stare_{stem}", image=files[n], mask=lab))
    return finish(root, SRC, "STARE", {"train": samples}, prep, val, seed, group, prefixes=("stare_",))


def convert_hrf(src, root, val=0.3, prep=None, group=None, seed=42):
    """HRF: src (at any depth) holds NN_{h,dr,g}.jpg images, NN_{h,dr,g}.tif vessel masks and NN_{h,dr,g}_mask.tif
    FOV masks (they feed --preprocess fov), as the all-images archive has them (images/, manual1/, mask/) or the
    per-category downloads, each extracted to its own folder (healthy/, healthy_manualsegm/, healthy_fovmask/, the
    same for diabetic_retinopathy and glaucoma) -> vessel masks. No official split; one group per image (45 eyes)."""
    eye = r"\d+_(?:h|dr|g)"  # number, then healthy, diabetic retinopathy or glaucoma
    kinds = {"image": eye + r"\.jpe?g", "vessels": eye + r"\.tiff?", "fov": eye + r"_mask\.tiff?"}
    found = {k: [] for k in kinds}
    for p in sorted(Path(src).rglob("*_*")):
        kind = next((k for k, rx in kinds.items() if re.fullmatch(rx, p.name, re.I)), None)
        if kind and p.is_file():
            found[kind].append(p)
    if not found["image"]:
        raise SystemExit(f"hrf: no NN_{{h,dr,g}}.jpg in {src}; expected HRF's images/, manual1/, mask/ or its "
                         "per-category folders (healthy/, healthy_manualsegm/, healthy_fovmask/, ...)")
    vessels = {p.stem.lower(): p for p in reversed(found["vessels"])}  # the first found wins
    fovs = {p.stem.lower()[:-5]: p for p in reversed(found["fov"])}
    samples = []
    for p in found["image"]:
        stem = p.stem.lower()
        if stem in vessels:
            samples.append(dict(name=f"hrf_{p.stem}", image=p, mask=vessels[stem], fov=fovs.get(stem)))
        else:
            log(f"{p}: no {p.stem}.tif vessel mask in {src} -> skipped")
    return finish(root, SRC, "HRF", {"train": samples}, prep, val, seed, group, prefixes=("hrf_",))


def convert_fives(src, root, val=0.2, prep=None, group=None, seed=42):
    """FIVES (figshare 19688169): src/{train,test}/{Original,Ground truth}/N_{A,D,G,N}.png (same name in both;
    A/D/G/N = AMD, DR, glaucoma, normal) -> vessel masks. Official train -> train (minus --val), test -> test; names
    carry the split (fives_train_1_A.png) so a number used in both cannot collide. One group per image."""
    by_split = {}
    for s in ("train", "test"):
        d = find_dir(src, s)
        if d is None or not (d / "Original").is_dir():
            continue
        pairs = _pairs(d / "Original", d / "Ground truth", lambda stem: stem)
        by_split[s] = [dict(name=f"fives_{s}_{stem}", image=p, mask=m) for p, stem, m in pairs]
    if not any(by_split.values()):
        raise SystemExit(f"fives: no train/Original or test/Original in {src}; expected FIVES' {{train,test}}/"
                         "{Original,Ground truth}/")
    return finish(root, SRC, "FIVES", by_split, prep, val, seed, group, official=True, prefixes=("fives_",))

# -----------------------------------------------------------------------------
# plain folders


def convert_folder(images, masks, root, task_key, group_regex=None, prep=None, prefix="", seed=42):
    """A folder of images + same-stem masks (seg keys; YOLO .txt for detection) -> root's task folder as prefix + stem
    (masks rewritten as 0/255 PNG); its entries record the folder ("folder"), so converting it again replaces its own
    files and another folder's are never overwritten. Then what no set assigned in the task is re-split 70/30
    (grouped if asked: splits.split_root); the sets' splits stay. -> images written."""
    task, samples = TASK_KEYS[task_key][1], []
    own = (Path(root) / TASK_KEYS[task_key][0]).resolve()
    for flag, d in (("images", images), ("masks", masks)):
        if Path(d).resolve() == own or own in Path(d).resolve().parents:
            raise SystemExit(f"folder: {flag} {d} is inside {root}'s own {TASK_KEYS[task_key][0]} folder, where the "
                             "conversion writes; nothing done. Its images are in the layout already: `python splits.py "
                             f"split --root {root}` lists the new ones")
    for p in sorted(Path(images).iterdir()):
        if p.suffix.lower() not in IMG_EXTS:
            continue
        if task == "det":
            lab = Path(masks) / f"{p.stem}.txt"
            if not lab.exists():
                log(f"{p}: no {lab.name} in {masks} -> skipped")
                continue
            samples.append(dict(name=prefix + p.stem, image=p, boxes=lab.read_text()))
        else:
            found = sorted(q for q in Path(masks).glob(p.stem + ".*") if q.suffix.lower() in IMG_EXTS)
            if not found:
                log(f"{p}: no same-stem mask in {masks} -> skipped")
                continue
            samples.append(dict(name=prefix + p.stem, image=p, mask=found[0]))
    owner = {"folder": Path(images).resolve().as_posix()}
    written = write_all(root, task_key, owner, {"train": samples}, prep).get("train", [])
    for e in written:
        e.update(owner)
    splits, fresh = read_splits(root), written
    if splits is not None:
        before = {e["image"]: s for s, v in splits.get(task_key, {}).items() for e in v if owns(owner, e)}
        splits[task_key], gone = drop_own(root, splits.get(task_key, {}), owner, (), written)
        if gone:
            log(f"{gone} files this folder wrote before and no longer holds deleted")
        for e in written:  # an image converted again keeps its listing: one a user held out stays held out
            if e["image"] in before:
                splits[task_key][before[e["image"]]].append(e)
        fresh = [e for e in written if e["image"] not in before]
    split_root(root, splits, keys=(task_key,), group_regex=group_regex, seed=seed, new={task_key: fresh})
    log(f"{len(written)} images -> {Path(root) / TASK_KEYS[task_key][0]}")
    return len(written)

# -----------------------------------------------------------------------------
# the summary


BINS = (8, 16, 32, 64)  # box size bins: longest side in pixels at the training size


def summary(root, imgsz=512):
    """What root's splits.json lists, as read by the loader -> {task_key: {split: stats}}, printed one line each:
    images (and files skipped as bad); detection: boxes, negatives (images without a box) and a histogram of the
    boxes' longest side in pixels once the image is letterboxed to imgsz; segmentation: mean vessel fraction."""
    splits = read_splits(root)
    splits = make_splits(root) if splits is None else splits
    out = {}
    print(f"summary of {root} (box sizes: longest side in px at imgsz {imgsz})")
    for key, (_, task, _) in TASK_KEYS.items():
        for s in SPLITS:
            if not splits.get(key, {}).get(s):
                continue
            ds = TaskDataset(root, key, s, imgsz=32, verbose=False, splits=splits)
            st = {"images": len(ds), "skipped": sum(act == "skipped" for *_, act in ds.problems)}
            if task == "det":
                sizes = np.array([max(b[3] * it["shape"][1], b[4] * it["shape"][0]) * imgsz / max(it["shape"])
                                  for it in ds.items for b in it["boxes"]])
                edges = np.digitize(sizes, BINS)
                st.update(boxes=len(sizes), negatives=sum(not len(it["boxes"]) for it in ds.items),
                          hist=[int((edges == k).sum()) for k in range(len(BINS) + 1)])
                labels = ["<8", "8-16", "16-32", "32-64", ">=64"]
                what = (f"{st['boxes']} boxes, {st['negatives']} negatives, sizes "
                        + " ".join(f"{lab}:{n}" for lab, n in zip(labels, st["hist"]))
                        + f" ({sum(st['hist'][:3])} under 32 px)")
            else:
                fr = [float(read_binary(it["mask"]).mean()) for it in ds.items]
                st["vessel"] = float(np.mean(fr)) if fr else 0.0
                what = f"mean vessel fraction {st['vessel']:.3f}"
            out.setdefault(key, {})[s] = st
            bad = f" ({st['skipped']} skipped as bad)" if st["skipped"] else ""
            print(f"  {key + '/' + s:<34} {st['images']:>6} images{bad}: {what}")
    return out

# -----------------------------------------------------------------------------
# the CLI


SETS = {  # CLI name -> (converter, what SRC is)
    "arcade": (convert_arcade, "ARCADE: arcade/ (stenosis/ and syntax/) or one of them, {train,val,test}/..."),
    "cadica": (convert_cadica, "CADICA: the folder holding selectedVideos/"),
    "xcad": (convert_xcad, "XCAD: the folder holding test/{images,masks}/"),
    "dca1": (convert_dca1, "DCA1: the folder holding <n>.pgm + <n>_gt.pgm"),
    "drive": (convert_drive, "DRIVE: the folder holding training/ and test/"),
    "chase": (convert_chase, "CHASE_DB1: the folder holding Image_01L.jpg + Image_01L_1stHO.png ..."),
    "stare": (convert_stare, "STARE: the folder holding im0001.ppm(.gz) and im0001.ah.ppm(.gz)"),
    "hrf": (convert_hrf, "HRF: the folder holding images/, manual1/, mask/"),
    "fives": (convert_fives, "FIVES: the folder holding train/ and test/ ({Original,Ground truth}/)"),
    "folder": (convert_folder, "a folder of images + a folder of same-stem masks (or YOLO .txt labels)"),
}
SET_OPTIONS = {  # per-set options: flag -> argparse keywords
    "arcade": {"--task": dict(choices=("detect", "segment"), default=None,
                              help="for one part only: default from its name (stenosis: detect, syntax: segment)")},
    "cadica": {"--drop": dict(default="", help="stenosis grades whose boxes are left out, e.g. p0_20,p20_50")},
    "chase": {"--observer": dict(choices=("1st", "2nd"), default="1st")},
    "stare": {"--observer": dict(choices=("ah", "vk"), default="ah")},
    "folder": {"--prefix": dict(default="", help="put before every output name, e.g. b_, so that a second folder "
                                                 "whose stems repeat another's writes its own files")},
}


def _run(args, prep):
    """Call the chosen converter with the parsed arguments."""
    fn = SETS[args.set][0]
    if args.set == "folder":
        return fn(args.src, args.masks, args.root, args.task, args.group, prep, args.prefix, args.seed)
    kw = dict(prep=prep, group=args.group, seed=args.seed)
    if args.val is not None:
        kw["val"] = args.val
    if args.set == "arcade":
        kw["task"] = args.task
    if args.set == "cadica":
        kw["drop"] = tuple(g for g in args.drop.split(",") if g)
    if args.set in ("chase", "stare"):
        kw["observer"] = args.observer
    return fn(args.src, args.root, **kw)


def main(argv=None):
    """The CLI: convert one set into --root, then print the summary; returns the exit status."""
    ap = argparse.ArgumentParser(description="convert a public data set into nanoCAMTL's layout (README: data layout)")
    sub = ap.add_subparsers(dest="set", required=True)
    for name, (_, what) in SETS.items():
        a = sub.add_parser(name, help=what)
        a.add_argument("src", help="images folder" if name == "folder" else what)
        if name == "folder":
            a.add_argument("masks")
            a.add_argument("--task", choices=list(TASK_KEYS), required=True)
        for flag, kw in SET_OPTIONS.get(name, {}).items():
            a.add_argument(flag, **kw)
        a.add_argument("--root", required=True, help="the processed data root to write (created if needed)")
        a.add_argument("--val", type=float, default=None, help="fraction of the official train to move to val "
                                                               "(by group)")
        a.add_argument("--preprocess", default="", help="comma-separated: fov, green, resize=S")
        a.add_argument("--group", default=None, help="regex on output file names: its first group keys the split")
        a.add_argument("--seed", type=int, default=42)
        a.add_argument("--imgsz", type=int, default=512, help="training size for the summary's box sizes")
    a = sub.add_parser("summary", help="print what a root's splits.json lists")
    a.add_argument("--root", required=True)
    a.add_argument("--imgsz", type=int, default=512)
    args = ap.parse_args(argv)
    if args.set == "summary":
        if not Path(args.root).is_dir():
            raise SystemExit(f"summary: --root {args.root} is not a directory")
        summary(args.root, args.imgsz)
        return 0
    for path in (args.src, getattr(args, "masks", None)):
        if path is not None and not Path(path).is_dir():
            raise SystemExit(f"{args.set}: {path} is not a directory")
    if args.val is not None and not 0 <= args.val < 1:
        raise SystemExit(f"--val {args.val}: a fraction in [0, 1)")
    try:
        prep = parse_preprocess(args.preprocess)
        re.compile(args.group or "")
    except (ValueError, re.error) as e:
        raise SystemExit(str(e)) from None
    if prep.get("fov") and args.set in ("arcade", "cadica", "xcad", "dca1"):
        raise SystemExit(f"--preprocess fov: for fundus sets only, not {args.set}")
    _run(args, prep)
    summary(args.root, args.imgsz)
    return 0


if __name__ == "__main__":
    sys.exit(main())
