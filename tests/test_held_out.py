"""Held out means held out: images a user listed in val or test stay there through every split and conversion
command unless the command names that split, a conversion never writes into its own source, and an image listed
twice counts once (in the metrics and in the COCO files)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_convert import SRC, _folder, _save, _splits, _where

import coco
import convert
import data
import splits


def _entries(root, names, **kw):
    """Fundus images and masks in root's layout -> their splits.json entries."""
    out = []
    for n in names:
        _save(root / "retinography" / "images" / f"{n}.png", np.full((20, 30, 3), 50, np.uint8))
        _save(root / "retinography" / "labels" / f"{n}.png", np.eye(20, 30, dtype=np.uint8) * 255)
        out.append({"image": f"retinography/images/{n}.png", "mask": f"retinography/labels/{n}.png",
                    "domain": "source", "group": n, **kw})
    return out


def _write(root, per):
    (root / "splits.json").write_text(json.dumps({SRC: {s: per.get(s, []) for s in ("train", "val", "test")}}))


def test_split_of_a_set_keeps_what_the_user_held_out_in_test(tmp_path, capsys):
    """A set without an official split (CADICA, XCAD, DCA1, CHASE, STARE, HRF) records "official": null; two of its
    images moved to test by hand stay there through `splits.py split --set NAME`."""
    es = _entries(tmp_path, [f"cadica_{i}" for i in range(10)], set="CADICA", official=None)
    _write(tmp_path, {"train": es[:6], "val": es[6:8], "test": es[8:]})
    assert splits.main(["split", "--root", str(tmp_path), "--set", "CADICA"]) == 0
    where = _where(tmp_path, SRC)
    assert [where[f"cadica_{i}.png"] for i in (8, 9)] == ["test", "test"]
    assert [where[f"cadica_{i}.png"] for i in (6, 7)] == ["val", "val"]  # val too: no --resplit val
    assert "CADICA test 2 -> test 2" in capsys.readouterr().err
    # named, val moves (its 2 among the 8 re-split 70/30); test never does without --resplit test
    assert splits.main(["split", "--root", str(tmp_path), "--set", "cadica", "--resplit", "val"]) == 0
    where = _where(tmp_path, SRC)
    assert [where[f"cadica_{i}.png"] for i in (8, 9)] == ["test", "test"]
    assert sum(v == "val" for v in where.values()) == 2 and sum(v == "train" for v in where.values()) == 6


def test_an_official_test_image_stays_even_when_test_is_named(tmp_path):
    es = _entries(tmp_path, ["a", "b", "c", "d"], set="DRIVE", official="test")
    mine = _entries(tmp_path, ["m1", "m2"])
    _write(tmp_path, {"train": mine[:1], "test": es + mine[1:]})
    assert splits.main(["split", "--root", str(tmp_path), "--set", "drive", "--resplit", "test"]) == 0
    where = _where(tmp_path, SRC)
    assert [where[f"{n}.png"] for n in "abcd"] == ["test"] * 4
    assert where["m2.png"] in ("train", "val")  # not official, and its split was named: free


def test_converting_a_folder_again_keeps_the_images_a_user_moved_to_test(tmp_path):
    root = tmp_path / "root"
    imgs, masks = _folder(tmp_path / "mine", [f"p{i}" for i in range(6)])
    convert.convert_folder(imgs, masks, root, SRC)
    s = _splits(root)
    moved = s[SRC]["train"][:2]  # the user holds two out by hand
    s[SRC]["train"], s[SRC]["test"] = s[SRC]["train"][2:], s[SRC]["test"] + moved
    (root / "splits.json").write_text(json.dumps(s))
    _folder(tmp_path / "mine", ["p9"])  # a new image, then the same command again
    convert.convert_folder(imgs, masks, root, SRC)
    where = _where(root, SRC)
    assert [where[Path(e["image"]).name] for e in moved] == ["test", "test"]
    assert where["p9.png"] in ("train", "val") and len(where) == 7


@pytest.mark.parametrize("prep", [None, "green"])
def test_a_folder_inside_the_roots_own_task_folder_is_refused_and_nothing_is_deleted(tmp_path, prep):
    root = tmp_path / "root"
    imgs, masks = _folder(tmp_path / "mine", ["a", "b"])
    convert.convert_folder(imgs, masks, root, SRC)
    own = root / "retinography"
    before = sorted(p.name for p in own.rglob("*.*"))
    with pytest.raises(SystemExit) as e:
        convert.convert_folder(own / "images", own / "labels", root, SRC,
                               prep=convert.parse_preprocess(prep) if prep else None)
    assert "inside" in str(e.value) and "nothing done" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in own.rglob("*.*")) == before


def test_an_image_listed_twice_counts_once_and_has_one_coco_id(tmp_path, capsys):
    es = _entries(tmp_path, ["a", "b"])
    _write(tmp_path, {"train": es, "val": [es[0], es[1], dict(es[0])]})
    ds = data.TaskDataset(tmp_path, SRC, "val", imgsz=32)
    assert len(ds) == 2
    err = capsys.readouterr().err
    assert "a.png: listed more than once (`python splits.py split` lists it once) -> counted once" in err
    loader = data.build_loader(tmp_path, SRC, "val", imgsz=32, batch=4)
    results = coco.Results({"seg": loader})
    assert sorted(results.ids["seg"].values()) == [0, 1]
    batch = next(iter(loader))
    results(batch, None, {"full": torch.full((len(batch["paths"]), 1, 32, 32), 5.0)})  # vessels everywhere
    assert sorted({r["image_id"] for r in results.results["seg"]}) == [0, 1]
