"""export.py: fused == unfused, the .pt2 program == the eager model (also at a batch size it was not traced with),
predictions from a .pt2 equal predictions from the checkpoint it came from, and the int8 program stays close to the
fp32 model (when the optional torchao is installed; without it, --int8 says so in one line), its mAP and Dice
printed beside the fp32 model's and a drop beyond the tolerance a warning."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import export
import predict
import prebuild
import synthetic
from export import measure
from model import load_checkpoint, load_weights

FIX = Path(__file__).parent / "fixtures"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def camtl_ckpt(tmp_path_factory):
    return prebuild.camtl_checkpoint(tmp_path_factory.mktemp("ck") / "best.pt")


def predicts_a_folder(program, tmp_path):
    """`predict.py --weights PROGRAM --source DIR` on one odd-sized image writes its mask and its labels."""
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray((np.random.default_rng(0).random((70, 150, 3)) * 255).astype(np.uint8)).save(src / "a.png")
    res = predict.main(["--weights", str(program), "--source", str(src), "--save-dir", str(tmp_path / "pred"),
                         "--conf", "0.001", "--device", "cpu"])
    assert res["saved"] == ["a"] and (tmp_path / "pred/masks/a.png").is_file()
    assert (tmp_path / "pred/labels/a.txt").is_file()


@pytest.fixture(scope="module")
def cli_builds():
    """`python export.py` as a user runs it: the default compiled artefact of a tiny checkpoint and, when torchao is
    installed, --int8 of a lively one with the fine vessel path, calibrated on synthetic images; started in the
    background as the session began (tests/prebuild.py)."""
    return prebuild.result()


def test_yolov8_from_ultralytics_pt2_equals_eager(tmp_path):
    model, cfg = load_weights(FIX / "det.pt")  # an Ultralytics checkpoint: the YOLOv8 route
    assert cfg is None and model.nc == 3
    stripped = []
    model.strip_aux = lambda: stripped.append(True)  # export must strip training-only branches when a model has them
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
        paths = export.export(model, 64, tmp_path / "det.pt2", fmt="onnx")
        assert paths[1].suffix == ".onnx" and paths[1].stat().st_size > 0
    except ImportError:  # the usual case: onnx is not a requirement; the .pt2 is still written, the message says why
        with pytest.raises(ImportError, match="onnx"):
            export.export(model, 64, tmp_path / "det.pt2", fmt="onnx")
    assert stripped
    run, meta = export.load_program(tmp_path / "det.pt2")
    assert meta["model"] == "YOLOv8" and meta["imgsz"] == 64 and meta["outputs"] == {"detections": [1, 7, 84]}
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        (got,), (fused,), ref = run(x), export.deployable(model)(x), model.eval()(x)
    assert (got - fused).abs().max() < 1e-4
    # folding: float rounding only
    assert (got - ref).abs().max() < 1e-3 and (got[:, 4:] - ref[:, 4:]).abs().max() < 1e-5


def test_camtl_fused_equals_unfused_in_target_domain(camtl_ckpt):
    model, _ = load_checkpoint(camtl_ckpt)
    net = export.deployable(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        det, full = net(x)
        with model.domain("target"):
            ref_det, ref_seg = model(x)
        with model.domain("source"):
            src_det, src_seg = model(x)
    assert (det - ref_det).abs().max() < 1e-3 and (det[:, 4:] - ref_det[:, 4:]).abs().max() < 1e-5
    assert (full - ref_seg["full"]).abs().max() < 1e-4
    assert (det[:, :4] - src_det[:, :4]).abs().max() > 0.1  # the target branch was folded, not the source one
    assert (full - src_seg["full"]).abs().max() > 0.01


def test_camtl_cli_dynamic_batch_pt2_equals_eager_and_predicts_alike(camtl_ckpt, tmp_path, capsys):
    out = tmp_path / "camtl.pt2"
    export.main(["--weights", str(camtl_ckpt), "--dynamic-batch", "--portable", "--out", str(out)])  # no --imgsz
    assert "was trained at" not in capsys.readouterr().out  # the training size, without a word
    run, imgsz, _ = predict.load_predictor(out)  # the loader the predictor uses
    model, _ = load_checkpoint(camtl_ckpt)
    eager = export.deployable(model)
    assert imgsz == 64  # the checkpoint's imgsz
    for b in (1, 3):  # traced with 2 images
        x = torch.rand(b, 3, 64, 64)
        with torch.no_grad():
            got, ref = run(x), eager(x)
        assert [tuple(t.shape) for t in got] == [(b, 5, 84), (b, 1, 64, 64)]
        assert max((g - r).abs().max() for g, r in zip(got, ref)) < 1e-4

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray((np.random.default_rng(0).random((70, 150, 3)) * 255).astype(np.uint8)).save(src / "a.png")
    for r, d in ((run, "pt2"), (eager, "pt")):
        predict.predict_folder(r, src, tmp_path / d, imgsz, conf=0.001)
    with pytest.raises(SystemExit) as e:  # a program holds the target branch only: one line
        predict.main(["--weights", str(out), "--source", str(src), "--domain", "source"])
    assert e.value.code == (f"--domain source: {out} is an exported program, and export.py exports the target "
                            "(angiography) branch only; predict fundus photographs with the .pt it came from")
    assert (tmp_path / "pt2/labels/a.txt").read_text() == (tmp_path / "pt/labels/a.txt").read_text()
    masks = [np.asarray(Image.open(tmp_path / d / "masks/a.png")) for d in ("pt2", "pt")]
    assert masks[0].shape == (70, 150) and (masks[0] != masks[1]).mean() < 1e-3


def test_export_says_so_when_asked_for_another_size_than_the_training_one(camtl_ckpt, tmp_path, capsys):
    """(Without --imgsz: the training size, silently; test_camtl_cli_dynamic_batch_... checks it.)"""
    export.main(["--weights", str(camtl_ckpt), "--portable", "--imgsz", "96", "--out", str(tmp_path / "b.pt2")])
    out = capsys.readouterr().out
    assert "--imgsz 96: " in out and "was trained at 64 px" in out, out
    assert predict.load_predictor(tmp_path / "b.pt2")[1] == 96  # asked for, and done


def test_compiled_artefact_is_the_default_equals_eager_and_predicts(cli_builds, tmp_path):
    out, code, text, camtl_ckpt = cli_builds["compiled"]  # the CLI without flags
    assert code == 0 and f"wrote {out} (compiled by AOTInductor" in text, text
    run, meta = export.load_program(out)
    assert meta["compiled"] and meta["imgsz"] == 64 and meta["model"] == "CAMTL"
    assert meta["threads"] == export.usable_cpus()  # compiled under OMP_NUM_THREADS=1 (tests/prebuild.py)
    eager = export.deployable(load_checkpoint(camtl_ckpt)[0])
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        (det, full), (ref_det, ref_full) = run(x), eager(x)
    assert (det - ref_det).abs().max() < 1e-3 and (full - ref_full).abs().max() < 1e-3  # decoded outputs
    with pytest.raises(ValueError, match="compiled for cpu, asked to run on meta"):
        export.load_program(out, "meta")
    predicts_a_folder(out, tmp_path)


def test_programs_are_compiled_for_every_usable_cpu_not_torch_s_current_threads(tmp_path, monkeypatch):
    """Inductor writes its loops' thread count into the program; export compiles for the CPUs the process may use,
    whatever torch's thread count is (a job run with OMP_NUM_THREADS=1 would otherwise write a one-thread program)."""
    seen = {}
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda prog, package_path, inductor_configs: seen.update(inductor_configs))
    monkeypatch.setattr(export.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert export.compile_package(None, tmp_path / "p.pt2", {"model": "CAMTL"}) is None
    finally:
        torch.set_num_threads(before)
    assert seen["cpp.threads"] == 4 and json.loads(seen["aot_inductor.metadata"][export.META])["threads"] == 4


# -----------------------------------------------------------------------------
# int8 (--int8): PT2E static quantisation through the optional package torchao, compiled by AOTInductor


def test_int8_parts_reach_every_convolution_they_name():
    """The quantizer matches the modules a node was called in: each name export_int8 hands it must be one the
    traced program called, and together they must cover every convolution under INT8_PARTS (a Sequential that
    forward walks item by item, like P3's seg head, is never called itself)."""
    from model import CAMTL
    model = CAMTL({"scale": [0.33, 0.125, 1024], "nc": 1, "seg_stride": 2}, verbose=False).eval()
    net = export.deployable(model)
    prog = torch.export.export(net, (torch.rand(1, 3, 64, 64),))
    called = {p.removeprefix("model.") for n in prog.graph.nodes for p, _ in n.meta.get("nn_module_stack", {}).values()}
    parts = export.called_parts(prog, export.INT8_PARTS)
    assert parts and set(parts) <= called
    convs = [n for n, m in net.model.named_modules() if isinstance(m, torch.nn.Conv2d)
             and any(n.startswith(f"{p}.") for p in export.INT8_PARTS)]
    assert len(convs) > 20 and "seg_head.heads.0.0.conv" in convs
    assert all(any(c == p or c.startswith(f"{p}.") for p in parts) for c in convs)


def test_int8_cli_needs_torchao_one_line_and_rejects_what_it_cannot_do(camtl_ckpt, monkeypatch):
    for flags in (["--portable"], ["--dynamic-batch"], ["--format", "onnx"]):
        with pytest.raises(SystemExit, match=f"--int8 with {flags[0]}"):
            export.main(["--weights", str(camtl_ckpt), "--int8", *flags])
    with pytest.raises(SystemExit, match="--calib 0: must be >= 1"):
        export.main(["--weights", str(camtl_ckpt), "--int8", "--calib", "0"])
    with pytest.raises(SystemExit, match="--calib-data: only used with --int8"):
        export.main(["--weights", str(camtl_ckpt), "--calib-data", "somewhere"])
    # torchao missing (None in sys.modules makes every import of it fail, installed or not): one line, non-zero exit
    # (SystemExit with a message exits 1), before anything is read or written
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")] + ["torchao"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SystemExit) as e:
        export.main(["--weights", str(camtl_ckpt), "--int8"])
    assert e.value.code == "--int8 needs the optional package torchao: pip install torchao"
    assert not camtl_ckpt.with_suffix(".int8.pt2").exists()


def test_int8_cli_artefact_is_close_to_fp32_and_predicts(cli_builds, tmp_path):
    pytest.importorskip("torchao", reason="--int8 needs the optional package torchao (not a nanoCAMTL requirement)")
    out, code, text, ck, root = cli_builds["int8"]  # --weights best.pt --int8: next to it, best.int8.pt2
    assert code == 0 and f"wrote {out} (int8, compiled by AOTInductor" in text, text
    run, meta = export.load_program(out)
    assert meta["model"] == "CAMTL" and meta["imgsz"] == 64 and meta["compiled"] and meta["config"]["widths"]
    assert meta["int8"]["calib_counts"] == {"angiography_detection": 4, "angiography_segmentation": 4}
    assert "seg_head.heads.0.0" in meta["int8"]["parts"]  # P3's seg head, walked item by item, is quantised too

    # letterboxed validation images of both tasks, through the int8 program and the fused fp32 model
    eager = export.deployable(load_checkpoint(ck)[0])
    imgs = [b["img"] for k in ("angiography_detection", "angiography_segmentation")
            for b in data.build_loader(root, k, "val", imgsz=64, batch=1, augment=False, shuffle=False)]
    with torch.no_grad():
        got, ref = zip(*((run(x), eager(x)) for x in imgs))
    assert [tuple(t.shape) for t in got[0]] == [(1, 5, 84), (1, 1, 64, 64)]
    v8, v = torch.cat([g[1] for g in got]).flatten(), torch.cat([r[1] for r in ref]).flatten()  # vessel logits
    assert (v8 - v).abs().max() > 1e-3  # really quantised, not the fp32 program under another name
    assert torch.corrcoef(torch.stack((v8, v)))[0, 1] > 0.97  # working: > 0.99; mis-calibrated: < 0.9
    assert (v8 - v).abs().mean() < 0.25 * v.std()  # working: < 0.1; mis-calibrated: > 0.35
    box8, box = torch.cat([g[0][:, :4] for g in got]), torch.cat([r[0][:, :4] for r in ref])  # xywh, canvas px
    assert (box8 - box).abs().mean() < 0.2  # working: < 0.1 px; mis-calibrated: > 0.38 px

    # the CLI scored both on the validation images and printed the table, the numbers validation would give
    head = (f"fp32 against int8 on 4 validation images of {root} (2 angiography_detection, "
            "2 angiography_segmentation):\n")
    assert head in text, text
    table = text.split(head)[1].splitlines()
    assert table[0].split() == ["mAP50", "mAP50-95", "Dice(full)"]
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in table[1:4]}
    loaders = data.val_loaders(root, "camtl", "val", 64, 1, 0, 1)
    for name, r in (("fp32", eager), ("int8", run)):
        m = measure(r, loaders, 1)
        assert rows[name] == pytest.approx([m["map50"], m["map50_95"], m["dice_full"]], abs=1e-4), (name, rows)
    assert rows["points"] == pytest.approx([100 * (a - b) for a, b in zip(rows["int8"], rows["fp32"])], abs=0.02)
    assert "WARNING --int8" not in text  # a working quantiser on this model: within a point

    predicts_a_folder(out, tmp_path)


def test_int8_check_warns_naming_each_metric_that_drops(camtl_ckpt, tmp_path, monkeypatch, capsys):
    """export.py --int8 with the quantiser and the compiler stubbed (the check is what is tested): an "int8"
    program whose vessel logits are pushed down predicts no vessels, and Dice(full) drops beyond the tolerance."""
    root = synthetic.make_synthetic(tmp_path / "syn", n=6, imgsz=64)
    monkeypatch.setattr(export, "torchao_pt2e", lambda *parts: None)
    monkeypatch.setattr(export, "export_int8", lambda model, imgsz, path, images, calib=None: [Path(path)])
    fp32 = export.deployable(load_checkpoint(camtl_ckpt)[0])
    shift = {"by": -100.0}
    monkeypatch.setattr(export, "load_program",
                        lambda path, device="cpu": ((lambda x: (fp32(x)[0], fp32(x)[1] + shift["by"])), {}))
    argv = ["--weights", str(camtl_ckpt), "--int8", "--calib-data", str(root), "--calib", "2"]
    export.main(argv)
    out = capsys.readouterr().out
    dice = float(out.split("fp32  ")[1].split()[2])
    assert dice > 0.1  # the fp32 model finds vessels; the "int8" one none
    assert (f"WARNING --int8: Dice(full) {dice:.4f} -> 0.0000 ({-100 * dice:+.2f} points): more than "
            "--int8-tolerance 1; calibrate on more or other images") in out
    assert "mAP50" not in out.split("WARNING")[1]  # the detections did not change: not named
    export.main(argv + ["--int8-tolerance", "50"])  # a drop within a looser tolerance: no warning
    assert "WARNING" not in capsys.readouterr().out
    shift["by"] = 0.0  # int8 == fp32
    export.main(argv)
    out = capsys.readouterr().out
    assert "WARNING" not in out and out.split("points")[1].split()[:3] == ["+0.00", "+0.00", "+0.00"]
    export.main(argv + ["--int8-val", "0"])  # no check asked for
    assert "fp32 against int8" not in capsys.readouterr().out
    for flags, msg in ((["--int8-val", "-1"], "--int8-val -1: must be >= 0"),
                       (["--int8-tolerance", "-2"], "--int8-tolerance -2.0: must be >= 0")):
        with pytest.raises(SystemExit, match=msg):
            export.main(argv + flags)
    with pytest.raises(SystemExit, match="--int8-tolerance: only used with --int8"):
        export.main(["--weights", str(camtl_ckpt), "--int8-tolerance", "2"])
