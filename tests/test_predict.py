"""Prediction on a folder of the user's images (evaluate.py --source) and the metrics CLI.

The coordinate chain is checked with a stub network that "detects" whatever is white on the letterboxed canvas it
is given: the predictor must letterbox, decode, NMS and map back to the original image so that the box, the txt
line and the mask land on the rectangle drawn in the original's pixels."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import synthetic
from model import CAMTL


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

    res = evaluate.predict_folder(white_detector, src, tmp_path / "out", imgsz=128)
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
    res = evaluate.main(["--weights", str(ck), "--source", str(src), "--save-dir", str(tmp_path / "out"),
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
        evaluate.main(args)
    evaluate.main(args + ["--name", "mine"])
    evaluate.main(args + ["--name", "mine", "--exist-ok"])
    runs = sorted(p.name for p in (tmp_path / "runs" / "predict").iterdir())
    assert runs == ["exp", "exp2", "mine"] and (tmp_path / "runs/predict/exp2/labels/a.txt").is_file()
