"""study.py and the `hard` synthetic preset: a tiny 2-arm x 2-seed study runs, skips what is done, and reports
exactly what its runs' results.csv files hold; interrupted runs resume; the hard angiograms have the properties
they claim; the default set is unchanged."""
import csv
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import config
import data
import evaluate
import study
import synthetic
import train
from model import load_checkpoint
from modules import DualBatchNorm2d

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(scale=[0.33, 0.125, 1024], imgsz=64, batch=2, workers=0, attn_dim=16, attn_heads=2, attn_tokens=16,
            log_interval=1, nbs=2, warmup_min_iters=2, epochs=1, plots=False)

# -----------------------------------------------------------------------------
# synthetic data: the default set as before, the hard preset as described


def digest(root):
    """sha256 over the decoded pixels of every PNG, the label files and splits.json (not PNG bytes: zlib may vary)."""
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if p.suffix == ".png":
            h.update(np.asarray(Image.open(p)).tobytes())
        elif p.suffix == ".txt" or p.name == "splits.json":
            h.update(p.read_bytes())
    return h.hexdigest()


def test_default_synthetic_set_is_unchanged(tmp_path):
    root = synthetic.make_synthetic(tmp_path / "s", n=3, imgsz=64, seed=0)
    assert digest(root) == "38a366ed5a2438cad90c68e162ce748300fc7b7ed76d7a6cb9741d06b58923ea"  # before the presets
    assert json.loads((root / "synthetic.json").read_text()) == dict(n=3, imgsz=64, seed=0, version=1, done=True)
    assert not (root / "meta.json").exists() and synthetic.preset_root() == synthetic.DEFAULT_ROOT


def hard_samples(count=6, size=256):
    for i in range(count):
        rng = np.random.default_rng([3, i])
        yield synthetic.synth_angiogram_hard(rng, size, 3)


def test_hard_angiograms_have_the_claimed_properties():
    sev, contrast = [], []
    for img, mask, boxes, meta in hard_samples():
        f = img / 255.0
        assert img.shape == mask.shape == (256, 256) and len(boxes) == len(meta["severity"])
        sev += meta["severity"]
        contrast.append(np.median(f[mask]) / np.median(f[~mask]))
        bg = ~mask[:, 1:] & ~mask[:, :-1]  # Poisson noise: neighbour differences have variance 2 I / photons
        sigma = (f[:, 1:] - f[:, :-1])[bg].std() / math.sqrt(2)
        assert sigma == pytest.approx(math.sqrt(f[~mask].mean() / meta["photons"]), rel=0.15)
        assert 3 <= meta["trees"] <= 5 and 5 <= meta["catheter_width"] <= 7 and 1 <= len(meta["tapers"]) <= 3
        for x1, y1, x2, y2 in boxes.round().astype(int):
            assert mask[y1:y2, x1:x2].mean() > 0.1  # a vessel runs through each box
            for tx, ty in meta["tapers"]:  # width step-downs are negatives: never inside a stenosis box
                assert not (x1 <= tx <= x2 and y1 <= ty <= y2)
    assert min(sev) >= 0.25 and max(sev) <= 0.9 and min(sev) < 0.4 and max(sev) > 0.75  # graded severities
    assert np.median(contrast) > 0.8  # vessels dim the image by ~10-20% (the default set: ~50%)
    default = [synthetic.synth_angiogram(np.random.default_rng([3, i]), 256, 3) for i in range(3)]
    assert all(np.median(im[m]) / np.median(im[~m]) < 0.7 for im, m, _ in default)


def test_hard_catheter_and_foreshortening_are_drawn():
    size = 256
    branches, tilted = synthetic._hard_trees(np.random.default_rng([3, 0]), size, 1.0, synthetic.HARD)
    img, mask, _, meta = synthetic.synth_angiogram_hard(np.random.default_rng([3, 0]), size, 3)  # same vessels
    cath = [b for b in branches if b.get("catheter")]
    assert len(cath) == 1 and np.ptp(cath[0]["ws"]) == 0 and meta["tilted"] == tilted
    xy = cath[0]["pts"].round().astype(int)
    xy = xy[((xy >= 0) & (xy < size)).all(1)]
    off = ~mask[xy[:, 1], xy[:, 0]]  # the catheter is no vessel in the mask ...
    assert len(xy) > 50 and off.mean() > 0.5
    assert np.median(img[xy[off, 1], xy[off, 0]]) < np.median(img[~mask]) - 10  # ... but dark in the image
    fs = np.concatenate([b["fs"] for b in branches if not b.get("catheter")])
    assert (fs > 1.05).any() == (tilted > 0) and fs.min() >= 1.0  # slanted segments hold more contrast


def test_hard_preset_is_cached_with_its_parameters(tmp_path, monkeypatch):
    root = synthetic.ensure_synthetic(tmp_path / "h", preset="hard", n=3, imgsz=64)
    marker = json.loads((root / "synthetic.json").read_text())
    meta = json.loads((root / "meta.json").read_text())
    assert marker["preset"] == "hard" and marker["draw"]["severity"] == [0.25, 0.9]
    assert sorted(meta) == sorted(f"angiography/{t}/images/{n}_{i:04d}.png" for t, n in
                                  (("detect", "sten"), ("segment", "angio")) for i in range(3))
    stamp = (root / "splits.json").stat().st_mtime_ns
    synthetic.ensure_synthetic(root, preset="hard", n=3, imgsz=64)
    assert (root / "splits.json").stat().st_mtime_ns == stamp  # same params: cached
    monkeypatch.setitem(synthetic.HARD, "photons", [50, 60])
    synthetic.ensure_synthetic(root, preset="hard", n=3, imgsz=64)
    assert json.loads((root / "synthetic.json").read_text())["draw"]["photons"] == [50, 60]  # regenerated
    assert synthetic.preset_root("hard") == synthetic.DEFAULT_ROOT.with_name("synthetic-hard")
    test, _ = config.RULES["synthetic_preset"]
    assert all(test(p) for p in synthetic.PRESETS) and not test("easy")
    assert config.load_config("camtl", str(study.ROOT / "configs/hard.py"))["synthetic_preset"] == "hard"
    with pytest.raises(SystemExit, match="synthetic_preset"):
        config.load_config("camtl", None, ["synthetic_preset=easy"])

# -----------------------------------------------------------------------------
# a tiny study, run in-process (each launch calls train.main with the command line study.py built)


class Done:
    """What launch returns: a finished process."""

    def __init__(self, code):
        self.returncode = code

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        return self.returncode


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    synthetic.make_synthetic(tmp / "synth", n=6, imgsz=64, seed=0)
    spec = dict(config=None, reference="a", seeds=[0, 1], set={**TINY, "data": str(tmp / "synth")},
                arms={"a": {}, "b": dict(lambda_cons=0.0, lambda_align=0.0)})
    study.STUDIES["tiny"] = spec
    yield tmp, spec
    del study.STUDIES["tiny"]


@pytest.fixture(scope="module")
def ran(tiny):
    tmp, spec = tiny
    launched = []

    def in_process(argv, log_path, threads):
        assert argv[0].endswith("train.py") and threads >= 1
        launched.append(argv)
        train.main(argv[1:])
        return Done(0)
    mp = pytest.MonkeyPatch()
    mp.setattr(study, "launch", in_process)
    record = ["--record", str(tmp / "record")]
    study.main(["tiny", "--out", str(tmp / "runs"), "--jobs", "2", *record])  # 2 jobs: 1 torch thread to score
    first = list(launched)
    study.main(["tiny", "--out", str(tmp / "runs"), "--jobs", "2", *record])  # all done: nothing trains
    mp.undo()
    return tmp, spec, first, launched


def results(run_dir):
    with open(run_dir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_study_runs_each_stage_once_and_skips_finished_runs(ran):
    tmp, spec, first, launched = ran
    keys = sorted(a[a.index("--stage") + 1] + " " + next(x for x in a if x.startswith("project=")) for a in first)
    out = tmp / "runs" / "tiny"
    assert keys == sorted([f"domainshift1 project={str(out / '_shared' / f's{s}')!r}" for s in (0, 1)]
                          + [f"camtl project={str(out / arm / f's{s}')!r}" for arm in "ab" for s in (0, 1)])
    assert launched == first  # the second call launched nothing
    for arm in "ab":
        for s in (0, 1):
            run = out / arm / f"s{s}" / "camtl" / "exp"
            cfg = torch.load(run / "weights" / "best.pt", map_location="cpu", weights_only=True)["config"]
            assert cfg["seed"] == s and cfg["weights_dir"] == str(out / "_shared" / f"s{s}" / "domainshift1" / "exp"
                                                                   / "weights")
            assert (cfg["lambda_cons"] == 0.0) == (arm == "b")
            assert json.loads((run / study.DONE).read_text())["seconds"] > 0
    with Image.open(out / "study.png") as im:
        assert im.width >= 600 and im.height >= 100


def travel(tmp, record, name, rows):
    """A copy of the record holding `rows` only, as a machine without runs/ gets it."""
    travelled = tmp / name
    shutil.copytree(record, travelled)
    with open(travelled / "study.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return travelled


def continue_study(tmp, travelled, machine, monkeypatch):
    """Run the tiny study on `machine` with the record `travelled` -> (the stage runs launched, the rows after)."""
    launched = []

    def in_process(argv, log_path, threads):
        launched.append(argv[argv.index("--stage") + 1] + " " + next(x for x in argv if x.startswith("project=")))
        train.main(argv[1:])
        return Done(0)
    monkeypatch.setattr(study, "launch", in_process)
    study.main(["tiny", "--out", str(tmp / machine), "--jobs", "2", "--record", str(travelled)])
    return sorted(launched), list(csv.DictReader(open(travelled / "study.csv", newline="")))


def test_a_study_continues_on_another_machine_from_its_record_alone(ran, monkeypatch, capsys):
    tmp, spec, _, _ = ran
    record, runs = tmp / "record", tmp / "runs" / "tiny"
    kept = {(r["arm"], r["seed"]): r for r in csv.DictReader(open(record / "study.csv", newline=""))}
    assert sorted(kept) == [("a", "0"), ("a", "1"), ("b", "0"), ("b", "1")]
    ids = [study.fingerprint(next((runs / f"_shared/s{s}/domainshift1/exp/weights").glob("yolov8*-domainshift1.pt")))
           for s in (0, 1)]
    assert ids[0] != ids[1] and all(kept[arm, str(s)]["stage1_id"] == ids[s] for arm in "ab" for s in (0, 1))
    assert {r["machine"] for r in kept.values()} == {study.machine()} and study.machine()
    assert sorted(p.name for p in (record / "curves").iterdir()) == sorted(
        [f"_shared-s{s}-{ids[s]}-domainshift1.csv" for s in (0, 1)] + [f"{a}-s{s}-{ids[s]}.csv" for a in "ab"
                                                                         for s in (0, 1)])
    assert (record / "curves" / f"b-s1-{ids[1]}.csv").read_text() == (runs / "b/s1/camtl/exp/results.csv").read_text()

    # the record without b seed 1 (killed in flight), on a machine that trains stage 1 as the first one did
    travelled = travel(tmp, record, "travelled", [r for k, r in kept.items() if k != ("b", "1")])
    study.main(["tiny", "--out", str(tmp / "m2"), "--record", str(travelled), "--dry-run"])
    assert "3 rows are in the record, of a, b" in capsys.readouterr().out
    launched, rows = continue_study(tmp, travelled, "m2", monkeypatch)
    assert launched == [f"camtl project={str(tmp / 'm2/tiny/b/s1')!r}",  # the missing run and its stage 1 only
                        f"domainshift1 project={str(tmp / 'm2/tiny/_shared/s1')!r}"]
    assert "a/s1/camtl: in the record, from this machine's stage 1" in capsys.readouterr().out
    got = {(r["arm"], r["seed"]): r for r in rows}
    assert len(rows) == 4 and all(got[k] == kept[k] for k in kept if k != ("b", "1"))  # recorded rows kept exactly
    assert got["b", "1"]["run"] == str(tmp / "m2/tiny/b/s1/camtl/exp") and got["b", "1"]["stage1_id"] == ids[1]
    assert "| b | 0,1 |" in (travelled / "study.md").read_text()

    # a machine whose arithmetic differs: seed 1's record came from a stage 1 this machine does not reproduce, so
    # the reference runs again and b pairs with that run, not with the recorded one
    other = [{**r, "stage1_id": "0123456789ab"} if r["seed"] == "1" else r for k, r in kept.items() if k != ("b", "1")]
    travelled = travel(tmp, record, "travelled2", other)
    launched, rows = continue_study(tmp, travelled, "m3", monkeypatch)
    assert launched == [f"camtl project={str(tmp / f'm3/tiny/{arm}/s1')!r}" for arm in "ab"] + [
        f"domainshift1 project={str(tmp / 'm3/tiny/_shared/s1')!r}"]
    got = {(r["arm"], r["seed"], r["stage1_id"]): r for r in rows}
    assert sorted(got) == [("a", "0", ids[0]), ("a", "1", "0123456789ab"), ("a", "1", ids[1]), ("b", "0", ids[0]),
                           ("b", "1", ids[1])]
    summary = study.summarize(study.read_record(travelled, "tiny"), ["a", "b"], "a")
    want = [float(got["b", s, ids[int(s)]]["map50"]) - float(got["a", s, ids[int(s)]]["map50"]) for s in "01"]
    assert summary["b"]["d_map50"][0] == pytest.approx(np.mean(want)) and summary["b"]["d_map50"][2] == 2
    assert summary["a"]["seeds"] == [0, 1, 1] and summary["a"]["map50"][2] == 3
    bad = travelled / "study.csv"
    bad.write_text(bad.read_text().replace("tiny,", "other,"))
    with pytest.raises(SystemExit, match="--record .* holds study 'other', not 'tiny'"):
        study.main(["tiny", "--out", str(tmp / "m3"), "--record", str(travelled)])


def test_a_record_of_an_older_layout_keeps_every_row_and_pairs_only_what_it_can(tiny, tmp_path, capsys):
    _, spec = tiny
    spec = {**spec, "arms": {**spec["arms"], "c": dict(attn_tokens=8), "d": dict(stage1=False)}}
    study.STUDIES["tiny2"] = spec
    try:
        record = tmp_path / "record"  # as study.py wrote it before stage1_id and Dice(source); an arm since removed
        record.mkdir()
        head = "study,arm,seed,epoch,map50,map50_95,map50_small,dice_full,camtl_s,stage1,stage1_s,run\n"
        rows = [f"tiny2,{arm},0,3,{m},0.3,0.4,0.5,60.0,shared,10.0,r\n" for arm, m in
                (("a", 0.5), ("b", 0.6), ("c", 0.7), ("d", 0.8), ("gone", 0.9))]
        (record / "study.csv").write_text(head + "".join(rows) + "tiny2,b,1,3,0.1,0.3,0.4,0.5,60.0,shared,10.0,r\n")
        recorded = study.read_record(record, "tiny2")
        assert all(r["stage1_id"] == "" and math.isnan(r["dice_source"]) for r in recorded)
        jobs = study.unrecorded(study.plan("tiny2", spec, list(spec["arms"]), [0, 1], tmp_path / "runs"), recorded,
                                "a")
        # seed 0 is all recorded: nothing of it runs; seed 1: its reference, c's own stage 1, the shared one
        assert list(jobs) == ["_shared/s1/domainshift1", "a/s1/camtl", "c/s1/domainshift1", "c/s1/camtl",
                              "d/s1/camtl"]
        assert jobs["d/s1/camtl"].deps == ["_shared/s1/domainshift1"] and "weights_dir" not in jobs["d/s1/camtl"].sets
        got = study.write_results(tmp_path / "runs", "tiny2", spec, record)
        assert [(r["arm"], r["seed"]) for r in got] == [("a", 0), ("b", 0), ("b", 1), ("c", 0), ("d", 0),
                                                        ("gone", 0)]  # every row kept, the removed arm's last
        md = (record / "study.md").read_text()
        assert "| b | 0,1 | 1 | 0.350 ± 0.354 |" in md  # two runs, one pair: b s1 has no `a` run
        assert "| b | 0 | +0.100 |" in md and "in no Δ: b s1 (no stage1_id)" in md and "gone" not in md
        assert "stage1_id" in (record / "study.csv").read_text().splitlines()[0]
        study.main(["tiny2", "--out", str(tmp_path / "runs"), "--only", "b", "--seeds", "1", "--record", str(record),
                    "--dry-run"])
        out = capsys.readouterr().out
        assert "the reference arm a is run too" in out and "fresh   a/s1/camtl" in out and "b/s1" not in out
    finally:
        del study.STUDIES["tiny2"]


def test_time_ratios_pair_only_runs_of_one_machine(tmp_path):
    def row(arm, seed, machine, camtl_s, map50):
        return dict(arm=arm, seed=seed, stage1_id="ab12", machine=machine, camtl_s=camtl_s, map50=map50,
                    **{k: 0.5 for k, _, _ in study.METRICS if k != "map50"})
    # seed 0: both on machine X; seed 1: one stage 1 (same bits) on two CPUs; seed 2: an older row, no machine
    rows = [row("a", 0, "X", 100.0, 0.5), row("b", 0, "X", 80.0, 0.6), row("a", 1, "X", 100.0, 0.5),
            row("b", 1, "Y", 150.0, 0.7), row("a", 2, "", 100.0, 0.5), row("b", 2, "", 90.0, 0.4)]
    s = study.summarize(rows, ["a", "b"], "a")["b"]
    assert [seed for seed, _ in s["pairs"]] == [0, 1, 2]  # every pair counts for the metrics
    assert s["d_map50"][0] == pytest.approx((0.1 + 0.2 - 0.1) / 3) and s["d_map50"][2] == 3
    assert s["time"][0] == pytest.approx(0.8) and s["time"][2] == 1  # only seed 0's time is a ratio
    study.write_table(tmp_path / "study.md", "t", {"config": None, "reference": "a"}, study.summarize(rows, "ab", "a"))
    md = (tmp_path / "study.md").read_text()
    assert "| b | 0 | +0.100 | +0.000 | +0.000 | +0.000 | +0.000 | 0.80 |" in md
    assert "| b | 1 | +0.200 | +0.000 | +0.000 | +0.000 | +0.000 | - |" in md and "| 0.80 |" in md


def test_study_table_equals_the_runs_csvs(ran, capsys):
    tmp, spec, _, _ = ran
    out = tmp / "runs" / "tiny"
    rng = np.random.default_rng(0)  # distinct metrics per run, so a mix-up of runs or seeds shows
    for arm in "ab":
        for s in (0, 1):
            run = out / arm / f"s{s}" / "camtl" / "exp"
            rows = results(run)
            for r in rows:
                r["metrics/mAP50(B)"], r["metrics/mAP50-95(B)"] = rng.uniform(0.3, 0.9), rng.uniform(0.1, 0.5)
                r["metrics/dice_full"], r["fitness"] = rng.uniform(0.2, 0.8), rng.uniform(0, 1)
            with open(run / "results.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    study.write_results(tmp / "runs", "tiny", spec)
    got = {(r["arm"], int(r["seed"])): r for r in csv.DictReader(open(out / "study.csv", newline=""))}
    assert sorted(got) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    want = {}
    for (arm, s), row in got.items():
        best = max(results(out / arm / f"s{s}" / "camtl" / "exp"), key=lambda r: float(r["fitness"]))
        want[arm, s] = {k: float(best[col]) for k, col in (("map50", "metrics/mAP50(B)"),
                                                             ("map50_95", "metrics/mAP50-95(B)"),
                                                             ("dice_full", "metrics/dice_full"))}
        assert all(float(row[k]) == pytest.approx(v) for k, v in want[arm, s].items())
    summary_md, pairs_md = (out / "study.md").read_text().split("Each pair:")
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in summary_md.splitlines() if line.startswith("| a ") or line.startswith("| b ")}
    pairs = {int(line.split("|")[2]): [float(c) for c in line.split("|")[3:-1]]
             for line in pairs_md.splitlines() if line.startswith("| b ")}
    assert sorted(pairs) == [0, 1] and not any(line.startswith("| a ") for line in pairs_md.splitlines())
    for s in (0, 1):  # per seed: b's run minus a's, each metric
        assert pairs[s][0] == pytest.approx(want["b", s]["map50"] - want["a", s]["map50"], abs=6e-4)
        assert pairs[s][3] == pytest.approx(want["b", s]["dice_full"] - want["a", s]["dice_full"], abs=6e-4)
        assert pairs[s][-1] == pytest.approx(float(got["b", s]["camtl_s"]) / float(got["a", s]["camtl_s"]), abs=6e-3)
    for arm in "ab":
        cells = table[arm]
        assert cells[1] == ("-" if arm == "a" else "2")  # pairs
        for col, k in ((2, "map50"), (3, "map50_95"), (5, "dice_full")):
            v = [want[arm, s][k] for s in (0, 1)]
            m, sd = cells[col].split(" ± ")
            assert float(m) == pytest.approx(np.mean(v), abs=6e-4) and float(sd) == pytest.approx(np.std(v, ddof=1),
                                                                                                  abs=6e-4)
        d = [want["b", s]["map50"] - want["a", s]["map50"] for s in (0, 1)]
        if arm == "b":  # paired per seed, not mean minus mean of unpaired runs
            m, sd = cells[len(study.METRICS) + 3].split(" ± ")
            assert float(m) == pytest.approx(np.mean(d), abs=6e-4) and float(sd) == pytest.approx(np.std(d, ddof=1),
                                                                                                  abs=6e-4)
        else:
            assert cells[len(study.METRICS) + 3] == "ref"
    study.main(["tiny", "--out", str(tmp / "runs"), "--dry-run"])
    assert "0 of 6 runs to do" in capsys.readouterr().out


def test_small_box_map50_is_the_validation_map50_when_nothing_is_filtered(ran):
    tmp, _, _, _ = ran
    best = tmp / "runs" / "tiny" / "a" / "s0" / "camtl" / "exp" / "weights" / "best.pt"
    val = torch.load(best, map_location="cpu", weights_only=True)["metrics"]["map50"]
    assert study.small_box_map50(best, tmp / "synth", max_side=10_000) == pytest.approx(val, abs=1e-6)
    assert math.isnan(study.small_box_map50(best, tmp / "synth", max_side=0))  # no box that small: NaN, not 0



def test_source_dice_scores_the_fundus_vessels_and_an_older_marker_gets_it_once(ran, monkeypatch):
    tmp, spec, _, _ = ran
    out = tmp / "runs" / "tiny"
    stage1 = out / "_shared" / "s0" / "domainshift1" / "exp" / "weights" / "best.pt"
    val = torch.load(stage1, map_location="cpu", weights_only=True)["metrics"]["dice_full"]
    assert study.source_dice(stage1, tmp / "synth") == pytest.approx(val, abs=1e-6)  # as stage 1 validated it
    run = out / "a" / "s1" / "camtl" / "exp"
    mark = json.loads((run / study.DONE).read_text())
    assert 0 <= mark["dice_source"] <= 1 and mark["dice_source"] == study.source_dice(run / "weights" / "best.pt",
                                                                                      tmp / "synth")
    model, cfg = load_checkpoint(run / "weights" / "best.pt")  # DualBN: the target branch would score otherwise
    assert any(isinstance(m, DualBatchNorm2d) for m in model.modules())
    loader = data.val_loaders(tmp / "synth", "domainshift1", "val", cfg["imgsz"], cfg["batch"], 0, cfg["nc"])["seg"]
    as_target = [{**b, "domain": "target"} for b in loader]
    target = evaluate.validate(model, {"seg": as_target}, cfg, torch.device("cpu"))["dice_full"]
    assert abs(target - mark["dice_source"]) > 1e-6
    del mark["dice_source"]
    study.write_mark(run, mark)  # a run scored before dice_source existed
    study.write_results(tmp / "runs", "tiny", spec)
    again = json.loads((run / study.DONE).read_text())
    assert again["dice_source"] == pytest.approx(study.source_dice(run / "weights" / "best.pt", tmp / "synth"))
    assert again["seconds"] == mark["seconds"] and again["map50_small"] == mark["map50_small"]
    rows = {(r["arm"], r["seed"]): r for r in csv.DictReader(open(out / "study.csv", newline=""))}
    assert float(rows["a", "1"]["dice_source"]) == pytest.approx(again["dice_source"])
    monkeypatch.setattr(study, "source_dice", lambda *a: pytest.fail("scored twice"))
    monkeypatch.setitem(study.SCORES, "dice_source", study.source_dice)
    study.write_results(tmp / "runs", "tiny", spec)  # every marker has it now: nothing is scored again

# -----------------------------------------------------------------------------
# the plan, interrupted runs, failures, mistakes


def test_arms_that_change_the_seg_stream_train_their_own_stage1(tiny, tmp_path):
    _, spec = tiny
    spec = {**spec, "arms": {**spec["arms"], "c": dict(attn_tokens=8)}}
    jobs = study.plan("tiny", spec, ["a", "c"], [0], tmp_path)
    assert list(jobs) == ["_shared/s0/domainshift1", "a/s0/camtl", "c/s0/domainshift1", "c/s0/camtl"]
    assert jobs["c/s0/camtl"].deps == ["_shared/s0/domainshift1", "c/s0/domainshift1"]  # the shared one: stage1_id
    assert jobs["c/s0/domainshift1"].cfg["attn_tokens"] == 8
    assert jobs["c/s0/camtl"].cfg["weights_dir"] == str(tmp_path / "tiny" / "c" / "s0" / "domainshift1" / "exp" /
                                                        "weights")
    assert jobs["_shared/s0/domainshift1"].cfg["attn_tokens"] == 16
    assert study.layout(tmp_path, "tiny", {"arms": {"x": {"stage1": False}}}, "x", 0)[1:] == (None, "none")


def test_the_ablation_keeps_the_attention_its_record_measured(tmp_path, capsys):
    # its full arm is the model of results/ablation (4 heads, 256 tokens) whatever configs/defaults.py says, so
    # `python study.py ablation` repeats the record and its new runs pair with recorded rows of the same config
    spec = study.STUDIES["ablation"]
    jobs = study.plan("ablation", spec, ["full", "speed-h2t128"], [0], tmp_path)
    for key, heads, tokens in (("_shared/s0/domainshift1", 4, 256), ("full/s0/camtl", 4, 256),
                               ("speed-h2t128/s0/domainshift1", 2, 128), ("speed-h2t128/s0/camtl", 2, 128)):
        assert (jobs[key].cfg["attn_heads"], jobs[key].cfg["attn_tokens"]) == (heads, tokens), key
    assert jobs["full/s0/camtl"].cfg["attn_query_stride"] == 16 and not jobs["full/s0/camtl"].cfg["xtam"]
    assert all(j.cfg["seg_stride"] == 8 for j in jobs.values())  # the vessel head the record measured
    study.main(["--list"])
    assert "set attn_heads=4 attn_tokens=256 seg_stride=8" in capsys.readouterr().out


def test_an_interrupted_run_is_resumed_and_its_clock_continues(tiny, tmp_path, monkeypatch):
    _, spec = tiny
    job = study.plan("tiny", spec, ["a"], [0], tmp_path)["a/s0/camtl"]
    job.cfg["epochs"] = 3
    argvs = []
    monkeypatch.setattr(study, "launch", lambda argv, log, threads: argvs.append(argv) or Done(0))
    assert study.state(job) == "fresh"
    study.start(job, "fresh", 1)
    assert "--set" in argvs[-1] and "--resume" not in argvs[-1]
    (job.dir / "weights").mkdir()
    torch.save({"epoch": 0}, job.dir / "weights" / "last.pt")  # killed in epoch 2 of 3
    clock = json.loads((job.dir / "time.json").read_text())
    (job.dir / "time.json").write_text(json.dumps({**clock, "start": clock["start"] - 100}))
    assert study.state(job) == "resume"
    study.start(job, "resume", 1)
    assert argvs[-1][-2:] == ["--resume", str(job.dir)] and (job.dir / "weights" / "last.pt").exists()
    assert json.loads((job.dir / "time.json").read_text())["spent"] >= 100  # the first attempt counts
    torch.save({"epoch": 2}, job.dir / "weights" / "last.pt")  # the last epoch, but killed before its product
    assert study.state(job) == "fresh"
    study.start(job, "fresh", 1)
    assert not (job.dir / "weights").exists()  # started over in a clean folder
    job.cfg["epochs"] = 4  # the study's config edited since: its folder holds another run
    assert study.state(job) == "stale" and study.changed(job) == ["epochs 3 -> 4"]


def test_a_record_of_another_config_is_run_again_and_never_summarised(ran, tmp_path, monkeypatch, capsys):
    """Each row and run carries its resolved config's id: after a change of the study's set, the recorded rows
    and the finished runs on disk are of another config, so every run is to do again, and a summary counts only
    runs of the config the study now describes, saying how many it left out."""
    tmp, spec, _, _ = ran
    recorded = study.read_record(tmp / "record", "tiny")
    assert len({r["config_id"] for r in recorded}) == 4 and all(r["config_id"] for r in recorded)  # arm x seed
    changed = {**spec, "set": {**spec["set"], "lambda_seg": 0.5}}
    jobs = study.plan("tiny", changed, ["a", "b"], [0, 1], tmp_path / "m4")
    left = study.unrecorded(jobs, recorded, "a")
    assert sorted(k for k, j in left.items() if j.stage == "camtl") == [f"{a}/s{s}/camtl" for a in "ab" for s in (0, 1)]
    assert sorted(study.unrecorded(study.plan("tiny", spec, ["a", "b"], [0, 1], tmp_path / "m5"), recorded, "a")) == []
    runs = tmp_path / "runs"
    shutil.copytree(tmp / "runs" / "tiny", runs / "tiny")  # the finished runs, then the study's set edited
    rows = study.write_results(runs, "tiny", changed)
    assert len(rows) == 4  # kept in study.csv
    md = (runs / "tiny" / "study.md").read_text()
    assert "Left out: 4 runs of another config" in md and "| a |" not in md
    assert "4 runs of another config left out of the summary" in capsys.readouterr().out
    study.write_results(runs, "tiny", spec)
    md = (runs / "tiny" / "study.md").read_text()
    assert "Left out" not in md and "| a | 0,1 |" in md


def test_runs_of_another_config_are_never_taken_as_done(ran, monkeypatch):
    tmp, spec, _, _ = ran
    monkeypatch.setitem(study.STUDIES, "tiny", {**spec, "set": {**spec["set"], "lambda_seg": 0.5}})
    monkeypatch.setattr(study, "launch", lambda *a: pytest.fail("launched"))
    with pytest.raises(SystemExit, match=r"6 runs in .* were started with another config \(_shared/s0/domainshift1: "
                                         r"lambda_seg 1.0 -> 0.5\); move them away"):
        study.main(["tiny", "--out", str(tmp / "runs")])


def test_a_failed_run_skips_what_needs_it_and_is_named(tiny, tmp_path, monkeypatch, capsys):
    _, spec = tiny
    monkeypatch.setattr(study, "launch", lambda argv, log, threads: Done(1))
    with pytest.raises(SystemExit, match=r"3 runs failed or were skipped: _shared/s0/domainshift1, a/s0/camtl"):
        study.main(["tiny", "--out", str(tmp_path), "--only", "a", "--only", "b", "--seeds", "0"])
    out = capsys.readouterr().out
    assert "_shared/s0/domainshift1: FAILED (exit 1)" in out and "a/s0/camtl: skipped" in out


@pytest.mark.parametrize("args, msg", [
    (["nope"], "study 'nope': no such study; studies: "),
    (["tiny", "--only", "a,zz"], "--only zz: not an arm of tiny; arms: a, b"),
    (["tiny", "--seeds", "0,x"], "--seeds '0,x': expected a comma list of integers"),
    (["tiny", "--jobs", "0"], "--jobs 0: expected >= 1"),
])
def test_mistakes_are_one_line(tiny, args, msg):
    with pytest.raises(SystemExit) as e:
        study.main(args + ["--dry-run"])
    assert str(e.value).startswith(msg) and "\n" not in str(e.value)


def test_an_arm_with_a_bad_key_stops_the_study_before_anything_runs(tiny, tmp_path, monkeypatch):
    _, spec = tiny
    monkeypatch.setitem(study.STUDIES, "bad", {**spec, "arms": {"a": {}, "z": {"no_such_key": 1}}})
    monkeypatch.setattr(study, "launch", lambda *a: pytest.fail("launched"))
    with pytest.raises(SystemExit, match="study bad, arm z: --set: unknown key 'no_such_key'"):
        study.main(["bad", "--out", str(tmp_path)])
