"""data.py, splits.py and synthetic.py: layout, splits, bad inputs, letterbox/augmentation alignment, loaders,
synthetic data, converters."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import convert
import data
import splits
import synthetic

pytestmark = pytest.mark.usefixtures("one_thread")  # they run beside the background builds

DET, SEG, SRC = "angiography_detection", "angiography_segmentation", "retinography_segmentation"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A tiny synthetic set: 10 images per task at 64 px (7 train / 3 val)."""
    return synthetic.make_synthetic(tmp_path_factory.mktemp("synth"), n=10, imgsz=64, seed=0)


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# -----------------------------------------------------------------------------
# reading


def test_read_image_formats(tmp_path):
    ramp16 = np.array([[0, 32768, 65535]] * 2, np.uint16)
    ramp8 = np.array([[0, 128, 255]] * 2, np.uint8)
    cases = {
        "g8.png": Image.fromarray(ramp8),
        "g16.png": Image.fromarray(ramp16),
        "g16.tif": Image.fromarray(ramp16),
        "rgb.bmp": Image.fromarray(np.stack([ramp8] * 3, -1)),
        "rgb.jpg": Image.fromarray(np.stack([ramp8] * 3, -1)),
        "rgba.png": Image.fromarray(np.stack([ramp8] * 3 + [np.zeros_like(ramp8)], -1)),
        "pal.png": Image.fromarray(np.stack([ramp8] * 3, -1)).convert("P", palette=Image.Palette.ADAPTIVE),
        "bit.png": Image.fromarray(ramp8 > 100),
    }
    for name, im in cases.items():
        if name.endswith("jpg"):
            im.save(tmp_path / name, quality=100)
        else:
            im.save(tmp_path / name)
        a = data.read_image(tmp_path / name)
        assert a.shape == (2, 3, 3) and a.dtype == np.float32, name
        assert a.min() >= 0 and a.max() <= 1, name
        tol = 0.05 if name.endswith(("jpg", "pal.png")) else 3e-3
        if name != "bit.png":
            assert np.allclose(a[0, :, 0], [0, 0.5, 1], atol=tol), (name, a[0, :, 0])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        data.read_image(tmp_path / "bad.png")


# -----------------------------------------------------------------------------
# splits


def test_splits_written_and_read_back(synth, tmp_path):
    p = synth / "splits.json"
    splits = json.loads(p.read_text())
    assert set(splits) == set(data.TASK_KEYS)
    for key, (folder, task, domain) in data.TASK_KEYS.items():
        tr, va = splits[key]["train"], splits[key]["val"]
        assert (len(tr), len(va), len(splits[key]["test"])) == (7, 3, 0)
        assert not {e["image"] for e in tr} & {e["image"] for e in va}
        for e in tr + va:
            assert e["domain"] == domain and not Path(e["image"]).is_absolute()
            assert (synth / e["image"]).exists() and (synth / e["mask" if task == "seg" else "label"]).exists()
        assert tr == sorted(tr, key=lambda e: e["image"])
    assert data.load_splits(synth) == splits
    assert data.make_splits(synth) == splits  # seed 42: the same split every time
    # absolute paths are accepted too
    root = tmp_path / "abs"
    root.mkdir()
    absolute = {k: {s: [{f: (str(synth / v) if f != "domain" else v) for f, v in e.items()} for e in es]
                    for s, es in d.items()} for k, d in splits.items()}
    (root / "splits.json").write_text(json.dumps(absolute))
    assert len(data.TaskDataset(root, DET, "val", 64, verbose=False)) == 3


def test_grouped_split_never_leaks_a_group():
    rng = np.random.default_rng(0)
    entries = [{"image": f"det/images/pat{p:02d}_frame{f:03d}.png", "domain": "target"}
               for p in range(12) for f in range(rng.integers(1, 30))]
    plain = data.split_entries(entries)
    key = lambda e: Path(e["image"]).name.split("_")[0]  # noqa: E731
    assert {key(e) for e in plain["train"]} & {key(e) for e in plain["val"]}  # per image: videos leak
    s = data.split_entries(entries, group_regex=r"(pat\d+)_")
    assert not {key(e) for e in s["train"]} & {key(e) for e in s["val"]}
    assert sorted(e["image"] for v in s.values() for e in v) == sorted(e["image"] for e in entries)
    assert 0.5 < len(s["train"]) / len(entries) < 0.9 and s["val"]


def test_resplit_keeps_what_sets_and_tests_pinned():
    """splits.resplit: a set's entries stay where its converter put them; named with sets, its official val/test still
    stay and the rest is pooled; an entry that records nothing stays in test; a pooled image whose group is held in
    val or test joins it; moves count (set, from, to)."""
    def e(name, **kw):
        return {"image": f"retinography/images/{name}.png", "mask": f"retinography/labels/{name}.png", **kw}

    per = {"train": [e("d1", set="D", official="train"), e("d2", set="D", official="train"), e("u1"), e("u2")],
           "val": [e("a1", set="A", official="val"), e("u3")],
           "test": [e("d3", set="D", official="test"), e("old", group="g")]}
    new = [e("n1"), e("n2", group="g")]
    out, moves = splits.resplit(per, new)
    where = {Path(x["image"]).stem: sp for sp, v in out.items() for x in v}
    assert [where[k] for k in ("d1", "d2", "a1", "d3", "old")] == ["train", "train", "val", "test", "test"]
    assert where["n2"] == "test"  # its group sits in test: a patient never straddles
    assert {where[k] for k in ("u1", "u2", "u3", "n1")} <= {"train", "val"} and sum(map(len, out.values())) == 10
    assert moves[("D", "test", "test")] == 1 and moves[("A", "val", "val")] == 1 and moves[(None, "new", "test")] == 1
    out, _ = splits.resplit(per, sets={"d"}, ratios=(0.0, 1.0, 0.0))  # D named: its official train pooled, test kept
    where = {Path(x["image"]).stem: sp for sp, v in out.items() for x in v}
    assert [where[k] for k in ("d1", "d2", "d3", "a1")] == ["val", "val", "test", "val"]
    assert all(x["image"] < y["image"] for v in out.values() for x, y in zip(v, v[1:]))  # sorted


def test_check_counts_an_image_listed_twice_once(tmp_path, capsys):
    """An image splits.json lists twice (here in train and in test) is one image to check, which fails naming it;
    splits.py split lists it once, in test."""
    for i in range(3):
        _png(tmp_path / "retinography/images" / f"r{i}.png", np.full((8, 8, 3), 50, np.uint8))
        _png(tmp_path / "retinography/labels" / f"r{i}.png", np.eye(8, dtype=np.uint8) * 255)
    listed = data.make_splits(tmp_path, ratios=(1, 0, 0))  # not `splits`: that names the module
    listed[SRC]["test"] = [dict(listed[SRC]["train"][0])]
    data.write_splits(tmp_path, listed)
    assert splits.main(["check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "r0.png: listed 2 times in retinography_segmentation (train, test)" in err and "3 images" in err
    assert splits.main(["split", "--root", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "splits.json").read_text())[SRC]
    assert [Path(e["image"]).name for e in s["test"]] == ["r0.png"] and sum(map(len, s.values())) == 3
    assert splits.main(["check", "--root", str(tmp_path)]) == 0
    assert "all 3 images usable" in capsys.readouterr().err


def test_own_fov_masks_in_the_fov_folder_are_listed_and_used(tmp_path):
    """A user's own field-of-view masks in retinography/fov/ (same stem, any image type) go into the splits
    training writes, and the dataset scores vessels inside them; an image without one has none."""
    for n in ("a", "b"):
        _png(tmp_path / "retinography/images" / f"{n}.png", np.full((8, 8, 3), 50, np.uint8))
        _png(tmp_path / "retinography/labels" / f"{n}.png", np.eye(8, dtype=np.uint8) * 255)
    _png(tmp_path / "retinography/fov/a.png", np.pad(np.full((6, 6), 255, np.uint8), 1))
    listed = {Path(e["image"]).stem: e for e in data.make_splits(tmp_path, ratios=(1, 0, 0))[SRC]["train"]}
    assert listed["a"]["fov"] == "retinography/fov/a.png" and "fov" not in listed["b"]
    item, problem = data.scan_entry(tmp_path, listed["a"], "seg", 1)
    assert problem is None and item["fov"] == tmp_path / "retinography/fov/a.png"
    assert data.scan_entry(tmp_path, listed["b"], "seg", 1)[0]["fov"] is None


def test_data_py_names_where_the_split_tools_went(tmp_path):
    """The split and check commands moved to splits.py: `python data.py split` says so in one line, no traceback."""
    r = subprocess.run([sys.executable, "data.py", "split", "--root", str(tmp_path)], cwd=Path(data.__file__).parent,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert len(r.stderr.splitlines()) == 1 and "splits.py" in r.stderr, r.stderr


# -----------------------------------------------------------------------------
# bad inputs


def _bad_layout(root):
    """A detection and a segmentation folder holding one of each kind of bad input."""
    img = (np.random.default_rng(0).random((32, 48)) * 255).astype(np.uint8)
    det, seg = root / "angiography/detect", root / "angiography/segment"
    labels = {"good": "0 0.5 0.5 0.2 0.2\n", "neg": "", "outside": "0 0.95 0.5 0.2 0.2\n",
              "malformed": "0 0.5 0.5 0.2\n", "bigcls": "3 0.5 0.5 0.2 0.2\n", "nan": "0 nan 0.5 0.2 0.2\n",
              "faroutside": "0 1.5 0.5 0.2 0.2\n", "emptyimg": "", "corrupt": "", "truncated": ""}
    (det / "labels").mkdir(parents=True)
    for name, text in labels.items():
        _png(det / "images" / f"{name}.png", img)
        (det / "labels" / f"{name}.txt").write_text(text)
    _png(det / "images" / "nolabel.png", img)
    (det / "images" / "emptyimg.png").write_bytes(b"")
    (det / "images" / "corrupt.png").write_bytes(b"\x89PNG garbage" * 10)
    full = (det / "images" / "good.png").read_bytes()
    (det / "images" / "truncated.png").write_bytes(full[: len(full) // 2])
    for name in ("ok", "nomask", "mismatch", "badmask"):
        _png(seg / "images" / f"{name}.png", img)
    _png(seg / "labels" / "ok.png", (img > 128).astype(np.uint8) * 255)
    _png(seg / "labels" / "mismatch.png", np.zeros((10, 10), np.uint8))
    (seg / "labels" / "badmask.png").write_bytes(b"garbage")
    data.write_splits(root, data.make_splits(root, ratios=(1, 0, 0)))


def test_bad_inputs_reported_skipped_and_strict(tmp_path, capsys):
    _bad_layout(tmp_path)
    ds = data.TaskDataset(tmp_path, DET, "train", 64, nc=1)
    err = capsys.readouterr().err
    assert sorted(Path(it["image"]).stem for it in ds.items) == ["good", "neg", "outside"]
    kinds = {"malformed": "malformed label", "bigcls": "class id >= nc (3 >= 1", "nan": "non-finite",
             "faroutside": "outside the image", "nolabel": "missing label", "emptyimg": "empty image file",
             "corrupt": "unreadable image", "truncated": "unreadable image", "outside": "clipped"}
    for name, kind in kinds.items():
        line = next(ln for ln in err.splitlines() if f"/{name}." in ln)
        assert kind in line, line
        assert line.endswith("clipped" if name == "outside" else "skipped"), line
    summary = next(ln for ln in err.splitlines() if "images used" in ln)  # one line of counts
    assert "3 of 11 images used" in summary and "skipped 8 (" in summary and "unreadable image: 2" in summary
    assert "clipped 1 (box outside the image: 1)" in summary
    boxes = {Path(it["image"]).stem: it["boxes"] for it in ds.items}
    assert len(boxes["neg"]) == 0  # an empty label file is a negative
    assert np.allclose(boxes["outside"], [[0, 0.925, 0.5, 0.15, 0.2]])
    seg = data.TaskDataset(tmp_path, SEG, "train", 64)
    err = capsys.readouterr().err
    assert len(seg) == 1 and "nomask.png: missing mask" in err and "mask size" in err and "badmask.png" in err
    with pytest.raises(ValueError, match="malformed"):
        data.TaskDataset(tmp_path, DET, "train", 64, strict=True)
    with pytest.raises(ValueError, match="missing mask"):
        data.TaskDataset(tmp_path, SEG, "train", 64, strict=True)
    # a file that breaks after the scan is reported and replaced, the epoch goes on
    (tmp_path / "angiography/detect/images/good.png").unlink()
    i = next(i for i, it in enumerate(ds.items) if Path(it["image"]).stem == "good")
    s = ds[i]
    assert "failed at load time" in capsys.readouterr().err and "good" not in s["path"]
    b = data.collate([ds[j] for j in range(len(ds))])
    assert b["bboxes"].shape[1] == 4 and b["mask"] is None


# -----------------------------------------------------------------------------
# letterbox and augmentation


def _rect_sample(h0=80, w0=120, box=(30, 20, 70, 60)):
    """An image with a bright rectangle, its mask, and its box (cls, normalised xywh)."""
    x1, y1, x2, y2 = box
    img = np.full((h0, w0, 3), 0.2, np.float32)
    img[y1:y2, x1:x2] = 0.9
    mask = np.zeros((h0, w0), bool)
    mask[y1:y2, x1:x2] = True
    b = np.array([[0, (x1 + x2) / 2 / w0, (y1 + y2) / 2 / h0, (x2 - x1) / w0, (y2 - y1) / h0]], np.float32)
    return img, mask, b


@pytest.mark.parametrize("aug", ["fliplr", "flipud", "scale", "translate", "photometric", "all"])
def test_augmentation_keeps_boxes_and_masks_aligned(aug):
    off = dict(fliplr=0, flipud=0, scale=0, translate=0, brightness=0, contrast=0, gamma=0)
    hyp = {"fliplr": {**off, "fliplr": 1}, "flipud": {**off, "flipud": 1}, "scale": {**off, "scale": 0.5},
           "translate": {**off, "translate": 0.2}, "all": data.AUG,
           "photometric": {**off, "brightness": 0.2, "contrast": 0.3, "gamma": 0.3}}[aug]
    img, mask, boxes = _rect_sample(box=(10, 20, 50, 60))  # off-centre, so a flip moves it
    kept = 0
    for seed in range(12):
        im, m, b, ratio, pad = data.transform(img, mask, boxes, 64, np.random.default_rng(seed), hyp)
        assert im.shape == (3, 64, 64) and m.shape == (1, 64, 64) and set(m.unique().tolist()) <= {0.0, 1.0}
        if not len(b):
            continue
        kept += 1
        _, x, y, w, h = b[0] * np.array([1, 64, 64, 64, 64])
        x1, y1, x2, y2 = int(round(x - w / 2)), int(round(y - h / 2)), int(round(x + w / 2)), int(round(y + h / 2))
        inside = m[0, y1 + 1:y2 - 1, x1 + 1:x2 - 1]
        assert inside.numel() and inside.mean() == 1, (aug, seed)  # the mask fills the box...
        outside = m[0].clone()
        outside[max(y1 - 1, 0):y2 + 1, max(x1 - 1, 0):x2 + 1] = 0
        assert outside.sum() == 0, (aug, seed)  # ...and nothing outside it
        if aug != "photometric" and aug != "all":
            assert im[:, y1 + 1:y2 - 1, x1 + 1:x2 - 1].min() > 0.85  # and the image agrees
    assert kept >= 8


def test_the_augment_key_sets_the_training_loaders_strengths(synth):
    """`augment` True, False or a dict changing data.AUG's strengths reaches the training loader; a strength with
    no name or out of range is one line naming the key."""
    import config
    import train
    off = dict(fliplr=0, flipud=0, scale=0, translate=0, brightness=0, contrast=0, gamma=0)
    loaders = {}
    for name, aug in (("none", False), ("all off", off), ("default", True), ("scale", {"scale": 0.25})):
        cfg = {**config.load_config("domainshift1", None, [f"augment={aug!r}", f"data={str(synth)!r}", "imgsz=64",
                                                           "batch=2", "workers=0"]), "stage": "domainshift1"}
        _, loader, _ = train.build_data(cfg, 0, 1)
        loaders[name] = loader.dataset
    assert not loaders["none"].augment and loaders["default"].augment and loaders["default"].hyp == data.AUG
    assert loaders["scale"].hyp == {**data.AUG, "scale": 0.25}
    same = [loaders[k][(0, 0, 0)]["img"] for k in ("none", "all off")]
    assert torch.allclose(*same, atol=1 / 1023)  # every strength at 0 is no augmentation (the photometric table's
    # 1024 levels aside)
    assert not torch.allclose(same[0], loaders["default"][(0, 0, 0)]["img"], atol=0.01)
    assert set(config.AUG_RANGES) == set(data.AUG)
    for bad in ("{'scal': 0.25}", "{'scale': 1.5}", "{'scale': 'a'}", "1", "[0.5]"):
        with pytest.raises(SystemExit, match="key 'augment' must be True, False, or a dict") as e:
            config.load_config("domainshift1", None, [f"augment={bad}"])
        assert "\n" not in str(e.value)


def _canvas_xyxy(b, S):
    """(n, 5) cls+xywh normalised to the canvas -> (n, 4) xyxy in canvas px."""
    return np.stack([b[:, 1] - b[:, 3] / 2, b[:, 2] - b[:, 4] / 2, b[:, 1] + b[:, 3] / 2, b[:, 2] + b[:, 4] / 2], 1) * S


def test_letterbox_round_trip():
    h0, w0 = 90, 150
    yy, xx = np.mgrid[:h0, :w0]
    mask = (xx - 60) ** 2 + (yy - 40) ** 2 < 30 ** 2
    img = np.repeat(mask[..., None], 3, 2).astype(np.float32)
    xyxy = np.array([[30.0, 10.0, 90.0, 70.0], [100.0, 50.0, 140.0, 88.0]])
    cx, cy = (xyxy[:, 0] + xyxy[:, 2]) / 2 / w0, (xyxy[:, 1] + xyxy[:, 3]) / 2 / h0
    bw, bh = (xyxy[:, 2] - xyxy[:, 0]) / w0, (xyxy[:, 3] - xyxy[:, 1]) / h0
    boxes = np.concatenate([np.zeros((2, 1)), np.stack([cx, cy, bw, bh], 1)], 1)
    im, m, b, ratio, pad = data.transform(img, mask, boxes.astype(np.float32), 64)
    assert abs(ratio[0] - ratio[1]) < 1 / h0 and pad[0] == 0 and pad[1] > 0  # wide: padded top and bottom
    assert torch.allclose(im[:, 0, 0], torch.full((3,), 114 / 255))
    canvas = _canvas_xyxy(b, 64)
    back = data.unletterbox_boxes(canvas, ratio, pad, (h0, w0))
    assert torch.allclose(back, torch.tensor(xyxy, dtype=torch.float32), atol=1e-3)
    mb = data.unletterbox_mask(m[0], ratio, pad, (h0, w0)) > 0.5
    assert mb.shape == (h0, w0)
    iou = (mb & torch.from_numpy(mask)).sum() / (mb | torch.from_numpy(mask)).sum()
    assert iou > 0.9
    # the stored map also undoes an augmentation (flips, scale, shift)
    hyp = dict(data.AUG, scale=0.1, translate=0.02, fliplr=1, flipud=1)
    im, m, b, ratio, pad = data.transform(img, mask, boxes.astype(np.float32), 64, np.random.default_rng(0), hyp)
    assert ratio[0] < 0 and ratio[1] < 0
    canvas = _canvas_xyxy(b, 64)
    back = data.unletterbox_boxes(canvas, ratio, pad)
    assert torch.allclose(back, torch.tensor(xyxy, dtype=torch.float32), atol=1e-3)


# -----------------------------------------------------------------------------
# loaders


def _paths(loader):
    return [(b["task"], b["domain"], tuple(b["paths"])) for b in loader]


def test_batches_have_the_documented_keys(synth):
    det = next(iter(data.build_loader(synth, DET, "train", 64, batch=4)))
    assert det["img"].shape == (4, 3, 64, 64) and det["img"].dtype == torch.float32
    n = len(det["batch_idx"])
    assert det["cls"].shape == (n, 1) and det["bboxes"].shape == (n, 4) and det["batch_idx"].shape == (n,)
    assert det["task"] == "det" and det["domain"] == "target" and det["mask"] is None and len(det["paths"]) == 4
    assert det["ratio"].shape == det["pad"].shape == det["orig_shape"].shape == (4, 2)
    seg = next(iter(data.build_loader(synth, SRC, "val", 64, batch=3)))
    assert seg["task"] == "seg" and seg["domain"] == "source" and seg["mask"].shape == (3, 1, 64, 64)
    for name, s in (("mask_p3", 8), ("mask_p4", 16), ("mask_p5", 32)):
        assert seg[name].shape == (3, 1, 64 // s, 64 // s)
        assert torch.allclose(seg[name].mean((1, 2, 3)), seg["mask"].mean((1, 2, 3)), atol=1e-6)
    assert seg["mask"].sum() > 0 and len(seg["bboxes"]) == 0


def test_alternating_loader_ratio_length_determinism(synth):
    def make(ratio=(1, 2), rank=0, world=1, src=False, workers=0):
        kw = dict(imgsz=64, batch=2, seed=3, rank=rank, world_size=world, workers=workers)
        det, seg = data.build_loader(synth, DET, "train", **kw), data.build_loader(synth, SEG, "train", **kw)
        return data.AlternatingLoader(det, seg, data.build_loader(synth, SRC, "train", **kw) if src else None, ratio)

    al = make()  # 7 train images per task, batch 2 -> 4 batches per stream
    assert len(al) == 6  # min(4 // 1, 4 // 2) = 2 cycles of det, seg, seg
    first = _paths(al)
    assert [t for t, _, _ in first] == ["det", "seg", "seg"] * 2 and len(first) == len(al)
    assert _paths(make()) == first  # deterministic for a seed
    a, b = next(iter(make())), next(iter(make(workers=2)))  # ...and for any number of workers
    assert torch.equal(a["img"], b["img"]) and torch.equal(a["bboxes"], b["bboxes"])
    al.set_epoch(1)
    assert _paths(al) != first  # reshuffled per epoch
    al3 = make((1, 1, 1), src=True)
    first3 = [(t, d) for t, d, _ in _paths(al3)][:3]
    assert len(al3) == 12 and first3 == [("det", "target"), ("seg", "target"), ("seg", "source")]
    replay = make((1, 1, 2), src=True)  # the source stream (4 batches) would last 2 cycles; det and seg last 4
    kinds = [d for _, d, _ in _paths(replay)]
    assert len(replay) == 16 and len(kinds) == 16 and kinds.count("source") == 8  # replay cycles, epoch kept
    with pytest.raises(ValueError):
        make((1, 2, 1))  # a source weight without a source loader
    with pytest.raises(ValueError):
        make((5, 1))  # 4 det batches cannot fill one cycle: an epoch of nothing is an error
    r0, r1 = make(rank=0, world=2), make(rank=1, world=2)  # DDP: same schedule, disjoint shares
    p0, p1 = _paths(r0), _paths(r1)
    assert len(r0) == len(r1) and [t for t, _, _ in p0] == [t for t, _, _ in p1]
    det0 = {p for t, _, ps in p0 if t == "det" for p in ps}
    det1 = {p for t, _, ps in p1 if t == "det" for p in ps}
    assert det0 and det1 and not det0 & det1


# -----------------------------------------------------------------------------
# synthetic data


def test_synthetic_deterministic_and_cached(tmp_path):
    a = synthetic.ensure_synthetic(tmp_path / "a", n=3, imgsz=64, seed=1)
    b = synthetic.make_synthetic(tmp_path / "b", n=3, imgsz=64, seed=1)
    c = synthetic.make_synthetic(tmp_path / "c", n=3, imgsz=64, seed=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 3 * 3 * 2 + 2  # images + masks/labels, splits.json, synthetic.json
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.suffix == ".png")
    stamp = (a / "splits.json").stat().st_mtime_ns
    assert synthetic.ensure_synthetic(a, n=3, imgsz=64, seed=1) == a and (a / "splits.json").stat().st_mtime_ns == stamp
    synthetic.ensure_synthetic(a, n=4, imgsz=64, seed=1)  # other params: regenerated
    assert len(list((a / "retinography/images").iterdir())) == 4
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        synthetic.ensure_synthetic(tmp_path / "foreign", n=2, imgsz=64)
    # the two domains look different: colour fundus vs gray angiogram
    fundus = data.read_image(next((a / "retinography/images").iterdir()))
    angio = data.read_image(next((a / "angiography/segment/images").iterdir()))
    assert fundus[..., 0].mean() > 2 * fundus[..., 2].mean() and np.allclose(angio[..., 0], angio[..., 2])


def test_synthetic_stenosis_boxes_lie_on_vessels():
    sizes = []
    for i in range(8):
        img, mask, boxes = synthetic.synth_angiogram(np.random.default_rng([5, i]), 256, 3)
        assert img.shape == mask.shape == (256, 256) and img[mask].mean() < img[~mask].mean()
        for x1, y1, x2, y2 in boxes.round().astype(int):
            assert mask[y1:y2, x1:x2].mean() > 0.1  # a vessel runs through the box
            cy, cx = (y1 + y2) // 2, (x1 + x2) // 2
            assert mask[cy - 2:cy + 3, cx - 2:cx + 3].any()  # and through its centre (the narrowing)
            sizes += [x2 - x1, y2 - y1]
    assert len(sizes) >= 20 and 12 <= np.median(sizes) <= 40 and min(sizes) >= 8 and max(sizes) <= 48


# -----------------------------------------------------------------------------
# converters


def test_arcade_conversion(tmp_path):
    src, root = tmp_path / "arcade/stenosis", tmp_path / "root"
    for name in ("1.png", "2.png"):
        _png(src / "train/images" / name, np.full((48, 64), 120, np.uint8))
    coco = {"images": [{"id": 1, "file_name": "1.png", "width": 64, "height": 48},
                       {"id": 2, "file_name": "2.png", "width": 64, "height": 48}],
            "categories": [{"id": 1, "name": "1"}, {"id": 26, "name": "stenosis"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 26, "bbox": [8, 8, 16, 12],
                 "segmentation": [[8, 8, 24, 8, 24, 20, 8, 20]]},
                {"id": 2, "image_id": 1, "category_id": 26, "bbox": [56, 40, 16, 16]},  # clipped at the edge
                {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10]}]}  # not a stenosis
    (src / "train/annotations").mkdir(parents=True)
    (src / "train/annotations/train.json").write_text(json.dumps(coco))
    split = convert.convert_arcade(src, root)
    assert [e["image"] for e in split["train"]] == ["angiography/detect/images/train_1.png",
                                                    "angiography/detect/images/train_2.png"]
    lab = np.loadtxt(root / "angiography/detect/labels/train_1.txt", ndmin=2)
    assert np.allclose(lab, [[0, 16 / 64, 14 / 48, 16 / 64, 12 / 48], [0, 60 / 64, 44 / 48, 8 / 64, 8 / 48]])
    assert (root / "angiography/detect/labels/train_2.txt").read_text() == ""  # a negative
    splits = json.loads((root / "splits.json").read_text())
    assert len(splits[DET]["train"]) == 2 and not splits[DET]["val"]
    ds = data.TaskDataset(root, DET, "train", 64, verbose=False)
    assert len(ds) == 2 and len(data.collate([ds[0], ds[1]])["bboxes"]) == 2
    convert.convert_arcade(src, root, task="segment")
    m = data.read_mask(root / "angiography/segment/labels/train_1.png")
    assert 150 <= m.sum() <= 250 and m[14, 16] and not m[40, 50]


def test_convert_folder_and_cli(tmp_path):
    imgs, masks, root = tmp_path / "imgs", tmp_path / "masks", tmp_path / "root"
    for i in range(4):
        _png(imgs / f"p{i // 2}_{i}.png", np.full((20, 30, 3), 50 * i, np.uint8))
        if i < 3:
            _png(masks / f"p{i // 2}_{i}.png", np.eye(20, 30, dtype=np.uint8) * 7)  # any value > 0 is vessel
    assert convert.convert_folder(imgs, masks, root, SRC, group_regex=r"(p\d)_") == 3
    assert set(np.unique(np.asarray(Image.open(root / "retinography/labels/p0_0.png")))) == {0, 255}
    s = json.loads((root / "splits.json").read_text())[SRC]
    assert sum(len(v) for v in s.values()) == 3
    assert len({Path(e["image"]).name[:2] for e in s["train"]} & {Path(e["image"]).name[:2] for e in s["val"]}) == 0
    splits.main(["split", "--root", str(root)])
    splits.main(["check", "--root", str(root)])
