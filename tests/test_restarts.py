"""Runs that survive restarts: SIGTERM inside an epoch writes a checkpoint that continues it exactly, --resume auto
continues the run a job script started, and a torchrun restart (--max-restarts) continues the run of its first
start. Every run here has the fine vessel path (seg_stride=4), so resume and DDP are checked with it too. Tiny
widths, 64 px, a few seconds per run."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from types import SimpleNamespace

import pytest
import torch
from test_ddp import gloo
from test_train import TINY

import evaluate
import synthetic
import train

ROOT = Path(__file__).resolve().parent.parent
# 10 batches an epoch (det, seg, fundus x 3: the 2-batch fundus stream starts over inside each epoch), a step every
# 2 batches, a loader worker (its seed drawn from the RNG as each epoch begins), the fine vessel path
REPLAY = ["camtl_ratio=[1,1,3]", "nbs=4", "workers=1", "plots=False", "epochs=2", "seg_stride=4"]


def run(tmp, stage, *extra, resume=None):
    argv = ["--stage", stage, "--set", *TINY, f"data={tmp / 'synth'}", f"project={tmp / 'runs'}",
            f"weights_dir={tmp / 'weights'}", *extra]
    return train.main(argv + (["--resume", str(resume)] if resume is not None else []))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A synthetic set and an uninterrupted camtl run of two epochs to compare with (from random init: what stage 1
    hands over plays no part in resuming)."""
    tmp = tmp_path_factory.mktemp("restarts")
    synthetic.make_synthetic(tmp / "synth", n=6, imgsz=64, seed=0)
    full, _ = run(tmp, "camtl", *REPLAY, "name=full")
    return tmp, full


def same_run(a, b):
    """results.csv byte for byte, and last.pt's weights, EMA, optimizer moments and RNG exactly."""
    assert (a / "results.csv").read_bytes() == (b / "results.csv").read_bytes()
    ca, cb = (torch.load(d / "weights" / "last.pt", weights_only=True) for d in (a, b))
    assert ca["epoch"] == cb["epoch"] and ca["ema_updates"] == cb["ema_updates"]
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"]) and torch.equal(ca["rng"]["numpy"], cb["rng"]["numpy"])
    assert ca["rng"]["python"] == cb["rng"]["python"]
    for part in ("model", "ema"):
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), part
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def sigterm_at_step(monkeypatch, n):
    """SIGTERM arrives during the n-th optimizer step (counting from 1)."""
    real, calls = train.optimizer_step, {"n": 0}

    def step(run, where="the end of the window"):
        calls["n"] += 1
        if calls["n"] == n:
            train.on_sigterm(signal.SIGTERM, None)  # inside the epochs: noted, the step finishes
        return real(run, where)
    monkeypatch.setattr(train, "stop_asked", False)
    monkeypatch.setattr(train, "optimizer_step", step)


@pytest.mark.parametrize("step,where,then", [(5, "epoch 1 to batch 10/10", "its validation"),
                                             (8, "epoch 2 to batch 6/10", "batch 7")])
def test_sigterm_inside_an_epoch_resumes_to_the_uninterrupted_run(synth, monkeypatch, capsys, step, where, then):
    """At the last batch of the first epoch (its validation still to do; no epoch complete) and inside a later
    epoch (the loaders' position, the fundus stream started over, running loss sums and RNG restored): the resumed
    run equals the uninterrupted one."""
    tmp, full = synth
    sigterm_at_step(monkeypatch, step)
    name = f"cut{step}"
    with pytest.raises(SystemExit, match=f"holds {where}; continue with  python train.py --stage camtl --resume "):
        run(tmp, "camtl", *REPLAY, f"name={name}")
    cut = tmp / "runs" / "camtl" / name
    ck = torch.load(cut / "weights" / "last.pt", weights_only=True)
    assert ck["mid_epoch"]["batch"] == int(where.split()[4].split("/")[0]) and ck["epoch"] == (step - 1) // 5 - 1
    monkeypatch.setattr(train, "stop_asked", False)
    capsys.readouterr()
    run(tmp, "camtl", *REPLAY, resume=cut)
    out = capsys.readouterr().out
    assert f"from epoch {ck['epoch'] + 2}, {then} with the run's own config" in out
    assert "init from last.pt (resume)" in out
    assert "domainshift1.pt" not in out and "COCO" not in out  # no stage-1/COCO messages that do not apply
    same_run(full, cut)
    with pytest.raises(SystemExit, match="has finished its 2 epochs; to train on, add --set epochs=N with N > 2"):
        run(tmp, "camtl", *REPLAY, resume=cut)


def test_sigterm_outside_the_epochs_stops_at_once_and_a_second_one_inside_waits(monkeypatch):
    """Set-up (a process group waiting for a dead peer) never reaches an optimizer step: SIGTERM there stops at
    once. Inside the epochs a second SIGTERM (a cluster signals every process, then torchrun its workers again)
    still lets the step finish and the checkpoint be written."""
    monkeypatch.setattr(train, "stop_asked", False)
    with pytest.raises(KeyboardInterrupt):
        train.on_sigterm(signal.SIGTERM, None)
    monkeypatch.setattr(train, "training", True)
    train.on_sigterm(signal.SIGTERM, None)
    train.on_sigterm(signal.SIGTERM, None)
    assert train.stop_asked is True


def test_a_resumed_run_repeats_the_last_validation_in_rows_without_one(synth):
    """With val_interval > 1 a row of an epoch without validation repeats the last validation's metrics; a resumed
    run must have them too."""
    tmp, full = synth
    ck = torch.load(full / "weights" / "last.pt", weights_only=True)
    args = SimpleNamespace(resume=str(full), set_keys={"epochs"}, device="cpu")  # extended by one epoch
    run = train.setup({**ck["config"], "epochs": 3}, args, log=lambda *a, **k: None)
    train.restore(run)
    assert run.metrics == ck["metrics"] and run.metrics["fitness"] > 0


def test_resume_auto_starts_then_continues_then_finishes_the_same_run(synth, monkeypatch, capsys):
    """The job script's one command line: the first start makes runs/camtl/{name}; killed after epoch 1 and
    started again it continues there; started once more after the end it only saves the stage's product again."""
    tmp, full = synth
    real, calls = evaluate.validate, {"n": 0}

    def killed_in_epoch_2(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(evaluate, "validate", killed_in_epoch_2)
    auto = tmp / "runs" / "camtl" / "job"
    with pytest.raises(SystemExit, match=f"holds epoch 1; continue with  python train.py --stage camtl --resume {auto}"):
        run(tmp, "camtl", *REPLAY, "name=job", resume="auto")  # Ctrl-C in epoch 2
    assert "--resume auto: no" in capsys.readouterr().out
    assert torch.load(auto / "weights" / "last.pt", weights_only=True)["epoch"] == 0
    monkeypatch.setattr(evaluate, "validate", real)
    run(tmp, "camtl", *REPLAY, "name=job", "resume=auto")  # YOLOv8's key=value form of the same flag
    out = capsys.readouterr().out
    assert f"resuming {auto} from epoch 2 with the run's own config\n" in out  # the job's own --set: not "ignored"
    same_run(full, auto)
    assert sorted(p.name for p in auto.parent.iterdir() if p.name.startswith("job")) == ["job"]
    product = auto / "weights" / "yolov8c-camtl.pt"
    product.unlink()
    run_dir, metrics = run(tmp, "camtl", *REPLAY, "name=job", resume="auto")
    assert "has trained its 2 epochs; its best weights are validated and saved again" in capsys.readouterr().out
    assert run_dir == auto and product.is_file() and metrics["fitness"] >= 0
    same_run(full, auto)


def worker_of_rank(agent, rank, start):
    """-> the pid of torchrun's worker process of this RANK in its start number `start` (0: the first; from the
    worker's environment), or None."""
    kids = subprocess.run(["pgrep", "-P", str(agent)], capture_output=True, text=True).stdout.split()
    for pid in kids:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and f"TORCHELASTIC_RESTART_COUNT={start}".encode() in env:
            return int(pid)
    return None


@gloo
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_torchrun_restarts_continue_the_run_of_the_first_start(synth):
    """Under torchrun --max-restarts=2: rank 1 killed (SIGKILL) after an epoch, then, in the restarted group,
    stopped (SIGTERM: both ranks agree to stop after one step and rank 0 saves inside the epoch). Each time
    torchrun restarts both ranks with the same command and they continue the first start's run folder from its
    last.pt: one folder, each epoch once, identical replicas, exit 0."""
    tmp, _ = synth
    project = tmp / "elastic"
    sets = [*TINY, f"data={tmp / 'synth'}", f"project={project}", f"weights_dir={tmp / 'weights'}", "epochs=8",
            "plots=False", "seg_stride=4"]  # 8: the SIGTERM, one epoch after the restart, must land before the end
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=2",
           "--monitor-interval=0.1", "--standalone", str(ROOT / "train.py"), "--stage", "domainshift1", "--device",
           "cpu", "--set", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    log = open(tmp / "elastic.log", "w")
    agent = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    last = project / "domainshift1" / "exp" / "weights" / "last.pt"
    t0, at, held = time.monotonic(), [], {}  # the epochs last.pt held when each signal went out

    def epochs_held():  # read again only when the file changed: a poll must stay far shorter than an epoch
        try:
            st = last.stat()
            key = (st.st_ino, st.st_mtime_ns, st.st_size)  # os.replace gives each save a new inode
        except FileNotFoundError:
            return 0
        if key not in held:
            held.clear()
            held[key] = torch.load(last, weights_only=True)["epoch"] + 1
        return held[key]
    for start, sig in ((0, signal.SIGKILL), (1, signal.SIGTERM)):
        base = pid = None  # last.pt's epochs when this start's rank 1 appeared: it signals after one epoch of its own
        while len(at) == start and agent.poll() is None and time.monotonic() - t0 < 240:
            done = epochs_held()
            pid = pid or worker_of_rank(agent.pid, 1, start)
            base = done if base is None and pid else base
            if pid and done > base:
                os.kill(pid, sig)
                at.append(done)
            time.sleep(0.05)
    agent.wait(timeout=300)
    log.close()
    out = (tmp / "elastic.log").read_text()
    assert len(at) == 2 and at[1] < 8, (at, out[-3000:])
    assert agent.returncode == 0, out[-3000:]
    # the SIGKILL: the next start resumes after a whole epoch; the SIGTERM: a stop after a step, inside an epoch
    resumed = re.findall(rf"resuming {re.escape(str(last.parent.parent))} from epoch (\d+)(, its validation)? with", out)
    stopped = re.findall(rf"interrupted: {re.escape(str(last))} holds epoch (\d+) to batch 1/1; continue with", out)
    assert len(resumed) == 2 and len(stopped) == 1, out[-3000:]
    assert resumed[0] == (str(int(resumed[0][0])), "") and int(resumed[0][0]) > at[0]
    assert resumed[1] == (stopped[0], ", its validation") and int(stopped[0]) > at[1]
    assert "max weight difference across 2 ranks 0\n" in out  # the replicas, fine path included, stayed equal
    assert out.count("domainshift1 done") == 1  # only rank 0 reports, once
    assert [p.name for p in (project / "domainshift1").iterdir()] == ["exp"]
    epochs = [line.split(",")[0] for line in (last.parent.parent / "results.csv").read_text().splitlines()[1:]]
    assert epochs == [str(e) for e in range(1, 9)]
    assert (last.parent / "yolov8c-domainshift1.pt").is_file()


def test_a_stop_inside_an_epoch_resumed_on_another_number_of_ranks_lands_on_the_same_images():
    """Every rank takes its share of one permutation, so batch 6 of 10 on one rank is batch 3 of 5 on two (and
    batch 2 of 5 on two is batch 4 of 10 on one); the run says it is no longer the uninterrupted one."""
    said = []
    mid = {"epoch": 0, "batch": 6, "nb": 10, "world": 1, "sum": {}, "n": {}, "rng": None}
    two = SimpleNamespace(world=2, nb=5, log=said.append)
    assert train.resharded(two, mid)["batch"] == 3
    one = SimpleNamespace(world=1, nb=10, log=said.append)
    assert train.resharded(one, {**mid, "batch": 2, "nb": 5, "world": 2})["batch"] == 4
    assert train.resharded(two, {**mid, "batch": 10})["batch"] == 5  # never past the epoch's end
    assert "batch 6/10 there is batch 3/5 here" in said[0] and "not the uninterrupted run's" in said[0]
