"""Every mistake a user can make gets a clear answer (issue 12), as one table: each row is a mistake, the command or
call that makes it, and a fragment of the one-line message it must print. No row may end in a traceback.

Kinds of rows:
    cli   a command line, run as a subprocess from the repo root (all of them at once, in parallel, when the first
          one is needed); it must exit non-zero, print the fragment and no "Traceback"
    exit  a call that must stop with SystemExit whose message (one line) holds the fragment
    error a library call that must raise ValueError (a CheckpointError for weights files) whose message (one line)
          holds the fragment; the commands' `main` turns it into that one-line exit
    warn  a call that must go on, printing the fragment (a warning, or a bad file named and skipped)

Then the legacy-pickle case: Ultralytics checkpoints as older releases wrote them (protocol 2, numpy scalars in the
metadata, the zip and the pre-1.6 formats) load and give the same outputs; what could run code is still refused.
"""
import copyreg
import importlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import config
import data
import evaluate
import predict
import model
import synthetic
from model import CAMTL, YOLOv8

REPO = Path(__file__).resolve().parent.parent
FIX = Path(__file__).parent / "fixtures"
TINY = {"scale": [0.33, 0.125, 1024], "imgsz": 64}
DET, SEG, SRC = "angiography_detection", "angiography_segmentation", "retinography_segmentation"
RESUME = dict(what="the last.pt of a run to resume", need=("model", "optimizer", "epoch", "config"))

pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _splits(root, splits):
    root.mkdir(parents=True, exist_ok=True)
    (root / "splits.json").write_text(splits if isinstance(splits, str) else json.dumps(splits))
    return root


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Every file the rows need, made once: broken weights, broken data roots, broken config files."""
    t = tmp_path_factory.mktemp("mistakes")
    w = SimpleNamespace(tmp=t, missing=t / "no_such_dir")
    # --- weights
    torch.manual_seed(0)
    net = CAMTL(TINY, verbose=False)
    w.best = t / "best.pt"
    torch.save({"model": net.state_dict(), "config": {**net.cfg, "batch": 2, "workers": 0}, "stage": "camtl"}, w.best)
    raw = w.best.read_bytes()
    w.cut = t / "last.pt"
    w.cut.write_bytes(raw[: len(raw) // 2])
    w.notes = t / "notes.pt"
    w.notes.write_text("epochs: 10\nbatch: 8\n")
    w.listpt = t / "list.pt"
    torch.save([1, 2, 3], w.listpt)
    w.misfit = t / "misfit.pt"
    torch.save({"model": {"backbone.0.conv.weight": torch.zeros(3)}, "config": dict(net.cfg)}, w.misfit)
    w.renamed = t / "best_renamed.pt2"
    shutil.copy(w.best, w.renamed)
    w.cut_pt2 = t / "best.pt2"  # a .pt2 cut short in transfer: its zip directory (at the end) is gone
    with zipfile.ZipFile(w.cut_pt2, "w") as z:
        z.writestr("best/archive_format", "pt2")
        z.writestr("best/extra/nanocamtl.json", "{}")
        z.writestr("best/data/weights/weight_0", os.urandom(20000))
    w.cut_pt2.write_bytes(w.cut_pt2.read_bytes()[:12000])
    _Payload.marker = w.marker = t / "pwned"
    w.evil = t / "evil.pt"
    torch.save({"model": _Payload(), "epoch": 1}, w.evil)
    w.src = t / "src"
    _png(w.src / "a.png", np.zeros((40, 40, 3), np.uint8))
    # --- config files
    for name, text in {"cfg.yaml": "imgsz: 512\nepochs: 10\n", "cfg_syntax.py": "config = {'epochs': 10\n",
                       "cfg_yamlish.py": "imgsz: 512\nname: exp\n", "cfg_none.py": "epochs = 10\n",
                       "cfg_list.py": "config = ['epochs', 10]\n", "cfg_typo.py": "config = {'epoch': 10}\n"}.items():
        (t / name).write_text(text)
    # --- data roots
    w.syn = synthetic.make_synthetic(t / "syn", n=6, imgsz=64, seed=0)  # 4 train / 2 val per task
    w.noangio = t / "noangio"
    shutil.copytree(w.syn / "retinography", w.noangio / "retinography")
    w.badjson = _splits(t / "badjson", '{"retinography_segmentation": {"train": [}')
    w.badlist = _splits(t / "badlist", [])
    w.badsplit = _splits(t / "badsplit", {SRC: {"training": [], "val": []}})
    w.badentry = _splits(t / "badentry", {DET: {"train": ["angiography/detect/images/1.png"]}})
    w.stale = t / "stale"
    shutil.copytree(w.syn, w.stale)
    shutil.copy(w.stale / "retinography/images/fundus_0000.png", w.stale / "retinography/images/new_scan.png")
    w.stale2 = t / "stale2"  # the warning comes once per root and process
    shutil.copytree(w.stale, w.stale2)
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 10:50] = 255
    w.dirs = t / "dirs"
    for stem in ("ok", "labeldir"):
        _png(w.dirs / "angiography/detect/images" / f"{stem}.png", img)
    (w.dirs / "angiography/detect/labels/labeldir.txt").mkdir(parents=True)
    (w.dirs / "angiography/detect/labels/ok.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (w.dirs / "angiography/detect/images/imagedir.png").mkdir()
    _png(w.dirs / "retinography/images/maskdir.png", img)
    (w.dirs / "retinography/labels/maskdir.png").mkdir(parents=True)
    _png(w.dirs / "retinography/images/jpegmask.png", img)
    Image.fromarray(mask).save(w.dirs / "retinography/labels/jpegmask.jpg", quality=60)
    data.write_splits(w.dirs, data.make_splits(w.dirs, ratios=(1, 0, 0)))
    w.noval = t / "noval"  # detection val split empty
    shutil.copytree(w.syn, w.noval)
    s = json.loads((w.noval / "splits.json").read_text())
    s[DET]["val"] = []
    _splits(w.noval, s)
    w.badfiles = t / "badfiles"  # no splits.json: `splits.py check` must not write one
    _png(w.badfiles / "retinography/images/a.png", img)
    _png(w.badfiles / "retinography/labels/a.png", mask)
    (w.badfiles / "retinography/images/b.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    _png(w.badfiles / "retinography/labels/b.png", mask)
    return w


def train(*args):
    return ["train.py", "--stage", "camtl", *map(str, args)]


def setting(item):
    """A config row: load_config with one --set item."""
    return lambda w: config.load_config("camtl", None, [item])


no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

# (id, kind, what: argv after `python` / a call of the fixture, fragment the message must hold)
ROWS = [
    # --- configuration: every key has a type and a range or a set of choices
    ("batch=0", "exit", setting("batch=0"), "key 'batch' must be >= 1, got 0"),
    ("epochs=0", "exit", setting("epochs=0"), "key 'epochs' must be >= 1"),
    ("epochs=2.5", "exit", setting("epochs=2.5"), "key 'epochs' expects int"),
    ("imgsz=100", "exit", setting("imgsz=100"), "key 'imgsz' must be a positive multiple of 32"),
    ("imgsz=-64", "exit", setting("imgsz=-64"), "got -64"),
    ("nc=0", "exit", setting("nc=0"), "key 'nc' must be >= 1"),
    ("workers=-1", "exit", setting("workers=-1"), "key 'workers' must be >= 0"),
    ("lr0<0", "exit", setting("lr0=-0.01"), "key 'lr0' must be >= 0"),
    ("lrf=0", "exit", setting("lrf=0"), "key 'lrf' must be in (0, 1]"),
    ("momentum=1", "exit", setting("momentum=1.0"), "key 'momentum' must be in [0, 1)"),
    ("val_interval=0", "exit", setting("val_interval=0"), "key 'val_interval' must be >= 1"),
    ("log_interval=0", "exit", setting("log_interval=0"), "key 'log_interval' must be >= 1"),
    ("max_nan_steps=0", "exit", setting("max_nan_steps=0"), "key 'max_nan_steps' must be >= 1"),
    ("camtl_ratio=[0,0]", "exit", setting("camtl_ratio=[0,0]"),
     "key 'camtl_ratio' must be [det, seg] or [det, seg, source replay]"),
    ("camtl_ratio negative", "exit", setting("camtl_ratio=[1,-2]"), "ints >= 0, det or seg > 0, got [1, -2]"),
    ("camtl_ratio of 4", "exit", setting("camtl_ratio=[1,2,1,1]"), "key 'camtl_ratio' must be"),
    ("camtl_ratio float", "exit", setting("camtl_ratio=[1.5,2]"), "got [1.5, 2]"),
    ("scale=q", "exit", setting("scale=q"),
     "key 'scale' must be one of n, s, m, l, x, or [depth, width, max_channels]"),
    ("scale pair", "exit", setting("scale=[0.33,0.25]"),
     "or [depth, width, max_channels] with depth and width > 0 and max_channels an int >= 8, got [0.33, 0.25]"),
    ("optimizer=Adam", "exit", setting("optimizer=Adam"), "key 'optimizer' must be one of SGD, AdamW, got 'Adam'"),
    ("amp_dtype=fp8", "exit", setting("amp_dtype=fp8"), "key 'amp_dtype' must be one of fp16, bf16, got 'fp8'"),
    ("cons_mode=foo", "exit", setting("cons_mode=foo"), "key 'cons_mode' must be one of contain, bce, got 'foo'"),
    ("device=gpu", "exit", setting("device=gpu"),
     "key 'device' expects auto, cpu, cuda, cuda:N or a GPU index N, got 'gpu'"),
    ("device=0,1", "exit", setting("device=0,1"),
     "names 2 GPUs, and one process drives one GPU: run `CUDA_VISIBLE_DEVICES=0,1 torchrun --nproc_per_node=2"),
    ("attn_dim % heads", "exit", setting("attn_dim=31"), "attn_dim must be divisible by attn_heads"),
    ("gn_groups=0", "exit", setting("gn_groups=0"), "key 'gn_groups' must be"),
    ("attn_query_stride=12", "exit", setting("attn_query_stride=12"), "key 'attn_query_stride' must be one of 8"),
    ("synthetic_n=0", "exit", setting("synthetic_n=0"), "key 'synthetic_n' must be >= 1"),
    ("lambda<0", "exit", setting("lambda_cons=-0.1"), "key 'lambda_cons' must be >= 0"),
    ("group_regex=(", "exit", setting("group_regex=("), "key 'group_regex' must be a Python regular expression"),
    ("seed=-1", "exit", setting("seed=-1"), "key 'seed' must be in [0, "),
    ("--config YAML", "exit", lambda w: config.load_config("camtl", str(w.tmp / "cfg.yaml")),
     "cfg.yaml: a .yaml file; configs are Python files: config = {...}"),
    ("--config syntax", "exit", lambda w: config.load_config("camtl", str(w.tmp / "cfg_syntax.py")),
     "cfg_syntax.py: not valid Python (line 1"),
    ("--config YAML as .py", "exit", lambda w: config.load_config("camtl", str(w.tmp / "cfg_yamlish.py")),
     "cfg_yamlish.py: running it failed (NameError"),
    ("--config no dict", "exit", lambda w: config.load_config("camtl", str(w.tmp / "cfg_none.py")),
     "cfg_none.py: defines neither `config = {...}` nor `camtl = {...}`"),
    ("--config list", "exit", lambda w: config.load_config("camtl", str(w.tmp / "cfg_list.py")),
     "`config` is a list, expected a dict"),
    ("--config typo", "exit", lambda w: config.load_config("camtl", str(w.tmp / "cfg_typo.py")),
     "cfg_typo.py: unknown key 'epoch'; did you mean epochs"),
    ("train.py --set batch=0", "cli", lambda w: train("--set", "batch=0"), "--set: key 'batch' must be >= 1, got 0"),
    ("train.py --config x.yaml", "cli", lambda w: train("--config", w.tmp / "cfg.yaml"), "configs are Python files"),
    # --- data set-up
    ("splits.json not JSON", "exit", lambda w: data.load_splits(w.badjson),
     "splits.json: not valid JSON (Expecting value at line 1"),
    ("splits.json a list", "exit", lambda w: data.load_splits(w.badlist), "a JSON list, not an object of task keys"),
    ("splits.json split name", "exit", lambda w: data.load_splits(w.badsplit),
     "split names ['training']; splits are train, val, test"),
    ("splits.json entry", "exit", lambda w: data.load_splits(w.badentry),
     """expected {task_key: {"train": [...], "val": [...], "test": [...]}}"""),
    ("splits.json regenerate", "exit", lambda w: data.load_splits(w.badentry), "`python splits.py split --root "),
    ("no angiography folder", "exit", lambda w: data.check_stage_data(w.noangio, "camtl", 2, [1, 2]),
     "angiography_detection has no training images"),
    ("task smaller than batch", "exit", lambda w: data.check_stage_data(w.syn, "domainshift1", 8, [1, 2]),
     "retinography_segmentation has 4 training images, fewer than one batch of 8"),
    ("counts per task", "exit", lambda w: data.check_stage_data(w.syn, "domainshift1", 8, [1, 2]),
     "Images per task (train/val/test): retinography_segmentation 4/2/0"),
    ("what to change: batch", "exit", lambda w: data.check_stage_data(w.syn, "domainshift1", 8, [1, 2]),
     "lower batch (--set batch=4)"),
    ("camtl_ratio can't cycle", "exit", lambda w: data.check_stage_data(w.syn, "camtl", 2, [1, 3]),
     "angiography_segmentation gives 2 batches of 2 per epoch but camtl_ratio [1, 3] takes 3 per cycle"),
    ("camtl_ratio fix", "exit", lambda w: data.check_stage_data(w.syn, "camtl", 2, [1, 3]),
     "--set camtl_ratio=[1,2]"),
    ("stale splits.json", "warn", lambda w: data.load_splits(w.stale),
     "splits.json does not list 1 of the 7 images in"),
    ("stale: how to rewrite", "warn", lambda w: data.load_splits(w.stale2), "`python splits.py split --root "),
    ("directory as label", "warn", lambda w: data.TaskDataset(w.dirs, DET, "train", 64),
     "labeldir.txt: a directory, not a label file -> skipped"),
    ("directory as image", "warn", lambda w: data.TaskDataset(w.dirs, DET, "train", 64),
     "imagedir.png: a directory, not an image file -> skipped"),
    ("directory as mask", "warn", lambda w: data.TaskDataset(w.dirs, SRC, "train", 64),
     "maskdir.png: a directory, not a mask file -> skipped"),
    ("JPEG mask", "warn", lambda w: data.TaskDataset(w.dirs, SRC, "train", 64),
     "jpegmask.jpg: mask not two-valued"),
    ("JPEG mask threshold", "warn", lambda w: data.TaskDataset(w.dirs, SRC, "train", 64),
     "vessel = value > "),
    ("empty detection val", "warn", lambda w: data.val_loaders(w.noval, "camtl", "val", 64, 2),
     "angiography_detection/val: no images, so its detection metrics are absent (not 0)"),
    ("splits.py check: no root", "cli", lambda w: ["splits.py", "check", "--root", w.missing],
     "check: --root " + "{missing} is not a directory"),
    ("splits.py check: bad files", "cli", lambda w: ["splits.py", "check", "--root", w.badfiles],
     "check: 1 of 2 files skipped as bad"),
    ("splits.py check: no write", "cli", lambda w: ["splits.py", "check", "--root", w.badfiles],
     "splits.json: checking the 70/30/0 split training would write (not written"),
    # --- weights files
    ("evaluate: truncated .pt", "cli", lambda w: ["evaluate.py", "--weights", w.cut],
     "last.pt: not a readable PyTorch checkpoint"),
    ("predict: foreign pickle", "cli", lambda w: ["predict.py", "--weights", w.listpt, "--source", w.src],
     "list.pt: as a nanoCAMTL checkpoint: holds a list, not a checkpoint dict"),
    ("predict: truncated .pt2", "cli", lambda w: ["predict.py", "--weights", w.cut_pt2, "--source", w.src],
     "best.pt2: not a complete zip archive"),
    ("evaluate --device cuda", "cli", lambda w: ["evaluate.py", "--weights", w.best, "--device", "cuda"],
     "--device cuda: CUDA is not available here"),
    ("export: text --weights", "cli", lambda w: ["export.py", "--weights", w.notes],
     "notes.pt: a text file, not a PyTorch checkpoint"),
    ("export: truncated .pt", "cli", lambda w: ["export.py", "--weights", w.cut],
     "truncated, or not a checkpoint at all?"),
    ("COCO weights not a checkpoint", "error", lambda w: CAMTL.from_pretrained(TINY, det=str(w.notes), verbose=False),
     "expected an official Ultralytics yolov8*.pt"),
    ("stage hand-over truncated", "error",
     lambda w: CAMTL.from_pretrained(TINY, stage_ckpt=str(w.cut), stage="camtl", verbose=False),
     "last.pt: not a readable PyTorch checkpoint"),
    ("stage hand-over expected", "error",
     lambda w: CAMTL.from_pretrained(TINY, stage_ckpt=str(w.notes), stage="camtl", verbose=False),
     "expected the stage checkpoint yolov8{S}-{stage}.pt"),
    ("--resume truncated last.pt", "error", lambda w: checkpoints.read_checkpoint(w.cut, **RESUME),
     "expected the last.pt of a run to resume"),
    ("--resume an Ultralytics file", "error", lambda w: checkpoints.read_checkpoint(FIX / "det.pt", **RESUME),
     "a pickle that names ultralytics.nn.tasks.DetectionModel"),
    ("--resume a directory", "error", lambda w: checkpoints.read_checkpoint(w.tmp, **RESUME),
     "a directory, not a file"),
    ("--resume best-only file", "error", lambda w: checkpoints.read_checkpoint(w.best, **RESUME),
     "a dict without 'optimizer', 'epoch'"),
    ("weights that do not fit", "error", lambda w: model.load_weights(w.misfit),
     "do not fit the model its config describes"),
    ("a .pt renamed .pt2", "error", lambda w: predict.load_predictor(w.renamed),
     "a PyTorch checkpoint (.pt), not a torch.export program"),
    ("code in a weights file", "error", lambda w: model.load_weights(w.evil), "refusing to load global"),
]


@pytest.fixture(scope="module")
def cli_runs(w):
    """Start every cli command at once (each pays ~1.5-3 s for importing torch; two cores share the wait), once per
    distinct command line; -> {command line: (exit status, output)}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = {}
    for rid, kind, what, _ in ROWS:
        argv = tuple(map(str, what(w))) if kind == "cli" else None
        if argv and argv not in procs and not (rid == "evaluate --device cuda" and torch.cuda.is_available()):
            procs[argv] = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True)
    outs = {argv: p.communicate(timeout=300)[0] for argv, p in procs.items()}
    return {argv: (p.returncode, outs[argv]) for argv, p in procs.items()}


@pytest.mark.parametrize("rid,kind,what,fragment", ROWS, ids=[r[0] for r in ROWS])
def test_mistake_gets_a_clear_answer(rid, kind, what, fragment, w, cli_runs, capsys):
    fragment = fragment.replace("{missing}", str(w.missing))
    if kind == "cli":
        if rid == "evaluate --device cuda" and torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        status, out = cli_runs[tuple(map(str, what(w)))]
        assert "Traceback" not in out, out
        assert status != 0, out
        assert fragment in out, out
    elif kind in ("exit", "error"):
        with pytest.raises(SystemExit if kind == "exit" else ValueError) as e:
            what(w)
        msg = str(e.value)
        assert fragment in msg, msg
        assert "\n" not in msg.strip(), msg  # one line
    else:
        what(w)
        out = capsys.readouterr()
        assert fragment in out.out + out.err, out


def test_what_the_mistakes_left_behind(w, cli_runs):
    """`splits.py check` wrote nothing; the payload never ran."""
    assert not (w.badfiles / "splits.json").exists()
    with pytest.raises(checkpoints.CheckpointError):
        model.load_weights(w.evil)
    assert not w.marker.exists()


def test_every_key_has_a_rule_and_gpu_forms_are_accepted():
    assert set(config.RULES) | set(config.TYPE_ONLY) == set(config.DEFAULTS)
    assert config.load_config("camtl", None, ["device=0"])["device"] == "cuda:0"  # --set parses 0 as an int
    assert config.load_config("camtl", None, ["device='1'"])["device"] == "cuda:1"
    assert config.load_config("camtl", None, ["device=cuda:0"])["device"] == "cuda:0"
    for stage in config.STAGES:  # the shipped configs pass their own rules
        for f in (None, str(REPO / "configs" / "angiography.py")):
            config.load_config(stage, f)


def test_12bit_image_in_16bit_file_is_scaled_by_its_real_range(tmp_path):
    ramp = np.linspace(0, 4095, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "a12.png")
    a = data.read_image(tmp_path / "a12.png")
    assert a.max() == 1.0 and np.isclose(a[0, 1, 0], ramp[0, 1] / 4095)  # not ramp / 65535: near-black
    assert data.full_scale(ramp) == 4095 and data.full_scale(ramp // 4) == 1023
    assert data.full_scale(np.array([0, 65535], np.uint16)) == 65535


def test_jpeg_mask_thresholded_at_half_its_max_and_two_valued_masks_at_zero(w):
    m = data.read_mask(w.dirs / "retinography/labels/jpegmask.jpg")
    assert m[25:35, 15:45].all() and not m[:15].any() and not m[45:].any()
    lv = np.array([[0, 7], [7, 0]], np.uint8)  # two-valued: any value > 0 is vessel
    assert data.mask_threshold(lv) == (0, True)


def test_empty_detection_val_split_reports_no_detection_metrics(w):
    loaders = data.val_loaders(w.noval, "camtl", "val", 64, 2)
    torch.manual_seed(0)
    net = CAMTL(TINY, verbose=False)
    cfg = {**config.DEFAULTS, **TINY}
    m = evaluate.validate(net, loaders, cfg, "cpu")
    assert "dice_full" in m and not {"map50", "map50_95", "precision", "recall"} & set(m)


# -----------------------------------------------------------------------------
# Ultralytics checkpoints as older releases wrote them


def _write_like_older_ultralytics(path, zip_format, numpy1_names, monkeypatch):
    """Re-save tests/fixtures/det.pt the way older Ultralytics releases wrote checkpoints: a protocol-2 pickle
    with numpy scalars in its metadata (then stored as numpy's `scalar(dtype, _codecs.encode(bytes, "latin1"))`;
    under numpy 1's name `numpy.core.multiarray.scalar` when numpy1_names), in the zip format or in the format of
    torch < 1.6. Its classes keep their names: torch.nn's are the real ones, Ultralytics' are stand-ins registered
    under their names while pickling (Ultralytics is not installed)."""
    ckpt = torch.load(FIX / "det.pt", map_location="cpu", pickle_module=checkpoints._safe_pickle, weights_only=False)
    fakes = set()

    def named(module, name, obj=None):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            pass
        parts = module.split(".")
        for part in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
            if part not in sys.modules or part in fakes:
                fakes.add(part)
                monkeypatch.setitem(sys.modules, part, sys.modules.get(part) or types.ModuleType(part))
        obj = obj or type(name, (), {})
        obj.__module__, obj.__qualname__ = module, name
        setattr(sys.modules[module], name, obj)
        return obj

    if numpy1_names:  # this numpy calls the module numpy._core.multiarray
        fakes.add("numpy.core.multiarray")
        monkeypatch.setitem(sys.modules, "numpy.core.multiarray", types.ModuleType("numpy.core.multiarray"))
        scalar = named("numpy.core.multiarray", "scalar", lambda *a: None)  # only its name is pickled

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, checkpoints._Record):  # back to the class it stands for, pickled as NEWOBJ + state
                obj.__class__ = named(*obj._origin.rsplit(".", 1))
                state = {k: v for k, v in vars(obj).items() if k not in ("_args", "_state")}
                return copyreg.__newobj__, (obj.__class__,), state
            if numpy1_names and isinstance(obj, np.generic):
                return scalar, (obj.dtype, obj.tobytes())
            return NotImplemented

    ckpt.update(best_fitness=np.float64(0.6123), updates=np.int64(1200), date="2023-01-10",
                train_metrics={"metrics/mAP50(B)": np.float64(0.71), "fitness": np.float32(0.61), "ok": np.bool_(1)})
    pm = types.ModuleType("legacy_pickle")
    pm.Pickler, pm.dump = Pickler, pickle.dump
    torch.save(ckpt, path, pickle_module=pm, pickle_protocol=2, _use_new_zipfile_serialization=zip_format)
    monkeypatch.undo()
    if zip_format:
        with zipfile.ZipFile(path) as z:
            raw = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    else:
        raw = path.read_bytes()
    assert raw.startswith(b"\x80\x02") and b"c_codecs\nencode\n" in raw and b"multiarray\nscalar\n" in raw
    assert (b"cnumpy.core.multiarray\n" in raw) == numpy1_names
    assert b"cultralytics.nn.tasks\nDetectionModel\n" in raw
    return path


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")  # torch < 1.6 files keep module source
@pytest.mark.parametrize("zip_format,numpy1_names", [(True, True), (False, False)], ids=["zip+numpy1", "pre-1.6"])
def test_older_ultralytics_checkpoint_loads_and_predicts_the_same(tmp_path, monkeypatch, zip_format, numpy1_names):
    path = _write_like_older_ultralytics(tmp_path / "yolov8-old.pt", zip_format, numpy1_names, monkeypatch)
    meta = torch.load(path, map_location="cpu", pickle_module=checkpoints._safe_pickle, weights_only=False)
    assert type(meta["best_fitness"]) is np.float64 and meta["best_fitness"] == np.float64(0.6123)
    assert meta["updates"] == 1200 and meta["train_metrics"]["fitness"] == np.float32(0.61)
    ref = YOLOv8.from_ultralytics(str(FIX / "det.pt"), verbose=False).eval()
    old = YOLOv8.from_ultralytics(str(path), verbose=False).eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ref(x), old(x))


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("payload,msg", [
    (_Reduce(__import__("_codecs").encode, ("print('hi')", "rot13")), "refusing _codecs.encode"),
    (_Reduce(np.float64(1).__reduce__()[0], (np.dtype("O"), b"\0" * 8)), "refusing numpy scalar of dtype 'O"),
    (_Reduce(getattr, ("x", "upper")), "refusing to load global '.*getattr'"),
])
def test_the_allowed_legacy_globals_only_make_data(tmp_path, payload, msg):
    path = tmp_path / "x.pt"
    torch.save({"model": payload}, path, pickle_protocol=2)
    with pytest.raises(ValueError, match=msg):
        checkpoints.read_ultralytics(str(path))
