"""Export a trained network for deployment: BatchNorm folded into the convolutions, auxiliary branches removed,
eval mode, and a forward that takes one tensor and returns a tuple of tensors.

    python export.py --weights runs/camtl/exp/weights/best.pt                 # -> runs/camtl/exp/weights/best.pt2
    python export.py --weights best.pt --portable                              # a plain torch.export program
    python export.py --weights best.pt --imgsz 640 --dynamic-batch --out camtl.pt2
    python export.py --weights yolov8n.pt                                      # an Ultralytics detector
    python export.py --weights best.pt --format onnx                           # also best.onnx (needs `onnx`)
    python export.py --weights best.pt --int8                                  # -> best.int8.pt2 (needs torchao)
    python export.py --weights best.pt --int8 --calib-data data/arcade --calib 128 --int8-val 200

S is the checkpoint's training size unless --imgsz asks for another (an Ultralytics file: 640). The program takes
x (B, 3, S, S): RGB in [0, 1], letterboxed to S as data.transform does (pad 114/255), and returns
    CA-MTL: (detections (B, 4+nc, A), vessel_logits (B, 1, S, S))
    YOLOv8: (detections (B, 4+nc, A),)
detections: per anchor xywh in input pixels, then one sigmoid score per class (metrics.nms turns them into boxes);
A = (S/8)^2 + (S/16)^2 + (S/32)^2. A CA-MTL model with DualBatchNorm is exported in its target (angiography) domain.

Three kinds of .pt2, all loaded by `load_program(path)` and by `python predict.py --weights best.pt2 --source DIR`:
- compiled (the CLI's default): the torch.export program compiled ahead of time by AOTInductor into machine code
  for this machine's CPU (or the GPU it was exported on) and packaged, faster than the fused eager model (speed:
  docs/benchmarks.md). It runs where it was compiled (same kind of device and CPU features); if compiling fails (no
  C++ compiler), export.py says so and writes the portable program.
- portable (`--portable`): the torch.export program itself, runs wherever torch runs, at eager speed.
- int8 (`--int8`, -> best.int8.pt2): static post-training quantisation, then compiled as above (so it runs where it
  was made). Weights int8 per output channel, activations uint8 per tensor, their ranges observed on --calib (64)
  training images of --calib-data (default: the checkpoint's data) letterboxed as data.transform does and run
  through the fused target-domain program: the images it is deployed on (camtl: angiogram detection and vessel
  images; a YOLOv8: detection images). Only the convolution stacks are int8 (INT8_PARTS: backbone, neck, s5, the
  seg head's and Detect's conv branches), and their last convs still return fp32 logits; attention, the seg head's
  gated fusion, the fine vessel path (seg_stride 4, 2) and the decode (DFL softmax, anchors, sigmoid) stay fp32.
  Its speed depends on the CPU's int8 instructions (AVX512-VNNI and the like). Making it needs the optional package
  torchao (its PT2E quantiser, and the Inductor passes that turn its quantize/dequantize pairs into oneDNN int8
  convolutions); running it needs only torch. Not the default: it does not equal eager within 1e-3, and its
  accuracy cost depends on the checkpoint (speed and accuracy: docs/benchmarks.md). So, once written, it is scored
  against the fused fp32 model on --int8-val (64) validation images of the same data: mAP50, mAP50-95 and Dice(full)
  side by side, and a warning naming each one that drops by more than --int8-tolerance (1) points.
ONNX (`--format onnx`, also writes the .pt2) needs the `onnx` and `onnxscript` packages, which nanoCAMTL does not
require.
"""
import argparse
import contextlib
import copy
import json
import logging
import os
import statistics
import time
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from checkpoints import CheckpointError
from metrics import VAL_NMS, DetMeter, SegMeter, nms, targets_xyxy
from model import CAMTL, check_imgsz, count_params, gflops, load_weights

META = "nanocamtl.json"  # stored inside the .pt2: input size, output names, classes, model config


class Deployed(nn.Module):
    """The inference contract, x -> tuple of tensors: no dicts and no options, which is what exporters want."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.outputs = ("detections", "vessel_logits") if isinstance(model, CAMTL) else ("detections",)

    def forward(self, x):
        if isinstance(self.model, CAMTL):
            det, seg = self.model(x)
            return det, seg["full"]
        return (self.model(x),)


def deployable(model, domain="target"):
    """A fused, auxiliary-stripped, eval-mode copy of model (the original is left as it was), wrapped in Deployed.
    A DualBatchNorm folds its `domain` branch: target (angiography, what deployment sees and what export traces) or
    source (fundus photographs, for evaluate.py --domain source)."""
    m = copy.deepcopy(model).eval().requires_grad_(False)
    if hasattr(m, "strip_aux"):  # training-only branches (the centre-keypoint auxiliary)
        m.strip_aux()
    if hasattr(m, "set_domain"):
        m.set_domain(domain)
    return Deployed(m.fuse())


def export(model, imgsz, path, fmt="pt2", dynamic_batch=False, verbose=True, compiled=False):
    """Trace deployable(model) at imgsz x imgsz with torch.export and save it to path (suffix .pt2): compiled by
    AOTInductor when `compiled` (falling back to the portable program if that fails), else the program itself;
    with fmt="onnx" also write the program as path.onnx. dynamic_batch: any batch size, else batch 1 only.
    Returns the paths written."""
    if fmt not in ("pt2", "onnx"):
        raise ValueError(f"format {fmt!r}: expected 'pt2' or 'onnx'")
    check_imgsz(imgsz, imgsz, "export")
    net = deployable(model)
    p = next(net.parameters())
    # torch.export fixes a dimension whose example size is 1, so a dynamic batch is traced with two images
    x = torch.rand(2 if dynamic_batch else 1, 3, imgsz, imgsz, device=p.device, dtype=p.dtype)
    dims = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic_batch else None
    prog = torch.export.export(net, (x,), dynamic_shapes=dims)

    meta = program_meta(model, net, prog, imgsz, dynamic_batch, compiled)
    path = Path(path).with_suffix(".pt2")
    path.parent.mkdir(parents=True, exist_ok=True)
    if compiled:
        why = compile_package(prog, path, meta)
        if why:
            print(f"AOTInductor could not compile the program here ({why}); writing the portable program instead")
        compiled = not why
    if not compiled:
        torch.export.save(prog, path, extra_files={META: json.dumps({**meta, "compiled": False})})
    written = [path]
    if verbose:
        b = "batch" if dynamic_batch else 1
        outs = "".join(f"  output {k} {v}\n" for k, v in meta["outputs"].items())
        print(f"{type(model).__name__} fused for export: {count_params(net):,} parameters, "
              f"{gflops(net, imgsz):.3g} GFLOPs at {imgsz}\n  input  x {(b, 3, imgsz, imgsz)}\n" + outs
              + f"wrote {path} ({'compiled by AOTInductor' if compiled else 'portable'}, "
              f"{path.stat().st_size / 2**20:.1f} MB)")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401  (torch's ONNX exporter needs onnx and onnxscript; we do not)
            import onnxscript  # noqa: F401
        except ImportError:
            raise ImportError("ONNX export needs the `onnx` and `onnxscript` packages (pip install onnx onnxscript); "
                              f"they are not nanoCAMTL requirements. The torch.export program {path} was written."
                              ) from None
        onnx_path = path.with_suffix(".onnx")
        torch.onnx.export(prog, (x,), onnx_path, input_names=["x"], output_names=list(net.outputs), dynamo=True,
                          external_data=False)
        written.append(onnx_path)
        if verbose:
            print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 2**20:.1f} MB)")
    return written


def program_meta(model, net, prog, imgsz, dynamic_batch, compiled):
    """META: what load_program's callers need to feed the program and read its outputs."""
    out_node = next(n for n in prog.graph.nodes if n.op == "output")
    shapes = [tuple(d if isinstance(d, int) else "batch" for d in a.meta["val"].shape) for a in out_node.args[0]]
    cfg = model.cfg if isinstance(model, CAMTL) else {"scale": list(model.scale), "nc": model.nc}
    return dict(model=type(model).__name__, imgsz=imgsz, dynamic_batch=dynamic_batch, nc=model.nc,
                outputs=dict(zip(net.outputs, shapes)), config=cfg, compiled=compiled)


def usable_cpus():
    """The CPUs this process may run on (a cluster job's share, not the whole host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def compile_package(prog, path, meta, freeze=False):
    """AOTInductor: prog compiled to machine code and packaged at path, META in its metadata. -> None, or the reason
    (one line) when this machine cannot compile it, e.g. no C++ compiler. freeze: weights become constants of the
    compiled graph, which is what lets Inductor pack int8 weights into oneDNN convolutions (it freezes only
    without autograd). Inductor writes its loops' thread count into the program: by default torch's current one,
    so a program compiled under OMP_NUM_THREADS=1 runs those loops on one thread forever (the pruned int8 program:
    2.13x fp32 compiled for 2 threads, 1.80x compiled for 1). It compiles for every CPU this process may use."""
    meta = {**meta, "threads": usable_cpus()}
    configs = {"aot_inductor.metadata": {META: json.dumps(meta)}, "cpp.threads": meta["threads"],
               **({"freezing": True} if freeze else {})}
    try:
        with torch.no_grad() if freeze else contextlib.nullcontext():
            torch._inductor.aoti_compile_and_package(prog, package_path=str(path), inductor_configs=configs)
        return None
    except Exception as e:  # the toolchain's many ways to fail
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"


# -----------------------------------------------------------------------------
# int8: PT2E static quantisation (torchao's X86 Inductor quantizer), compiled by AOTInductor

NEEDS_TORCHAO = "--int8 needs the optional package torchao: pip install torchao"
# the convolution stacks: nearly all of the FLOPs, and they keep their accuracy at int8. Everything else (CTAM, CSAM
# and FPMA attention, the seg head's softmax-gated fusion, Detect's decode) stays fp32: cheap, and where a
# quantised softmax, gate or anchor multiply would cost accuracy
INT8_PARTS = ("backbone", "neck", "s5", "seg_head.heads", "detect.cv2", "detect.cv3")
FP32_PARTS = ("neck.ema3", "neck.ema4", "neck.ema5")  # EMA attention inside the neck, when the model has it


def torchao_pt2e(parts=INT8_PARTS):
    """(prepare_pt2e, convert_pt2e, quantizer for `parts` of a Deployed) from torchao, or ImportError with the
    one-line NEEDS_TORCHAO. Importing the quantizer also registers torchao's Inductor passes that turn its
    quantize/dequantize pairs into int8 oneDNN convolutions; without them AOTInductor would compile fp32
    convolutions between fake quantisers."""
    log = logging.getLogger("torch.utils._pytree")  # torchao 0.18 registers an Enum the old way: a warning per import
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    except ImportError:
        raise ImportError(NEEDS_TORCHAO) from None
    finally:
        log.setLevel(level)
    cfg = get_default_x86_inductor_quantization_config()  # weights int8 per channel, activations uint8 per tensor
    quantizer = X86InductorQuantizer()
    for name in FP32_PARTS:  # the first setting that matches a node wins, so the exceptions go first
        quantizer.set_module_name_qconfig(f"model.{name}", None)
    for name in parts:
        quantizer.set_module_name_qconfig(f"model.{name}", cfg)
    return prepare_pt2e, convert_pt2e, quantizer


class FakeQuantConv2d(nn.Conv2d):
    """An nn.Conv2d that rounds as the int8 program's convolutions do, for quantisation-aware training: its weight
    to int8 per output channel (symmetric over each filter's range: the program's weight rounding exactly), its
    input to uint8 per tensor over the batch's range (0 included; the program uses a range calibrated once).
    Straight-through gradients (torch's fake quantisation: none for a value the rounding clips, such as a filter's
    largest positive weight at +127.5 steps). Its state dict is an nn.Conv2d's, so a checkpoint trained with it is an
    ordinary one. Per-channel symmetric rounding does not change when BatchNorm is folded in (a per-channel scale),
    so the unfused weight trains the deployed rounding."""

    def forward(self, x):
        lo, hi = x.detach().min().clamp(max=0).float(), x.detach().max().clamp(min=0).float()
        scale = ((hi - lo) / 255).clamp(min=1e-8)
        zero = (-lo / scale).round().clamp(0, 255).int()
        x = torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)
        w = self.weight
        ws = (w.detach().abs().amax(dim=(1, 2, 3)).float() / 127.5).clamp(min=1e-8)  # (C_out,)
        w = torch.fake_quantize_per_channel_affine(w, ws, torch.zeros_like(ws, dtype=torch.int32), 0, -128, 127)
        return self._conv_forward(x, w, self.bias)


def fake_quantize(model, on=True):
    """Quantisation-aware training: every nn.Conv2d of INT8_PARTS (not FP32_PARTS) computes as FakeQuantConv2d
    (on=False: as nn.Conv2d again). In place; -> how many."""
    def inside(name, parts):
        return any(name == p or name.startswith(f"{p}.") for p in parts)
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and inside(name, INT8_PARTS) and not inside(name, FP32_PARTS):
            m.__class__ = FakeQuantConv2d if on else nn.Conv2d
            n += 1
    return n


def called_parts(prog, names):
    """names -> the modules of the exported program `prog` (of a Deployed: paths below its `model`) the quantizer can
    find. It matches the modules a node was called in, and a container forward walks item by item (a ModuleList,
    P3's seg head Sequential) is never called itself, so the outermost called modules inside it stand for it. A
    name the model lacks (a YOLOv8 has no s5) is left out."""
    called = {p.removeprefix("model.") for n in prog.graph.nodes for p, _ in n.meta.get("nn_module_stack", {}).values()}
    out = []
    for n in names:
        inner = [c for c in called if c == n or c.startswith(f"{n}.")]
        out += sorted(c for c in inner if not any(c.startswith(f"{o}.") for o in inner))  # the outermost only
    return out


def scored_tasks(model, cfg):
    """{task: task key} of the images a model is deployed on: CA-MTL the tasks its stage is scored on (camtl:
    angiogram detection and vessel images), a YOLOv8 the detection images."""
    import data
    stage = (cfg or {}).get("stage", "camtl") if isinstance(model, CAMTL) else None
    return dict(data.STAGE_TASKS[stage]) if stage else {"det": data.STAGE_TASKS["camtl"]["det"]}


def quotas(sizes, n):
    """n images shared in turn among the tasks that still have some: {key: images there} -> {key: count}."""
    counts = dict.fromkeys(sizes, 0)
    for i in range(n):
        live = [k for k in sizes if sizes[k] > counts[k]]
        if not live:
            break
        counts[live[i % len(live)]] += 1
    return counts


def calibration_images(model, cfg, root, imgsz, n):
    """Up to n training images of root, letterboxed to imgsz as data.transform does, as an iterator of (1, 3, S, S),
    and their count per task key: the images the deployed model sees (scored_tasks), taken in turn. A fixed random
    pick (seed 0), so that the first frames of one sequence do not make up the whole sample."""
    import data
    keys = list(scored_tasks(model, cfg).values())
    loaders = [data.build_loader(root, k, "train", imgsz=imgsz, batch=1, augment=False, shuffle=True, workers=0,
                                 nc=model.nc) for k in keys]
    counts = quotas({k: len(ld.dataset) for k, ld in zip(keys, loaders)}, n)

    def images():
        its = {k: iter(ld) for k, ld in zip(keys, loaders)}
        taken = dict.fromkeys(keys, 0)
        while taken != counts:
            for k in keys:
                if taken[k] < counts[k]:
                    taken[k] += 1
                    yield next(its[k])["img"]  # (1, 3, S, S)
    return images(), counts


def export_int8(model, imgsz, path, images, calib=None, verbose=True):
    """deployable(model) quantised to int8 (INT8_PARTS), calibrated on `images` (an iterable of (1, 3, S, S)
    letterboxed inputs), compiled by AOTInductor and written to path (suffix .pt2), batch 1. calib: what the images
    were, kept in the metadata. ImportError without torchao; ValueError when nothing calibrated or it cannot compile.
    Returns [path]."""
    check_imgsz(imgsz, imgsz, "export")
    net = deployable(model).cpu()  # the X86 quantizer's int8 kernels run on the CPU
    x = torch.rand(1, 3, imgsz, imgsz)
    traced = torch.export.export(net, (x,))
    parts = called_parts(traced, INT8_PARTS)
    prepare_pt2e, convert_pt2e, quantizer = torchao_pt2e(parts)
    prepared = prepare_pt2e(traced.module(), quantizer)  # observers around parts' ops
    seen = 0
    with torch.no_grad():
        for img in images:
            prepared(img.float())
            seen += 1
    if not seen:
        raise ValueError("--int8: no calibration images")
    prog = torch.export.export(convert_pt2e(prepared), (x,))  # quantize/dequantize pairs around the int8 ops
    meta = program_meta(model, net, prog, imgsz, False, compiled=True)
    meta["int8"] = {"calib_images": seen, **(calib or {}), "parts": parts}
    path = Path(path).with_suffix(".pt2")
    path.parent.mkdir(parents=True, exist_ok=True)
    why = compile_package(prog, path, meta, freeze=True)
    if why:  # a fake-quantised portable program would be slower than fp32: no fallback
        raise ValueError(f"--int8: AOTInductor could not compile the quantised program here ({why}); "
                         "an int8 program needs a C++ compiler")
    if verbose:
        named = [p for p in INT8_PARTS if any(q == p or q.startswith(f"{p}.") for q in parts)]
        print(f"{type(model).__name__} fused and quantised to int8 ({', '.join(named)}; the rest fp32), "
              f"calibrated on {seen} images\n  input  x {(1, 3, imgsz, imgsz)}\n"
              + "".join(f"  output {k} {v}\n" for k, v in meta["outputs"].items())
              + f"wrote {path} (int8, compiled by AOTInductor, {path.stat().st_size / 2**20:.1f} MB)")
    return [path]


def load_program(path, device="cpu"):
    """An export.py .pt2 -> (callable module, metadata: model, imgsz, dynamic_batch, nc, outputs, config).
    ValueError, one line naming the path, for anything else: missing, truncated, text, a .pt renamed .pt2."""
    again = "expected a .pt2 written by export.py (run `python export.py --weights W.pt` again)"
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file; {again}")
    try:  # look before torch.export.load, which logs a whole traceback before it raises
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: not a complete zip archive ({e}; truncated, or not a .pt2 at all?); {again}"
                         ) from None
    if not any(n.endswith("/archive_format") for n in names):
        kind = "a PyTorch checkpoint (.pt)" if any(n.endswith("/data.pkl") for n in names) else "a zip archive"
        raise ValueError(f"{path}: {kind}, not a torch.export program; {again}")
    if any("/data/aotinductor/" in n for n in names):
        return load_compiled(path, device, again)
    if not any(n.endswith(f"/extra/{META}") for n in names):
        raise ValueError(f"{path}: a torch.export program, but not one written by export.py (no {META} inside)")
    log = logging.getLogger("torch.export")
    extra, level = {META: ""}, log.level
    log.setLevel(logging.ERROR)
    try:
        prog = torch.export.load(path, extra_files=extra)
    except Exception as e:  # a damaged member: torch raises many kinds
        msg = (str(e).strip().splitlines() or [""])[0][:120]
        raise ValueError(f"{path}: torch.export cannot load it ({type(e).__name__}: {msg}); {again}") from None
    finally:
        log.setLevel(level)
    if torch.device(device).type != "cpu":  # traced on the CPU: constants made inside the graph move too
        prog = torch.export.passes.move_to_device_pass(prog, device)
    return prog.module(), json.loads(extra[META])


def load_compiled(path, device, again):
    """An AOTInductor package -> (callable, metadata). It runs on the kind of device it was compiled for."""
    try:
        run = torch._inductor.aoti_load_package(str(path))
        info = run.get_metadata()
    except Exception as e:
        msg = (str(e).strip().splitlines() or [""])[0][:120]
        raise ValueError(f"{path}: a compiled program this machine cannot load ({type(e).__name__}: {msg}); "
                         "export it on this machine, or with --portable") from None
    if META not in info:
        raise ValueError(f"{path}: a compiled program, but not one written by export.py (no {META} inside)")
    built = info.get("AOTI_DEVICE_KEY", "cpu")
    if torch.device(device).type != built:
        raise ValueError(f"{path}: compiled for {built}, asked to run on {device}; export it on the target device, "
                         "or with --portable")
    return run, json.loads(info[META])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="our .pt checkpoint, or an Ultralytics yolov8*.pt")
    ap.add_argument("--imgsz", type=int,
                    help="input size, a multiple of 32 (default: the checkpoint's training size, else 640)")
    ap.add_argument("--format", choices=("pt2", "onnx"), default="pt2", help="onnx: the .pt2 plus an .onnx")
    ap.add_argument("--dynamic-batch", action="store_true", help="accept any batch size (default: batch 1)")
    ap.add_argument("--portable", action="store_true",
                    help="write the plain torch.export program (runs anywhere, eager speed) instead of compiling it")
    ap.add_argument("--out", help="output path (default: the weights path with suffix .pt2, .int8.pt2 with --int8)")
    ap.add_argument("--int8", action="store_true",
                    help="int8 static quantisation for the CPU, compiled (needs the optional package torchao)")
    ap.add_argument("--calib-data", metavar="ROOT",
                    help="--int8: data root whose training images calibrate it (default: the checkpoint's data, "
                    "else the built-in synthetic set)")
    ap.add_argument("--calib", type=int, metavar="N", help="--int8: number of calibration images (default 64)")
    ap.add_argument("--int8-val", type=int, metavar="N",
                    help="--int8: validation images of the same data to score fp32 against int8 on (default 64, "
                    "0: no check)")
    ap.add_argument("--int8-tolerance", type=float, metavar="POINTS",
                    help="--int8: a drop of mAP50, mAP50-95 or Dice(full) beyond this many points (0.01 each) is a "
                    "warning (default 1)")
    a = ap.parse_args(argv)
    if not Path(a.weights).is_file():
        what = "a directory, not a file" if Path(a.weights).is_dir() else "no such file"
        raise SystemExit(f"--weights {a.weights}: {what}; expected a .pt checkpoint (ours or an Ultralytics "
                         "yolov8*.pt)")
    if Path(a.weights).suffix == ".pt2":
        raise SystemExit(f"--weights {a.weights}: already an exported program; export the .pt checkpoint it came from")
    if a.imgsz is not None and (a.imgsz <= 0 or a.imgsz % 32):
        raise SystemExit(f"--imgsz {a.imgsz}: must be a positive multiple of 32, "
                         f"e.g. {max(round(a.imgsz / 32), 1) * 32}")
    int8_only = [f for f, v in (("--calib-data", a.calib_data), ("--calib", a.calib), ("--int8-val", a.int8_val),
                                ("--int8-tolerance", a.int8_tolerance)) if v is not None]
    if not a.int8 and int8_only:
        raise SystemExit(f"{int8_only[0]}: only used with --int8")
    if a.int8:
        check_int8_flags(a)
    try:
        model, cfg = load_weights(a.weights)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    trained = (cfg or {}).get("imgsz", 640)
    imgsz = a.imgsz or trained
    if imgsz != trained:
        print(f"--imgsz {imgsz}: {a.weights} was trained at {trained} px; an export at another size can predict "
              "differently (small objects above all). Leave --imgsz out to export at the training size.")
    try:
        if a.int8:
            return export_int8_cli(model, cfg, imgsz, a)
        return export(model, imgsz, a.out or a.weights, a.format, a.dynamic_batch, compiled=not a.portable)
    except (ImportError, ValueError) as e:
        raise SystemExit(str(e)) from None


def check_int8_flags(a):
    """--int8's flags: what an int8 program cannot be, the counts; torchao present. Fills in the defaults."""
    clash = [f for f, on in (("--portable", a.portable), ("--dynamic-batch", a.dynamic_batch),
                             ("--format onnx", a.format == "onnx")) if on]
    if clash:
        raise SystemExit(f"--int8 with {' and '.join(clash)}: an int8 program is compiled, for batch 1, "
                         "as a .pt2 only")
    for flag, v, ok, allowed in (("--calib", a.calib, a.calib is None or a.calib >= 1, ">= 1"),
                                 ("--int8-val", a.int8_val, a.int8_val is None or a.int8_val >= 0, ">= 0"),
                                 ("--int8-tolerance", a.int8_tolerance,
                                  a.int8_tolerance is None or a.int8_tolerance >= 0, ">= 0")):
        if not ok:
            raise SystemExit(f"{flag} {v}: must be {allowed}")
    a.int8_val = 64 if a.int8_val is None else a.int8_val
    a.int8_tolerance = 1.0 if a.int8_tolerance is None else a.int8_tolerance
    try:  # before reading anything: say what is missing at once
        torchao_pt2e()
    except ImportError as e:
        raise SystemExit(str(e)) from None


def export_int8_cli(model, cfg, imgsz, a):
    """--int8: calibration images from --calib-data, the checkpoint's data or the synthetic set, then export_int8."""
    where = "--calib-data" if a.calib_data else "the checkpoint's data"
    try:
        root = Path(a.calib_data) if a.calib_data else data_root(cfg)
    except FileExistsError as e:
        raise SystemExit(f"calibration data: the built-in synthetic set, but {e}; pass --calib-data ROOT") from None
    if not root.is_dir():
        raise SystemExit(f"calibration data {root} ({where}) is not a directory; pass --calib-data ROOT")
    images, counts = calibration_images(model, cfg, root, imgsz, 64 if a.calib is None else a.calib)
    if not sum(counts.values()):
        raise SystemExit(f"{root}: no training images in {' or '.join(counts)} to calibrate on; "
                         "pass --calib-data ROOT")
    print(f"calibrating on {sum(counts.values())} training images of {root} ("
          + ", ".join(f"{n} {k}" for k, n in counts.items()) + f") at {imgsz} px")
    out = Path(a.out) if a.out else Path(a.weights).with_suffix(".int8.pt2")
    written = export_int8(model, imgsz, out, images, calib={"calib_data": str(root), "calib_counts": counts})
    if a.int8_val:
        int8_check(model, cfg, root, imgsz, out, a.int8_val, a.int8_tolerance)
    return written


def data_root(cfg):
    """A checkpoint's data root: its config's `data`, else the synthetic set it was trained on, looked up with its
    own parameters (other ones would generate another); an Ultralytics detector (cfg None): the default set."""
    import synthetic
    return Path(cfg.get("data") or synthetic.ensure_config(cfg) if cfg else synthetic.ensure_synthetic())


@torch.no_grad()
def measure(run, loaders, nc, limits=None, nms_kw=None):
    """
    run(x (B, 3, S, S)) -> (detections (B, 4+nc, A),) or (detections, vessel logits (B, 1, S, S)): what
    export.Deployed and an export.py program return, given the loaders' CPU images. loaders {"det": ..., "seg": ...}
    as data.val_loaders builds them; limits {task: n}: stop a task once n images are scored (exact with batch 1).
    nms_kw: the validation NMS (default VAL_NMS). -> {"images": {task: n}, "map50", "map50_95" (with "det"),
    "dice_full" (with "seg" and a vessel output), "ms": the median time of one call}, computed as validate computes
    them.
    """
    det_meter, seg_meter, images, vessels, times = DetMeter(), SegMeter(), {}, False, []
    for task, loader in loaders.items():
        images[task] = 0
        for batch in loader:
            if limits is not None and images[task] >= limits[task]:
                break
            t = time.perf_counter()
            out = run(batch["img"])
            times.append(time.perf_counter() - t)
            images[task] += len(batch["img"])
            if task == "det":
                h, w = batch["img"].shape[-2:]
                preds = [p.cpu() for p in nms(out[0].float(), **(nms_kw or VAL_NMS))]
                det_meter.update(preds, [targets_xyxy(batch, i, h, w) for i in range(len(preds))])
            elif len(out) > 1:
                seg_meter.update(out[1].float().cpu(), batch["mask"])
                vessels = True
    m = {"images": images, "ms": 1e3 * statistics.median(times) if times else float("nan")}
    if "det" in loaders:
        r = det_meter.compute(nc)
        m.update(map50=r["map50"], map50_95=r["map50_95"])
    if vessels:
        m["dice_full"] = seg_meter.compute()[0]
    return m


def val_images(model, cfg, root, imgsz, n):
    """What `measure` scores a model of config cfg on: -> (batch-1 val loaders of root's deployed tasks, at most n
    images in all {task: n_task}, the validation NMS of cfg)."""
    import data
    loaders = {t: data.build_loader(root, k, "val", imgsz=imgsz, batch=1, augment=False, shuffle=False, workers=0,
                                    nc=model.nc) for t, k in scored_tasks(model, cfg).items()}
    limits = quotas({t: len(ld.dataset) for t, ld in loaders.items()}, n)
    nms_kw = dict(conf=cfg["val_conf"], iou=cfg["val_iou"], max_det=cfg["max_det"], multi_label=True) if cfg \
        else VAL_NMS
    return {t: ld for t, ld in loaders.items() if limits[t]}, limits, nms_kw


INT8_METRICS = {"map50": "mAP50", "map50_95": "mAP50-95", "dice_full": "Dice(full)"}


def int8_check(model, cfg, root, imgsz, path, n, tolerance=1.0):
    """The fused fp32 model against the int8 program at path on up to n validation images of root (the deployed
    tasks, in turn, batch 1), scored as validation scores them (measure): mAP50, mAP50-95, Dice(full),
    printed as a table. A drop of more than `tolerance` points (0.01 each) is a warning naming the metric.
    -> {"fp32": metrics, "int8": metrics, "dropped": [metric keys]}, or None without validation images."""
    loaders, limits, nms_kw = val_images(model, cfg, root, imgsz, n)
    if not loaders:
        print(f"--int8: {root} has no validation images to measure fp32 against int8 on")
        return None
    run8, _ = load_program(path)
    res = {k: measure(run, loaders, model.nc, limits, nms_kw) for k, run in (("fp32", deployable(model).cpu()),
                                                                           ("int8", run8))}
    keys = [k for k in INT8_METRICS if k in res["fp32"]]
    change = {k: 100 * (res["int8"][k] - res["fp32"][k]) for k in keys}
    scored = res["fp32"]["images"]
    print(f"fp32 against int8 on {sum(scored.values())} validation images of {root} ("
          + ", ".join(f"{scored[t]} {loaders[t].dataset.key}" for t in scored) + "):\n"
          + f"  {'':8}" + "".join(f"{INT8_METRICS[k]:>12}" for k in keys) + "\n"
          + "".join(f"  {r:8}" + "".join(f"{res[r][k]:>12.4f}" for k in keys) + "\n" for r in ("fp32", "int8"))
          + f"  {'points':8}" + "".join(f"{change[k]:>+12.2f}" for k in keys))
    dropped = [k for k in keys if change[k] < -tolerance]
    if dropped:
        print("WARNING --int8: " + ", ".join(f"{INT8_METRICS[k]} {res['fp32'][k]:.4f} -> {res['int8'][k]:.4f} "
                                             f"({change[k]:+.2f} points)" for k in dropped)
              + f": more than --int8-tolerance {tolerance:g}; calibrate on more or other images (--calib, "
              "--calib-data), or deploy the fp32 program")
    return {**res, "dropped": dropped}


if __name__ == "__main__":
    main()
