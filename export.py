"""Export a trained network for deployment: BatchNorm folded into the convolutions, auxiliary branches removed,
eval mode, and a forward that takes one tensor and returns a tuple of tensors.

    python export.py --weights runs/camtl/exp/weights/best.pt                 # -> runs/camtl/exp/weights/best.pt2
    python export.py --weights best.pt --portable                              # a plain torch.export program
    python export.py --weights best.pt --imgsz 640 --dynamic-batch --out camtl.pt2
    python export.py --weights yolov8n.pt                                      # an Ultralytics detector
    python export.py --weights best.pt --format onnx                           # also best.onnx (needs `onnx`)

The program takes x (B, 3, S, S): RGB in [0, 1], letterboxed to S as data.transform does (pad 114/255), and returns
    CA-MTL: (detections (B, 4+nc, A), vessel_logits (B, 1, S, S))
    YOLOv8: (detections (B, 4+nc, A),)
detections: per anchor xywh in input pixels, then one sigmoid score per class (evaluate.nms turns them into boxes);
A = (S/8)^2 + (S/16)^2 + (S/32)^2. A CA-MTL model with DualBatchNorm is exported in its target (angiography) domain.

Two kinds of .pt2, both loaded by `load_program(path)` and by `python evaluate.py --weights best.pt2 --source DIR`:
- compiled (the CLI's default): the torch.export program compiled ahead of time by AOTInductor into machine code
  for this machine's CPU (or the GPU it was exported on) and packaged; YOLOv8n at 640 px runs in about 0.8x the
  fused eager time on this machine's CPU (README: speed). It runs where it was compiled (same kind of device and
  CPU features); if compiling fails (no C++ compiler), export.py says so and writes the portable program.
- portable (`--portable`): the torch.export program itself, runs wherever torch runs, at eager speed.
ONNX (`--format onnx`, also writes the .pt2) needs the `onnx` and `onnxscript` packages, which nanoCAMTL does not
require.
"""
import argparse
import copy
import json
import logging
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

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


def deployable(model):
    """A fused, auxiliary-stripped, eval-mode copy of model (the original is left as it was), wrapped in Deployed.
    A DualBatchNorm folds its target (angiography) branch: deployment sees angiograms."""
    m = copy.deepcopy(model).eval().requires_grad_(False)
    if hasattr(m, "strip_aux"):  # training-only branches (the centre-keypoint auxiliary)
        m.strip_aux()
    if hasattr(m, "set_domain"):
        m.set_domain("target")
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

    out_node = next(n for n in prog.graph.nodes if n.op == "output")
    shapes = [tuple(d if isinstance(d, int) else "batch" for d in a.meta["val"].shape) for a in out_node.args[0]]
    cfg = model.cfg if isinstance(model, CAMTL) else {"scale": list(model.scale), "nc": model.nc}
    meta = dict(model=type(model).__name__, imgsz=imgsz, dynamic_batch=dynamic_batch, nc=model.nc,
                outputs=dict(zip(net.outputs, shapes)), config=cfg, compiled=compiled)
    path = Path(path).with_suffix(".pt2")
    path.parent.mkdir(parents=True, exist_ok=True)
    if compiled:
        compiled = compile_package(prog, path, meta)
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


def compile_package(prog, path, meta):
    """AOTInductor: prog compiled to machine code and packaged at path, META in its metadata. -> True, or False
    (with the reason printed) when this machine cannot compile it, e.g. no C++ compiler."""
    try:
        torch._inductor.aoti_compile_and_package(prog, package_path=str(path),
                                                 inductor_configs={"aot_inductor.metadata": {META: json.dumps(meta)}})
        return True
    except Exception as e:  # the toolchain's many ways to fail
        print(f"AOTInductor could not compile the program here ({type(e).__name__}: "
              f"{(str(e).strip().splitlines() or [''])[0][:160]}); writing the portable program instead")
        return False


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
    ap.add_argument("--out", help="output path (default: the weights path with suffix .pt2)")
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
    model, cfg = load_weights(a.weights)
    imgsz = a.imgsz or (cfg or {}).get("imgsz", 640)
    try:
        return export(model, imgsz, a.out or a.weights, a.format, a.dynamic_batch, compiled=not a.portable)
    except (ImportError, ValueError) as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
