"""The suite's slowest artefacts, built in the background: `python export.py` twice, as a user runs it, the default
compiled program of a tiny checkpoint and (when torchao is installed) --int8 of a lively, pruned one. Each is mostly one
single-threaded C++ build of about a minute, so conftest.py queues them as soon as the tests are collected, when a
selected test needs them, and they build while the tests before tests/test_export.py run; its `cli_builds` fixture
waits for them (`result`). Likewise Inductor's kernels for test_compile.py's Block: on a fresh machine their C++
builds take about 30 s, so a background process compiles the same Block after the exports and leaves them in
Inductor's cache, and the test (fixture `inductor_cache`, run last) then compiles it again from that cache."""
import contextlib
import copy
import importlib.util
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

import synthetic
from model import CAMTL
from modules import CTAM, Conv, to_dualbn
from prune import prune

REPO = Path(__file__).resolve().parent.parent
TINY = {"scale": [0.33, 0.125, 1024], "dual_bn": True, "imgsz": 64}
_jobs = {}  # name -> {argv, cwd, env, out, log, extra, proc: its Popen once started, error, done: threading.Event}
_lock, _busy, _ended, _dir = threading.Lock(), [], threading.Event(), []  # _busy: [True] while the thread runs


def randomise(model, seed=0):
    """BatchNorm statistics and affine far from identity (so folding is really exercised, each DualBN branch
    differently) and attention gates open (so CTAM/CSAM/FPMA reach the outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t, lo, hi in ((m.running_mean, -0.2, 0.2), (m.running_var, 0.5, 1.5),
                                  (m.weight, 0.7, 1.3), (m.bias, -0.2, 0.2)):
                    t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
        for name, p in model.named_parameters():
            if name.split(".")[-1] == "gate":
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)
    return model.eval()


def lively(model, seed=1):
    """Conv weights at He scale (variance 2 / fan-in): the default init shrinks the signal layer by layer, so a tiny
    random network's outputs are nearly constant and any quantiser, broken or not, would reproduce them. Here a
    quantiser calibrated on the wrong range (zeros, or images x 0.1) leaves vessel logits with correlation 0.74-0.88
    and boxes 0.4-0.6 px off on average; a working one, > 0.99 and < 0.1 px."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad:  # not DFL's frozen bin values
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel()) ** 0.5)
    return model


def camtl_checkpoint(path):
    """The randomised tiny camtl checkpoint (seed 0) at path, as test_export.py's tests use it -> path."""
    torch.manual_seed(0)
    model = randomise(CAMTL(TINY, verbose=False))
    torch.save({"model": model.state_dict(), "config": {**model.cfg, "workers": 0}, "stage": "camtl"}, path)
    return path


class Block(torch.nn.Module):
    """The unusual part of the network for a compiler: a DualBN Conv, then CTAM's attention as P3 runs it (queries
    pooled 2x2, SDPA on strided views, pooled keys, the output upsampled back, the key-attention maps) in
    channels_last."""

    def __init__(self):
        super().__init__()
        self.conv = to_dualbn(Conv(8, 16, 3))
        self.ctam = CTAM(16, (8,), dim=16, heads=4, tokens=16, qpool=2)
        torch.nn.init.uniform_(self.ctam.gate, -1, 1)

    def forward(self, x):
        y, maps = self.ctam(self.conv(x), [x], need_attn=True)
        return y, maps[0]


def block_step(m, x):
    """Forward + a loss on both outputs + backward -> ([y, map], the parameters' gradients)."""
    m.zero_grad()
    y, a = m(x)
    (y.square().mean() + a.square().sum()).backward()
    return [y.detach(), a.detach()], [p.grad for p in m.parameters() if p.grad is not None]


def compiled_block():
    """(eager Block, its Inductor-compiled copy, input x), one thread, as test_compile.py runs them."""
    torch.set_num_threads(1)  # the kernels Inductor writes depend on the thread count, and so does its cache key
    torch.manual_seed(0)
    block = Block().to(memory_format=torch.channels_last).train()
    compiled = copy.deepcopy(block)
    compiled.compile(dynamic=False)
    return block, compiled, torch.rand(2, 8, 16, 16).contiguous(memory_format=torch.channels_last)


def start(exports=True, inductor=True):
    """Queue the builds (once each): the compiled program of the randomised tiny checkpoint, and --int8 of a lively
    one with the fine vessel path (seg_stride=4), pruned by half (prune.py), calibrated on a tiny synthetic set; and
    the Block's Inductor kernels, into Inductor's cache. They run one after another, in the order the tests need them,
    so that with the tests' own process two processes share the 2 cores (all three at once slowed the tests beside
    them by half)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}  # the tests have the other core
    if exports and "compiled" not in _jobs:
        d = Path(tempfile.mkdtemp(prefix="nanocamtl-prebuild-"))
        _dir.append(d)
        ck = camtl_checkpoint(d / "camtl.pt")
        _queue("compiled", ["export.py", "--weights", str(ck), "--out", str(d / "camtl_aoti.pt2")], REPO, env,
               d / "camtl_aoti.pt2", d / "compiled.log", (ck,))
        if importlib.util.find_spec("torchao"):
            torch.manual_seed(0)  # a pruned network with the fine vessel path: both through the int8 build
            model = lively(randomise(CAMTL({**TINY, "seg_stride": 4}, verbose=False)))
            widths = prune(model, 0.5)
            ck8 = d / "best.pt"
            torch.save({"model": model.state_dict(), "config": {**model.cfg, "widths": widths, "workers": 0},
                        "stage": "camtl"}, ck8)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # collecting
                root = synthetic.make_synthetic(d / "syn", n=6, imgsz=64)  # 4 training images per task
            argv = ["export.py", "--weights", str(ck8), "--int8", "--calib-data", str(root), "--calib", "8"]
            _queue("int8", argv, REPO, env, d / "best.int8.pt2", d / "int8.log", (ck8, root))
    if inductor and "inductor" not in _jobs:
        code = "import prebuild; b, c, x = prebuild.compiled_block(); prebuild.block_step(c, x)"
        path = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        _queue("inductor", ["-c", code], Path(__file__).parent, {**env, "PYTHONPATH": path}, None, None, ())


def _queue(name, argv, cwd, env, out, log, extra):
    """One build more for the background thread (started if none is running)."""
    with _lock:
        _jobs[name] = {"argv": argv, "cwd": cwd, "env": env, "out": out, "log": log, "extra": extra, "proc": None,
                       "error": None, "done": threading.Event()}
        if not _busy:  # decided under the lock, as the thread decides to end: a job queued meanwhile is never lost
            _busy.append(True)
            threading.Thread(target=_run_all, daemon=True).start()


def _run_all():
    """The background thread: each queued build in turn, until none is left or the session ends."""
    while True:
        with _lock:
            todo = [j for j in _jobs.values() if j["proc"] is None and not j["done"].is_set()]
            if not todo or _ended.is_set():
                for j in todo:
                    j["done"].set()
                _busy.clear()
                return
            j = todo[0]
            try:
                with open(j["log"] or os.devnull, "w") as f:  # a file, not a pipe: an unread pipe, once full, blocks
                    j["proc"] = subprocess.Popen([sys.executable, *j["argv"]], cwd=j["cwd"], env=j["env"], stdout=f,
                                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
            except OSError as e:  # told to its waiter, not lost with this thread
                j["error"] = e
                j["done"].set()
                continue
        j["proc"].wait()
        j["done"].set()


def _wait(name, timeout):
    """The build `name` ended within timeout seconds -> its Popen."""
    j = _jobs[name]
    if not j["done"].wait(timeout):
        raise TimeoutError(f"the background build {name!r} took over {timeout} s")
    if j["proc"] is None:
        raise RuntimeError(f"the background build {name!r} did not start: {j['error'] or 'the session is ending'}")
    return j["proc"]


def result():
    """Wait for the builds -> {"compiled": (output path, exit code, printed text, checkpoint), "int8": (the same,
    data root)}."""
    start(inductor=False)
    out = {}
    for k in ("compiled", "int8"):
        if k in _jobs:
            j, code = _jobs[k], _wait(k, 900).returncode
            out[k] = (j["out"], code, j["log"].read_text(), *j["extra"])
    return out


def inductor_warm():
    """Wait for the Block's kernels to be in Inductor's cache (queued now if they were not). Whether that worked
    does not matter: the test compiles the Block itself either way."""
    start(exports=False)
    try:
        _wait("inductor", 300)
    except (TimeoutError, RuntimeError):
        with _lock:
            _jobs["inductor"]["done"].set()  # if it has not started, it never will
            proc = _jobs["inductor"]["proc"]
        if proc is not None:
            _kill(proc)


def stop():
    """End of the session: the queue is emptied, a build still running stopped, their folder removed."""
    _ended.set()
    with _lock:
        procs = [j["proc"] for j in _jobs.values() if j["proc"] is not None]
    for proc in procs:
        _kill(proc)
    for d in _dir:
        shutil.rmtree(d, ignore_errors=True)


def _kill(proc):
    """A build and everything it started (Inductor's compile workers, the C++ compilers): its own process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
