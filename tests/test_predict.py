"""Prediction on a folder of the user's images (predict.py), the metrics CLI (evaluate.py), --domain and the KEY=VALUE
settings.

The coordinate chain is checked with a stub network that "detects" whatever is white on the letterboxed canvas it
is given: the predictor must letterbox, decode, NMS and map back to the original image so that the box, the txt
line and the mask land on the rectangle drawn in the original's pixels."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import plots
import predict
import synthetic
from model import CAMTL, DOMAINS


pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


def white_detector(x):
    """Stub of the exported contract: one box around the white pixels of the canvas (conf 0.9), one decoy
    anchor under the confidence threshold, and vessel logits positive exactly on white."""
    white = x[0].min(0).values > 0.5  # the letterbox pad is 114/255 < 0.5, the background black
    ys, xs = torch.nonzero(white, as_tuple=True)
    x1, y1, x2, y2 = xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1  # pixel edges
    det = torch.tensor([[(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, 0.9],
                        [10.0, 10.0, 8.0, 8.0, 0.1]]).T[None]  # (1, 4+nc, A=2)
    return det, torch.where(white, 10.0, -10.0)[None, None]


@pytest.mark.parametrize("size,rect", [((200, 120), (50, 30, 110, 80)), ((96, 240), (20, 150, 70, 190))])
def test_box_and_mask_come_back_in_image_pixels(tmp_path, size, rect):
    w0, h0 = size
    img = np.zeros((h0, w0, 3), np.uint8)
    x1, y1, x2, y2 = rect
    img[y1:y2, x1:x2] = 255
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(img).save(src / "scan.png")
    Image.fromarray((img[..., 0].astype(np.uint16) * 257)).save(src / "gray16.png")  # 16-bit gray: read as well
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (src / "notes.txt").write_text("not an image")

    res = predict.predict_folder(white_detector, src, tmp_path / "out", imgsz=128)
    assert res["saved"] == ["gray16", "scan"] and sorted(p.name for p in res["skipped"]) == ["broken.png", "notes.txt"]
    for stem in res["saved"]:
        rows = [line.split() for line in (tmp_path / "out/labels" / f"{stem}.txt").read_text().splitlines()]
        assert len(rows) == 1 and len(rows[0]) == 6 and rows[0][0] == "0" and float(rows[0][5]) == pytest.approx(0.9)
        _, xc, yc, bw, bh = (float(v) for v in rows[0][:5])
        got = np.array([(xc - bw / 2) * w0, (yc - bh / 2) * h0, (xc + bw / 2) * w0, (yc + bh / 2) * h0])
        assert np.abs(got - rect).max() < 3, (got, rect)  # one canvas pixel is 1.6-1.9 image pixels here
        mask = np.asarray(Image.open(tmp_path / "out/masks" / f"{stem}.png")) > 0
        assert mask.shape == (h0, w0)
        truth = img[..., 0] > 0
        assert (mask & truth).sum() / (mask | truth).sum() > 0.9
        assert Image.open(tmp_path / "out" / f"{stem}.png").size == (w0, h0)


def test_predict_cli_with_checkpoint_and_metrics_cli(tmp_path, capsys):
    torch.manual_seed(0)
    model = CAMTL({"scale": [0.33, 0.125, 1024], "imgsz": 64}, verbose=False)
    ck = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "config": {**model.cfg, "batch": 4, "workers": 0}, "stage": "camtl"}, ck)

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray((np.random.default_rng(0).random((50, 90, 3)) * 255).astype(np.uint8)).save(src / "a.jpg")
    (src / "b.png").write_bytes(b"")
    res = predict.main(["--weights", str(ck), "--source", str(src), "--save-dir", str(tmp_path / "out"),
                         "--conf", "0.001"])
    assert res["saved"] == ["a"] and [p.name for p in res["skipped"]] == ["b.png"]
    assert "b.png" in capsys.readouterr().out
    assert Image.open(tmp_path / "out/masks/a.png").size == (90, 50)
    assert all(len(line.split()) == 6 for line in (tmp_path / "out/labels/a.txt").read_text().splitlines())

    root = synthetic.make_synthetic(tmp_path / "syn", n=6, imgsz=64)
    m = evaluate.main(["--weights", str(ck), "--data", str(root), "--workers", "0"])
    out = capsys.readouterr().out
    for key in ("Dice / IoU  full", "Dice / IoU  p3", "P / R", "mAP50 / mAP50-95",
                "val loss  det "):
        assert key in out
    assert {"dice_full", "dice_p5", "map50_95", "val/total"} <= set(m)


def test_predictions_go_to_numbered_run_folders(tmp_path, monkeypatch):
    src = tmp_path / "imgs"
    src.mkdir()
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(src / "a.png")
    monkeypatch.chdir(tmp_path)
    args = ["--weights", str(ROOT / "tests" / "fixtures" / "det.pt"), "--source", str(src), "--device", "cpu"]
    for _ in range(2):
        predict.main(args)
    predict.main(args + ["--name", "mine"])
    predict.main(args + ["--name", "mine", "--exist-ok"])
    runs = sorted(p.name for p in (tmp_path / "runs" / "predict").iterdir())
    assert runs == ["exp", "exp2", "mine"] and (tmp_path / "runs/predict/exp2/labels/a.txt").is_file()


# -----------------------------------------------------------------------------
# --domain: the BatchNorm branch that predicts, on a real-size fundus photograph


def dual_bn_checkpoint(path, seed=0):
    """A tiny camtl checkpoint with DualBN whose two branches differ (statistics and affine drawn apart), gates
    open so the attention reaches the outputs."""
    torch.manual_seed(seed)
    model = CAMTL({"scale": [0.33, 0.125, 1024], "imgsz": 64, "dual_bn": True}, verbose=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t, lo, hi in ((m.running_mean, -0.3, 0.3), (m.running_var, 0.5, 1.5), (m.bias, -0.3, 0.3)):
                    t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)
    torch.save({"model": model.state_dict(), "config": {**model.cfg, "batch": 2, "workers": 0}, "stage": "camtl"},
               path)
    return path


def fundus_photograph(size=1400):
    """An RGB fundus-like photograph: an orange disc with a few dark vessels on a black background."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(xx - size / 2, yy - size / 2)
    img = np.zeros((size, size, 3), np.uint8)
    img[r < size * 0.45] = (200, 90, 40)
    for k in range(5):  # vessels: dark curves from the disc's centre
        t = np.linspace(0, 1, 4 * size)
        x = (size / 2 + t * size * 0.4 * np.cos(k * 1.3 + t)).astype(int)
        y = (size / 2 + t * size * 0.4 * np.sin(k * 1.3 + t)).astype(int)
        for d in range(-3, 4):
            img[np.clip(y + d, 0, size - 1), x] = (90, 30, 20)
    return img


def test_real_size_image_predicts_in_both_domains_at_full_size(tmp_path, capsys):
    ck = dual_bn_checkpoint(tmp_path / "best.pt")
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(fundus_photograph()).save(src / "fundus.png")
    outs = {}
    for domain in ("source", "target", None):
        argv = ["--weights", str(ck), "--source", str(src), "--save-dir", str(tmp_path / str(domain)),
                "--conf", "0.001", "--device", "cpu"] + (["--domain", domain] if domain else [])
        assert predict.main(argv)["saved"] == ["fundus"]
        log = capsys.readouterr().out
        want = domain or "target"  # a camtl checkpoint predicts with its target branch unless told
        assert f"domain: the {want} BatchNorm branch of {ck} predicts" in log
        mask = np.asarray(Image.open(tmp_path / str(domain) / "masks/fundus.png"))
        assert mask.shape == (1400, 1400)
        assert Image.open(tmp_path / str(domain) / "fundus.png").size == (1400, 1400)
        outs[domain] = (mask, (tmp_path / str(domain) / "labels/fundus.txt").read_text())
    assert outs[None][0].tolist() == outs["target"][0].tolist() and outs[None][1] == outs["target"][1]

    img = data.read_image(src / "fundus.png")  # the vessel logits themselves differ between the branches
    logits = {}
    for domain in ("source", "target"):
        run, imgsz, names = predict.load_predictor(ck, domain=domain)
        det, logits[domain] = predict.predict_image(run, img, imgsz, conf=0.001)
        assert logits[domain].shape == (1400, 1400) and names == ["stenosis"]
    assert (logits["source"] - logits["target"]).abs().max() > 0.1
    assert outs["source"][1] != outs["target"][1]  # and so do the boxes


def test_domain_on_a_model_with_one_batchnorm_branch_says_so_and_predicts(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(src / "a.png")
    det = ROOT / "tests" / "fixtures" / "det.pt"  # an Ultralytics detector: plain BatchNorm
    res = predict.main(["--weights", str(det), "--source", str(src), "--save-dir", str(tmp_path / "out"),
                         "--domain", "source", "--device", "cpu"])
    assert res["saved"] == ["a"]
    assert f"--domain source: {det} has one BatchNorm branch (trained without DualBN)" in capsys.readouterr().out


def test_metrics_in_the_source_domain_score_fundus_vessels_with_the_source_branch(tmp_path, capsys):
    ck = dual_bn_checkpoint(tmp_path / "best.pt")
    root = synthetic.make_synthetic(tmp_path / "syn", n=6, imgsz=64)
    ms = {}
    for domain in ("source", "target"):
        ms[domain] = evaluate.main(["--weights", str(ck), "--data", str(root), "--workers", "0", "--domain", domain])
        log = capsys.readouterr().out
        keys = "retinography_segmentation" if domain == "source" else \
            "angiography_detection, angiography_segmentation"
        assert f"domain: {domain} ({DOMAINS[domain]}): {keys} scored with the {domain} BatchNorm branch" in log
    assert "map50" not in ms["source"] and "dice_full" in ms["source"]  # fundus photographs: vessels only
    assert "map50" in ms["target"]


# -----------------------------------------------------------------------------
# KEY=VALUE settings


def test_key_value_settings_set_the_flags_and_win_over_them():
    a = evaluate.parse_args(["--weights", "best.pt", "conf=0.5", "iou=0.6", "imgsz=256", "split=test", "save_json",
                             "--conf", "0.1", "domain=source", "exist_ok=true", "--name", "x", "name=y"])
    assert (a.weights, a.conf, a.iou, a.imgsz, a.split, a.domain) == ("best.pt", 0.5, 0.6, 256, "test", "source")
    assert a.save_json is True and a.exist_ok is True and a.name == "y"
    a = predict.parse_args(["weights=w.pt2", "source=imgs", "save_dir=out", "--exist-ok", "exist_ok=false"])
    assert (a.weights, a.source, a.save_dir, a.exist_ok, a.conf) == ("w.pt2", "imgs", "out", False, None)
    assert evaluate.parse_args(["weights=w.pt"]).split == "val"


def test_evaluate_source_says_where_prediction_lives():
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--weights", "best.pt", "--source", "imgs/"])
    assert str(e.value.code) == ("--source imgs/: predictions on your images are predict.py's: python predict.py "
                                 "--weights best.pt --source imgs/")


@pytest.mark.parametrize("argv,msg", [
    (["conff=0.5"], "conff=0.5: unknown key 'conff'; did you mean conf?"),
    (["save-json=true"], "save-json=true: unknown key 'save-json'; did you mean save_json?"),
    (["model=best.pt"], "model=best.pt: unknown key 'model' (keys: weights, data, split"),
    (["imgsz=big"], "imgsz=big: invalid int value: 'big'"),
    (["split=tst"], "split=tst: invalid choice: 'tst'"),
    (["domain=fundus"], "domain=fundus: invalid choice: 'fundus'"),
    (["save_json=maybe"], "save_json=maybe: save_json is a switch: save_json=true, save_json=false, or save_json "
                          "alone"),
    (["conf"], "conf: expected conf=VALUE"),
    (["best.pt"], "best.pt: unknown key 'best.pt'; expected KEY=VALUE"),
])
def test_a_bad_setting_is_one_line_naming_it(argv, msg):
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(["--weights", "best.pt", *argv])
    assert str(e.value.code).startswith(msg) and "\n" not in str(e.value.code)


def test_weights_are_required_one_way_or_the_other():
    with pytest.raises(SystemExit, match=r"--weights FILE \(or weights=FILE\) is required"):
        evaluate.parse_args(["conf=0.5"])
    with pytest.raises(SystemExit, match=r"--weights FILE and --source DIR \(or weights=FILE source=DIR\) are "):
        predict.parse_args(["source=imgs"])


def test_key_value_settings_reach_the_metrics(tmp_path, monkeypatch):
    ck = tmp_path / "best.pt"
    model = CAMTL({"scale": [0.33, 0.125, 1024], "imgsz": 64}, verbose=False)
    torch.save({"model": model.state_dict(), "config": {**model.cfg, "batch": 4, "workers": 0}, "stage": "camtl"}, ck)
    root = synthetic.make_synthetic(tmp_path / "syn", n=6, imgsz=64)
    seen = {}

    def fake_validate(model, loaders, cfg, *args, **kw):
        seen.update(cfg=cfg, sizes={t: ld.dataset.imgsz for t, ld in loaders.items()},
                    splits={t: ld.dataset.split for t, ld in loaders.items()})
        return {}
    monkeypatch.setattr(evaluate, "validate", fake_validate)
    evaluate.main(["--weights", str(ck), f"data={root}", "conf=0.5", "iou=0.6", "imgsz=96", "split=train",
                   "workers=0"])
    assert seen["cfg"]["val_conf"] == 0.5 and seen["cfg"]["val_iou"] == 0.6 and seen["cfg"]["imgsz"] == 96
    assert seen["sizes"] == {"det": 96, "seg": 96} and seen["splits"] == {"det": "train", "seg": "train"}


# -----------------------------------------------------------------------------
# prediction pictures: YOLOv8's label style, sized to the image


def drawn_sizes(tmp_path, size):
    """plot_prediction of one stenosis box on a black size x size image -> (label height, line width, white text
    pixels in the label), measured on the drawn pixels."""
    s = size / 200
    x1, y1, x2, y2 = 50 * s, 80 * s, 150 * s, 160 * s
    path = predict.plot_prediction(torch.zeros(3, size, size), torch.tensor([[x1, y1, x2, y2, 0.91, 0]]), None,
                                 tmp_path / f"{size}.png", ["stenosis"])
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    red = (a == plots.colour(0)).all(-1)
    above = red[: int(y1)]  # the label sits on top of the box
    rows = np.flatnonzero(above.any(1))
    cols = np.flatnonzero(above.any(0))
    assert rows.max() == int(y1) - 1 and cols.min() == int(x1)  # ... ending on the box's top edge, at its left
    text = (a[rows.min():int(y1), cols.min():cols.max() + 1] > 200).all(-1).sum()  # white, antialiased
    return len(rows), int(red[int((y1 + y2) / 2), : int(x1 + 20 * s)].sum()), text


def test_label_and_line_scale_with_the_image(tmp_path):
    h_small, lw_small, text_small = drawn_sizes(tmp_path, 200)
    h_big, lw_big, text_big = drawn_sizes(tmp_path, 1400)
    assert (lw_small, lw_big) == (2, 4)  # YOLOv8: max(round((w + h) / 2 * 0.003), 2)
    assert 12 <= h_small <= 24 and h_big >= 3 * h_small  # the font: max(round((w + h) / 2 * 0.035), 12) px
    assert text_small > 20 and text_big > 10 * text_small  # "stenosis 0.91" written in white on the label


def test_labels_of_nested_near_duplicates_and_at_the_edges_do_not_collide(tmp_path):
    W = H = 400
    assert predict.label_box((100, 100, 200, 200), 60, 20, W, H, []) == (100, 80, 160, 100)  # above, as YOLOv8
    assert predict.label_box((100, 5, 200, 200), 60, 20, W, H, []) == (100, 5, 160, 25)  # top of the image: inside
    assert predict.label_box((380, 100, 400, 200), 60, 20, W, H, []) == (340, 80, 400, 100)  # shifted into the image
    det = torch.tensor([[100, 100, 300, 300, 0.9, 0], [102, 102, 298, 299, 0.8, 1], [101, 103, 299, 297, 0.7, 2]])
    path = predict.plot_prediction(torch.zeros(3, H, W), det, None, tmp_path / "dups.png", ["a", "b", "c"])
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    spots = []
    for j in range(3):  # every label's fill is drawn whole: nothing printed over it but its own text
        ys, xs = np.nonzero((a == plots.colour(j)).all(-1) & ~box_outline(det[j], H, W))
        spots.append((xs.min(), ys.min(), xs.max(), ys.max()))
    for i in range(3):
        for j in range(i + 1, 3):
            p, q = spots[i], spots[j]
            assert p[2] < q[0] or q[2] < p[0] or p[3] < q[1] or q[3] < p[1], (spots, i, j)


def box_outline(box, h, w, lw=2):
    """The pixels of a box's outline, lw wide and drawn inwards as PIL draws it."""
    m = np.zeros((h, w), bool)
    x1, y1, x2, y2 = (int(v) for v in box[:4])
    m[y1:y2 + 1, x1:x2 + 1] = True
    m[y1 + lw:y2 + 1 - lw, x1 + lw:x2 + 1 - lw] = False
    return m
