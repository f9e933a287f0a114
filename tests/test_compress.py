"""Compression: structured pruning removes whole channels correctly (prune.py), fake quantisation computes what
int8 computes (export.FakeQuantConv2d), and compress.py fine-tunes both through train.py's loop into a checkpoint
that every command loads; its mistakes are answered in one line."""
import json
from argparse import Namespace

import pytest
import torch
import torch.nn as nn
from prebuild import TINY, randomise
from test_train import TINY as TINY_RUN

import compress
import evaluate
import export
import predict
import synthetic
import train
from config import load_config
from model import CAMTL, camtl_config, count_params, load_checkpoint
from modules import Bottleneck
from prune import apply_widths, importance, narrow, prune, sites

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("seg_stride", [8, 2])
def test_narrowing_channels_nothing_reads_changes_nothing(seg_stride):
    """Half of every site's channels made unread (their consumer's input weights zeroed), then removed: every
    output is unchanged, so the surgery maps each kept channel to its own filter, norm (BN, each DualBN branch,
    GroupNorm) and consumer input (SPPF's four copies too)."""
    torch.manual_seed(0)
    model = randomise(CAMTL({**TINY, "seg_stride": seg_stride}, verbose=False))
    model.set_domain("target")
    have = sites(model)
    assert any(isinstance(m, Bottleneck) for m in model.modules()) and "backbone.9.cv1" in have
    assert ("seg_head.heads.0.2" in have) == (seg_stride == 8)  # P3's last hidden map feeds the fine path
    keep = {}
    with torch.no_grad():
        for name, (producer, consumer, copies) in have.items():
            c = producer.conv.out_channels
            keep[name] = torch.arange(0, c, 2)
            drop = torch.cat([torch.arange(1, c, 2) + k * c for k in range(copies)])
            consumer.weight[:, drop] = 0
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before = {d: model.set_domain(d)(x) for d in ("target", "source")}  # each DualBN branch
        n = count_params(model)
        for name, idx in keep.items():
            narrow(model, name, idx)
        for d, (det, seg) in before.items():
            model.set_domain(d)
            det2, seg2 = model(x)
            assert torch.allclose(det, det2, atol=1e-5) and torch.allclose(seg["full"], seg2["full"], atol=1e-5), d
    assert count_params(model) < 0.8 * n
    for name, (producer, consumer, copies) in sites(model).items():
        assert producer.conv.out_channels == len(keep[name]) == consumer.in_channels // copies


def test_prune_removes_the_least_important_and_its_widths_rebuild_the_network():
    torch.manual_seed(0)
    model = randomise(CAMTL(TINY, verbose=False))
    site = next(k for k, (p, _, _) in sites(model).items() if p.conv.out_channels == 16)
    producer = sites(model)[site][0]
    c = producer.conv.out_channels
    with torch.no_grad():
        producer.bn.target.weight[: c // 2] *= 1e-3  # the first half hardly reaches the output
    model.set_domain("target")
    imp = importance(producer)
    assert imp[: c // 2].max() < imp[c // 2:].min()
    kept_filters = producer.conv.weight[c // 2:].clone()
    widths = prune(model, 0.5)
    assert widths[site] == c // 2 and torch.equal(producer.conv.weight, kept_filters)
    assert set(widths) == {k for k in sites(CAMTL(TINY, verbose=False)) if not k.startswith("seg_head.")}
    assert len(prune(CAMTL(TINY, verbose=False), 0.5, whole=())) == len(sites(model))
    # a config carrying the widths builds the same network: the checkpoint loads strictly, outputs equal
    again = CAMTL({**TINY, "widths": widths}, verbose=False)
    again.load_state_dict(model.state_dict())
    again.set_domain("target")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[1]["full"], again.eval()(x)[1]["full"])
    with pytest.raises(ValueError, match="prune ratio 1.5"):
        prune(model, 1.5)
    with pytest.raises(ValueError, match="'neck.nope' is not a prunable layer"):
        apply_widths(CAMTL(TINY, verbose=False), {"neck.nope": 3})
    with pytest.raises(ValueError, match="expected an int from 1 to its"):
        apply_widths(CAMTL(TINY, verbose=False), {site: 10 ** 4})


def test_fake_quantised_conv_is_the_hand_computed_int8_conv_and_trains():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8) * 2 + 0.5
    ref = nn.Conv2d(3, 4, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    n = export.fake_quantize(nn.ModuleDict({"backbone": nn.Sequential(conv), "other": nn.Sequential(ref)}))
    assert n == 1 and type(conv) is export.FakeQuantConv2d and type(ref) is nn.Conv2d
    # the rounding torch's quantisers define (the X86 quantiser's: weights int8 per output channel, symmetric;
    # inputs uint8 per tensor, affine), with the ranges of this weight and this batch
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
    wobs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    wobs(ref.weight.detach())
    ws, wz = wobs.calculate_qparams()
    ws, wz = ws.view(-1, 1, 1, 1), wz.view(-1, 1, 1, 1)
    wq = ((ref.weight.detach() / ws).round() + wz).clamp(-128, 127).sub(wz) * ws
    xobs = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    xobs(x)
    xs, xz = xobs.calculate_qparams()
    xq = ((x / xs).round() + xz).clamp(0, 255).sub(xz) * xs
    want = nn.functional.conv2d(xq, wq, ref.bias, padding=1)
    got = conv(x)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, ref(x), atol=1e-3)
    got.square().sum().backward()  # straight-through: a gradient for every weight inside the int8 range (a
    # filter's largest positive weight, at +127.5 steps, rounds to 128 and is clipped to 127, as in the int8 program)
    assert (conv.weight.grad != 0).float().mean() > 0.9 and conv.bias.grad.abs().min() > 0
    assert list(conv.state_dict()) == ["weight", "bias"]  # an ordinary checkpoint
    export.fake_quantize(nn.ModuleDict({"backbone": nn.Sequential(conv)}), on=False)
    assert type(conv) is nn.Conv2d
    model = CAMTL(TINY, verbose=False)
    convs = [k for k, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert 0 < export.fake_quantize(model) < len(convs)  # the int8 parts only (attention and gates stay fp32)


def test_pruning_a_pruned_network_keeps_its_other_narrowed_layers(tmp_path):
    """A checkpoint whose seg head was narrowed by hand (`widths`), pruned again: the layers --prune leaves whole
    keep their widths, so the new checkpoint still builds its network."""
    torch.manual_seed(0)
    model = randomise(CAMTL({**TINY, "widths": {"seg_head.heads.1.0": 8}}, verbose=False))
    torch.save({"model": model.state_dict(), "config": {**model.cfg, "workers": 0}, "stage": "camtl"},
               tmp_path / "a.pt")
    path = compress.prune_checkpoint(*load_checkpoint(tmp_path / "a.pt"), 0.5, tmp_path / "run" / "pruned.pt")
    net, cfg = load_checkpoint(path)
    assert cfg["widths"]["seg_head.heads.1.0"] == 8 and cfg["widths"]["backbone.9.cv1"] == 32
    assert net.seg_head.heads[1][0].conv.out_channels == 8


def portable_instead_of_compiled(prog, path, meta, freeze=False):
    """export.compile_package stand-in: the int8 program saved as the portable torch.export program (its C++ build
    takes a minute; tests/test_export.py builds one)."""
    torch.export.save(prog, path, extra_files={export.META: json.dumps({**meta, "compiled": False})})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny camtl run (1 epoch from random init) -> (its folder's parent, its product)."""
    tmp = tmp_path_factory.mktemp("compress")
    synthetic.make_synthetic(tmp / "synth", n=6, imgsz=64, seed=0)
    base, _ = train.main(["--stage", "camtl", "--set", *TINY_RUN, f"data={tmp / 'synth'}", f"project={tmp / 'runs'}",
                          f"weights_dir={tmp / 'weights'}", "plots=False", "epochs=1", "seg_stride=4"])
    return tmp, base / "weights" / "yolov8c-camtl.pt"


@pytest.fixture(scope="module")
def compressed(trained):
    """`compress.py --prune 0.5 --qat --epochs 1` on the tiny run (--qat exports int8: the optional torchao)."""
    pytest.importorskip("torchao", reason="compress.py --qat exports int8 with the optional package torchao")
    tmp, weights = trained
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export, "compile_package", portable_instead_of_compiled)
        res = compress.main(["--weights", str(weights), "--prune", "0.5", "--qat", "--epochs", "1", "--calib", "4",
                             "--val", "8", "--set", "log_interval=5"])
    return tmp, weights, res


def test_compress_prunes_and_trains_for_int8_through_train_py(compressed, capsys):
    tmp, weights, res = compressed
    run = tmp / "runs" / "camtl" / "exp-prune50-qat"
    product = run / "weights" / "yolov8c-camtl.pt"
    assert (run / "pruned.pt").is_file() and (run / "results.csv").is_file() and product.is_file()
    assert list(res) == ["fp32", "prune50-qat fp32", "int8 (post-training)", "prune50-qat int8"]
    for m in res.values():
        assert {"map50", "map50_95", "dice_full", "ms", "mb"} <= set(m) and 0 <= m["dice_full"] <= 1
    assert res["prune50-qat fp32"]["params"] < 0.75 * res["fp32"]["params"]
    assert res["prune50-qat fp32"]["gflops"] < res["fp32"]["gflops"]
    assert json.loads((run / "compress.json").read_text())["results"]["prune50-qat int8"]["map50"] == \
        res["prune50-qat int8"]["map50"]
    ck = torch.load(product, weights_only=True)
    pruned = torch.load(run / "pruned.pt", weights_only=True)
    assert ck["config"]["widths"] == pruned["config"]["widths"] and ck["config"]["qat"] is True
    assert ck["config"]["init"] == str((run / "pruned.pt").resolve()) and ck["config"]["lr0"] == pytest.approx(2e-4)
    full = dict(sites(load_checkpoint(weights)[0]))
    for name, n in ck["config"]["widths"].items():  # halved in multiples of 8; 8 channels stay
        c = full[name][0].conv.out_channels
        assert n == (c if c <= 8 else c // 2) and n % 8 == 0, (name, c, n)


def test_a_pruned_checkpoint_goes_through_every_command(compressed, tmp_path, capsys):
    """evaluate.py, export.py (its program equals the eager network), predict.py (the checkpoint and its program
    predict alike) and --resume all load the smaller network from its own checkpoint."""
    tmp, weights, _ = compressed
    run = tmp / "runs" / "camtl" / "exp-prune50-qat"
    product = run / "weights" / "yolov8c-camtl.pt"
    model, cfg = load_checkpoint(product)
    assert cfg["widths"] and count_params(model) < 0.75 * count_params(load_checkpoint(weights)[0])
    m = evaluate.main(["--weights", str(product), "--device", "cpu"])
    assert 0 <= m["dice_full"] <= 1
    export.export(model, 64, tmp_path / "p.pt2", verbose=False)
    prog, meta = export.load_program(tmp_path / "p.pt2")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want = export.deployable(model)(x)
    got = prog(x)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got, want))
    src = tmp_path / "src"
    src.mkdir()
    img = next((tmp / "synth" / "angiography" / "segment" / "images").iterdir())
    (src / img.name).write_bytes(img.read_bytes())
    outs = {}
    for name, w in (("ckpt", product), ("prog", tmp_path / "p.pt2")):
        predict.main(["--weights", str(w), "--source", str(src), "--save-dir", str(tmp_path / name), "--conf",
                      "0.001", "--device", "cpu"])
        outs[name] = (tmp_path / name / "masks" / img.name).read_bytes()
    assert outs["ckpt"] == outs["prog"]
    (run / "pruned.pt").rename(tmp_path / "moved.pt")  # last.pt holds what --resume needs: not `init`
    train.main(["--stage", "camtl", "--resume", str(run), "--set", "epochs=2"])
    assert "qat: " in capsys.readouterr().out  # the resumed run trains with fake quantisation too
    rows = (run / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header, the fine-tune's epoch, the resumed one
    assert torch.load(product, weights_only=True)["config"]["widths"] == cfg["widths"]


def test_pruning_alone_needs_no_extra_narrows_the_seg_head_when_asked_and_evaluate_scores_it(trained, monkeypatch):
    """compress.py --prune without --qat runs with torchao absent; --prune-seg narrows the seg head's hidden widths
    as well; evaluate.py loads the smaller network from its checkpoint and scores what compress.py measured on it."""
    tmp, weights = trained
    monkeypatch.setattr(export, "torchao_pt2e", lambda *a: (_ for _ in ()).throw(ImportError(export.NEEDS_TORCHAO)))
    res = compress.main(["--weights", str(weights), "--prune", "0.5", "--prune-seg", "--epochs", "1", "--val", "64"])
    assert list(res) == ["fp32", "prune50-seg fp32"]
    product = tmp / "runs" / "camtl" / "exp-prune50-seg" / "weights" / "yolov8c-camtl.pt"
    model, cfg = load_checkpoint(product)
    seg = {k: n for k, n in cfg["widths"].items() if k.startswith("seg_head.")}
    full = dict(sites(load_checkpoint(weights)[0]))
    assert seg and all(n < full[k][0].conv.out_channels for k, n in seg.items() if full[k][0].conv.out_channels > 8)
    assert any(n < full[k][0].conv.out_channels for k, n in seg.items())
    assert res["prune50-seg fp32"]["params"] == count_params(model) < res["fp32"]["params"]
    m = evaluate.main(["--weights", str(product), "--device", "cpu", "--batch", "1"])
    for k in ("map50", "map50_95", "dice_full"):
        assert m[k] == pytest.approx(res["prune50-seg fp32"][k], abs=1e-3), k
    with pytest.raises(SystemExit, match="--prune-seg narrows the seg head as --prune R does the rest"):
        compress.main(["--weights", str(weights), "--prune-seg", "--qat"])


def test_compress_mistakes_are_one_line(compressed, tmp_path, monkeypatch):
    tmp, weights, _ = compressed
    w = ["--weights", str(weights)]
    for argv, says in (([*w], "nothing to do; pass --prune R"),
                       ([*w, "--prune", "1.5"], "--prune 1.5: the fraction of channels to remove"),
                       ([*w, "--prune", "0.3", "--epochs", "0"], "--epochs 0: must be >= 1"),
                       (["--weights", str(tmp_path / "no.pt"), "--qat"], "no such file"),
                       ([*w, "--prune", "0.3", "--set", "epoch=3"], "unknown key 'epoch'"),
                       ([*w, "--prune", "0"], "--prune 0.0: the fraction of channels to remove")):
        with pytest.raises(SystemExit) as e:
            compress.main(argv)
        assert says in str(e.value) and "\n" not in str(e.value), str(e.value)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="compress.py runs as one process; under torchrun, fine-tune its pruned.pt"):
        compress.main([*w, "--prune", "0.3"])
    monkeypatch.delenv("WORLD_SIZE")
    stage1 = tmp_path / "ds1.pt"
    cfg = {**torch.load(weights, weights_only=True)["config"], "stage": "domainshift1"}
    torch.save({"model": CAMTL(camtl_config(cfg, "domainshift1"), verbose=False).state_dict(), "config": cfg,
                "stage": "domainshift1"}, stage1)
    with pytest.raises(SystemExit, match="a domainshift1 checkpoint; compress.py compresses the network that is"):
        compress.main(["--weights", str(stage1), "--prune", "0.3"])
    bad = tmp_path / "yolo.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="compress.py fine-tunes on the run's own data"):
        compress.main(["--weights", str(bad), "--prune", "0.3"])
    monkeypatch.setattr(export, "torchao_pt2e", lambda *a: (_ for _ in ()).throw(ImportError(export.NEEDS_TORCHAO)))
    with pytest.raises(SystemExit, match="--qat exports an int8 program, which needs the optional package torchao"):
        compress.main([*w, "--qat"])
    with pytest.raises(SystemExit, match=r"^key init: .*no\.pt"):
        train.main(["--stage", "camtl", "--set", *TINY_RUN, f"data={tmp / 'synth'}", f"project={tmp_path}",
                    f"init={tmp_path / 'no.pt'}"])
    with pytest.raises(SystemExit, match="widths: 'neck.nope' is not a prunable layer"):
        train.main(["--stage", "camtl", "--set", *TINY_RUN, f"data={tmp / 'synth'}", f"project={tmp_path}",
                    "widths={'neck.nope': 3}", "stage1=False"])


def test_qat_is_in_the_trained_model_and_its_ema_and_a_run_starts_from_init_s_ema(compressed, tmp_path):
    """qat=True: the model train.setup builds and its EMA copy (what validation scores) compute with fake
    quantisation. init=last.pt: the run starts from its EMA weights, as load_checkpoint reads a last.pt."""
    tmp, weights, _ = compressed
    last = weights.parent / "last.pt"
    sets = [*TINY_RUN, f"data={tmp / 'synth'}", f"project={tmp_path}", "seg_stride=4", "qat=True", f"init={last}"]
    run = train.setup(load_config("camtl", None, sets), Namespace(resume=None, device="cpu", set_keys=set()))
    for net in (run.model, run.ema.ema):
        assert sum(type(m) is export.FakeQuantConv2d for m in net.modules()) == export.fake_quantize(CAMTL(
            {**TINY, "seg_stride": 4}, verbose=False))
    ema = torch.load(last, weights_only=True)["ema"]
    assert all(torch.equal(run.model.state_dict()[k], v) for k, v in ema.items())


def test_a_pruned_stage_checkpoint_builds_its_own_widths(tmp_path):
    """The checkpoint a run starts from brings its widths (here a pruned stage-1 product that camtl finds in
    weights_dir), and GroupNorm layers narrowed to a width their groups do not divide get the groups it takes."""
    widths = {"backbone.9.cv1": 16, "seg_head.heads.1.0": 6}
    torch.manual_seed(0)
    stage1 = {**load_config("domainshift1", None, [*TINY_RUN, "gn_groups=4"]), "widths": widths}
    model = CAMTL(camtl_config(stage1, "domainshift1"), verbose=False)
    assert model.seg_head.heads[1][0].bn.num_groups == 2  # 6 channels: 2 groups of 3
    (tmp_path / "w").mkdir()
    torch.save({"model": model.state_dict(), "config": stage1, "stage": "domainshift1"},
               tmp_path / "w" / "yolov8c-domainshift1.pt")
    cfg = load_config("camtl", None, [*TINY_RUN, f"weights_dir={tmp_path / 'w'}", "gn_groups=4"])
    net, _ = train.build_model(cfg, "camtl", print, verbose=False)
    assert cfg["widths"] == widths and net.backbone[9].cv1.conv.out_channels == 16
    assert torch.equal(net.seg_head.heads[1][0].bn.weight, model.seg_head.heads[1][0].bn.weight)
