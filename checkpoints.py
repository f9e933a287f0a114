"""Reading and writing weights files: our checkpoints, and Ultralytics' `yolov8*.pt` without Ultralytics.

Read top to bottom: the safe unpickler for Ultralytics files and their key mapping to our module names, loading a
state dict by name and shape, then our own checkpoints (plain dicts of tensors and the config, written atomically).
Each reader raises CheckpointError naming the file, what is wrong with it and what was expected; each command's
`main` turns that into one line (`SystemExit`), so library callers can catch it.
"""
import math
import os
import pickle
import re
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch


class CheckpointError(ValueError):
    """A weights file that is not what was asked for; the message is one line naming the file."""

# -----------------------------------------------------------------------------
# Ultralytics checkpoints, read without Ultralytics and without running anything from the file.
#
# An official `yolov8n.pt` is a torch zip archive whose pickle rebuilds whole Ultralytics modules. We
# unpickle it with an allow-list: tensor rebuild functions and plain containers resolve to the real thing;
# classes from the module trees a checkpoint legitimately names (ultralytics, torch.nn, numpy scalars,
# namespaces) become inert records that only store their state; every other global (os.system, eval,
# getattr, subprocess, ...) raises before it can be called.
#
# Pickles of protocol 2 (what torch.save writes by default, and what older Ultralytics releases hold) store a
# numpy scalar (a float64 best_fitness, a metric) as numpy's `scalar(dtype, bytes)`, its bytes as
# `_codecs.encode(text, "latin1")`. Both are allowed in a narrowed form that can only make data: the encode
# turns a str into bytes with latin-1 and nothing else; the scalar is rebuilt from the dtype's inert record
# for plain numeric dtypes (bool, int, uint, float, complex) from exactly its item size of bytes.

_LATIN1 = ("latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "l1")


def _latin1_bytes(text, encoding="utf-8", errors="strict"):
    """`_codecs.encode` as protocol-2 pickles use it, to store bytes: a str -> its latin-1 bytes, and only that."""
    if not isinstance(text, str) or not isinstance(encoding, str) or encoding.lower() not in _LATIN1:
        raise pickle.UnpicklingError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r}): a weights file "
                                     "only uses it to store bytes as latin-1 text; nothing from it was run")
    return text.encode("latin-1")


def _numpy_scalar(dtype, data=None):
    """numpy's `scalar(dtype, bytes)` -> the numpy scalar, for plain numeric dtypes; `dtype` is the inert record
    of `numpy.dtype(code, ...)` with its pickled state (3, byte order, ...)."""
    code = (getattr(dtype, "_args", None) or (None,))[0]
    state = getattr(dtype, "_state", None)
    order = state[1] if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "=") else "="
    if not (isinstance(code, str) and re.fullmatch(r"[biufc]\d{1,2}", code) and isinstance(data, bytes)):
        raise pickle.UnpicklingError(f"refusing numpy scalar of dtype {code!r}: only plain numbers are rebuilt")
    dt = np.dtype(order + code)
    if len(data) != dt.itemsize:
        raise pickle.UnpicklingError(f"numpy scalar of dtype {code!r}: {len(data)} bytes, expected {dt.itemsize}")
    return np.frombuffer(data, dt)[0]


_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("torch", "Size"): torch.Size,
    **{(b, n): getattr(__import__("builtins"), n)
       for b in ("builtins", "__builtin__") for n in ("set", "frozenset", "slice")},
    ("_codecs", "encode"): _latin1_bytes,
    **{(m, "scalar"): _numpy_scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
}
_RECORD_MODULES = ("ultralytics.", "models.", "torch.nn.modules.", "torch.nn.parameter", "numpy", "argparse",
                   "types", "pathlib", "datetime")


class _Record:
    """Stand-in for a class we refuse to import: accepts any construction, keeps its state, does nothing."""

    def __init__(self, *args, **kwargs):
        self.__dict__["_args"] = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:  # e.g. numpy.dtype's (3, byte order, ...): kept as data
            self.__dict__["_state"] = state


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith(_RECORD_MODULES):
            return type(name, (_Record,), {"_origin": f"{module}.{name}"})
        raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}': a weights file has no reason "
                                     "to name it (a tampered or foreign file?); nothing from it was run")


_safe_pickle = types.ModuleType("nanocamtl_safe_pickle")
_safe_pickle.Unpickler = _SafeUnpickler
_safe_pickle.load = lambda f, **kw: _SafeUnpickler(f, **kw).load()
_safe_pickle.UnpicklingError = pickle.UnpicklingError
_safe_pickle.__name__ = "nanocamtl_safe_pickle"


def _module_tensors(obj, prefix, out):
    """Walk an unpickled nn.Module record and collect its parameters and buffers as a state dict."""
    d = getattr(obj, "__dict__", {})
    for key in ("_parameters", "_buffers"):
        for k, v in (d.get(key) or {}).items():
            if isinstance(v, torch.Tensor):
                out[prefix + k] = v
    for k, child in (d.get("_modules") or {}).items():
        if child is not None:
            _module_tensors(child, f"{prefix}{k}.", out)
    return out


def _not_a_file(path):
    """Why path cannot be a weights file, from its first bytes (missing, a directory, empty, text), else None.
    torch.save writes a zip archive ("PK") or, before torch 1.6, a pickle (protocol 2+: byte 0x80)."""
    p = Path(path)
    if not p.exists():
        return "no such file"
    if not p.is_file():
        return "a directory, not a file" if p.is_dir() else "not a regular file"
    with open(p, "rb") as f:
        head = f.read(32)
    if not head:
        return "an empty file (0 bytes)"
    if head.startswith((b"PK", b"\x80")):
        return None
    text = head.decode("utf-8", "replace")
    if text.isprintable() or text.replace("\n", "").replace("\t", "").replace("\r", "").isprintable():
        return f"a text file, not a PyTorch checkpoint (it starts {text.strip()[:24]!r})"
    return f"not a PyTorch checkpoint (it starts with bytes {head[:4].hex(' ')}, not a zip archive or a pickle)"


def _unreadable(e):
    """One line about a torch.load failure on a file that is no (complete) PyTorch checkpoint."""
    msg = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:100]
    return f"not a readable PyTorch checkpoint ({type(e).__name__}: {msg}); truncated, or not a checkpoint at all?"


# what torch.load raises on a text file, a truncated archive, a raw pickle of something else
_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError,
                KeyError, TypeError, AttributeError, UnicodeDecodeError, MemoryError)


def read_ultralytics(path):
    """Ultralytics checkpoint -> float32 state dict named `model.{i}.…` (EMA weights when present).
    CheckpointError naming the path for anything else: a missing, empty, text or truncated file, a foreign pickle,
    a refused global (nothing from the file is run)."""
    why = _not_a_file(path)
    if why:
        raise CheckpointError(f"{path}: {why}")
    try:
        with warnings.catch_warnings():  # files of torch < 1.6 keep module source; torch warns when it cannot compare
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
            ckpt = torch.load(path, map_location="cpu", pickle_module=_safe_pickle, weights_only=False)
    except pickle.UnpicklingError as e:
        if str(e).startswith(("refusing", "numpy scalar")):
            raise CheckpointError(f"{path}: {e}") from None
        raise CheckpointError(f"{path}: {_unreadable(e)}") from None
    except _LOAD_ERRORS as e:
        raise CheckpointError(f"{path}: {_unreadable(e)}") from None
    if isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        sd = ckpt  # already a plain state dict
    else:
        model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else ckpt
        if not isinstance(model, _Record):
            raise CheckpointError(f"{path}: no Ultralytics model inside (expected a dict with 'model' or 'ema')")
        sd = _module_tensors(model, "", {})
    if not any(k.startswith("model.0.") for k in sd):
        raise CheckpointError(f"{path}: holds no Ultralytics layer 'model.0' ({len(sd)} tensors); "
                              "not a YOLOv8 checkpoint")
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


# Ultralytics layer index -> our module path (layers 10, 11, 13, 14, 17, 20 are Upsample/Concat: no weights)
ULTRA_TO_OURS = {**{i: f"backbone.{i}" for i in range(10)},
                 12: "neck.t4", 15: "neck.n3", 16: "neck.d3", 18: "neck.n4", 19: "neck.d4", 21: "neck.n5", 22: "detect"}


def map_ultralytics(sd, nc=None):
    """Rename `model.{i}.…` to ours; keep only Detect's box/class branches and DFL from a head
    (a -seg head also has mask parts); drop the class branch when nc differs from the checkpoint's."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] != "model" or not parts[1].isdigit() or int(parts[1]) not in ULTRA_TO_OURS:
            continue
        i, rest = int(parts[1]), ".".join(parts[2:])
        if i == 22 and not rest.startswith(("cv2.", "cv3.", "dfl.")):
            continue
        out[f"{ULTRA_TO_OURS[i]}.{rest}"] = v
    ck_nc = out["detect.cv3.0.2.weight"].shape[0] if "detect.cv3.0.2.weight" in out else None
    if nc is not None and ck_nc is not None and nc != ck_nc:
        out = {k: v for k, v in out.items() if not k.startswith("detect.cv3.")}
    return out, ck_nc


def infer_scale(sd):
    """(depth, width, max_channels) from tensor shapes: width from layer 0, max_channels from layer 7,
    depth from the bottleneck count of layer 4 (6 at depth 1)."""
    w = sd["model.0.conv.weight"].shape[0] / 64
    c7 = sd["model.7.conv.weight"].shape[0]
    mc = 1024 if c7 >= math.ceil(1024 * w / 8) * 8 else round(c7 / w)
    n4 = len({k.split(".")[3] for k in sd if k.startswith("model.4.m.")})
    return n4 / 6, w, mc



def load_matching(model, sd, source="checkpoint", verbose=True):
    """Load every tensor whose name and shape match; fail loudly on shape clashes, report what stayed fresh."""
    own = model.state_dict()
    bad = [f"{k}: {tuple(v.shape)} vs ours {tuple(own[k].shape)}"
           for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{source}: {len(bad)} tensors do not fit this model (wrong scale?): " + "; ".join(bad[:3]))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    def parts(keys):  # module names, so one line stays readable
        names = sorted({k.rsplit(".", 2)[0] for k in keys if not k.endswith("num_batches_tracked")})
        return f"{len(names)} modules ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})" if names else ""
    if verbose:
        fresh, dropped = parts(missing), parts(unexpected)
        print(f"loaded {len(sd) - len(unexpected)} tensors from {source}"
              + (f"; kept fresh init for {fresh}" if fresh else "")
              + (f"; dropped {len(unexpected)} tensors this model has no place for: {dropped}" if dropped else ""))
    return missing, unexpected


# -----------------------------------------------------------------------------
# our checkpoints: {"model": state dict, "config": dict, ...}, readable with torch.load(weights_only=True)

CHECKPOINT = "a nanoCAMTL checkpoint (a run's last.pt / best.pt or a yolov8{S}-{stage}.pt)"


def read_checkpoint(path, what=CHECKPOINT, need=("model",)):
    """One of our checkpoint files -> its dict. CheckpointError, one line naming the path, what is wrong with it
    and what was expected (`what`), for a missing, empty, text or truncated file, a pickle of classes (Ultralytics'
    or a foreign one), anything but a dict, or a dict without the keys in need ('model' and 'config' must be
    dicts). To resume: read_checkpoint(last, "the last.pt of a run to resume", need=("model", "optimizer", ...))."""
    try:
        return _read_ours(path, need)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}; expected {what}") from None


def _read_ours(path, need):
    why = _not_a_file(path)
    if why:
        raise ValueError(why)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if named:  # it names a class or function: not our plain dict
            raise ValueError(f"a pickle that names {named.group(1)}, which our checkpoints (tensors, dicts, numbers) "
                             "never do (an Ultralytics or foreign file?); nothing from it was run") from None
        raise ValueError(_unreadable(e)) from None
    except _LOAD_ERRORS as e:
        raise ValueError(_unreadable(e)) from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"holds a {type(ckpt).__name__}, not a checkpoint dict")
    missing = [k for k in need if k not in ckpt]
    if missing:
        raise ValueError(f"a dict without {', '.join(repr(k) for k in missing)} (it has {', '.join(map(repr, ckpt))})"
                         [:300])
    for k in ("model", "config"):
        if k in ckpt and not isinstance(ckpt[k], dict):
            raise ValueError(f"its {k!r} is a {type(ckpt[k]).__name__}, not a dict")
    return ckpt


def save_checkpoint(obj, path):
    """torch.save to a temporary file, then rename: a run killed mid-write never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
