"""The speed levers change no numbers: channels_last and torch.compile give eager's outputs and gradients, and
compile makes one graph per (tasks, domain), never one per step; in the real train loop its graphs stay within
the count train.compile_models states, and a compiler that fails leaves the run eager, not ended."""
import copy
import json

import pytest
import torch
import prebuild
from prebuild import TINY, randomise

import synthetic
import train
from model import CAMTL, stage_setup

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_camtl():
    torch.manual_seed(0)
    model = CAMTL({k: v for k, v in TINY.items() if k != "imgsz"}, verbose=False)
    return stage_setup(randomise(model), "camtl").train()


def step(model, x, tasks=("det", "seg"), domain="target"):
    """Forward in a domain + a loss touching every output (attention maps included) + backward ->
    (outputs flattened, {name: grad})."""
    model.zero_grad(set_to_none=True)
    with model.domain(domain):
        det, seg = model(x, tasks=tasks, need_attn=True)
    outs = list(det or []) + [seg[k] for k in ("p3", "p4", "p5", "full")] + seg["attn"]
    sum(o.float().square().mean() for o in outs).backward()
    return [o.detach() for o in outs], {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_close(a, b, tol=1e-4):
    """Lists of tensors a, b agree: max |a - b| <= tol * max |b|, over the whole list (as one flat vector)."""
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
    err = max((x - y).abs().max().item() for x, y in zip(a, b))
    scale = max(y.abs().max().item() for y in b)
    assert err <= tol * scale, f"max error {err:.3g} vs scale {scale:.3g}"


def test_channels_last_gives_the_same_outputs_and_gradients():
    """In float64, so that what remains is layout handling (the attention's strided views), not float32's
    summation order: BN weight gradients are sums with cancellation and differ by ~5e-4 of their size in fp32."""
    model, x = tiny_camtl().double(), torch.rand(2, 3, 64, 64, dtype=torch.float64)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert cl.backbone[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    out, grads = step(model, x)
    out_cl, grads_cl = step(cl, x.contiguous(memory_format=torch.channels_last))
    assert_close(out_cl, out, 1e-9)
    assert grads.keys() == grads_cl.keys() and len(grads) > 100
    assert_close([grads_cl[k] for k in grads], list(grads.values()), 1e-9)


@pytest.fixture
def inductor_cache():
    """The Block's kernels, compiled in the background since collection (tests/prebuild.py)."""
    prebuild.inductor_warm()


def test_inductor_compiled_block_matches_eager(inductor_cache):
    block, compiled, x = prebuild.compiled_block()
    res = [prebuild.block_step(m, x) for m in (block, compiled)]
    assert_close(res[1][0], res[0][0])
    assert len(res[1][1]) == len(res[0][1]) > 5
    assert_close(res[1][1], res[0][1])


def test_compile_makes_one_graph_per_tasks_and_domain():
    """train.compile_models on a tiny CA-MTL (aot_eager: dynamo's graphs and autograd without inductor's C++ build,
    which takes minutes on a CPU; the inductor numerics are the test above): each (tasks, domain) compiles once,
    repeats compile nothing, and every output and gradient is eager's."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model, x = tiny_camtl(), torch.rand(2, 3, 64, 64)
    compiled, = train.compile_models([copy.deepcopy(model)], backend="aot_eager")
    assert set(compiled.state_dict()) == set(model.state_dict())  # checkpoints unchanged
    for tasks, domain in ((("det", "seg"), "target"), (("seg",), "source")):
        out, grads = step(model, x, tasks, domain)
        out_c, grads_c = step(compiled, x, tasks, domain)
        assert_close(out_c, out)
        assert_close([grads_c[k] for k in grads], list(grads.values()))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2
    for _ in range(2):
        step(compiled, x, ("det", "seg"), "target")
        step(compiled, x, ("seg",), "source")
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_auto_means_cuda_only():
    cfg = {"compile": "auto"}
    assert not train.use_compile(cfg, torch.device("cpu"))
    assert train.use_compile(cfg, torch.device("cuda"))
    assert train.use_compile({"compile": True}, torch.device("cpu"))
    assert not train.use_compile({"compile": False}, torch.device("cuda"))


@pytest.fixture(scope="module")
def odd_val(tmp_path_factory):
    """Synthetic data whose camtl val split has 3 segmentation images (a batch of 2, then a smaller one of 1) and
    no detection images (one graph fewer to trace); 6 training images per task."""
    root = tmp_path_factory.mktemp("compile") / "synth"
    synthetic.make_synthetic(root, n=9, imgsz=64, seed=0)  # 6 train / 3 val per task
    splits = json.loads((root / "splits.json").read_text())
    det = splits["angiography_detection"]
    det["test"], det["val"] = det.get("test", []) + det["val"], []
    (root / "splits.json").write_text(json.dumps(splits))
    return root


def train_compiled(root, backend, monkeypatch, capsys):
    """One camtl epoch through train.main with compile on and this backend: target det batches and replayed source
    seg batches (camtl_ratio [1, 0, 1]), validation on the EMA -> (log, unique graphs compiled)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(train, "COMPILE_BACKEND", backend)
    sets = ["scale=[0.33,0.125,1024]", "imgsz=64", "batch=2", "nbs=2", "workers=0", "attn_dim=16", "attn_heads=2",
            "attn_tokens=16", "warmup_min_iters=2", "epochs=1", "plots=False", "compile=True",
            "camtl_ratio=[1,0,1]", "lambda_cons=0", "lambda_align=0", f"data={root}",
            f"project={root.parent / 'runs'}", f"weights_dir={root / 'w'}"]
    capsys.readouterr()
    run_dir, metrics = train.main(["--stage", "camtl", "--device", "cpu", "--set", *sets])
    assert (run_dir / "weights" / "yolov8c-camtl.pt").is_file() and 0 <= metrics["dice_full"] <= 1
    return capsys.readouterr().out, counters["stats"]["unique_graphs"]


def test_compile_in_the_train_loop_stays_within_its_graph_count(odd_val, monkeypatch, capsys):
    """Dynamo's "eager" backend: its graphs, guards and recompiles without AOT autograd's tracing (which the test
    above covers). Training: det (target) and seg (source) batches, the model; validation: seg, the EMA, plus the
    smaller last batch: 4 graphs, none per step."""
    out, graphs = train_compiled(odd_val, "eager", monkeypatch, capsys)
    assert "compile on" in out and "torch.compile" not in out and " det " in out  # det batches trained
    assert graphs == 4 <= train.MAX_GRAPHS


def test_a_failing_compiler_leaves_the_run_eager_with_one_line(odd_val, monkeypatch, capsys):
    def no_compiler(gm, example_inputs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
    out, _ = train_compiled(odd_val, no_compiler, monkeypatch, capsys)
    lines = [ln for ln in out.splitlines() if "torch.compile" in ln]
    assert len(lines) == 1 and "training goes on eager" in lines[0] and "No working C++ compiler" in lines[0]
    assert "Traceback" not in out and "camtl done" in out
