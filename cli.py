"""What a user types and watches: the command lines of evaluate.py and predict.py as YOLOv8 users type them
(argparse flags, then KEY=VALUE settings over them: `conf=0.5 split=test save_json`; a --device checked against
this machine), and the progress line of every loop (training epochs, validation)."""
import argparse
import sys
import time
from pathlib import Path

import torch

from config import check_device, did_you_mean


def parse_settings(ap, argv=None):
    """ap's flags, then the KEY=VALUE settings (a positional `settings` argument) over them -> argparse.Namespace.
    A key is a flag's name (without --, with _ for -); its value goes through that flag's type and choices; a switch
    takes true, false or the bare key. A mistake is one line naming the setting (an unknown key: the keys it was
    probably meant to be)."""
    try:
        a = ap.parse_intermixed_args(argv)
    except argparse.ArgumentError as e:
        ap.error(str(e))
    keys = [k for k in vars(a) if k != "settings"]
    for item in a.settings:
        k, eq, v = item.partition("=")
        if k not in keys:
            hint = did_you_mean(k, keys) if eq else "; expected KEY=VALUE"
            raise SystemExit(f"{item}: unknown key '{k}'{hint} (keys: {', '.join(keys)})")
        if ap.get_default(k) is False:  # a switch
            if eq and v.lower() not in ("true", "false"):
                raise SystemExit(f"{item}: {k} is a switch: {k}=true, {k}=false, or {k} alone")
            setattr(a, k, not eq or v.lower() == "true")
        elif not eq:
            raise SystemExit(f"{item}: expected {k}=VALUE")
        else:
            try:
                ap.parse_args([f"--{k.replace('_', '-')}={v}"], namespace=a)
            except argparse.ArgumentError as e:
                raise SystemExit(f"{item}: {e.message}") from None
    return a


def settings_arg(ap):
    """The positional KEY=VALUE settings, with the help that says how they work."""
    ap.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                    help="any flag as YOLOv8 takes it: its name without -- and with _ for - (conf=0.5 split=test "
                    "save_json=true); these come after the flags and win over them")


def pick_device(flag, prog):
    """--device as typed -> torch.device, or one line saying why it cannot be had here."""
    if "," in flag:
        raise SystemExit(f"--device {flag}: {prog} runs on one device; pick one, e.g. --device cuda:0")
    want = check_device(flag, "--device")  # cpu, cuda, cuda:N; a bare GPU index N means cuda:N
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {flag}: CUDA is not available here (no GPU, or a CPU-only torch); "
                         "use --device cpu")
    if want.startswith("cuda:") and int(want[5:]) >= torch.cuda.device_count():
        raise SystemExit(f"--device {flag}: this machine has {torch.cuda.device_count()} GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device(want)


# the numeric flags' allowed values: (test, what the message says)
RANGES = {"imgsz": (lambda v: v > 0 and v % 32 == 0, "a positive multiple of 32"), "batch": (lambda v: v >= 1, ">= 1"),
          "workers": (lambda v: v >= 0, ">= 0"), "conf": (lambda v: 0 <= v <= 1, "in [0, 1]"),
          "iou": (lambda v: 0 <= v <= 1, "in [0, 1]")}


def check_flags(a):
    """--weights is a file, and each numeric flag given is in RANGES; else one line naming the flag."""
    if not Path(a.weights).is_file():
        what = "a directory, not a file" if Path(a.weights).is_dir() else "no such file"
        raise SystemExit(f"--weights {a.weights}: {what}; expected a .pt checkpoint (or a .pt2 to predict)")
    for k, (ok, allowed) in RANGES.items():
        v = getattr(a, k, None)
        if v is not None and not ok(v):
            raise SystemExit(f"--{k} {v}: must be {allowed}")


# -----------------------------------------------------------------------------
# the progress line (hand-written, no tqdm)


class Progress:
    """One phase's progress (an epoch, a validation). On a terminal: one self-updating line with a bar, the count,
    the caller's text (losses), items/s and ETA. When stdout is a file or a pipe: plain lines every `every` steps
    and at the end, with no control characters, flushed at once (tail -f, tee and nohup see them as they come)."""

    def __init__(self, total, desc, every=10, unit="img", file=None, enabled=True, start=0):
        """start: steps done before this clock started (an epoch resumed inside), left out of the rate and ETA."""
        self.total, self.desc, self.every, self.unit, self.enabled = total, desc, max(1, every), unit, enabled
        self.file = file or sys.stdout
        self.tty = self.file.isatty()
        self.t0, self.items, self.last, self.start = time.time(), 0, "", start

    def update(self, i, text="", items=0):
        """Step i (1-based) done; items processed in it (for the rate); text: e.g. the running losses."""
        self.items += items
        if not self.enabled or not (self.tty or i % self.every == 0 or i == self.total):
            return
        dt = max(time.time() - self.t0, 1e-9)
        eta = dt / max(i - self.start, 1) * (self.total - i)
        rate = f"  {self.items / dt:.1f} {self.unit}/s" if self.items else ""
        line = f"{self.desc} {i:>{len(str(self.total))}}/{self.total} {text}{rate}  ETA {eta / 60:.1f} min"
        if self.tty:
            width = 20
            done = round(width * i / max(self.total, 1))
            bar = "█" * done + "·" * (width - done)
            pad = " " * max(len(self.last) - len(line) - width - 1, 0)
            self.last = f"{bar} {line}"
            print(f"\r{self.last}{pad}", end="" if i < self.total else "\n", file=self.file, flush=True)
        else:
            print(line, file=self.file, flush=True)
