"""plots.py: every picture on small synthetic inputs (edge cases included) is a readable, non-blank PNG of plausible
size, and the confusion matrix counts a hand-built case exactly."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import metrics
import plots


def check_png(path, min_w=200, min_h=150):
    """The file is a PNG of at least min_w x min_h that is not one flat colour; returns it as an array."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= min_w and im.height >= min_h, im.size
        a = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert a.std() > 0
    return a


# -----------------------------------------------------------------------------
# helpers


def test_y_axis_gets_3_to_5_round_ticks():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        scale = 10 ** rng.uniform(-4, 4)
        lo, hi = sorted(rng.uniform(-1, 1, 2) * scale)
        if rng.uniform() < 0.1:
            hi = lo  # a flat series
        a, b = plots.nice_limits(lo, hi)
        ticks = plots.nice_ticks(a, b, 5)
        assert a <= lo and b >= hi and b > a
        assert 3 <= len(ticks) <= 5, (lo, hi, ticks)
    assert plots.nice_ticks(1, 12, 7, integer=True) == [2, 4, 6, 8, 10, 12]
    assert plots.nice_ticks(1.2, 1.9, 7, integer=True) == [] and plots.nice_ticks(1, 1.9, 7, integer=True) == [1]
    assert plots.log_ticks(1, 256) == [1, 2, 5, 10, 20, 50, 100, 200]
    assert [plots.tick_label(v, 0.25) for v in plots.nice_ticks(0, 1, 5)] == ["0.00", "0.25", "0.50", "0.75", "1.00"]
    assert [plots.tick_label(v, 2) for v in (0, 2, 4)] == ["0", "2", "4"]
    assert plots.tick_label(0.30000000000000004, 0.1) == "0.3" and plots.tick_label(-1e-17, 0.1) == "0.0"


def test_smooth_skips_nans_and_keeps_length():
    y = np.array([1.0, np.nan, 3.0, 4.0, 5.0])
    s = plots.gaussian_smooth(y, 1.0)
    assert s.shape == y.shape and np.isfinite(s).all()
    assert np.allclose(plots.gaussian_smooth(np.full(7, 2.5), 3.0), 2.5)  # a kernel longer than the series
    assert np.isnan(plots.gaussian_smooth(np.full(3, np.nan), 1.0)).all()


# -----------------------------------------------------------------------------
# results.png


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(",".join(header) + "\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows))
    return path


def test_plot_results_many_epochs_gaps_and_zero_series(tmp_path):
    header = ["epoch", "train/box", "train/cls", "val/box", "metrics/mAP50(B)", "fitness", "lr"]
    rows = [[e, 2 - 0.1 * e, 1 / e, 2.2 - 0.1 * e, 0.05 * e, 0.04 * e, 0.01] for e in range(1, 11)]
    rows[3][3] = ""  # an empty cell
    rows[5][4] = "nan"
    a = check_png(plots.plot_results(write_csv(tmp_path / "a/results.csv", header, rows), tmp_path / "a.png"), 500, 400)
    # the same run with an always-zero column (and a blank line): the zero series is left out -> the same picture
    zero = [h if h != "lr" else "train/cons" for h in header] + ["lr"]
    rows0 = [r[:-1] + [0.0, 0.01] for r in rows]
    path0 = write_csv(tmp_path / "b/results.csv", zero, rows0)
    path0.write_text(path0.read_text() + "\n")
    b = check_png(plots.plot_results(path0, tmp_path / "b.png"), 500, 400)
    assert a.shape == b.shape and (a == b).all()


def test_plot_results_one_epoch_padded_headers_and_no_rows(tmp_path):
    header = ["            epoch", "   train/box_loss", "     val/box_loss", " metrics/mAP50(B)", "lr/pg0"]
    one = write_csv(tmp_path / "one.csv", header, [[1, 1.5, 1.7, 0.1, 0.001]])  # Ultralytics pads its headers
    check_png(plots.plot_results(one, tmp_path / "one.png"), 400, 300)
    empty = write_csv(tmp_path / "empty.csv", header, [])
    check_png(plots.plot_results(empty, tmp_path / "empty.png"), 400, 50)


# -----------------------------------------------------------------------------
# curves


def curves(n_classes, k=1000, seed=0):
    rng = np.random.default_rng(seed)
    px = np.linspace(0, 1, k)
    r = np.sort(rng.uniform(0, 1, (n_classes, k)), 1)[:, ::-1]  # recall falls as the threshold rises
    p = np.sort(rng.uniform(0, 1, (n_classes, k)), 1)
    f1 = 2 * p * r / (p + r + 1e-16)
    pr = np.sort(rng.uniform(0, 1, (n_classes, k)), 1)[:, ::-1]
    return px, p, r, f1, px, pr, pr.mean(1)


@pytest.mark.parametrize("n_classes", [1, 3, 25, 0])
def test_plot_curves_writes_the_four_yolov8_files(tmp_path, n_classes):
    names = [f"class{i}" for i in range(n_classes)]
    paths = plots.plot_curves(tmp_path, *curves(n_classes), names)
    assert [p.name for p in paths] == ["PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png"]
    for p in paths:
        check_png(p, 640, 500)


def test_pr_curve_accepts_a_101_point_recall_grid(tmp_path):
    x = np.linspace(0, 1, 101)
    check_png(plots.plot_pr_curve(x, torch.tensor(1 - x**2)[None], [0.66], tmp_path / "pr.png", ["stenosis"]), 640, 500)


# -----------------------------------------------------------------------------
# confusion matrix


def test_confusion_matrix_counts_by_hand():
    nc = 2
    box = lambda x, y, s=10: [x, y, x + s, y + s]
    targets = [
        [[0, *box(0, 0)], [1, *box(50, 50)], [0, *box(100, 100)]],  # image 0: 3 labels
        [],  # image 1: no labels
        [[1, *box(0, 0)]],  # image 2: nothing predicted
        [[0, *box(0, 0)]],  # image 3: a detection that overlaps nothing
        [[0, *box(0, 0)]],  # image 4: a duplicate detection
    ]
    preds = [
        [[*box(0, 0), 0.9, 0],  # TP class 0
         [*box(50, 50), 0.8, 0],  # on the class-1 label, predicted class 0
         [*box(200, 200), 0.7, 1],  # on nothing: background FP of class 1
         [*box(100, 100), 0.2, 0]],  # under conf 0.25: ignored, so that label is missed
        [[*box(0, 0), 0.5, 1]],  # image without labels: background FP of class 1
        [],
        [[*box(30, 30), 0.9, 0]],  # no match in the image at all: FP class 0 (and the label missed)
        [[*box(0, 0), 0.9, 0], [0, 0, 10, 9, 0.8, 0]],  # both on the label: one TP, one FP
    ]
    targets = [np.array(t, np.float32).reshape(-1, 5) for t in targets]
    m = metrics.confusion_matrix([torch.tensor(p).reshape(-1, 6) for p in preds], targets, nc)
    want = np.zeros((3, 3), int)  # rows predicted, columns true, index 2 background
    want[0, 0] = 2  # image 0, image 4
    want[0, 1] = 1  # class-1 label predicted as class 0
    want[1, 2] = 2  # two class-1 detections on background
    want[2, 0] = 2  # missed class-0 labels: image 0 (under conf), image 3
    want[2, 1] = 1  # image 2
    want[0, 2] = 2  # image 3's stray detection, image 4's duplicate
    assert m.dtype.kind == "i" and (m == want).all(), m


def test_confusion_matrix_each_detection_keeps_its_best_label_and_iou_is_strict():
    t = [np.array([[0, 0, 0, 10, 10], [0, 5, 0, 15, 10]], np.float32)]
    p = [np.array([[4, 0, 14, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 0]], np.float32)]  # det 0: IoU .43 / .82
    assert (metrics.confusion_matrix(p, t, 1) == [[2, 0], [0, 0]]).all()
    half = [np.array([[0, 0, 10, 10, 0.9, 0]], np.float32)]  # IoU 0.5 exactly with the label below
    lab = [np.array([[0, 0, 0, 10, 20]], np.float32)]
    assert (metrics.confusion_matrix(half, lab, 1, iou=0.5) == [[0, 1], [1, 0]]).all()
    assert (metrics.confusion_matrix(half, lab, 1, iou=0.45) == [[1, 0], [0, 0]]).all()


@pytest.mark.parametrize("nc,normalize", [(1, True), (1, False), (3, True), (25, True)])
def test_plot_confusion_matrix(tmp_path, nc, normalize):
    m = np.random.default_rng(nc).integers(0, 30, (nc + 1, nc + 1))
    names = ["stenosis"] if nc == 1 else [f"a long class name {i}" for i in range(nc)]
    check_png(plots.plot_confusion_matrix(m, names, tmp_path / "cm.png", normalize), 300, 250)


def test_plot_confusion_matrix_of_an_empty_matrix(tmp_path):
    check_png(plots.plot_confusion_matrix(np.zeros((2, 2)), ["stenosis"], tmp_path / "cm.png"), 300, 250)


# -----------------------------------------------------------------------------
# labels.png


def test_plot_labels(tmp_path):
    rng = np.random.default_rng(0)
    xywh = np.concatenate([rng.uniform(0.2, 0.8, (300, 2)), rng.uniform(0.01, 0.3, (300, 2))], 1)
    cls = rng.integers(0, 3, 300)
    check_png(plots.plot_labels(torch.tensor(xywh), torch.tensor(cls)[:, None], 512, tmp_path / "a.png",
                                ["stenosis", "occlusion", "other"]), 900, 350)
    check_png(plots.plot_labels(xywh[:5], np.zeros(5), 256, tmp_path / "one_class.png", ["stenosis"]), 900, 350)
    check_png(plots.plot_labels(np.zeros((0, 4)), np.zeros(0), 256, tmp_path / "none.png", ["stenosis"]), 900, 350)


# -----------------------------------------------------------------------------
# batch mosaics


def batch(B=5, S=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(B, 3, S, S, generator=g)
    masks = (torch.rand(B, 1, S, S, generator=g) > 0.8).float()
    batch_idx = torch.tensor([0.0, 0.0, 2.0, 3.0])  # image 1 and 4 have no boxes
    cls = torch.zeros(4, 1)
    bboxes = torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.1, 0.1, 0.1, 0.1], [0.9, 0.05, 0.1, 0.1], [0.3, 0.7, 0.4, 0.2]])
    paths = [f"/data/images/angio_{i:04d}_with_a_very_long_file_name_indeed.png" for i in range(B)]
    return imgs, batch_idx, cls, bboxes, masks, paths


def test_plot_batch_labels_and_predictions(tmp_path):
    imgs, bi, cls, bb, masks, paths = batch()
    a = check_png(plots.plot_batch(imgs, bi, cls, bb, masks, paths, tmp_path / "train_batch0.png", names=["stenosis"]),
                  500, 400)
    assert a.shape[:2] == (2 * 256, 3 * 256)  # 5 images: 3 columns, 2 rows of 256-px tiles (64-px inputs upscaled)
    check_png(plots.plot_batch(imgs, bi, cls, bb, None, paths, tmp_path / "val_batch0_labels.png"), 500, 400)
    preds = [torch.tensor([[10.0, 10, 30, 40, 0.9, 0], [0, 0, 5, 5, 0.1, 0]]), torch.zeros(0, 6),
             torch.tensor([[50.0, 0, 64, 10, 0.5, 0]]), torch.zeros(0, 6), torch.zeros(0, 6)]
    check_png(plots.plot_batch(imgs, bi, cls, bb, masks, paths, tmp_path / "val_batch0_pred.png", preds=preds,
                               names=["stenosis"]), 500, 400)
    nothing = [torch.zeros(0, 6)] * 5
    check_png(plots.plot_batch(imgs, bi, cls, bb, None, paths, tmp_path / "none.png", preds=nothing), 500, 400)


def test_plot_batch_caps_at_16_tiles_and_takes_one_image(tmp_path):
    imgs, _, _, _, masks, _ = batch(B=20, S=320)
    empty = torch.zeros(0), torch.zeros(0, 1), torch.zeros(0, 4)
    names = [f"{i}.png" for i in range(20)]
    a = check_png(plots.plot_batch(imgs, *empty, masks, names, tmp_path / "m.png"), 1000, 1000)
    assert a.shape[:2] == (4 * 320, 4 * 320)
    one = check_png(plots.plot_batch(imgs[:1] * 255, *empty, None, ["x.png"], tmp_path / "one.png"), 300, 300)
    assert one.shape[:2] == (320, 320)


def test_plot_seg_batch(tmp_path):
    imgs, _, _, _, masks, paths = batch(B=6, S=64)
    logits = torch.randn(6, 1, 32, 32)  # a coarser logit map is resized to the image
    a = check_png(plots.plot_seg_batch(imgs, masks, logits, paths, tmp_path / "val_seg_batch0.png"), 1000, 500)
    assert a.shape[1] > a.shape[0]  # 6 images: two image/GT/prediction triplets per row
    check_png(plots.plot_seg_batch(imgs[:1], None, logits[:1], paths[:1], tmp_path / "one.png", max_images=8), 500, 150)
    assert math.isclose(Image.open(tmp_path / "one.png").width, 3 * 192 + 4)
