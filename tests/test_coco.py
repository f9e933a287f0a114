"""coco.py and evaluate.py / predict.py --save-json: masks as COCO's compressed RLE (the strings pycocotools
writes), the COCO files' schema, and evaluate's mAP against a COCO-style AP computed here, independently, from the
written files."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import coco
import data
import evaluate
import predict
import synthetic
from metrics import DetMeter, targets_xyxy
from model import CAMTL

pytestmark = pytest.mark.usefixtures("one_thread")


def cross_mask():
    a = np.zeros((30, 40), bool)
    a[3:20, 5:37] = True
    a[10, :] = True
    return a


# masks and the counts strings pycocotools' mask.encode writes for them (Fortran order)
PYCOCOTOOLS = [
    (np.array([[0, 1], [1, 1]], bool), "13"),
    (np.array([[1, 1, 0], [0, 1, 1]], bool), "01110O"),
    (np.zeros((4, 5), bool), "d0"),
    (cross_mask(), ":1m00000000I`0G00000000000000000000000000000000000000000000000000000000000007@9000F"),
]


@pytest.mark.parametrize("mask,counts", PYCOCOTOOLS)
def test_rle_is_cocos_compressed_form(mask, counts):
    assert coco.rle_encode(mask) == {"size": list(mask.shape), "counts": counts}
    assert (coco.rle_decode({"size": list(mask.shape), "counts": counts}) == mask).all()


def test_rle_round_trips_and_reads_the_uncompressed_form():
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = rng.integers(1, 70, 2)
        m = rng.random((h, w)) < rng.uniform()
        assert (coco.rle_decode(coco.rle_encode(m)) == m).all()
    m = np.ones((3, 2), bool)  # uncompressed: counts start with the (empty) run of 0s
    assert (coco.rle_decode({"size": [3, 2], "counts": [0, 6]}) == m).all()
    # down column 0: rows 0-9 empty, row 10 full, then rows 11-29 and column 1's rows 0-9 empty
    assert coco.rle_counts(coco.rle_encode(cross_mask())["counts"])[:3] == [10, 1, 19 + 10]
    with pytest.raises(ValueError, match="RLE counts sum to 5, not 3 x 2 = 6"):
        coco.rle_decode({"size": [3, 2], "counts": [1, 4]})


# -----------------------------------------------------------------------------
# COCO-style AP, written from COCO's definition (cocoeval: greedy matching by score per image and class, all images
# pooled per class, precision envelope read at 101 recall points), reading only the JSON files

THRESHOLDS = np.linspace(0.5, 0.95, 10)


def iou_xywh(a, b):
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def coco_hits(dets, gts):
    """One image and class: dets by descending score -> (n, 10) bool, true positive at each threshold."""
    hits = np.zeros((len(dets), len(THRESHOLDS)), bool)
    for k, t in enumerate(THRESHOLDS):
        taken = set()
        for i, d in enumerate(dets):
            best, m = min(t, 1 - 1e-10), None
            for j, g in enumerate(gts):
                v = iou_xywh(d["bbox"], g["bbox"])
                if j not in taken and v >= best:
                    best, m = v, j
            if m is not None:
                taken.add(m)
                hits[i, k] = True
    return hits


def coco_map(gt_path, dt_path, max_dets=300):
    """-> (mAP50, mAP50-95) of the results file against the ground-truth file."""
    gt, dt = json.loads(Path(gt_path).read_text()), json.loads(Path(dt_path).read_text())
    aps = []
    for c in (cat["id"] for cat in gt["categories"]):
        n_gt = sum(a["category_id"] == c for a in gt["annotations"])
        if not n_gt:
            continue
        scores, hits = [], []
        for img in gt["images"]:
            gts = [a for a in gt["annotations"] if a["image_id"] == img["id"] and a["category_id"] == c]
            dets = sorted((d for d in dt if d["image_id"] == img["id"] and d["category_id"] == c),
                          key=lambda d: -d["score"])[:max_dets]
            scores += [d["score"] for d in dets]
            hits.append(coco_hits(dets, gts))
        hits = np.concatenate(hits)[np.argsort(-np.array(scores), kind="mergesort")]
        ap = []
        for k in range(len(THRESHOLDS)):
            tp, fp = np.cumsum(hits[:, k]), np.cumsum(~hits[:, k])
            recall, precision = tp / n_gt, tp / np.maximum(tp + fp, 1e-16)
            precision = np.maximum.accumulate(precision[::-1])[::-1]
            at = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
            ap.append(np.mean([precision[i] if i < len(precision) else 0.0 for i in at]))
        aps.append(ap)
    aps = np.array(aps)
    return aps[:, 0].mean(), aps.mean()


# -----------------------------------------------------------------------------
# a small detection set in odd sizes, predictions near its labels: our mAP == the COCO-style AP of the files


SIZES = [(300, 200), (160, 260), (256, 256), (400, 120), (90, 90), (200, 330), (240, 180), (130, 310)]


def det_set(root, rng, nc=2):
    """Angiography detection images of SIZES with 1-5 labelled boxes each, all in the val split."""
    d = root / "angiography" / "detect"
    (d / "images").mkdir(parents=True)
    (d / "labels").mkdir()
    entries = []
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / "images" / f"{i}.png")
        rows = []
        for _ in range(rng.integers(1, 6)):
            bw, bh = rng.uniform(0.1, 0.4, 2)
            rows.append(f"{rng.integers(nc)} {rng.uniform(bw / 2, 1 - bw / 2):.6f} "
                        f"{rng.uniform(bh / 2, 1 - bh / 2):.6f} {bw:.6f} {bh:.6f}")
        (d / "labels" / f"{i}.txt").write_text("\n".join(rows) + "\n")
        entries.append({"image": f"angiography/detect/images/{i}.png", "label": f"angiography/detect/labels/{i}.txt",
                        "domain": "target"})
    (root / "splits.json").write_text(json.dumps({"angiography_detection": {"train": [], "val": entries,
                                                                            "test": []}}))
    return data.build_loader(root, "angiography_detection", "val", imgsz=128, batch=3, augment=False, nc=nc)


def near_predictions(batch, rng, nc=2):
    """Per image: most labels found again (jittered, sometimes with the wrong class), a few false alarms, all
    inside the image's content on the canvas, by descending confidence (as NMS gives them) -> list of (n, 6)."""
    S = batch["img"].shape[-1]
    out = []
    for i in range(len(batch["img"])):
        t = targets_xyxy(batch, i, S, S).numpy()
        rows = []
        for c, x1, y1, x2, y2 in t:
            if rng.random() < 0.85:
                j = rng.normal(0, 0.08, 4) * [x2 - x1, y2 - y1, x2 - x1, y2 - y1]
                rows.append([x1 + j[0], y1 + j[1], x2 + j[2], y2 + j[3], rng.uniform(0.2, 1),
                             c if rng.random() < 0.9 else 1 - c])
        for _ in range(rng.integers(0, 3)):
            x, y = rng.uniform(0, S - 20, 2)
            rows.append([x, y, x + rng.uniform(8, 20), y + rng.uniform(8, 20), rng.uniform(0, 0.6), rng.integers(nc)])
        p = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
        (rx, ry), (px, py), (h0, w0) = batch["ratio"][i].tolist(), batch["pad"][i].tolist(), batch["orig_shape"][i]
        p[:, [0, 2]] = p[:, [0, 2]].clamp(px, px + rx * w0)  # content, not padding: the metric is computed on the
        p[:, [1, 3]] = p[:, [1, 3]].clamp(py, py + ry * h0)  # canvas, COCO on the image, where the pad is clipped
        out.append(p[p[:, 4].argsort(descending=True)])
    return out


def test_our_map_equals_a_coco_style_ap_of_the_written_files(tmp_path):
    rng = np.random.default_rng(0)
    loader = det_set(tmp_path / "set", rng)
    results, meter = coco.Results({"det": loader}), DetMeter()  # DetMeter's default: the COCO greedy rule
    for batch in loader:
        preds = near_predictions(batch, rng)
        results(batch, preds, None)  # as validate's on_batch hook calls it
        meter.update(preds, [targets_xyxy(batch, i, 128, 128) for i in range(len(preds))])
    ours = meter.compute(2)
    paths = results.write(tmp_path / "out", "val", ["a", "b"])
    assert [p.name for p in paths] == ["instances_val.json", "predictions.json"]
    map50, map50_95 = coco_map(*paths)
    assert 0.3 < map50_95 < 0.9  # a case with hits, misses and near misses at every threshold
    # the same matches; the AP integrals differ slightly: the reference's compute_ap interpolates the precision
    # envelope linearly and integrates by trapezoids, COCO reads the step function at 101 points and averages
    assert ours["map50"] == pytest.approx(map50, abs=0.005) and ours["map50_95"] == pytest.approx(map50_95, abs=0.005)


def test_ground_truth_file_is_coco_in_original_pixels(tmp_path):
    loader = det_set(tmp_path / "set", np.random.default_rng(1))
    gt = coco.ground_truth(loader.dataset, ["a", "b"])
    assert set(gt) == {"images", "annotations", "categories"}
    assert gt["categories"] == [{"id": 1, "name": "a", "supercategory": "lesion"},
                                {"id": 2, "name": "b", "supercategory": "lesion"}]
    assert [(im["id"], im["file_name"], im["width"], im["height"]) for im in gt["images"]] == \
        [(i, f"angiography/detect/images/{i}.png", w, h) for i, (w, h) in enumerate(SIZES)]
    labels = [line.split() for i in range(len(SIZES))
              for line in (tmp_path / f"set/angiography/detect/labels/{i}.txt").read_text().splitlines()]
    assert [a["id"] for a in gt["annotations"]] == list(range(1, len(labels) + 1))  # ids from 1, as COCO's
    for a, (c, xc, yc, bw, bh) in zip(gt["annotations"], labels):
        w, h = SIZES[a["image_id"]]
        assert a["category_id"] == int(c) + 1 and a["iscrowd"] == 0
        assert a["bbox"] == pytest.approx([(float(xc) - float(bw) / 2) * w, (float(yc) - float(bh) / 2) * h,
                                           float(bw) * w, float(bh) * h], abs=2e-3)
        assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3], abs=1e-2)


# -----------------------------------------------------------------------------
# the CLI


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = CAMTL({"scale": [0.33, 0.125, 1024], "imgsz": 64}, verbose=False)
    with torch.no_grad():  # convolutions at He scale (a fresh tiny network's outputs are nearly constant), and box
        for m in model.modules():  # distances of a few bins (so that boxes fit in the image and differ)
            if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad:
                m.weight.normal_(0, (2 / m.weight[0].numel()) ** 0.5)
        for branch in model.detect.cv2:
            branch[-1].bias.copy_(-torch.arange(16.0).repeat(4))
    torch.save({"model": model.state_dict(), "config": {**model.cfg, "batch": 2, "workers": 0}, "stage": "camtl"},
               d / "best.pt")
    return d / "best.pt", synthetic.make_synthetic(d / "syn", n=6, imgsz=64)


def test_save_json_writes_both_tasks_and_our_map_equals_cocos(tiny, tmp_path, capsys):
    ck, root = tiny
    m = evaluate.main(["--weights", str(ck), f"data={root}", "workers=0", "save_json", f"save_dir={tmp_path}"])
    names = ["instances_val.json", "predictions.json", "vessels_val.json", "vessels_predictions.json"]
    assert f"COCO files -> {tmp_path}: {', '.join(names)}" in capsys.readouterr().out
    gt, dt = (json.loads((tmp_path / n).read_text()) for n in names[:2])
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    for im in gt["images"]:
        assert data.read_image(root / im["file_name"]).shape[:2] == (im["height"], im["width"])
    assert len(dt) > 10 and {d["category_id"] for d in dt} == {1}  # a random model at conf 0.001: many boxes
    assert len({tuple(d["bbox"]) for d in dt}) > 10
    for d in dt:
        h, w = sizes[d["image_id"]]
        x, y, bw, bh = d["bbox"]
        assert set(d) == {"image_id", "category_id", "bbox", "score"} and 0.001 < d["score"] <= 1
        assert 0 <= x and 0 <= y and bw >= 0 and bh >= 0 and x + bw <= w + 1e-3 and y + bh <= h + 1e-3
    map50, map50_95 = coco_map(tmp_path / names[0], tmp_path / names[1])
    assert m["map50"] == pytest.approx(map50, abs=0.005) and m["map50_95"] == pytest.approx(map50_95, abs=0.005)

    vgt, vdt = (json.loads((tmp_path / n).read_text()) for n in names[2:])
    assert vgt["categories"] == coco.VESSELS and {d["category_id"] for d in vdt} == {1}
    assert len(vgt["annotations"]) == len(vgt["images"]) == 2 and len(vdt) == 2  # vessels in every image
    for a in vgt["annotations"]:  # the mask files themselves, at their own size
        im = vgt["images"][a["image_id"]]
        mask = data.read_mask(root / im["file_name"].replace("/images/", "/labels/"))
        assert (coco.rle_decode(a["segmentation"]) == mask).all() and a["area"] == mask.sum()
    for d in vdt:
        im = vgt["images"][d["image_id"]]
        assert coco.rle_decode(d["segmentation"]).shape == (im["height"], im["width"]) and 0.5 < d["score"] <= 1


def test_save_json_of_a_folder_maps_ids_to_files(tiny, tmp_path):
    ck, _ = tiny
    src = tmp_path / "src"
    src.mkdir()
    for name, (w, h) in (("b.png", (90, 50)), ("a.jpg", (64, 120))):
        Image.fromarray((np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)).save(src / name)
    out = tmp_path / "out"
    predict.main(["--weights", str(ck), "--source", str(src), "save_dir=" + str(out), "conf=0.001", "save_json"])
    ids = json.loads((out / "images.json").read_text())
    assert ids["images"] == [{"id": 0, "file_name": "a.jpg", "width": 64, "height": 120},
                             {"id": 1, "file_name": "b.png", "width": 90, "height": 50}]
    assert ids["categories"] == [{"id": 1, "name": "stenosis", "supercategory": "lesion"}]
    dt = json.loads((out / "predictions.json").read_text())
    for stem, im in zip("ab", ids["images"]):  # the same boxes as labels/{stem}.txt, in pixels
        rows = [[float(v) for v in line.split()] for line in (out / f"labels/{stem}.txt").read_text().splitlines()]
        got = [d for d in dt if d["image_id"] == im["id"]]
        assert len(got) == len(rows) > 0
        w, h = im["width"], im["height"]
        for d, (c, xc, yc, bw, bh, p) in zip(got, rows):
            assert d["category_id"] == c + 1 and d["score"] == pytest.approx(p, abs=1e-4)
            assert d["bbox"] == pytest.approx([(xc - bw / 2) * w, (yc - bh / 2) * h, bw * w, bh * h], abs=2e-3)
    assert {d["image_id"] for d in json.loads((out / "vessels_predictions.json").read_text())} <= {0, 1}
