"""
Pictures of a nanoCAMTL run, drawn with PIL only and named and laid out as Ultralytics YOLOv8 draws them, so that a
YOLOv8 user finds their way in a run folder:

    results.png                          plot_results            losses and metrics per epoch, from results.csv
    PR_curve.png, F1_curve.png,          plot_curves             precision-recall; F1, P and R against confidence
      P_curve.png, R_curve.png
    confusion_matrix.png                 plot_confusion_matrix (counted by metrics.confusion_matrix)
    labels.png                           plot_labels             instances per class, box centres, box sizes in px
    train_batch0.png, val_batch0_*.png   plot_batch              mosaic: boxes, vessel mask, file names
    val_seg_batch0.png                   plot_seg_batch          image / ground-truth mask / predicted mask

and the building blocks predict.py's picture (predict.plot_prediction) draws with.

Every picture function takes plain arrays, tensors, lists and paths, writes one PNG (folders created) and returns
its path. Nothing here imports the rest of nanoCAMTL.
"""

import csv
import functools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

INK, GRID, WHITE, GREY = (40, 40, 40), (228, 228, 228), (255, 255, 255), (175, 175, 175)
MEAN = (30, 90, 210)  # the "all classes" curve
SMOOTH = (240, 120, 20)  # the smoothed line of results.png
MASK = (0, 210, 255)  # vessel mask overlay
PALETTE = [(230, 60, 60), (40, 160, 70), (250, 150, 30), (140, 80, 200), (20, 170, 190), (210, 80, 160),
           (120, 110, 40), (90, 130, 230), (200, 60, 20), (70, 200, 130), (160, 40, 90), (100, 100, 100)]

# -----------------------------------------------------------------------------
# drawing helpers: fonts and text, ticks, an Axes frame, legend, colour map, smoothing


def colour(i):
    return PALETTE[int(i) % len(PALETTE)]


def name(names, i, width=24):
    """Class i's name, shortened, or its number when names has none for it."""
    return str(names[i])[:width] if names is not None and i < len(names) else str(i)


@functools.lru_cache(maxsize=None)
def font(size=13):
    """PIL's built-in font at `size` px (Pillow >= 10.1 with FreeType), else its small fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def text_width(s, size=13):
    left, _, right, _ = font(size).getbbox(s)
    return right - left


def text(d, xy, s, size=13, fill=INK, anchor=(0, 0), bg=None):
    """Write s so that the point `anchor` of its box (fractions: (0, 0) top-left, (0.5, 0.5) centre) lands on xy."""
    f = font(size)
    left, top, right, bottom = d.textbbox((0, 0), s, font=f)
    x, y = xy[0] - anchor[0] * (right - left) - left, xy[1] - anchor[1] * (bottom - top) - top
    if bg is not None:
        d.rectangle([x + left - 2, y + top - 2, x + right + 2, y + bottom + 2], fill=bg)
    d.text((x, y), s, font=f, fill=fill)


def vtext(img, xy, s, size=13, fill=INK):
    """Write s turned 90 degrees counter-clockwise (read bottom to top), centred on xy."""
    f = font(size)
    left, top, right, bottom = f.getbbox(s)
    tile = Image.new("RGBA", (right - left + 2, bottom - top + 2), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text((1 - left, 1 - top), s, font=f, fill=fill)
    tile = tile.rotate(90, expand=True)
    img.paste(tile, (round(xy[0] - tile.width / 2), round(xy[1] - tile.height / 2)), tile)


def nice_ticks(lo, hi, most=5, integer=False):
    """Round tick values (steps 1, 2, 2.5, 5 x 10^k; whole steps if integer) inside [lo, hi], at most `most`."""
    k = math.floor(math.log10(max(hi - lo, 1e-12) / most))
    for step in (m * 10.0 ** e for e in (k, k + 1, k + 2) for m in (1, 2, 2.5, 5)):
        if integer and (step < 1 or step != int(step)):
            continue
        first = math.ceil(lo / step - 1e-9) * step
        n = math.floor((hi - first) / step + 1e-9) + 1
        if n <= most:
            return [first + i * step for i in range(n)]
    return [lo, hi]


def nice_limits(lo, hi, most=5):
    """Limits widened to round tick values, so that a y axis shows 3-5 labelled ticks."""
    if not hi - lo > 1e-12 * max(1.0, abs(hi)):  # a flat series: centre it
        d = abs(lo) * 0.1 or 1.0
        lo, hi = lo - d, hi + d
    for n in range(3, most + 1):
        t = nice_ticks(lo, hi, n)
        step = t[1] - t[0] if len(t) > 1 else hi - lo
        lo2, hi2 = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
        if round((hi2 - lo2) / step) + 1 <= most:
            return lo2, hi2
    return lo, hi


def log_ticks(lo, hi):
    e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    return [m * 10.0 ** e for e in range(e0, e1 + 1) for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi]


def tick_label(v, step):
    """Tick value with as many decimals as the tick step needs."""
    if abs(v) >= 1e5 or 0 < abs(step) < 1e-4:
        return f"{v:.3g}"
    d = next((d for d in range(6) if abs(round(step, d) - step) < abs(step) * 1e-6), 6)
    return f"{0.0 if abs(v) < abs(step) * 1e-6 else v:.{d}f}"


class Axes:
    """Maps data (xlim, ylim; optionally log10) to the pixel box (x0, y0, x1, y1) of a canvas, and draws in it."""

    def __init__(self, img, box, xlim=(0, 1), ylim=(0, 1), xlog=False, ylog=False):
        self.img, self.d, self.box = img, ImageDraw.Draw(img, "RGBA"), [round(v) for v in box]  # RGBA: fills blend
        self.xlim, self.ylim, self.xlog, self.ylog = xlim, ylim, xlog, ylog

    @staticmethod
    def _frac(v, lim, log):
        f = (lambda u: math.log10(max(u, 1e-12))) if log else float
        return (f(v) - f(lim[0])) / ((f(lim[1]) - f(lim[0])) or 1.0)

    def px(self, x, y):
        """Data point -> canvas pixel, clamped to the box."""
        x0, y0, x1, y1 = self.box
        fx = min(max(self._frac(x, self.xlim, self.xlog), 0.0), 1.0)
        fy = min(max(self._frac(y, self.ylim, self.ylog), 0.0), 1.0)
        return x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)

    def frame(self, title="", xlabel="", ylabel="", xticks=None, yticks=None, grid=True, size=13, integer_x=False):
        """Grid, border, ticks with their values, axis labels and title; default ticks are round values."""
        x0, y0, x1, y1 = self.box
        if xticks is None:
            xticks = log_ticks(*self.xlim) if self.xlog else nice_ticks(*sorted(self.xlim), 7, integer_x)
        if yticks is None:
            yticks = log_ticks(*self.ylim) if self.ylog else nice_ticks(*sorted(self.ylim), 5)
        widths = [0]
        for axis, ticks in (("x", xticks), ("y", yticks)):
            step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(ticks[0]) if ticks else 1.0
            for v in ticks:
                label = f"{v:g}" if (self.xlog if axis == "x" else self.ylog) else tick_label(v, step)
                widths.append(text_width(label, size - 1) if axis == "y" else 0)
                if axis == "x":
                    p = self.px(v, self.ylim[0])[0]
                    if grid:
                        self.d.line([(p, y0), (p, y1)], fill=GRID)
                    self.d.line([(p, y1), (p, y1 + 4)], fill=INK)
                    text(self.d, (p, y1 + 6), label, size - 1, anchor=(0.5, 0))
                else:
                    p = self.px(self.xlim[0], v)[1]
                    if grid:
                        self.d.line([(x0, p), (x1, p)], fill=GRID)
                    self.d.line([(x0 - 4, p), (x0, p)], fill=INK)
                    text(self.d, (x0 - 6, p), label, size - 1, anchor=(1, 0.5))
        self.d.rectangle([x0, y0, x1, y1], outline=INK)
        if title:
            text(self.d, ((x0 + x1) / 2, y0 - 6), title, size + 1, anchor=(0.5, 1))
        if xlabel:
            text(self.d, ((x0 + x1) / 2, y1 + 8 + size), xlabel, size, anchor=(0.5, 0))
        if ylabel:
            vtext(self.img, (x0 - 18 - max(widths), (y0 + y1) / 2), ylabel, size)

    def line(self, xs, ys, fill, width=2):
        """Polyline through the finite points; a non-finite value breaks it."""
        seg = []
        for x, y in list(zip(xs, ys)) + [(math.nan, math.nan)]:
            if math.isfinite(x) and math.isfinite(y):
                seg.append(self.px(x, y))
            elif seg:
                if len(seg) > 1:
                    self.d.line(seg, fill=fill, width=width, joint="curve")
                seg = []

    def dots(self, xs, ys, fill, r=2.5):
        for x, y in zip(xs, ys):
            if math.isfinite(x) and math.isfinite(y):
                px, py = self.px(x, y)
                self.d.ellipse([px - r, py - r, px + r, py + r], fill=fill)


def legend(d, xy, items, size=12):
    """A framed list of (label, colour) line samples with its top-left corner at xy."""
    if not items:
        return xy[0]
    h = size + 6
    w = max(text_width(s, size) for s, _ in items) + 44
    d.rectangle([xy[0], xy[1], xy[0] + w, xy[1] + h * len(items) + 8], fill=WHITE, outline=GREY)
    for i, (s, c) in enumerate(items):
        y = xy[1] + 4 + h * i + h / 2
        d.line([(xy[0] + 6, y), (xy[0] + 30, y)], fill=c, width=3)
        text(d, (xy[0] + 36, y), s, size, anchor=(0, 0.5))
    return xy[0] + w


def blues(v):
    """Colour map for v in [0, 1]: white -> light blue -> dark blue."""
    stops = np.array([(247, 251, 255), (110, 170, 215), (8, 48, 107)], np.float64)
    v = np.clip(np.asarray(v, np.float64), 0, 1)[..., None] * 2
    lo = np.where(v < 1, stops[0], stops[1])
    hi = np.where(v < 1, stops[1], stops[2])
    t = np.where(v < 1, v, v - 1)
    return (lo + (hi - lo) * t).round().astype(np.uint8)


def gaussian_smooth(y, sigma):
    """Gaussian smoothing that skips NaNs (each output is the weighted mean of the finite values near it)."""
    y = np.asarray(y, np.float64)
    ok = np.isfinite(y)
    if sigma <= 0 or not ok.any():
        return y
    h = math.ceil(4 * sigma)
    k = np.exp(-0.5 * (np.arange(-h, h + 1) / sigma) ** 2)
    num = np.convolve(np.where(ok, y, 0.0), k)[h:h + len(y)]  # "full" then centred: works for any kernel length
    den = np.convolve(ok.astype(np.float64), k)[h:h + len(y)]
    return np.where(den > 1e-9, num / np.maximum(den, 1e-12), np.nan)


def to_numpy(x, dtype=np.float64):
    return x.detach().float().cpu().numpy().astype(dtype) if torch.is_tensor(x) else np.asarray(x, dtype)


def to_uint8(img):
    """(3, H, W) tensor/array, float in [0, 1] or 0-255 -> (H, W, 3) uint8."""
    a = to_numpy(img)
    a = a * 255 if a.max(initial=0) <= 1.0 else a
    return np.ascontiguousarray(a.transpose(1, 2, 0).clip(0, 255).round().astype(np.uint8))


def save(img, out_path):
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    img.save(out_path)
    return out_path


# -----------------------------------------------------------------------------
# results.png


def plot_results(csv_path, out_path, cols=5, panel=(300, 230)):
    """
    results.csv -> results.png: one panel per series against epoch, grouped in rows: train losses (train/...),
    val losses (val/...), then the metrics (fitness last). lr*, time and series that are always zero are left out;
    empty or unparsable cells are gaps. Raw values are dots, the orange line a Gaussian smoothing of them.
    """
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    head = [h.strip() for h in rows[0]] if rows else []

    def num(s):
        try:
            return float(s)
        except ValueError:
            return math.nan

    data = {h: np.array([num(r[i]) if i < len(r) else math.nan for r in rows[1:]]) for i, h in enumerate(head)}
    epoch = data.pop("epoch", np.arange(1, len(rows)))
    series = {k: v for k, v in data.items() if not k.lower().startswith(("lr", "time"))
              and np.isfinite(v).any() and np.nanmax(np.abs(v)) > 0}
    metrics = [k for k in series if not k.startswith(("train/", "val/")) and k != "fitness"]
    groups = [[k for k in series if k.startswith("train/")], [k for k in series if k.startswith("val/")],
              metrics + [k for k in series if k == "fitness"]]
    cols = max(2, min(cols, max(len(g) for g in groups)))  # no empty columns (2 leave room for the header)
    layout = [g[i:i + cols] for g in groups for i in range(0, len(g), cols)] or [[]]
    pw, ph = panel
    img = Image.new("RGB", (cols * pw, 30 + len(layout) * ph), WHITE)
    d = ImageDraw.Draw(img)
    text(d, (10, 15), f"{Path(csv_path).name}: {len(epoch)} epoch{'s' * (len(epoch) != 1)}", 14, anchor=(0, 0.5))
    legend(d, (cols * pw - 200, 2), [("results", MEAN), ("smooth", SMOOTH)], 11)
    if not series:
        text(d, (10, 60), "no non-zero series to plot", 14)
    finite_ep = epoch[np.isfinite(epoch)]
    e0, e1 = (finite_ep.min(), finite_ep.max()) if len(finite_ep) else (0, 1)
    pad = max(0.5 if e1 == e0 else 0.03 * (e1 - e0), 1e-9)
    for r, keys in enumerate(layout):
        for c, key in enumerate(keys):
            y = series[key]
            x0, y0 = c * pw, 30 + r * ph
            ax = Axes(img, (x0 + 62, y0 + 26, x0 + pw - 14, y0 + ph - 42), (e0 - pad, e1 + pad),
                      nice_limits(np.nanmin(y), np.nanmax(y)))
            ax.frame(key, "epoch", integer_x=True, size=12)
            ax.line(epoch, y, MEAN, 1)
            ax.dots(epoch, y, MEAN)
            if np.isfinite(y).sum() >= 3:
                ax.line(epoch, gaussian_smooth(y, min(3.0, len(y) / 10)), SMOOTH, 2)
    return save(img, out_path)


# -----------------------------------------------------------------------------
# PR_curve.png, F1_curve.png, P_curve.png, R_curve.png


def _curve_picture(title, xlabel, ylabel, x, ys, labels, mean, mean_label, out_path):
    """The layout shared by the curve pictures: ys (n_classes, K) against x (K,) on [0, 1] x [0, 1], each class
    coloured and named by labels up to 20 classes (grey and unnamed beyond), the mean (K,) or None in bold blue."""
    img = Image.new("RGB", (980, 640), WHITE)
    ax = Axes(img, (90, 50, 630, 580))
    ax.frame(title, xlabel, ylabel, xticks=[i / 5 for i in range(6)], yticks=[i / 5 for i in range(6)], size=14)
    many = len(ys) > 20
    for i, y in enumerate(ys):
        ax.line(x, y, GREY if many else colour(i), 1 if many else 2)
    items = [] if many else [(s, colour(i)) for i, s in enumerate(labels)]
    if mean is not None:
        ax.line(x, mean, MEAN, 4)
        items.append((mean_label, MEAN))
    right = legend(ax.d, (650, 50), items)
    return save(img.crop((0, 0, max(right + 20, 700), img.height)), out_path)


def plot_pr_curve(recall, precision, ap50, out_path, names=()):
    """
    PR_curve.png: precision against recall per class (named with its AP50) and the mean over classes, named
    "all classes X mAP@0.5". recall (K,) grid in [0, 1]; precision (n_classes, K) at those recalls;
    ap50 (n_classes,); names (n_classes,).
    """
    recall, ap50 = to_numpy(recall), to_numpy(ap50).reshape(-1)
    precision = to_numpy(precision).reshape(-1, len(recall))
    labels = [f"{name(names, i)} {ap50[i]:.3f}" for i in range(len(precision))]
    mean, mean_label = (precision.mean(0), f"all classes {ap50.mean():.3f} mAP@0.5") if len(ap50) else (None, "")
    return _curve_picture("Precision-Recall Curve", "Recall", "Precision", recall, precision, labels, mean,
                          mean_label, out_path)


def plot_mc_curve(px, py, out_path, names=(), ylabel="Metric"):
    """
    {F1,P,R}_curve.png: a metric against confidence per class and the smoothed mean over classes, whose best value
    and its confidence the legend gives. px (K,) confidence grid in [0, 1]; py (n_classes, K); names (n_classes,).
    """
    px = to_numpy(px)
    py = to_numpy(py).reshape(-1, len(px))
    mean, mean_label = None, ""
    if len(py):
        mean = gaussian_smooth(py.mean(0), 0.05 * len(px) / math.sqrt(3))  # about a moving average over 10% of the grid
        best = int(np.nanargmax(mean))
        mean_label = f"all classes {mean[best]:.2f} at {px[best]:.3f}"
    labels = [name(names, i) for i in range(len(py))]
    return _curve_picture(f"{ylabel}-Confidence Curve", "Confidence", ylabel, px, py, labels, mean, mean_label,
                          out_path)


def plot_curves(save_dir, px, p, r, f1, pr_recall, pr_precision, ap50, names):
    """
    The four curve pictures of a detection validation, as YOLOv8 names them, into save_dir:
    PR_curve.png, F1_curve.png, P_curve.png, R_curve.png. Rows are the classes that have labels, in one order:
      px (K,)                     confidence grid (evaluate uses np.linspace(0, 1, 1000))
      p, r, f1 (n_classes, K)     precision, recall and F1 of each class at confidence threshold px
      pr_recall (R,)              recall grid of the PR curve (e.g. np.linspace(0, 1, 1000))
      pr_precision (n_classes, R) each class's interpolated precision envelope at IoU 0.5 on that grid
      ap50 (n_classes,)           AP at IoU 0.5 per class
      names (n_classes,)          class names
    Returns the four paths.
    """
    save_dir = Path(save_dir)
    return [plot_pr_curve(pr_recall, pr_precision, ap50, save_dir / "PR_curve.png", names),
            plot_mc_curve(px, f1, save_dir / "F1_curve.png", names, "F1"),
            plot_mc_curve(px, p, save_dir / "P_curve.png", names, "Precision"),
            plot_mc_curve(px, r, save_dir / "R_curve.png", names, "Recall")]


# -----------------------------------------------------------------------------
# confusion_matrix.png


def plot_confusion_matrix(matrix, names, out_path, normalize=True):
    """
    confusion_matrix.png from confusion_matrix()'s (nc + 1, nc + 1) array (rows predicted, columns true, last =
    background). normalize: each column (true class) divided by its sum, so a column reads "of the labels of this
    class, the fraction predicted as ..."; the background column spreads the false positives over classes.
    """
    m = to_numpy(matrix)
    n = len(m)
    labels = [name(names, i, 20) for i in range(n - 1)] + ["background"]
    a = m / (m.sum(0, keepdims=True) + 1e-9) if normalize else m
    vmax = 1.0 if normalize else max(a.max(), 1.0)
    c = int(min(max(560 // n, 22), 130))
    fs = 13 if c >= 50 else 10
    lw = max(text_width(s, fs) for s in labels)
    rotate = lw > c - 6
    x0, y0 = lw + 60, 60
    w = x0 + n * c + 110
    img = Image.new("RGB", (w, y0 + n * c + (lw if rotate else fs) + 46), WHITE)
    d = ImageDraw.Draw(img)
    for i in range(n):
        for j in range(n):
            v = a[i, j]
            box = [x0 + j * c, y0 + i * c, x0 + (j + 1) * c, y0 + (i + 1) * c]
            d.rectangle(box, fill=tuple(blues(v / vmax).tolist()), outline=WHITE)
            if (v >= 0.005 if normalize else v > 0) and c >= 22:
                s = f"{v:.2f}" if normalize else f"{int(v)}"
                text(d, (box[0] + c / 2, box[1] + c / 2), s, fs, WHITE if v / vmax > 0.5 else INK, (0.5, 0.5))
    for k, s in enumerate(labels):
        text(d, (x0 - 6, y0 + (k + 0.5) * c), s, fs, anchor=(1, 0.5))
        if rotate:
            vtext(img, (x0 + (k + 0.5) * c, y0 + n * c + 6 + text_width(s, fs) / 2), s, fs)
        else:
            text(d, (x0 + (k + 0.5) * c, y0 + n * c + 6), s, fs, anchor=(0.5, 0))
    text(d, (x0 + n * c / 2, img.height - 12), "True", 15, anchor=(0.5, 1))
    vtext(img, (16, y0 + n * c / 2), "Predicted", 15)
    text(d, (x0 + n * c / 2, 30), "Confusion Matrix" + (" Normalized" if normalize else ""), 17, anchor=(0.5, 0.5))
    bx, bh = x0 + n * c + 20, n * c  # colour bar
    for k in range(bh):
        d.line([(bx, y0 + bh - k), (bx + 16, y0 + bh - k)], fill=tuple(blues(k / max(bh - 1, 1)).tolist()))
    d.rectangle([bx, y0, bx + 16, y0 + bh], outline=GREY)
    ticks = nice_ticks(0, vmax, 5, integer=not normalize)
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1
    for v in ticks:
        text(d, (bx + 22, y0 + bh - v / vmax * bh), tick_label(v, step), 11, anchor=(0, 0.5))
    return save(img, out_path)


# -----------------------------------------------------------------------------
# labels.png


def plot_labels(boxes_xywh, cls, imgsz, out_path, names=()):
    """
    labels.png from all training labels: instances per class, a heat map of box centres, and box width x height in
    pixels on log axes (1 px .. imgsz) with the 32 px lines, so that small stenoses show.
    boxes_xywh (N, 4) normalised to the imgsz x imgsz canvas the network sees; cls (N,); names (nc,).
    """
    b, c = to_numpy(boxes_xywh).reshape(-1, 4), to_numpy(cls).reshape(-1).astype(int)
    nc = max(len(names or ()), int(c.max(initial=-1)) + 1, 1)
    img = Image.new("RGB", (1320, 440), WHITE)
    counts = np.bincount(c, minlength=nc)
    ax = Axes(img, (80, 50, 420, 370), (-0.5, nc - 0.5), nice_limits(0, counts.max(initial=0) * 1.1 or 1))
    ax.frame(f"instances ({len(c)} boxes)", "", "instances", xticks=[], size=13)
    for k, n in enumerate(counts):
        (x1, y1), (x2, y2) = ax.px(k - 0.4, n), ax.px(k + 0.4, 0)
        ax.d.rectangle([x1, y1, x2, y2], fill=colour(k))
        if nc <= 20:
            text(ax.d, ((x1 + x2) / 2, y1 - 2), str(n), 11, anchor=(0.5, 1))
            text(ax.d, ((x1 + x2) / 2, y2 + 6), name(names, k, 12), 12, anchor=(0.5, 0))

    bins = int(np.clip(np.sqrt(len(b)), 8, 50))  # about sqrt(N) x sqrt(N) cells: ~1 box per cell on average
    hist = np.histogram2d(b[:, 1], b[:, 0], bins=bins, range=[[0, 1], [0, 1]])[0]  # rows y (top = 0), columns x
    ax = Axes(img, (520, 50, 840, 370), (0, 1), (1, 0))
    heat = blues(hist / max(hist.max(), 1))
    img.paste(Image.fromarray(heat).resize((320, 320), Image.NEAREST), (520, 50))
    ax.frame("box centres", "x", "y", grid=False, size=13)

    wh = (b[:, 2:] * imgsz).clip(1, imgsz)
    small = int((wh.max(1) < 32).sum()) if len(wh) else 0
    ax = Axes(img, (960, 50, 1280, 370), (1, imgsz), (1, imgsz), xlog=True, ylog=True)
    ax.frame(f"box size: {small} of {len(wh)} with longest side < 32 px", "width (px)", "height (px)", size=13)
    for k in range(nc):
        ax.dots(wh[c == k, 0], wh[c == k, 1], colour(k) + (110,), 2)
    ax.line([32, 32], [1, imgsz], (220, 40, 40), 1)
    ax.line([1, imgsz], [32, 32], (220, 40, 40), 1)
    text(ax.d, (ax.px(32, 1)[0] + 3, ax.box[1] + 4), "32 px", 11, (220, 40, 40))
    return save(img, out_path)


# -----------------------------------------------------------------------------
# train_batch*.png, val_batch*_labels.png, val_batch*_pred.png, val_seg_batch*.png


def tinted(img, mask=None):
    """(3, S, S) image (+ (1, S, S) mask > 0.5 tinted) -> PIL RGB."""
    a = to_uint8(img).astype(np.float32)
    if mask is not None:
        m = (to_numpy(mask).reshape(a.shape[:2]) > 0.5)[..., None]
        a = np.where(m, 0.55 * a + 0.45 * np.array(MASK, np.float32), a)
    return Image.fromarray(a.round().astype(np.uint8))


def plot_batch(imgs, batch_idx, cls, bboxes, masks, paths, out_path, preds=None, names=None, max_images=16,
               conf=0.25):
    """
    A mosaic (up to 4 x 4) of letterboxed images with boxes, the vessel mask tinted, and the file name on each tile:
    train_batch0..2.png (augmented inputs), val_batch0_labels.png, and with preds val_batch0_pred.png.
    imgs (B, 3, S, S) in [0, 1]; masks (B, 1, S, S) or None; paths (B,) file names.
    Labels: batch_idx (N,), cls (N,) or (N, 1), bboxes (N, 4) normalised xywh; drawn when preds is None.
    preds: per image (n, 6) x1, y1, x2, y2, conf, cls in canvas pixels; boxes with conf > `conf`, conf shown.
    """
    n = min(len(imgs), max_images)
    ns = max(1, math.ceil(math.sqrt(n)))
    S = imgs.shape[-1]
    t = min(max(S, 256), 1920 // ns)  # tile size: readable captions, mosaic at most 1920 px
    k = t / S
    canvas = Image.new("RGB", (ns * t, max(1, math.ceil(n / ns)) * t), WHITE)
    bi, c, bb = to_numpy(batch_idx).reshape(-1), to_numpy(cls).reshape(-1), to_numpy(bboxes).reshape(-1, 4)
    for i in range(n):
        tile = tinted(imgs[i], None if masks is None else masks[i]).resize((t, t), Image.BILINEAR)
        d = ImageDraw.Draw(tile)
        if preds is None:
            rows = [(x - w / 2, y - h / 2, x + w / 2, y + h / 2, None, j) for (x, y, w, h), j in
                    zip(bb[bi == i] * t, c[bi == i])]
        else:
            p = to_numpy(preds[i]).reshape(-1, 6)
            rows = [(*(r[:4] * k), r[4], r[5]) for r in p[p[:, 4] > conf]]
        for x1, y1, x2, y2, score, j in rows:
            col = colour(j)
            d.rectangle([x1, y1, x2, y2], outline=col, width=2)
            s = name(names, int(j)) + ("" if score is None else f" {score:.2f}")
            x = min(max(x1, 2), t - text_width(s, 11) - 3)
            text(d, (x, max(y1 - 1, 0)), s, 11, WHITE, anchor=(0, 1) if y1 > 14 else (0, 0), bg=col)
        text(d, (5, 5), Path(str(paths[i])).name[:40], 12, WHITE, bg=(0, 0, 0))
        canvas.paste(tile, ((i % ns) * t, (i // ns) * t))
    d = ImageDraw.Draw(canvas)
    for g in range(1, ns):  # white borders between tiles
        d.line([(g * t, 0), (g * t, canvas.height)], fill=WHITE, width=3)
        d.line([(0, g * t), (canvas.width, g * t)], fill=WHITE, width=3)
    return save(canvas, out_path)


def plot_seg_batch(imgs, masks, logits, paths, out_path, max_images=8):
    """
    val_seg_batch0.png: per image (up to max_images; two per row beyond 4) image | ground-truth mask | predicted mask
    (sigmoid(logits) > 0.5), white vessels on black, the prediction captioned with its Dice.
    imgs (B, 3, S, S) in [0, 1]; masks (B, 1, S, S) 0/1 or None; logits (B, 1, h, w) (resized to S); paths (B,).
    """
    n = min(len(imgs), max_images)
    S = imgs.shape[-1]
    t = min(max(S, 192), 320)
    logits = torch.as_tensor(logits[:n]).detach().float().cpu()
    if logits.shape[-2:] != (S, S):
        logits = F.interpolate(logits, size=(S, S), mode="bilinear", align_corners=False)
    pred = (logits.sigmoid() > 0.5).numpy().reshape(n, S, S)
    g = 2 if n > 4 else 1  # image triplets per row
    canvas = Image.new("RGB", (g * (3 * t + 4) + (g - 1) * 8, math.ceil(n / g) * (t + 2) - 2), WHITE)
    for i in range(n):
        gt = np.zeros((S, S), bool) if masks is None else to_numpy(masks[i]).reshape(S, S) > 0.5
        total = pred[i].sum() + gt.sum()
        dice = "" if masks is None else f" (Dice {2 * (pred[i] & gt).sum() / total if total else 1.0:.3f})"
        tiles = [(tinted(imgs[i]), Path(str(paths[i])).name[:32]),
                 (Image.fromarray(gt.astype(np.uint8) * 255), "no mask" if masks is None else "ground truth"),
                 (Image.fromarray(pred[i].astype(np.uint8) * 255), "prediction" + dice)]
        for j, (tile, caption) in enumerate(tiles):
            tile = tile.convert("RGB").resize((t, t), Image.BILINEAR)
            text(ImageDraw.Draw(tile), (4, 4), caption, 12, WHITE, bg=(0, 0, 0))
            canvas.paste(tile, ((i % g) * (3 * t + 12) + j * (t + 2), (i // g) * (t + 2)))
    return save(canvas, out_path)
