"""Synthetic data for nanoCAMTL, drawn from scratch: fundus photographs (source domain: colour retina,
optic disc, vessel arcades + vessel masks) and coronary angiograms (target domain: gray X-ray-like images
with contrast-filled vessel trees, + vessel masks, or + YOLO boxes around narrowed vessel segments, i.e.
stenoses). Written in data.py's on-disk layout with a splits.json, deterministic in (n, imgsz, seed), and
cached: a synthetic.json marker records the parameters, so ensure_synthetic regenerates only on a change.

Presets: `default` (the Quickstart's set) and `hard` (the study benchmark, docs/study.md: Beer-Lambert contrast,
Poisson noise, crossing and foreshortened trees, a catheter, width step-downs that are no stenoses, stenoses of
severity 25-90%; meta.json lists per angiogram what was drawn).

CLI:
    python synthetic.py [--preset P] [--root R] [--n N] [--imgsz S] [--seed K]   generate (default root data/synthetic,
                                                                                   data/synthetic-P for a preset)
    python synthetic.py grid [--preset P] [--root R] [--out PNG]    picture of samples (assets/synthetic_grid.png,
                                                                     assets/P_grid.png for a preset)
"""
import argparse
import json
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data import TASK_KEYS, TaskDataset, load_splits, log, task_dir, yolo_line

DEFAULT_ROOT = Path(__file__).resolve().parent / "data" / "synthetic"
SYNTH = dict(n=300, imgsz=256, seed=0)  # the default synthetic set
SYNTH_VERSION = 1  # bump when the generator changes, so cached sets are regenerated

# -----------------------------------------------------------------------------
# drawing: vessel trees, stenoses, the two kinds of image


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


def _spots(branches, k, size, min_w=6):
    """(vessel, point) pairs where a narrowing can go: a vessel at least min_w px wide at 256 (never the
    catheter), away from its ends and from the border."""
    cands = []
    for bi, b in enumerate(branches):
        idx = np.arange(len(b["pts"]))
        ok = (b["ws"] >= min_w * k) & (idx > 14) & (idx < len(idx) - 14) & (not b.get("catheter"))
        ok &= ((b["pts"] > 0.08 * size) & (b["pts"] < 0.92 * size)).all(1)
        cands += [(bi, i) for i in idx[ok]]
    return cands


def _add_stenoses(rng, branches, count, k, size, sev=(0.6, 0.9), reach=2.0, avoid=()):
    """Narrow up to `count` spots of thick vessels (a Gaussian dip in width of severity in `sev`, Gaussian length
    L) where no other vessel touches within reach * L along the vessel (a crossing or a branch would hide the
    narrowing), away from the border and 32 px (at 256) from each other and from the points `avoid`.
    -> (boxes (m, 4) xyxy px, tight around each narrowing; severities (m,))."""
    cands = _spots(branches, k, size)
    q = np.concatenate([b["pts"] for b in branches])  # every vessel point (Q, 2), its width, its vessel
    wq = np.concatenate([b["ws"] for b in branches])
    owner = np.concatenate([np.full(len(b["ws"]), j) for j, b in enumerate(branches)])
    boxes, sevs, centres = [], [], [np.asarray(c) for c in avoid]
    for _ in range(count * 20):
        if len(boxes) == count or not cands:
            break
        bi, i = cands[rng.integers(len(cands))]
        b = branches[bi]
        if any(np.hypot(*(b["pts"][i] - c)) < 32 * k for c in centres):  # keep stenoses apart
            continue
        depth, L = rng.uniform(*sev), rng.uniform(2.5, 6) * k  # depth and Gaussian length (px)
        s = (np.arange(len(b["pts"])) - i) * k  # arc length from the centre
        near, seen = np.abs(s) <= 2 * L, np.abs(s) <= reach * L
        o = (owner != bi) & (np.abs(q - b["pts"][i]).max(1) < reach * L + 30 * k)  # other vessels close by
        gap = np.linalg.norm(b["pts"][seen][:, None] - q[o][None], axis=2)  # (m, O) centre distances
        if (gap < b["ws"][seen][:, None] / 2 + wq[o][None] / 2 + 3 * k).any():
            continue
        w0 = b["ws"][i]
        b["ws"] = b["ws"] * (1 - depth * np.exp(-0.5 * (s / L) ** 2))
        half = max(w0 / 2 + k, 6 * k)  # the vessel's walls, and at least 12 px at 256
        x1, y1 = b["pts"][near].min(0) - half
        x2, y2 = b["pts"][near].max(0) + half
        boxes.append(np.clip([x1, y1, x2, y2], 0, size))
        sevs.append(depth)
        centres.append(b["pts"][i])
    return np.array(boxes, np.float32).reshape(-1, 4), np.array(sevs, np.float32)


def _border_root(rng, size):
    """A tree's root just off the frame on a random side, and a heading into the image (rad)."""
    side = rng.integers(4)
    t = rng.uniform(0.15, 0.85) * size
    p = (np.array([(t, 0), (size, t), (t, size), (0, t)][side]) - size / 2) * 1.1 + size / 2  # root off-frame
    return p, math.atan2(size / 2 - p[1], size / 2 - p[0]) + rng.uniform(-0.5, 0.5)


def synth_angiogram(rng, size=256, stenoses=0):
    """Angiogram-like image: noisy gray background, dark contrast-filled coronary trees.
    -> (gray uint8 (size, size), vessel mask bool, stenosis boxes (m, 4) xyxy px)."""
    k = size / 256
    branches = []
    for _ in range(rng.integers(2, 4)):  # 2-3 trees entering from the border
        p, ang = _border_root(rng, size)
        _grow(rng, p, ang, rng.uniform(8, 12) * k, rng.uniform(0.9, 1.3) * size, k, 3, branches)
    boxes, _ = _add_stenoses(rng, branches, stenoses, k, size)
    dens = _draw(branches, size)  # (size, size)
    bg = rng.uniform(0.5, 0.7) + 0.3 * (_smooth_noise(rng, size, 4) - 0.5) + 0.1 * (_smooth_noise(rng, size, 12) - 0.5)
    img = bg * (1 - rng.uniform(0.45, 0.7) * _blur(dens, 0.7 * k))  # contrast agent absorbs X-rays
    img += rng.uniform(0.015, 0.035) * rng.standard_normal((size, size), np.float32)  # quantum noise
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), dens >= 0.5, boxes


# the `hard` preset's angiograms: the X-ray physics and the confounders of real ones
HARD = dict(
    trees=[3, 6],  # coronary trees per image, [low, high): 3-5, more crossings than the default 2-3
    mu=[0.025, 0.045],  # attenuation per px of contrast (at 256): the thickest lumen dims the image by ~25-40%
    photons=[150, 600],  # quanta per pixel at full brightness: Poisson noise of std sqrt(I / photons)
    severity=[0.25, 0.9],  # stenosis depth: fraction of the lumen width lost
    reach=1.0,  # a stenosis needs no other vessel within reach * L (the default set: 2 L)
    tilt=[0.5, 0.85], p_tilt=0.5,  # a tree seen foreshortened: compressed along one axis by this factor
    tapers=[1, 4], taper=[0.3, 0.55],  # 1-3 per image: width step-downs (by 30-55%) that are no stenoses
    catheter=[5, 7],  # guide catheter width (px at 256), ending at the ostium of the first tree
    blur=1.0,  # detector blur (px at 256)
)
LUMEN = ((1.0, 0.48), (0.75, 0.32), (0.45, 0.17))  # nested bands (radius fraction, share of the width) whose
# sum follows a round lumen's chord 2 sqrt(r^2 - d^2) at distance d from the centre line


def _blur_f(a, sigma):
    """Separable Gaussian blur of a float map (edges repeated)."""
    h = max(int(3 * sigma), 1)
    g = np.exp(-0.5 * (np.arange(-h, h + 1) / sigma) ** 2)
    g /= g.sum()
    for ax in (0, 1):
        p = np.pad(a, [(h, h) if i == ax else (0, 0) for i in (0, 1)], mode="edge")
        a = sum(w * np.take(p, np.arange(j, j + a.shape[ax]), axis=ax) for j, w in enumerate(g))
    return a


def _tilt(rng, tree, c, origin):
    """Foreshorten a tree: compress it about origin by c along a random axis. A segment seen at a slant holds more
    contrast along the ray: its path factor fs grows by 1 / (its projected length per unit length)."""
    a = rng.uniform(0, math.pi)
    u = np.array([math.cos(a), math.sin(a)])
    A = np.eye(2) - (1 - c) * np.outer(u, u)  # (2, 2)
    for b in tree:
        t = np.gradient(b["pts"], axis=0)  # (n, 2) tangents
        t /= np.linalg.norm(t, axis=1, keepdims=True) + 1e-9
        b["fs"] = b["fs"] / np.linalg.norm(t @ A.T, axis=1)
        b["pts"] = origin + (b["pts"] - origin) @ A.T


def _add_tapers(rng, branches, count, k, size, step=(0.3, 0.55)):
    """Step-downs in width that do not recover (a smooth step over a few px): narrowings that are no stenosis.
    -> centres (m, 2) px, 32 px (at 256) apart."""
    cands, centres = _spots(branches, k, size, min_w=5), []
    for _ in range(count * 20):
        if len(centres) == count or not cands:
            break
        bi, i = cands[rng.integers(len(cands))]
        b = branches[bi]
        if any(np.hypot(*(b["pts"][i] - c)) < 32 * k for c in centres):
            continue
        s = (np.arange(len(b["pts"])) - i) * k / (rng.uniform(1.5, 3) * k)  # arc length in step lengths
        b["ws"] = b["ws"] * (1 - rng.uniform(*step) / (1 + np.exp(-s)))
        centres.append(b["pts"][i])
    return np.array(centres, np.float32).reshape(-1, 2)


def _draw_thickness(branches, size, ss=2):
    """Contrast along each ray (px at size): per pixel the chord through each vessel's round lumen, times its
    path factor fs and opacity. Within a tree the thickest chord wins (a branch does not thin its parent where it
    leaves); the trees (and the catheter) add up where they cross, as absorbers in series do."""
    out, lim = np.zeros((size, size), np.float32), size * ss
    for tree in sorted({b["tree"] for b in branches}):
        segs = []
        for b in (b for b in branches if b["tree"] == tree):
            P, v = (b["pts"] * ss).tolist(), (b["ws"] * b["fs"] * b.get("opacity", 1.0)).tolist()
            segs += list(zip(v[:-1], P[:-1], P[1:], (b["ws"] * ss / 2).tolist()))
        segs.sort(key=lambda t: t[0])  # thickest last: where segments overlap, the largest chord stays
        for frac, share in LUMEN:
            im = Image.new("F", (lim, lim), 0.0)
            d = ImageDraw.Draw(im)
            for v, (x, y), (x2, y2), r in segs:
                if -r <= x <= lim + r and -r <= y <= lim + r:
                    d.line([(x, y), (x2, y2)], fill=v * share, width=max(round(2 * r * frac), 1))
                    d.ellipse([x - r * frac, y - r * frac, x + r * frac, y + r * frac], fill=v * share)
            out += np.asarray(im.reduce(ss))
    return out


def _hard_trees(rng, size, k, p):
    """The vessels of a hard angiogram: 3-5 trees (the first from an ostium inside the frame, where the catheter
    ends), some foreshortened, and the catheter. -> (branches with tree id and path factor, trees tilted)."""
    branches, tilted = [], 0
    for t in range(rng.integers(*p["trees"])):
        if t == 0:  # the catheter crosses the frame towards the ostium; the tree leaves it sideways
            root = rng.uniform(0.25, 0.75, 2) * size
            back = math.atan2(size / 2 - root[1], size / 2 - root[0]) + rng.uniform(-0.6, 0.6)
            ang = back + rng.choice([-1, 1]) * rng.uniform(1.2, 2.0)
        else:
            root, ang = _border_root(rng, size)
        tree = []
        _grow(rng, root, ang, rng.uniform(8, 12) * k, rng.uniform(0.9, 1.3) * size, k, 3, tree)
        for b in tree:
            b.update(tree=t, fs=np.ones(len(b["ws"])))
        if rng.random() < p["p_tilt"]:
            _tilt(rng, tree, rng.uniform(*p["tilt"]), root)
            tilted += 1
        if t == 0:  # the guide catheter, drawn from the ostium back along its way in
            cath = []
            _grow(rng, tree[0]["pts"][0], back, 1.0, 1.6 * size, k, 0, cath, curl=0.006)
            w = rng.uniform(*p["catheter"]) * k
            cath[0].update(ws=np.full(len(cath[0]["pts"]), w), fs=np.ones(len(cath[0]["pts"])), tree=-1,
                           opacity=1.3, catheter=True)  # radio-opaque walls
            tree += cath
        branches += tree
    return branches, tilted


def synth_angiogram_hard(rng, size=256, stenoses=0, p=HARD):
    """A harder angiogram (the `hard` preset): Beer-Lambert contrast of round lumens (thin vessels and narrowed
    ones are fainter), low contrast, Poisson quantum noise, crossing and foreshortened trees, a guide catheter
    (not a vessel in the mask), width step-downs that are not stenoses, stenoses of severity 25-90%.
    -> (gray uint8 (size, size), vessel mask bool, stenosis boxes (m, 4) xyxy px, meta dict)."""
    k = size / 256
    branches, tilted = _hard_trees(rng, size, k, p)
    tapers = _add_tapers(rng, branches, rng.integers(*p["tapers"]), k, size, p["taper"])
    boxes, sev = _add_stenoses(rng, branches, stenoses, k, size, p["severity"], p["reach"], avoid=tapers)
    vessels = [b for b in branches if not b.get("catheter")]
    mu, photons = rng.uniform(*p["mu"]), rng.uniform(*p["photons"])
    thick = _blur_f(_draw_thickness(branches, size), p["blur"] * k) / k  # (size, size) px of contrast at 256
    bg = rng.uniform(0.5, 0.7) + 0.3 * (_smooth_noise(rng, size, 4) - 0.5) + 0.1 * (_smooth_noise(rng, size, 12) - 0.5)
    img = np.clip(bg * np.exp(-mu * thick), 0, 1)  # (size, size) expected intensity
    img = rng.poisson(img * photons) / photons  # quantum noise
    cath = next(b for b in branches if b.get("catheter"))
    meta = dict(severity=[round(float(v), 3) for v in sev], catheter_width=round(float(cath["ws"][0] / k), 2),
                tapers=tapers.round(1).tolist(), trees=len({b["tree"] for b in vessels}), tilted=tilted,
                mu=round(mu, 4), photons=round(photons, 1))  # px at 256; tapers: centres (x, y) px
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), _draw(vessels, size) >= 0.5, boxes, meta


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


PRESETS = {  # name -> (generation defaults, angiogram drawing params; None: synth_angiogram)
    "default": (SYNTH, None),
    "hard": ({**SYNTH, "n": 1000}, HARD),  # 1000 per task: 300 validation images of each
}


def preset_root(preset="default"):
    """Where a preset's set is cached: data/synthetic (the default), data/synthetic-{preset}."""
    return DEFAULT_ROOT if preset == "default" else DEFAULT_ROOT.with_name(f"{DEFAULT_ROOT.name}-{preset}")


def _synth_one(job):
    """Generate and write one image (+ mask or labels); seeded by (seed, task, i) alone. -> (image path relative
    to root, its drawing meta) for a hard angiogram, else None."""
    root, key, i, size, seed, draw = job
    rng = np.random.default_rng([seed, list(TASK_KEYS).index(key), i])
    d = Path(root) / TASK_KEYS[key][0]
    name = {"retinography_segmentation": "fundus", "angiography_segmentation": "angio",
            "angiography_detection": "sten"}[key] + f"_{i:04d}"
    meta = None
    if key == "retinography_segmentation":
        img, mask = synth_fundus(rng, size)
    elif draw is None:
        img, mask, boxes = synth_angiogram(rng, size, rng.choice(4, p=[0.15, 0.4, 0.3, 0.15]))
    else:
        img, mask, boxes, meta = synth_angiogram_hard(rng, size, rng.choice(4, p=[0.15, 0.4, 0.3, 0.15]), draw)
    Image.fromarray(img).save(d / "images" / f"{name}.png", compress_level=1)
    if key == "angiography_detection":
        (d / "labels" / f"{name}.txt").write_text("".join(yolo_line(b, size, size) for b in boxes))
    else:
        Image.fromarray(mask.astype(np.uint8) * 255).save(d / "labels" / f"{name}.png", compress_level=1)
    return None if meta is None else (f"{TASK_KEYS[key][0]}/images/{name}.png", meta)


def _marker(n, imgsz, seed, preset):
    """synthetic.json's parameters; a preset's drawing params are part of them, so a change regenerates."""
    want = dict(n=n, imgsz=imgsz, seed=seed, version=SYNTH_VERSION)
    draw = PRESETS[preset][1]
    return want if draw is None else json.loads(json.dumps({**want, "preset": preset, "draw": draw}))


def make_synthetic(root, n=SYNTH["n"], imgsz=SYNTH["imgsz"], seed=SYNTH["seed"], preset="default", workers=None):
    """Write n images per task key (deterministic in seed) in the layout, splits.json and a marker
    (written first, marked done last, so an interrupted run is recognised and redone). A preset with its own
    angiograms also writes meta.json: per angiogram what was drawn (stenosis severities, catheter, noise, ...)."""
    if preset not in PRESETS:
        raise ValueError(f"synthetic preset {preset!r}: expected one of {', '.join(PRESETS)}")
    root, params = Path(root), _marker(n, imgsz, seed, preset)
    for key in TASK_KEYS:
        task_dir(root, key)
    (root / "synthetic.json").write_text(json.dumps({**params, "done": False}))
    jobs = [(str(root), key, i, imgsz, seed, PRESETS[preset][1]) for key in TASK_KEYS for i in range(n)]
    if workers is None:  # process start-up costs more than a handful of images
        workers = min(os.cpu_count() or 1, 8) if len(jobs) >= 64 else 1
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            metas = list(ex.map(_synth_one, jobs, chunksize=16))
    else:
        metas = [_synth_one(j) for j in jobs]
    if PRESETS[preset][1] is not None:
        (root / "meta.json").write_text(json.dumps(dict(m for m in metas if m is not None), indent=0))
    (root / "splits.json").unlink(missing_ok=True)
    load_splits(root)
    (root / "synthetic.json").write_text(json.dumps({**params, "done": True}))
    return root


def ensure_synthetic(root=None, preset="default", **params):
    """The synthetic set of a preset at root (default preset_root(preset)), generated unless one with these params
    exists. Safe to call from every DDP rank of one machine: one generates, the others wait."""
    import fcntl  # POSIX only, like torchrun

    if preset not in PRESETS:
        raise ValueError(f"synthetic preset {preset!r}: expected one of {', '.join(PRESETS)}")
    root = Path(root or preset_root(preset))
    params = {**PRESETS[preset][0], **params}
    marker = root / "synthetic.json"
    want = {**_marker(params["n"], params["imgsz"], params["seed"], preset), "done": True}
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            try:
                have = json.loads(marker.read_text())
            except (ValueError, OSError):  # a marker broken by hand or by a full disk: regenerate
                have = None
            if have == want:
                return root
            for d in ("retinography", "angiography", "splits.json", "synthetic.json", "meta.json"):  # what we wrote
                p = root / d
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
        elif root.exists() and any(root.iterdir()):
            raise FileExistsError(f"{root} is not empty and holds no synthetic.json: not overwriting it")
        log(f"generating synthetic data in {root} ({want})")
        return make_synthetic(root, preset=preset, **params)


def ensure_config(cfg):
    """The synthetic set a training config names (keys synthetic_preset, synthetic_n, imgsz)."""
    return ensure_synthetic(preset=cfg["synthetic_preset"], n=cfg["synthetic_n"], imgsz=cfg["imgsz"])

# -----------------------------------------------------------------------------
# a picture of the data, and the CLI


def save_grid(root=None, out=None, preset="default", cols=3, tile=192):
    """Rows: fundus, angiogram (seg), angiogram (det), angiogram (det, augmented); for each sample
    the letterboxed image and the same with its mask (green) and boxes (red) drawn on it. root: a set on disk,
    default the preset's cached one; out default assets/synthetic_grid.png (a preset's: assets/{preset}_grid.png)."""
    root = ensure_synthetic(preset=preset) if root is None else Path(root)
    name = "synthetic_grid.png" if preset == "default" else f"{preset}_grid.png"
    out = Path(out or Path(__file__).resolve().parent / "assets" / name)
    rows = [("retinography_segmentation", "val", False), ("angiography_segmentation", "val", False),
            ("angiography_detection", "val", False), ("angiography_detection", "train", True)]
    grid = Image.new("RGB", (2 * cols * tile, len(rows) * tile))
    for r, (key, split, aug) in enumerate(rows):
        ds = TaskDataset(root, key, split, tile, aug, verbose=False)
        picks = [i for i in range(len(ds)) if TASK_KEYS[key][1] == "seg" or len(ds.items[i]["boxes"])][:cols]
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
    ap = argparse.ArgumentParser(description="nanoCAMTL synthetic data: generate it, or save a picture of it")
    ap.add_argument("cmd", nargs="?", choices=("synth", "grid"), default="synth",
                    help="synth (default): generate the set; grid: save a picture of samples")
    ap.add_argument("--root", default=None, help=f"data root (default {DEFAULT_ROOT}, a preset's {DEFAULT_ROOT}-NAME)")
    ap.add_argument("--preset", default="default", choices=list(PRESETS),
                    help="default: the Quickstart's set; hard: the study benchmark's (docs/study.md)")
    for k, v in SYNTH.items():
        hard = f"; hard: {PRESETS['hard'][0][k]}" if PRESETS["hard"][0][k] != v else ""
        ap.add_argument(f"--{k}", type=int, default=None, help=f"synth only (default {v}{hard})")
    ap.add_argument("--out", default=None, help="grid only: the PNG to write (default assets/synthetic_grid.png)")
    args = ap.parse_args(argv)
    params = {k: getattr(args, k) for k in SYNTH if getattr(args, k) is not None}
    for k, lo in (("n", 1), ("imgsz", 32)):
        if params.get(k, lo) < lo:
            ap.error(f"--{k} {params[k]}: must be >= {lo}")
    if args.cmd == "synth":
        if args.out is not None:
            ap.error("--out is an option of grid")
        try:
            ensure_synthetic(args.root, args.preset, **params)
        except FileExistsError as e:
            raise SystemExit(f"{e}; give an empty or new folder with --root") from None
    else:
        if params:
            ap.error(f"{', '.join('--' + k for k in params)}: options of synth, not grid")
        save_grid(args.root, args.out, args.preset)


if __name__ == "__main__":
    main()
