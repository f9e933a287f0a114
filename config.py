"""Configuration as plain dicts: `configs/defaults.py` lists every key with its default and meaning.

A run resolves, in order: configs/defaults.py -> configs/{stage}.py -> the data config (configs/synthetic.py, or
--config FILE) -> --set key=value. A config file is Python: `config = {...}`, plus optional per-stage dicts
(`camtl = {...}`) that apply on top for that stage only.

Every value is checked where it enters (`check_key`), before anything is built or written: its type is the
default's, and RULES below says which values of that type are allowed. A mistake stops the run with one line
naming the key, the value, what is allowed and where the value came from (and, for an unknown key, the keys it
was probably meant to be). Checks that involve two keys run once the layers are merged (`check_config`).
"""
import ast
import difflib
import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STAGES = ("domainshift1", "camtl")  # in training order; each has its configs/{stage}.py
DEFAULTS = runpy.run_path(str(ROOT / "configs" / "defaults.py"))["config"]
SCALE_NAMES = ("n", "s", "m", "l", "x")  # model.SCALES; repeated here because model imports config
# keys added after checkpoints were written, at the value those older runs trained with (not today's default)
OLD_RUN_VALUES = {"attn_query_stride": 8, "ctam": True, "csam": True, "fpma": True, "xtam": False, "seg_stride": 8}


def saved_config(saved):
    """The full config of a checkpoint's saved one: a key it lacks takes its OLD_RUN_VALUES value if it has one
    (what that run computed), else today's default."""
    return {**DEFAULTS, **{k: v for k, v in OLD_RUN_VALUES.items() if k not in saved}, **saved}

# -----------------------------------------------------------------------------
# what each key allows, beyond its type: key -> (test of the value, what is allowed)


def at_least(lo):
    return (lambda v: v >= lo), f">= {lo}"


def interval(lo, hi, closed="[]"):
    """A range; closed tells which ends belong to it: "[]", "[)", "(]" or "()"."""
    def ok(v):
        return (v >= lo if closed[0] == "[" else v > lo) and (v <= hi if closed[1] == "]" else v < hi)
    return ok, f"in {closed[0]}{lo}, {hi}{closed[1]}"


def one_of(*choices):
    return (lambda v: v in choices), "one of " + ", ".join(map(str, choices))


def _is_scale(v):
    if isinstance(v, str):
        return v in SCALE_NAMES
    if len(v) != 3:
        return False
    d, w, mc = v
    nums = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (d, w))
    return nums and d > 0 and w > 0 and isinstance(mc, int) and not isinstance(mc, bool) and mc >= 8


def _is_ratio(v):
    counts = all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
    return len(v) in (2, 3) and counts and v[0] + v[1] > 0


def _is_regex(v):
    try:
        re.compile(v)
        return True
    except re.error:
        return False


NON_NEGATIVE = at_least(0)
# the augmentation's strengths (data.AUG; repeated here: config imports nothing), which `augment` may change
AUG_RANGES = {"fliplr": interval(0, 1), "flipud": interval(0, 1), "scale": interval(0, 1, "[)"),
              "translate": interval(0, 0.5), "brightness": interval(0, 1), "contrast": interval(0, 1, "[)"),
              "gamma": interval(0, 1)}


def _is_augment(v):
    if isinstance(v, bool):
        return True
    if not isinstance(v, dict):
        return False
    nums = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values())
    return nums and all(k in AUG_RANGES and AUG_RANGES[k][0](x) for k, x in v.items())


RULES = {
    # model
    "scale": (_is_scale, f"one of {', '.join(SCALE_NAMES)}, or [depth, width, max_channels] with depth and width "
                         "> 0 and max_channels an int >= 8"),
    "nc": at_least(1),
    "attn_dim": at_least(1),
    "attn_heads": at_least(1),
    "attn_tokens": at_least(1),
    "attn_query_stride": ((lambda v: v in (8, 16, 32, 64)), "one of 8 (every query), 16, 32, 64"),
    "gn_groups": at_least(1),
    # data
    "synthetic_n": at_least(1),
    "synthetic_preset": one_of("default", "hard"),  # synthetic.PRESETS; repeated here: config imports nothing
    "imgsz": ((lambda v: v > 0 and v % 32 == 0), "a positive multiple of 32 (the largest stride), e.g. 256 or 512"),
    "batch": at_least(1),
    "workers": NON_NEGATIVE,
    "group_regex": (_is_regex, "a Python regular expression (its first group keys a patient/video), or ''"),
    "camtl_ratio": (_is_ratio, "[det, seg] or [det, seg, source replay]: batch counts per cycle, ints >= 0, "
                               "det or seg > 0"),
    # weights and output
    "project": ((lambda v: v != ""), "a folder name, not empty"),
    "seed": interval(0, 2**32 - 1),
    # optimisation
    "epochs": at_least(1),
    "optimizer": one_of("SGD", "AdamW"),
    "lr0": NON_NEGATIVE,
    "lrf": interval(0, 1, "(]"),
    "momentum": interval(0, 1, "[)"),
    "weight_decay": NON_NEGATIVE,
    "nbs": at_least(1),
    "warmup_epochs": NON_NEGATIVE,
    "warmup_min_iters": NON_NEGATIVE,
    "warmup_momentum": interval(0, 1, "[)"),
    "warmup_bias_lr": NON_NEGATIVE,
    "clip_grad": ((lambda v: v > 0), "> 0"),
    "amp_dtype": one_of("fp16", "bf16"),
    "seg_stride": one_of(8, 4, 2),
    "augment": (_is_augment, "True, False, or a dict of the augmentation's strengths to change, each "
                + "; ".join(f"{k} {r[1]}" for k, r in AUG_RANGES.items())),
    "widths": ((lambda v: all(isinstance(k, str) and type(n) is int and n >= 1 for k, n in v.items())),
               "{layer: channels}, ints >= 1 (compress.py writes it)"),
    "compile": ((lambda v: v is True or v is False or v == "auto"), "true, false or auto (on CUDA only)"),
    "ema_decay": interval(0, 1, "[)"),
    "ema_tau": at_least(1),
    "max_nan_steps": at_least(1),
    # losses: gains, weights and lambdas are >= 0 (below), cons_margin is a vessel-coverage fraction
    "cons_mode": one_of("contain", "bce"),
    "cons_margin": interval(0, 1),
    # validation and logging
    "val_interval": at_least(1),
    "val_conf": interval(0, 1),
    "val_iou": interval(0, 1),
    "max_det": at_least(1),
    "log_interval": at_least(1),
}
for _k in ("box", "cls", "dfl", "kpt", "kobj", "w_p3", "w_p4", "w_p5", "w_p2", "w_p1", "w_full", "lambda_det",
           "lambda_seg", "lambda_cons", "lambda_align", "lambda_l2sp"):
    RULES[_k] = NON_NEGATIVE
# keys without a rule: bools and paths/names (their type is all; paths are checked where used), and device
# (check_device). A new key belongs in RULES or here (tests/test_mistakes.py checks that every key is in one).
TYPE_ONLY = ("ema_attention", "dual_bn", "kpt_aux", "ctam", "csam", "fpma", "xtam", "stage1", "data",
             "init", "qat", "weights_dir", "name", "exist_ok", "device", "cos_lr", "amp", "ema", "plots",
             "channels_last", "deterministic")

# -----------------------------------------------------------------------------
# checking one value, a device, a merged config


def check_device(value, source="--device"):
    """A device as a user types it -> the string torch.device takes: auto, cpu, cuda, cuda:N; a GPU index N (the
    int 0 that `--set device=0` parses to, or the string "0") means cuda:N. Several GPUs ("0,1", [0, 1]) are one
    process each: the message says to launch torchrun, where each rank takes cuda:LOCAL_RANK."""
    v, where = value, source if source.startswith("--device") else f"{source}: key 'device'"
    if isinstance(v, (list, tuple)) or isinstance(v, str) and "," in v:
        ids = ",".join(str(x).strip() for x in (v if isinstance(v, (list, tuple)) else v.split(",")))
        raise SystemExit(f"{where} {ids} names {ids.count(',') + 1} GPUs, and one process drives one GPU: run "
                         f"`CUDA_VISIBLE_DEVICES={ids} torchrun --nproc_per_node={ids.count(',') + 1} train.py ... "
                         "--set device=cuda` (each rank takes cuda:LOCAL_RANK)")
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return f"cuda:{v}"
    if isinstance(v, str):
        s = v.strip().lower()
        if s.isdigit():
            return f"cuda:{int(s)}"
        if s in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", s):
            return s
    raise SystemExit(f"{where} expects auto, cpu, cuda, cuda:N or a GPU index N, got {value!r}")


def did_you_mean(key, known):
    """The hint '; did you mean a, b?' naming the known keys closest to a mistyped one, or '' when none is."""
    near = difflib.get_close_matches(key, list(known), n=3)
    return f"; did you mean {', '.join(near)}?" if near else ""


def check_key(key, value, source):
    """The value, converted (int -> float, tuple -> list; a device to its torch form) when the default's type asks
    for it; unknown keys, wrong types and values outside RULES are errors that name the key, the value, what is
    allowed and the source (and suggest close matches for an unknown key)."""
    if key not in DEFAULTS:
        raise SystemExit(f"{source}: unknown key '{key}'{did_you_mean(key, DEFAULTS)} (configs/defaults.py lists every "
                         "key)")
    if key == "device":  # `--set device=0` arrives as an int, `device=0,1` as a tuple
        return check_device(value, source)
    want = DEFAULTS[key]
    if key in ("compile", "augment"):  # a bool or "auto" / a dict of strengths: RULES tells
        ok = True
    elif isinstance(want, bool) or isinstance(value, bool):  # bool is an int subclass: compare exactly
        ok = type(value) is type(want)
    elif isinstance(want, float):
        ok = isinstance(value, (int, float))
    elif key == "scale":  # a name, or a (depth, width, max_channels) triple: RULES tells which
        ok = isinstance(value, (str, list, tuple))
    elif isinstance(want, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    else:
        ok = isinstance(value, type(want))
    if not ok:
        raise SystemExit(f"{source}: key '{key}' expects {type(want).__name__} (default {want!r}), got {value!r}")
    if isinstance(want, float):
        value = float(value)
    value = list(value) if isinstance(value, tuple) else value
    test, allowed = RULES.get(key, (None, ""))
    if test is not None and not test(value):
        raise SystemExit(f"{source}: key '{key}' must be {allowed}, got {value!r}")
    return value


def check_config(cfg):
    """Rules between keys, once every layer is merged."""
    if cfg["attn_dim"] % cfg["attn_heads"]:
        raise SystemExit(f"keys 'attn_dim' {cfg['attn_dim']} and 'attn_heads' {cfg['attn_heads']}: attn_dim must be "
                         "divisible by attn_heads (e.g. attn_dim=64 attn_heads=2)")
    return cfg


# -----------------------------------------------------------------------------
# reading the layers


def read_config_file(path, stage):
    """A config file's `config` dict, then its per-stage dict (e.g. `camtl = {...}`) for this stage. The file is
    Python; one that is not (YAML, a syntax error, a name it never defines) or that defines neither dict stops
    the run with one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--config: no such file {path}")
    how = "configs are Python files: config = {...} (see configs/angiography.py)"
    if path.suffix.lower() in (".yaml", ".yml", ".json", ".toml"):
        raise SystemExit(f"--config {path}: a {path.suffix} file; {how}")
    try:
        ns = runpy.run_path(str(path))
    except SyntaxError as e:
        raise SystemExit(f"--config {path}: not valid Python (line {e.lineno}: {e.msg}); {how}") from None
    except Exception as e:  # e.g. YAML that happens to parse: `name: exp` evaluates the name exp
        raise SystemExit(f"--config {path}: running it failed ({type(e).__name__}: {e}); {how}") from None
    layers = {k: ns[k] for k in ("config", stage) if k in ns}
    if not layers:
        raise SystemExit(f"--config {path}: defines neither `config = {{...}}` nor `{stage} = {{...}}`; {how}")
    for k, v in layers.items():
        if not isinstance(v, dict):
            raise SystemExit(f"--config {path}: `{k}` is a {type(v).__name__}, expected a dict; {how}")
    return {**layers.get("config", {}), **layers.get(stage, {})}


def parse_set(items):
    """["epochs=5", "camtl_ratio=[1,2]", "optimizer=AdamW"] -> {key: Python value}; bare words stay strings."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            out[k.strip()] = v  # a bare string such as cosine or /data/root
    return out


def load_config(stage, config_file=None, sets=()):
    """The resolved, checked config of a stage (a new dict, with "stage" set)."""
    if stage not in STAGES:
        raise SystemExit(f"stage {stage!r}: expected one of {', '.join(STAGES)}")
    cfg = dict(DEFAULTS)
    data_file = config_file or "configs/synthetic.py"
    layers = [(ROOT / "configs" / f"{stage}.py", f"configs/{stage}.py"),
              (Path(config_file) if config_file else ROOT / data_file, data_file)]
    for path, name in layers:
        for k, v in read_config_file(path, stage).items():
            cfg[k] = check_key(k, v, name)
    for k, v in parse_set(sets).items():
        cfg[k] = check_key(k, v, "--set")
    cfg["stage"] = stage
    return check_config(cfg)


def next_run_dir(project, kind, name="", exist_ok=False):
    """project/kind/name for a new run (train: kind = the stage; predict.py: predict). An empty name is
    exp; a taken one gets the next free number (exp2, exp3, ...), unless exist_ok, which reuses it."""
    base, name = Path(project) / kind, name or "exp"
    d, n = base / name, 2
    while d.exists() and not exist_ok:
        d, n = base / f"{name}{n}", n + 1
    return d


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
