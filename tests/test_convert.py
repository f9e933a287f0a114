"""convert.py: each public set's converter on a tiny mock written here in that set's own layout, file names and
formats (COCO JSON, CADICA txt, .tif/.gif/.ppm(.gz)/.pgm/.JPG, 0/255 GIF and palette PNG masks), checked file by file;
the preprocessing steps on small arrays; the summary; the CLI's answers to mistakes; a root converted from ARCADE +
DRIVE trains one tiny camtl epoch (detection, vessels and fundus replay)."""
import gzip
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import convert
import data
import splits
import train

pytestmark = pytest.mark.usefixtures("one_thread")  # they run beside the background builds

DET, SEG, SRC = "angiography_detection", "angiography_segmentation", "retinography_segmentation"
TINY = ["scale=[0.33,0.125,1024]", "imgsz=64", "batch=2", "workers=0", "attn_dim=16", "attn_heads=2",
        "attn_tokens=16", "nbs=2", "warmup_min_iters=2", "epochs=1", "plots=False"]


def _save(path, arr, **kw):
    """Write an array as an image; the format follows the file name (PIL), folders are created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def _angio(h=64, w=64, seed=0):
    """A gray angiogram-like uint8 (h, w): bright background, a dark vessel band."""
    a = np.random.default_rng(seed).integers(150, 200, (h, w)).astype(np.uint8)
    a[h // 2 - 3:h // 2 + 3] = 60
    return a


def _fundus(h=48, w=64, seed=0):
    """An RGB fundus-like uint8 (h, w, 3): a reddish disc on black (the field of view) with darker vessels."""
    yy, xx = np.mgrid[:h, :w]
    fov = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 2 - 2) ** 2
    a = np.zeros((h, w, 3), np.uint8)
    a[fov] = (180 + seed, 90, 40)
    a[fov & (np.abs(yy - h // 2) < 2)] = (120, 40, 20)
    return a, fov


def _vessels(h=48, w=64):
    """A bool (h, w) vessel mask: a horizontal band and a vertical one."""
    m = np.zeros((h, w), bool)
    m[h // 2 - 2:h // 2 + 2, 4:-4] = True
    m[4:-4, w // 3] = True
    return m


def _splits(root):
    return json.loads((Path(root) / "splits.json").read_text())


def _names(split):
    return {s: sorted(Path(e["image"]).name for e in v) for s, v in split.items()}

# -----------------------------------------------------------------------------
# angiography


def _coco_split(d, json_name, n, part):
    """One ARCADE split folder: d/images/N.png (64 x 64) + d/annotations/json_name, COCO-style. stenosis: category 26
    'stenosis' boxes (image N: one box [8 + N, 10, 12, 8] px); syntax: segment polygons, categories 1-25 named after
    the SYNTAX segments ('1', '5', '16a', ...)."""
    cats = [{"id": i + 1, "name": n, "supercategory": "vessel"} for i, n in enumerate(["1", "2", "3", "4", "5", "16a"])]
    images, anns = [], []
    for i in range(1, n + 1):
        _save(d / "images" / f"{i}.png", _angio(seed=i))
        images.append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 64})
        if part == "stenosis":
            x, y, w, h = 8 + i, 10, 12, 8
            anns.append({"id": i, "image_id": i, "category_id": 26, "bbox": [x, y, w, h], "area": w * h,
                         "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]], "iscrowd": 0})
        else:  # two segments: a band across (category 1) and a bar down (category 6, '16a')
            anns.append({"id": 2 * i, "image_id": i, "category_id": 1, "bbox": [4, 28, 56, 8], "area": 448,
                         "segmentation": [[4, 28, 60, 28, 60, 36, 4, 36]], "iscrowd": 0})
            anns.append({"id": 2 * i + 1, "image_id": i, "category_id": 6, "bbox": [30, 4, 4, 24],
                         "area": 96, "segmentation": [[30, 4, 34, 4, 34, 28, 30, 28]], "iscrowd": 0})
    coco = {"images": images, "categories": cats + [{"id": 26, "name": "stenosis", "supercategory": ""}],
            "annotations": anns}
    (d / "annotations").mkdir(parents=True, exist_ok=True)
    (d / "annotations" / json_name).write_text(json.dumps(coco))


def _arcade(src, counts=(("train", 4), ("val", 2), ("test", 0))):
    """The Zenodo release, arcade/{stenosis,syntax}/{split}/{images/N.png, annotations/{split}.json}."""
    for part in ("stenosis", "syntax"):
        for split, n in counts:
            _coco_split(src / part / split, f"{split}.json", n, part)
    return src


def _arcade_challenge(src, counts=(3, 2, 1)):
    """The challenge release, arcade_challenge_datasets/: dataset_phase_1/{stenosis_dataset/sten_{train,val},
    segmentation_dataset/seg_{train,val}}/annotations/<folder>.json and dataset_final_phase/{test_cases_stenosis,
    test_case_segmentation}/annotations/instances_default.json, each beside its images/."""
    for part, sub, short, test in (("stenosis", "stenosis_dataset", "sten", "test_cases_stenosis"),
                                   ("syntax", "segmentation_dataset", "seg", "test_case_segmentation")):
        for split, n in zip(("train", "val"), counts):
            _coco_split(src / "dataset_phase_1" / sub / f"{short}_{split}", f"{short}_{split}.json", n, part)
        _coco_split(src / "dataset_final_phase" / test, "instances_default.json", counts[2], part)
    return src


def test_arcade_both_parts(tmp_path, capsys):
    src, root = _arcade(tmp_path / "arcade"), tmp_path / "root"
    assert convert.main(["arcade", str(src), "--root", str(root), "--imgsz", "64"]) == 0
    s = _splits(root)
    assert _names(s[DET]) == {"train": [f"train_{i}.png" for i in range(1, 5)], "val": ["val_1.png", "val_2.png"],
                              "test": []}  # ARCADE's own split, kept
    assert _names(s[SEG]) == _names(s[DET])
    assert all(e["group"] == Path(e["image"]).stem for v in s[DET].values() for e in v)
    lab = np.loadtxt(root / "angiography/detect/labels/train_3.txt", ndmin=2)  # box [11, 10, 12, 8] on 64 x 64
    assert np.allclose(lab, [[0, 17 / 64, 14 / 64, 12 / 64, 8 / 64]], atol=1e-6)
    m = np.asarray(Image.open(root / "angiography/segment/labels/val_2.png"))
    assert set(np.unique(m)) == {0, 255} and m[32, 10] == 255 and m[10, 32] == 255 and m[10, 10] == 0
    out = capsys.readouterr().out
    assert "angiography_detection/train" in out and "4 boxes, 0 negatives" in out and "(4 under 32 px)" in out
    assert "angiography_segmentation/val" in out and "mean vessel fraction" in out


def test_arcade_in_its_archive_folder_and_the_challenge_release(tmp_path):
    """ARCADE as extracted: the Zenodo zip's own arcade/ folder one level down; the challenge release (annotation files
    sten_train.json, seg_val.json, instances_default.json in two phase folders) from the folder holding it, and one
    of its parts alone. Its official train/val/test are kept and recorded."""
    zen, root = tmp_path / "zenodo", tmp_path / "root"
    _arcade(zen / "arcade", (("train", 2), ("val", 1), ("test", 1)))
    convert.convert_arcade(zen, root)
    s = _splits(root)
    assert _names(s[DET]) == _names(s[SEG]) == {"train": ["train_1.png", "train_2.png"], "val": ["val_1.png"],
                                                "test": ["test_1.png"]}
    ch, root2 = tmp_path / "download", tmp_path / "root2"
    _arcade_challenge(ch / "arcade_challenge_datasets")
    assert convert.main(["arcade", str(ch), "--root", str(root2), "--imgsz", "64"]) == 0
    s = _splits(root2)
    want = {"train": ["train_1.png", "train_2.png", "train_3.png"], "val": ["val_1.png", "val_2.png"],
            "test": ["test_1.png"]}
    assert _names(s[DET]) == _names(s[SEG]) == want
    assert {(e["set"], e["official"]) for e in s[SEG]["val"] + s[DET]["val"]} == {("ARCADE", "val")}
    assert {e["official"] for e in s[DET]["test"]} == {"test"}
    lab = np.loadtxt(root2 / "angiography/detect/labels/test_1.txt", ndmin=2)  # box [9, 10, 12, 8] px
    assert np.allclose(lab, [[0, 15 / 64, 14 / 64, 12 / 64, 8 / 64]], atol=1e-6)
    m = data.read_mask(root2 / "angiography/segment/labels/val_2.png")
    assert m[32, 10] and m[10, 32] and not m[10, 10]
    root3 = tmp_path / "root3"
    convert.convert_arcade(ch / "arcade_challenge_datasets/dataset_phase_1/segmentation_dataset", root3)
    s = _splits(root3)
    assert _names(s[SEG])["val"] == ["val_1.png", "val_2.png"] and not any(s[DET].values())
    _arcade(ch / "arcade", (("train", 1),))  # both releases under one folder: which train is meant?
    with pytest.raises(SystemExit, match="two ARCADE train folders"):
        convert.convert_arcade(ch, tmp_path / "root4")


def _cadica(src):
    """selectedVideos/pX/{lesionVideos.txt, nonlesionVideos.txt, vY/{input/pX_vY_000ZZ.png, pX_vY_selectedFrames.txt,
    groundtruth/pX_vY_000ZZ.txt ('x y w h grade' lines)}}: 3 patients, each a lesion video v1 (frames 1-3, key frames
    2 and 3) and a non-lesion video v2 (frames 1-2, key frame 1, no groundtruth/). Patient 3's only boxes are p0_20."""
    base = src / "selectedVideos"
    for p in (1, 2, 3):
        pd = base / f"p{p}"
        for v, frames, keys in (("v1", (1, 2, 3), (2, 3)), ("v2", (1, 2), (1,))):
            for f in frames:
                _save(pd / v / "input" / f"p{p}_{v}_{f:05d}.png", _angio(seed=10 * p + f))
            (pd / v / f"p{p}_{v}_selectedFrames.txt").write_text("".join(f"p{p}_{v}_{f:05d}\n" for f in keys))
        grade = "p0_20" if p == 3 else "p70_90"
        for f in (2, 3):
            (pd / "v1/groundtruth").mkdir(exist_ok=True)
            (pd / "v1/groundtruth" / f"p{p}_v1_{f:05d}.txt").write_text(f"10 12 8 6 {grade}\n40 40 16 20 p90_98\n"
                                                                         if f == 3 else f"10 12 8 6 {grade}\n")
        (pd / "lesionVideos.txt").write_text("v1\n")
        (pd / "nonlesionVideos.txt").write_text("v2\n")
    return src


def test_cadica_key_frames_negatives_and_patient_groups(tmp_path):
    src, root = _cadica(tmp_path / "CADICA"), tmp_path / "root"
    split = convert.convert_cadica(src, root, val=0.4, drop=("p0_20",))
    names = sorted(n for v in _names(split).values() for n in v)
    # key frames only; p3_v1_00002's only box is p0_20 (dropped): left out, never a negative
    assert names == ["cadica_p1_v1_00002.png", "cadica_p1_v1_00003.png", "cadica_p1_v2_00001.png",
                     "cadica_p2_v1_00002.png", "cadica_p2_v1_00003.png", "cadica_p2_v2_00001.png",
                     "cadica_p3_v1_00003.png", "cadica_p3_v2_00001.png"]
    labels = root / "angiography/detect/labels"
    assert (labels / "cadica_p1_v2_00001.txt").read_text() == ""  # a non-lesion video's key frame: negative
    assert np.allclose(np.loadtxt(labels / "cadica_p1_v1_00002.txt", ndmin=2), [[0, 14 / 64, 15 / 64, 8 / 64, 6 / 64]])
    assert len(np.loadtxt(labels / "cadica_p3_v1_00003.txt", ndmin=2)) == 1  # its p0_20 box dropped, p90_98 kept
    s = _splits(root)[DET]
    patients = {sp: {e["group"] for e in s[sp]} for sp in ("train", "val")}
    assert patients["val"] and patients["train"] and not patients["train"] & patients["val"]
    assert all(e["group"] == "cadica_" + Path(e["image"]).name.split("_")[1] for v in s.values() for e in v)


def test_xcad_and_dca1(tmp_path):
    xcad, dca1, root = tmp_path / "XCAD", tmp_path / "Database_134_Angiograms", tmp_path / "root"
    for i in range(3):
        _save(xcad / "test/images" / f"{100 + i}_7.png", _angio(seed=i))
        _save(xcad / "test/masks" / f"{100 + i}_7.png", _vessels(64, 64).astype(np.uint8) * 255)
        _save(xcad / "train/trainA" / f"{i}.png", _angio(seed=9))  # unlabelled: not used
        _save(dca1 / f"{i + 1}.pgm", _angio(30, 30, seed=i))  # PIL writes .pgm as binary PGM (P5)
        _save(dca1 / f"{i + 1}_gt.pgm", _vessels(30, 30).astype(np.uint8) * 255)
    assert open(dca1 / "1.pgm", "rb").read(2) == b"P5"
    sx = convert.convert_xcad(xcad, root, val=0.34)
    sd = convert.convert_dca1(tmp_path, root, val=0.0)  # found below src
    assert sum(map(len, sx.values())) == 3 and len(sx["val"]) == 1 and _names(sd)["train"] == [
        "dca1_1.png", "dca1_2.png", "dca1_3.png"]
    s = _splits(root)[SEG]
    assert sum(map(len, s.values())) == 6  # both sets listed side by side
    assert all(e["group"] == Path(e["image"]).stem for v in s.values() for e in v)  # no patient ids: one image each
    m = data.read_mask(root / "angiography/segment/labels/dca1_2.png")
    assert m.shape == (30, 30) and m[15, 10] and not m[2, 20]
    assert np.array_equal(np.asarray(Image.open(root / "angiography/segment/images/dca1_2.png")), _angio(30, 30, 1))

# -----------------------------------------------------------------------------
# fundus


def _drive(src, n_train=5, n_test=2):
    """DRIVE/{training,test}/{images/NN_{training,test}.tif, 1st_manual/NN_manual1.gif (0/255), mask/NN_..._mask.gif}:
    training numbered from 21, test from 01, as DRIVE numbers them."""
    for part, ids in (("training", range(21, 21 + n_train)), ("test", range(1, 1 + n_test))):
        for i in ids:
            img, fov = _fundus(seed=i)
            _save(src / part / "images" / f"{i:02d}_{part}.tif", img)
            _save(src / part / "1st_manual" / f"{i:02d}_manual1.gif", (_vessels() & fov).astype(np.uint8) * 255)
            _save(src / part / "mask" / f"{i:02d}_{part}_mask.gif", fov.astype(np.uint8) * 255)
    return src


def test_drive_official_split(tmp_path):
    src, root = _drive(tmp_path / "DRIVE"), tmp_path / "root"
    split = convert.convert_drive(src, root)  # default val 0.2: one of the 5 training images
    assert _names(split)["test"] == ["drive_01_test.tif", "drive_02_test.tif"]  # official test -> test
    assert len(split["train"]) == 4 and len(split["val"]) == 1
    assert all(n.endswith("_training.tif") for n in _names(split)["train"] + _names(split)["val"])
    img = root / "retinography/images/drive_21_training.tif"
    assert np.array_equal(np.asarray(Image.open(img)), _fundus(seed=21)[0])  # copied as it is
    m = np.asarray(Image.open(root / "retinography/labels/drive_21_training.png"))
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 255} and m[24, 30] == 255 and m[2, 2] == 0
    assert {e["group"] for e in split["train"]} == {f"drive_{Path(e['image']).name[6:8]}" for e in split["train"]}
    # the set's FOV masks are kept beside the images, for scoring vessels inside them (evaluate.py)
    assert all(e["fov"] == e["mask"].replace("labels/", "fov/") for v in split.values() for e in v)
    f = np.asarray(Image.open(root / "retinography/fov/drive_21_training.png")) > 0
    assert np.array_equal(f, _fundus(seed=21)[1])


def test_drive_without_test_labels_says_the_test_split_is_left_out(tmp_path, capsys):
    """A copy whose test/ has images but no 1st_manual/ (the labels some copies lack): training converts, and one
    line says that there is no test split to score."""
    src, root = _drive(tmp_path / "DRIVE", 3, 2), tmp_path / "root"
    shutil.rmtree(src / "test/1st_manual")
    split = convert.convert_drive(src, root, val=0.0)
    assert len(split["train"]) == 3 and split["test"] == []
    err = [line for line in capsys.readouterr().err.splitlines() if "1st_manual" in line]
    assert len(err) == 1 and "test" in err[0] and "--split test" in err[0], err


def test_drive_preprocess_uses_its_fov_mask(tmp_path):
    src, root = _drive(tmp_path / "DRIVE", 2, 0), tmp_path / "root"
    (src / "training/mask/21_training_mask.gif").unlink()  # 21: no FOV mask, the red channel gives the disc
    box = np.zeros((48, 64), np.uint8)
    box[10:30, 10:50] = 255  # 22: its FOV mask GIF is a 20 x 40 rectangle
    _save(src / "training/mask/22_training_mask.gif", box)
    convert.convert_drive(src, root, val=0.0, prep=convert.parse_preprocess("fov,green,resize=32"))
    sizes = {}
    for i in (21, 22):
        im = Image.open(root / f"retinography/images/drive_{i}_training.png")
        m = np.asarray(Image.open(root / f"retinography/labels/drive_{i}_training.png"))
        assert im.mode == "L" and m.shape == im.size[::-1] and set(np.unique(m)) <= {0, 255} and m.any()
        sizes[i] = im.size
    # 21: the disc (43 px across) cropped to 43 x 43, then 32 x 32; 22: the 40 x 20 rectangle, then 32 x 16
    assert sizes == {21: (32, 32), 22: (32, 16)}
    # 22's FOV mask went through the same crop and resize: all inside; 21 shipped none, so it has none
    f = np.asarray(Image.open(root / "retinography/fov/drive_22_training.png"))
    assert f.shape == (16, 32) and (f == 255).all()
    assert not (root / "retinography/fov/drive_21_training.png").exists()


def _palette_mask(mask):
    """A palette PNG whose index 0 is WHITE (vessel) and index 1 black: read by colour, not by index."""
    im = Image.frombytes("P", mask.shape[::-1], np.where(mask, 0, 1).astype(np.uint8).tobytes())
    im.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    return im


def test_chase_groups_the_two_eyes_of_a_child(tmp_path):
    src, root = tmp_path / "CHASEDB1", tmp_path / "root"
    for child in (1, 2, 3, 4):
        for eye in "LR":
            stem = f"Image_{child:02d}{eye}"
            _save(src / f"{stem}.jpg", _fundus(seed=child)[0], quality=95)
            _palette_mask(_vessels()).save(src / f"{stem}_1stHO.png")
            _save(src / f"{stem}_2ndHO.png", np.zeros((48, 64), np.uint8))
    split = convert.convert_chase(src, root, val=0.25)
    assert sum(map(len, split.values())) == 8 and len(split["val"]) == 2
    s = _splits(root)[SRC]
    kids = {sp: {e["group"] for e in s[sp]} for sp in ("train", "val")}
    assert len(kids["val"]) == 1 and not kids["train"] & kids["val"]
    val_names = sorted(Path(e["image"]).name for e in s["val"])
    assert val_names[0][:-5] == val_names[1][:-5] and {val_names[0][-5], val_names[1][-5]} == {"L", "R"}
    m = data.read_mask(root / "retinography/labels/chase_Image_02R.png")
    assert np.array_equal(m, _vessels())  # white palette entry = vessel, though its index is 0
    assert (root / "retinography/images/chase_Image_02R.jpg").is_file()


def test_stare_plain_and_gzipped_ppm(tmp_path):
    src, root = tmp_path / "stare", tmp_path / "root"
    for i in (1, 2, 3):
        img, mask = _fundus(seed=i)[0], (_vessels().astype(np.uint8) * 255)
        if i == 1:  # as distributed: gzip-compressed PPM
            for arr, path in ((img, src / "stare-images/im0001.ppm.gz"), (mask, src / "labels-ah/im0001.ah.ppm.gz")):
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = _save(tmp_path / "plain.ppm", np.repeat(arr[..., None], 3, 2) if arr.ndim == 2 else arr)
                path.write_bytes(gzip.compress(tmp.read_bytes()))
        else:
            _save(src / f"stare-images/im000{i}.ppm", img)
            _save(src / f"labels-ah/im000{i}.ah.ppm", np.repeat(mask[..., None], 3, 2))  # labels are colour PPMs
    _save(src / "labels-vk/im0001.vk.ppm", np.zeros((48, 64, 3), np.uint8))  # the other observer: not used
    split = convert.convert_stare(src, root, val=0.0)
    assert _names(split)["train"] == ["stare_im0001.png", "stare_im0002.png", "stare_im0003.png"]
    assert np.array_equal(np.asarray(Image.open(root / "retinography/images/stare_im0001.png")), _fundus(seed=1)[0])
    assert np.array_equal(data.read_mask(root / "retinography/labels/stare_im0001.png"), _vessels())
    assert [e["group"] for e in _splits(root)[SRC]["train"]] == ["stare_im0001", "stare_im0002", "stare_im0003"]


def test_stare_with_a_gunzipped_copy_is_read_once(tmp_path, capsys):
    """im0001.ppm next to im0001.ppm.gz (as `gunzip -k` leaves them): one image, listed once, and check agrees."""
    src, root = tmp_path / "stare", tmp_path / "root"
    for i in (1, 2):
        plain = _save(src / f"stare-images/im000{i}.ppm", _fundus(seed=i)[0])
        (src / f"stare-images/im000{i}.ppm.gz").write_bytes(gzip.compress(plain.read_bytes()))
        _save(src / f"labels-ah/im000{i}.ah.ppm", np.repeat(_vessels()[..., None], 3, 2).astype(np.uint8) * 255)
    split = convert.convert_stare(src, root, val=0.0)
    assert _names(split) == {"train": ["stare_im0001.png", "stare_im0002.png"], "val": [], "test": []}
    assert _names(_splits(root)[SRC])["train"] == ["stare_im0001.png", "stare_im0002.png"]
    assert "read once" in capsys.readouterr().err
    assert splits.main(["check", "--root", str(root)]) == 0
    assert "all 2 images usable" in capsys.readouterr().err


def test_hrf_and_fives(tmp_path):
    hrf, fives, root = tmp_path / "HRF", tmp_path / "FIVES", tmp_path / "root"
    for stem in ("01_dr", "01_g", "01_h", "02_h"):
        img, fov = _fundus(seed=3)
        _save(hrf / "images" / f"{stem}.{'jpg' if stem == '02_h' else 'JPG'}", img, quality=95)
        _save(hrf / "manual1" / f"{stem}.tif", _vessels().astype(np.uint8) * 255)
        _save(hrf / "mask" / f"{stem}_mask.tif", np.repeat(fov[..., None], 3, 2).astype(np.uint8) * 255)
    for split in ("train", "test"):
        for stem in ("1_A", "2_D", "3_G", "4_N")[:4 if split == "train" else 2]:
            _save(fives / split / "Original" / f"{stem}.png", _fundus(seed=4)[0])
            _save(fives / split / "Ground truth" / f"{stem}.png", np.repeat(_vessels()[..., None], 3, 2).astype(
                np.uint8) * 255)  # RGB 0/255
    sh = convert.convert_hrf(hrf, root, val=0.25, prep={"fov": True})
    assert sum(map(len, sh.values())) == 4 and len(sh["val"]) == 1
    im = np.asarray(Image.open(root / "retinography/images/hrf_01_dr.png"))
    assert im.shape[:2] == (43, 43) and im[0, 0].max() == 0  # cropped to the FOV given by mask/01_dr_mask.tif
    sf = convert.convert_fives(fives, root, val=0.0)
    assert _names(sf) == {"train": ["fives_train_1_A.png", "fives_train_2_D.png", "fives_train_3_G.png",
                                    "fives_train_4_N.png"], "val": [], "test": ["fives_test_1_A.png",
                                                                                 "fives_test_2_D.png"]}
    assert np.array_equal(data.read_mask(root / "retinography/labels/fives_test_1_A.png"), _vessels())
    s = _splits(root)[SRC]
    assert sum(map(len, s.values())) == 10  # HRF's 4 and FIVES' 6, side by side
    assert all(e["group"] == Path(e["image"]).stem for v in s.values() for e in v)
    convert.convert_fives(fives, root, val=0.0)  # again: replaced, not doubled
    assert sum(map(len, _splits(root)[SRC].values())) == 10

def test_hrf_per_category_downloads(tmp_path):
    """HRF as nine downloads, each extracted to its own folder: healthy/ (one level deeper, as some unzip tools do),
    healthy_manualsegm/, healthy_fovmask/, and the same for diabetic_retinopathy and glaucoma."""
    src, root = tmp_path / "HRF", tmp_path / "root"
    fov = np.zeros((48, 64), np.uint8)
    fov[8:40, 8:56] = 255  # a 48 x 32 rectangle: its crop shows the FOV file was the one used
    for cat, code in (("healthy", "h"), ("diabetic_retinopathy", "dr"), ("glaucoma", "g")):
        for i in (1, 2):
            stem = f"{i:02d}_{code}"
            _save(src / cat / (cat if cat == "healthy" else "") / f"{stem}.jpg", _fundus(seed=i)[0], quality=95)
            _save(src / f"{cat}_manualsegm" / f"{stem}.tif", _vessels().astype(np.uint8) * 255)
            _save(src / f"{cat}_fovmask" / f"{stem}_mask.tif", fov)
    split = convert.convert_hrf(src, root, val=0.0, prep={"fov": True})
    assert _names(split)["train"] == [f"hrf_{i:02d}_{c}.png" for i in (1, 2) for c in ("dr", "g", "h")]
    for name in ("hrf_01_h", "hrf_02_g"):
        assert Image.open(root / f"retinography/images/{name}.png").size == (48, 32)
        assert data.read_mask(root / f"retinography/labels/{name}.png").any()
    assert {(e["set"], e["official"]) for e in _splits(root)[SRC]["train"]} == {("HRF", None)}


# -----------------------------------------------------------------------------
# a converted root trains


def test_converted_arcade_and_drive_train_one_camtl_epoch(tmp_path):
    """ARCADE (angiography detect + segment) and DRIVE (retinography, replayed) in one root: one camtl epoch with
    det:seg:replay batches 1:2:1, so all three converted task folders go through the training loop once."""
    root = tmp_path / "root"
    convert.convert_arcade(_arcade(tmp_path / "arcade"), root)
    convert.convert_drive(_drive(tmp_path / "DRIVE", 4, 0), root, prep={"resize": 48})
    data.check_stage_data(root, "camtl", batch=2, camtl_ratio=(1, 2, 1))
    run_dir, metrics = train.main(["--stage", "camtl", "--set", *TINY, "camtl_ratio=[1,2,1]", f"data={root}",
                                   f"project={tmp_path}/runs", f"weights_dir={tmp_path}/w"])
    assert (run_dir / "weights/best.pt").is_file() and 0 <= metrics["dice_full"] <= 1 and "map50" in metrics
    header = (run_dir / "results.csv").read_text().splitlines()[0]
    assert "train/det" in header and "train/seg" in header

# -----------------------------------------------------------------------------
# sets, folders and splits in one root


def _folder(d, stems, value=40, size=(20, 30)):
    """d/images/STEM.png + d/masks/STEM.png (0/255) for each stem -> (images, masks)."""
    for stem in stems:
        _save(d / "images" / f"{stem}.png", np.full((*size, 3), value, np.uint8))
        _save(d / "masks" / f"{stem}.png", _vessels(*size).astype(np.uint8) * 255)
    return d / "images", d / "masks"


def _where(root, key):
    return {Path(e["image"]).name: s for s, v in _splits(root)[key].items() for e in v}


def test_folder_and_split_keep_what_sets_assigned(tmp_path, capsys):
    """folder and splits.py split re-split only entries that no set assigned (with --set NAME, that set's too, its
    official test staying), say what moved where, and read a splits.json written before sets were recorded."""
    root = tmp_path / "root"
    convert.convert_drive(_drive(tmp_path / "DRIVE", 4, 2), root, val=0.25)
    drive = _splits(root)[SRC]
    assert {(e["set"], e["official"]) for e in drive["test"]} == {("DRIVE", "test")}
    assert {(e["set"], e["official"]) for e in drive["train"] + drive["val"]} == {("DRIVE", "train")}
    capsys.readouterr()
    convert.convert_folder(*_folder(tmp_path / "mine", [f"p{i}_{j}" for i in range(3) for j in range(2)]), root, SRC)
    err = capsys.readouterr().err
    assert "retinography_segmentation: DRIVE test 2 -> test 2" in err and "DRIVE train 3 -> train 3" in err
    assert "no set new 6 -> train 4, val 2" in err
    s = _splits(root)[SRC]
    assert {k: [e for e in v if e.get("set")] for k, v in s.items()} == drive  # DRIVE's entries as they were
    assert splits.main(["split", "--root", str(root), "--group", r"(p\d)_"]) == 0
    err = capsys.readouterr().err
    assert "DRIVE val 1 -> val 1" in err and "no set train 4 -> " in err
    mine = {s: {Path(e["image"]).name[:2] for e in v if not e.get("set")} for s, v in _splits(root)[SRC].items()}
    assert mine["train"] and mine["val"] and not mine["train"] & mine["val"] and not mine["test"]
    # DRIVE's train and val re-split too: val is named, as held-out listings move only when their split is named
    assert splits.main(["split", "--root", str(root), "--set", "drive", "--resplit", "val"]) == 0
    assert "DRIVE test 2 -> test 2" in capsys.readouterr().err
    where = _where(root, SRC)
    assert [where[f"drive_0{i}_test.tif"] for i in (1, 2)] == ["test", "test"]
    assert {where[f"drive_{i}_training.tif"] for i in range(21, 25)} <= {"train", "val"}
    with pytest.raises(SystemExit, match="--set STARE: .* records the sets DRIVE"):
        splits.main(["split", "--root", str(root), "--set", "STARE"])
    legacy = {k: {sp: [{f: v for f, v in e.items() if f in ("image", "mask", "label", "domain")} for e in es]
                  for sp, es in per.items()} for k, per in _splits(root).items()}
    (root / "splits.json").write_text(json.dumps(legacy))  # as an older convert.py wrote it
    assert splits.main(["split", "--root", str(root), "--resplit", "val"]) == 0
    where = _where(root, SRC)
    assert [where[f"drive_0{i}_test.tif"] for i in (1, 2)] == ["test", "test"]  # a test listing stays in test
    assert sum(v == "train" for v in where.values()) == 7 and len(where) == 12


@pytest.mark.parametrize("seed", range(4))
def test_official_val_and_test_never_reach_train(tmp_path, seed):
    """Random sequences of conversions (DRIVE: train/test; ARCADE: train/val/test), folder conversions into the same
    tasks and splits.py split (plain, grouped, --set), each at least once, on one root: after each step every official
    val and test image of the sets converted so far is listed in exactly its official split, and no image twice."""
    root, rng = tmp_path / "root", random.Random(seed)
    drive, arcade = _drive(tmp_path / "DRIVE", 4, 2), _arcade(tmp_path / "arcade", (("train", 3), ("val", 2),
                                                                                     ("test", 2)))
    fundus, angio = _folder(tmp_path / "fundus", [f"f{i}" for i in range(5)]), _folder(tmp_path / "angio", ["a0", "a1"])
    official = {"DRIVE": {SRC: {f"drive_0{i}_test.tif": "test" for i in (1, 2)}},
                "ARCADE": {k: {"val_1.png": "val", "val_2.png": "val", "test_1.png": "test", "test_2.png": "test"}
                           for k in (DET, SEG)}}
    done, history = set(), []
    ops = {"drive": lambda: convert.convert_drive(drive, root, val=rng.choice([0.0, 0.25, 0.5])),
           "arcade": lambda: convert.convert_arcade(arcade, root, val=rng.choice([0.0, 0.5])),
           "folder fundus": lambda: convert.convert_folder(*fundus, root, SRC, group_regex=rng.choice([None, r"\d"])),
           "folder angio": lambda: convert.convert_folder(*angio, root, SEG),
           "split": lambda: splits.main(["split", "--root", str(root)] + rng.choice(
               [[], ["--group", r"_(\d)"]] + [["--set", name] for name in sorted(done)]))}
    for op in rng.sample(sorted(ops), len(ops)) + rng.choices(sorted(ops), k=3):  # each op at least once
        history.append(op)
        ops[op]()
        done |= {op.upper()} & set(official)
        s = _splits(root)
        for key, per in s.items():
            names = [Path(e["image"]).name for v in per.values() for e in v]
            assert len(names) == len(set(names)), history
            where = _where(root, key)
            for name, sp in (item for st in done for item in official[st].get(key, {}).items()):
                assert where.get(name) == sp, (history, key, name)


def test_a_conversion_never_overwrites_another_folder_or_set(tmp_path, capsys):
    """A folder whose stems repeat another folder's, or a set's output names, is refused before anything is written,
    naming the clash; --prefix names it apart; the same folder again replaces its own files. An unreadable image is
    skipped, not fatal."""
    root, a = tmp_path / "root", _folder(tmp_path / "a", ["x1", "x2"])
    (a[0] / "broken.png").write_bytes(b"not a png")
    _save(a[1] / "broken.png", np.zeros((20, 30), np.uint8))
    assert convert.convert_folder(*a, root, SRC) == 2
    assert "broken.png" in capsys.readouterr().err
    images = root / "retinography/images"
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    b = _folder(tmp_path / "b", ["x1", "x3"], value=200)
    argv = ["folder", str(b[0]), str(b[1]), "--root", str(root), "--task", SRC]
    with pytest.raises(SystemExit, match=r"x1 .*folder .*/a/images.*--prefix"):
        convert.main(argv)
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before  # nothing written, not even x3
    assert convert.main(argv + ["--prefix", "b_"]) == 0
    assert sorted(_where(root, SRC)) == ["b_x1.png", "b_x3.png", "x1.png", "x2.png"]
    assert convert.convert_folder(*a, root, SRC) == 2  # the same folder again: its own files
    assert sorted(_where(root, SRC)) == ["b_x1.png", "b_x3.png", "x1.png", "x2.png"]
    convert.convert_drive(_drive(tmp_path / "DRIVE", 1, 1), root, val=0.0)
    c = _folder(tmp_path / "c", ["drive_01_test"], size=(48, 64))
    with pytest.raises(SystemExit, match=r"drive_01_test .*set DRIVE"):
        convert.convert_folder(*c, root, SRC)
    convert.convert_folder(*_folder(tmp_path / "d", ["train_1"], size=(64, 64)), root, SEG)
    with pytest.raises(SystemExit, match=r"train_1 .*folder .*/d/images"):  # nor a set a folder's: ARCADE's train_1
        convert.convert_arcade(_arcade(tmp_path / "arcade", (("train", 1),)), root)
    assert DET not in _splits(root) or not any(_splits(root)[DET].values())  # refused before either part was written


def test_converting_again_removes_only_what_it_wrote_and_no_longer_lists(tmp_path):
    root, src = tmp_path / "root", _drive(tmp_path / "DRIVE", 3, 1)
    convert.convert_drive(src, root, val=0.0)
    mine = _folder(tmp_path / "mine", ["m1", "m2"])
    convert.convert_folder(*mine, root, SRC)
    stray = _save(root / "retinography/images/drive_99_mine.png", np.zeros((8, 8), np.uint8))  # listed by no one
    for p in (src / "training").rglob("22_*"):
        p.unlink()  # DRIVE without image 22
    convert.convert_drive(src, root, val=0.0)
    files = sorted(p.relative_to(root / "retinography").as_posix() for p in (root / "retinography").rglob("*.*"))
    assert files == ["fov/drive_01_test.png", "fov/drive_21_training.png", "fov/drive_23_training.png",  # FOV masks
                     "images/drive_01_test.tif", "images/drive_21_training.tif", "images/drive_23_training.tif",
                     "images/drive_99_mine.png", "images/m1.png", "images/m2.png", "labels/drive_01_test.png",
                     "labels/drive_21_training.png", "labels/drive_23_training.png", "labels/m1.png", "labels/m2.png"]
    assert stray.exists() and "drive_22_training.tif" not in _where(root, SRC)
    (mine[0] / "m2.png").unlink()
    convert.convert_folder(*mine, root, SRC)  # the folder again, without m2
    assert not (root / "retinography/images/m2.png").exists() and not (root / "retinography/labels/m2.png").exists()
    assert sorted(_where(root, SRC)) == ["drive_01_test.tif", "drive_21_training.tif", "drive_23_training.tif",
                                         "drive_99_mine.png", "m1.png"]


# -----------------------------------------------------------------------------
# preprocessing, splits, summary, CLI


def test_preprocessing_steps_on_small_arrays():
    assert convert.parse_preprocess("fov, green,resize=512") == {"fov": True, "green": True, "resize": 512}
    assert convert.parse_preprocess("") == {}
    with pytest.raises(ValueError, match="unknown step 'clahe'"):
        convert.parse_preprocess("clahe")
    g = np.tile(np.arange(100, 116, dtype=np.uint8), (16, 1))  # (16, 16) low contrast: 100..115
    eq = convert.clahe(g, tiles=1, clip=100.0)  # one tile, no clipping: global histogram equalisation
    assert eq.dtype == np.uint8 and eq.shape == g.shape and eq.max() == 255 and eq.min() < 30
    assert np.all(np.diff(eq[0].astype(int)) > 0)  # monotone in the input
    halves = np.where(np.arange(64) < 32, 40, 200)[None].repeat(64, 0)  # dark | bright, each with faint texture
    tex = (halves + np.random.default_rng(0).integers(0, 8, (64, 64))).astype(np.uint8)
    loc = convert.clahe(tex, tiles=2, clip=2.0)
    for cols in (slice(4, 28), slice(36, 60)):  # local contrast up in both halves, the dark one stays darker
        assert loc[:, cols].std() > 2 * tex[:, cols].std()
    assert loc[:, 4:28].mean() < loc[:, 36:60].mean()
    assert len(np.unique(convert.clahe(np.full((9, 7), 80, np.uint8)))) == 1  # flat stays flat, no seams
    img, fov = _fundus(24, 32)
    assert np.array_equal(convert.fov_mask(img.astype(np.float32) / 255), fov)
    im = convert.resize_longest(Image.new("RGB", (60, 30)), 20)
    assert im.size == (20, 10)  # aspect kept
    m = convert.resize_longest(Image.fromarray(np.eye(30, 60, dtype=np.uint8) * 255), 120, mask=True)
    assert m.size == (120, 60) and set(np.unique(np.asarray(m))) <= {0, 255}
    out, om = convert.preprocess(img.astype(np.float32) / 255, _vessels(24, 32), {"fov": True, "resize": 40})
    assert out.mode == "RGB" and max(out.size) == 40 and om.size == out.size  # cropped to the disc, then scaled


def _entry(name, group):
    return {"image": f"x/images/{name}.png", "mask": "m", "group": group}


def test_assign_splits_keeps_official_and_moves_whole_groups():
    mk = _entry
    by = {"train": [mk(f"a{i}", "A") for i in range(3)] + [mk(f"b{i}", "B") for i in range(3)] + [mk("c", "C")],
          "test": [mk("t", "T")]}
    out = convert.assign_splits(by, val=0.3, seed=0)
    assert [e["image"] for e in out["test"]] == ["x/images/t.png"]
    assert {e["group"] for e in out["val"]}.isdisjoint({e["group"] for e in out["train"]}) and out["val"]
    assert sum(map(len, out.values())) == 8
    assert not convert.assign_splits(by, val=0.0)["val"]
    one = convert.assign_splits({"train": [mk("a", "A"), mk("b", "A")]}, val=0.5)
    assert len(one["train"]) == 2  # a single group never leaves train empty
    rx = convert.assign_splits(by, val=0.3, seed=0, group_regex=r"^([ab])")
    assert {e["group"] for e in rx["train"] + rx["val"]} == {"a", "b", "C"}


def test_cli_mistakes(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for argv, msg in [(["drive", str(tmp_path / "empty")], "drive: no training/ or test/"),
                      (["cadica", str(tmp_path / "empty")], "no selectedVideos/"),
                      (["arcade", str(tmp_path / "empty"), "--preprocess", "fov"], "fundus sets only"),
                      (["hrf", str(tmp_path / "nope")], "is not a directory"),
                      (["stare", str(tmp_path / "empty"), "--preprocess", "resize=0"], "unknown step 'resize=0'"),
                      (["chase", str(tmp_path / "empty"), "--val", "1.5"], "--val 1.5")]:
        with pytest.raises(SystemExit, match=msg):
            convert.main(argv + ["--root", str(tmp_path / "root")])
    src, root = _drive(tmp_path / "DRIVE", 2, 1), tmp_path / "root2"
    assert convert.main(["drive", str(src), "--root", str(root), "--val", "0"]) == 0
    capsys.readouterr()
    st = convert.summary(root, imgsz=64)
    assert st[SRC]["train"]["images"] == 2 and st[SRC]["test"]["images"] == 1
    assert 0.05 < st[SRC]["train"]["vessel"] < 0.3
    assert "retinography_segmentation/train" in capsys.readouterr().out
