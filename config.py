"""Configuration as plain dicts: `configs/defaults.py` lists every key with its default and meaning.

A run resolves, in order: configs/defaults.py -> configs/{stage}.py -> the data config (configs/synthetic.py, or
--config FILE) -> --set key=value. A config file is Python: `config = {...}`, plus optional per-stage dicts
(`camtl = {...}`) that apply on top for that stage only. Unknown keys and wrong types stop the run with one line
naming the key (and the keys it was probably meant to be).
"""
import ast
import difflib
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STAGES = ("domainshift1", "camtl")  # in training order; each has its configs/{stage}.py
DEFAULTS = runpy.run_path(str(ROOT / "configs" / "defaults.py"))["config"]


def read_config_file(path, stage):
    """A config file's `config` dict, then its per-stage dict (e.g. `camtl = {...}`) for this stage."""
    if not Path(path).is_file():
        raise SystemExit(f"--config: no such file {path}")
    ns = runpy.run_path(str(path))
    return {**ns.get("config", {}), **ns.get(stage, {})}


def check_key(key, value, source):
    """The value, converted (int -> float, tuple -> list) when the default's type asks for it; unknown keys and
    wrong types are errors that name the key (and suggest close matches)."""
    if key not in DEFAULTS:
        near = difflib.get_close_matches(key, DEFAULTS, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise SystemExit(f"{source}: unknown key '{key}'{hint} (configs/defaults.py lists every key)")
    want = DEFAULTS[key]
    if isinstance(want, bool) or isinstance(value, bool):  # bool is an int subclass: compare exactly
        ok = type(value) is type(want)
    elif isinstance(want, float):
        ok = isinstance(value, (int, float))
    elif isinstance(want, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    elif key == "scale":  # a name, or a (depth, width, max_channels) triple
        ok = isinstance(value, str) or isinstance(value, (list, tuple)) and len(value) == 3
    else:
        ok = isinstance(value, type(want))
    if not ok:
        raise SystemExit(f"{source}: key '{key}' expects {type(want).__name__} (default {want!r}), got {value!r}")
    if isinstance(want, float):
        return float(value)
    return list(value) if isinstance(value, tuple) else value


def parse_set(items):
    """["epochs=5", "camtl_ratio=[1,2]", "optimizer=AdamW"] -> {key: Python value}; bare words stay strings."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k.strip()] = v  # a bare string such as cosine or /data/root
    return out


def load_config(stage, config_file=None, sets=()):
    """The resolved config of a stage (a new dict, with "stage" set)."""
    cfg = dict(DEFAULTS)
    data_file = config_file or "configs/synthetic.py"
    layers = [(ROOT / "configs" / f"{stage}.py", f"configs/{stage}.py"),
              (Path(config_file) if config_file else ROOT / data_file, data_file)]
    for path, name in layers:
        for k, v in read_config_file(path, stage).items():
            cfg[k] = check_key(k, v, name)
    for k, v in parse_set(sets).items():
        cfg[k] = check_key(k, v, "--set")
    if cfg["imgsz"] % 32:
        raise SystemExit(f"key 'imgsz' must be a multiple of 32, got {cfg['imgsz']}")
    if len(cfg["camtl_ratio"]) not in (2, 3) or min(cfg["camtl_ratio"]) < 0:
        raise SystemExit(f"key 'camtl_ratio' expects [det, seg] or [det, seg, source], got {cfg['camtl_ratio']}")
    cfg["stage"] = stage
    return cfg


def format_config(cfg, width=110):
    """`config: k=v k=v ...` wrapped at width, as printed at the start of a run."""
    lines, line = [], "config:"
    for k, v in cfg.items():
        item = f" {k}={v!r}"
        if len(line) + len(item) > width:
            lines.append(line)
            line = "       "
        line += item
    return "\n".join(lines + [line])
