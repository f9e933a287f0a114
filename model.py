"""The networks: YOLOv8 and CA-MTL, assembled from modules.py.

Read top to bottom: scales and helpers, Backbone / PAN / YOLOv8, then CAMTL (the multi-task network; README: The
CAMTL network) with its stage setup, and last building a network from a weights file a user hands us:
`load_checkpoint` (ours) and `load_weights` (ours or an Ultralytics yolov8*.pt). The files themselves are read in
checkpoints.py, which answers a file that is not what was asked for with a CheckpointError naming it.
"""
import contextlib
import math

import torch
import torch.nn as nn

from checkpoints import CheckpointError, infer_scale, load_matching, map_ultralytics, read_checkpoint, read_ultralytics
from config import DEFAULTS, STAGES, saved_config
from modules import (CSAM, CTAM, FPMA, XTAM, C2f, Conv, Detect, DualBatchNorm2d, EMAttention, SegHeadMulti, SPPF, UpAdd,
                     to_dualbn, to_groupnorm)
from prune import apply_widths

# (depth, width, max_channels) of the official scales
SCALES = {
    "n": (0.33, 0.25, 1024),
    "s": (0.33, 0.50, 1024),
    "m": (0.67, 0.75, 768),
    "l": (1.00, 1.00, 512),
    "x": (1.00, 1.25, 512),
}
STRIDES = (8, 16, 32)


def scale_triple(scale):
    if isinstance(scale, str):
        if scale not in SCALES:
            raise ValueError(f"scale {scale!r}: expected one of {list(SCALES)} "
                             "or a (depth, width, max_channels) triple")
        return SCALES[scale]
    d, w, mc = scale
    return float(d), float(w), int(mc)


def check_imgsz(h, w, where="input"):
    """The PAN concatenates upsampled and lateral maps, so every side must divide by the largest stride."""
    if h % 32 or w % 32:
        raise ValueError(f"{where}: image size {h}x{w} is not a multiple of 32; letterbox or resize it "
                         f"(e.g. to {math.ceil(h / 32) * 32}x{math.ceil(w / 32) * 32})")


def count_params(module):
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def gflops(model, imgsz=640, forward=None):
    """Forward FLOPs (multiply-adds x 2, convs and matmuls) at imgsz, as YOLOv8 reports them. Attention
    included: the counter knows SDPA's GPU kernels but not the CPU one, so we tell it the same formula."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v)}

    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    p = next(model.parameters())
    x = torch.zeros(1, 3, h, w, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as fc:
            (forward or model)(x)
    finally:
        model.train(was_training)
    return fc.get_total_flops() / 1e9


# -----------------------------------------------------------------------------
# YOLOv8


class Backbone(nn.Sequential):
    """CSPDarknet layers 0-9, indexed as in Ultralytics. Returns [B3 (stride 8), B4 (16), B5 (32)]; with `early`
    (layer indices, e.g. (2, 0): stride 4, then 2) also those layers' outputs: ([B3, B4, B5], [early maps])."""

    def forward(self, x, early=()):
        taps, skips = [], {}
        for i, layer in enumerate(self):
            x = layer(x)
            if i in (4, 6, 9):
                taps.append(x)
            if i in early:
                skips[i] = x
        return (taps, [skips[i] for i in early]) if early else taps


class PAN(nn.Module):
    """Top-down then bottom-up path aggregation (Ultralytics layers 10-21); EMA attention optionally inline
    after N3/N4/N5, so everything downstream (the next strided conv, the head) sees its output."""

    def __init__(self, c3, c4, c5, n, ema_attention=False):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.t4 = C2f(c5 + c4, c4, n)  # layer 12
        self.n3 = C2f(c4 + c3, c3, n)  # layer 15
        self.d3 = Conv(c3, c3, 3, 2)  # layer 16
        self.n4 = C2f(c3 + c4, c4, n)  # layer 18
        self.d4 = Conv(c4, c4, 3, 2)  # layer 19
        self.n5 = C2f(c4 + c5, c5, n)  # layer 21
        self.ema3, self.ema4, self.ema5 = ((EMAttention(c3), EMAttention(c4), EMAttention(c5)) if ema_attention
                                           else (nn.Identity(), nn.Identity(), nn.Identity()))

    def forward(self, b3, b4, b5):
        t4 = self.t4(torch.cat((self.up(b5), b4), 1))
        n3 = self.ema3(self.n3(torch.cat((self.up(t4), b3), 1)))
        n4 = self.ema4(self.n4(torch.cat((self.d3(n3), t4), 1)))
        n5 = self.ema5(self.n5(torch.cat((self.d4(n4), b5), 1)))
        return [n3, n4, n5]


class YOLOv8(nn.Module):
    """YOLOv8 detector. Training mode: three raw maps (B, 64+nc, H/s, W/s); eval: (B, 4+nc, A) decoded."""

    def __init__(self, nc=80, scale="n", ema_attention=False, kpt_aux=False, verbose=True):
        super().__init__()
        d, w, mc = self.scale = scale_triple(scale)
        self.nc = nc

        def ch(c):
            return math.ceil(min(c, mc) * w / 8) * 8

        def rep(n):
            return max(round(n * d), 1) if n > 1 else n

        self.channels = c3, c4, c5 = ch(256), ch(512), ch(1024)
        self.backbone = Backbone(
            Conv(3, ch(64), 3, 2),  # 0  P1/2
            Conv(ch(64), ch(128), 3, 2),  # 1  P2/4
            C2f(ch(128), ch(128), rep(3), True),  # 2
            Conv(ch(128), c3, 3, 2),  # 3  P3/8
            C2f(c3, c3, rep(6), True),  # 4  B3
            Conv(c3, c4, 3, 2),  # 5  P4/16
            C2f(c4, c4, rep(6), True),  # 6  B4
            Conv(c4, c5, 3, 2),  # 7  P5/32
            C2f(c5, c5, rep(3), True),  # 8
            SPPF(c5, c5, 5),  # 9  B5
        )
        self.neck = PAN(c3, c4, c5, rep(3), ema_attention)
        self.detect = Detect(nc, self.channels, STRIDES, kpt_aux=kpt_aux)
        if verbose:
            print(self.summary())

    def summary(self, imgsz=640):
        # convs scale exactly with area at multiples of 32, so count FLOPs at 64 px and scale up (fast for x)
        g = gflops(self, 64) * (imgsz / 64) ** 2
        d, w, mc = self.scale
        return (f"{type(self).__name__} scale ({d:.2f}, {w:.3g}, {mc}), nc {self.nc}: "
                f"{count_params(self):,} parameters, {g:.1f} GFLOPs at {imgsz}")

    def features(self, x):
        """Neck outputs [N3, N4, N5]."""
        check_imgsz(*x.shape[-2:])
        return self.neck(*self.backbone(x))

    def forward(self, x, raw=None):
        """raw (default: in training mode): the head's three raw maps, as the loss takes them; else decoded."""
        return self.detect(self.features(x), raw)

    def strip_aux(self):
        """Remove the centre-keypoint auxiliary branch (training only); detections are unchanged."""
        self.detect.strip_aux()
        return self

    def fuse(self):
        """Fold every BatchNorm into its convolution (inference only); returns self."""
        for m in self.modules():
            if isinstance(m, Conv):
                m.fuse()
        return self

    @classmethod
    def from_ultralytics(cls, path, nc=None, verbose=True, **kw):
        """Build from an official `yolov8*.pt` / `yolov8*-seg.pt`: scale and nc inferred from its tensors;
        with nc given and different, the class branch keeps its fresh prior-bias init."""
        sd = read_ultralytics(path)
        ours, ck_nc = map_ultralytics(sd, nc)
        model = cls(nc=nc or ck_nc or 80, scale=infer_scale(sd), verbose=False, **kw)
        load_matching(model, ours, f"{path}", verbose=verbose)
        if verbose:
            print(model.summary())
        return model


# -----------------------------------------------------------------------------
# CA-MTL: YOLOv8 + a vessel-segmentation stream, cross-task and cross-scale attention (docs/design.md)
#
#   backbone -> neck -> N3, N4, N5   (and with seg_stride 4 / 2 the backbone's layer 2 / layers 2 and 0: B2, B1)
#   seg stream:  S5 = s5(N5);  S4 = fpma4(N4 <- S5);  S3 = fpma3(N3 <- S4);  seg_head(S3, S4, S5) -> p3, p4, p5, full
#   fine path (seg_stride < 8): seg_head's stride-8 logit up through B2 (p2), B1 (p1); full = the finest, upsampled
#   det stream:  D_k = ctam[k](N_k <- S_k);  D3', D4', D5' = csam(D3 <- D4, D5;  D4 <- D5;  D5);  detect(D')
#   xtam (opt.): S_k' = xtam[k](S_k <- N_k) into the seg head instead of S_k: the exchange's seg <- det direction
#
# Every attention branch is gated at zero, so with COCO weights CAMTL detects exactly as YOLOv8. Each part can be
# switched off for ablations (configs/defaults.py): ctam (D_k = N_k), csam (D' = D), fpma (S4 = N4 + up(proj(S5)),
# S3 alike, a plain FPN); the model then holds none of that part's parameters.

# the model's keys of a config, with their defaults and meaning in configs/defaults.py (imgsz: of the summary)
MODEL_KEYS = ("scale", "nc", "attn_dim", "attn_heads", "attn_tokens", "attn_query_stride", "ema_attention",
              "gn_groups", "dual_bn", "imgsz", "kpt_aux", "ctam", "csam", "fpma", "xtam", "seg_stride",
              "widths")
CAMTL_DEFAULTS = {k: DEFAULTS[k] for k in MODEL_KEYS}
TASKS = ("det", "seg")
EARLY = {8: (), 4: (2,), 2: (2, 0)}  # seg_stride -> the backbone layers the fine path reads (stride 4, then 2)
# switches of parts that stage 1 trains (seg stream, neck, fine path): a camtl run with other values cannot carry
# them over
STAGE1_SWITCHES = ("fpma", "xtam", "ema_attention", "seg_stride")
# keys that change what stage 1's attention and GroupNorm compute but no weight's shape: its weights load either way
STAGE1_FUNCTION = ("attn_heads", "attn_tokens", "attn_query_stride", "gn_groups")
GN_PARTS = ("s5", "fpma4", "fpma3", "fpn4", "fpn3", "ctam", "xtam", "csam", "seg_head")  # GroupNorm, both stages
DUALBN_PARTS = ("backbone", "neck", "detect")


class CAMTL(YOLOv8):
    """Multi-task CA-MTL network. forward(x, tasks=("det", "seg"), need_attn=False, raw=None) -> (det_out,
    seg_out): det_out as YOLOv8's (raw, by default in training mode: 3 raw maps; else (B, 4+nc, A)) or None;
    seg_out {p3, p4, p5, full} logits (B, 1, H/s, W/s) and (B, 1, H, W), or None. A task not asked for is not
    computed: "seg" alone runs no CTAM/CSAM/Detect; "det" alone runs the seg stream (CTAM's keys; nothing of it
    without CTAM) but not the seg head. With need_attn (tasks including "seg"), seg_out["attn"] = CTAM's
    key-attention maps, 3 x (B, h', w'), each summing to 1; with "seg" alone they come from CTAM's queries and keys
    only, without running CTAM's output, CSAM or Detect. With ctam off there are no maps: seg_out has no "attn",
    and the alignment term is skipped."""

    def __init__(self, cfg=None, verbose=True):
        cfg = dict(cfg or {})
        for k in cfg:
            if k not in CAMTL_DEFAULTS:
                raise ValueError(f"CAMTL config: unknown key {k!r} (known: {', '.join(CAMTL_DEFAULTS)})")
        cfg = {**CAMTL_DEFAULTS, **cfg}
        if cfg["seg_stride"] not in EARLY:
            raise ValueError(f"CAMTL config: seg_stride {cfg['seg_stride']!r}: expected one of {list(EARLY)}")
        if cfg["attn_dim"] % cfg["attn_heads"]:
            raise ValueError(f"CAMTL config: attn_dim {cfg['attn_dim']} is not divisible by "
                             f"attn_heads {cfg['attn_heads']}")
        super().__init__(nc=cfg["nc"], scale=cfg["scale"], ema_attention=cfg["ema_attention"], kpt_aux=cfg["kpt_aux"],
                         verbose=False)
        self.cfg = cfg
        _, w, mc = self.scale
        c3, c4, c5 = self.channels
        cs5 = math.ceil(min(256, mc) * w / 8) * 8  # S5 has 256 * width channels
        a = dict(dim=cfg["attn_dim"], heads=cfg["attn_heads"], tokens=cfg["attn_tokens"])
        qp = [max(1, cfg["attn_query_stride"] // s) for s in (8, 16, 32)]  # query pooling at P3, P4, P5
        seg_ch = (c3, c4, cs5)
        self.s5 = Conv(c5, cs5, 1)
        if cfg["fpma"]:
            self.fpma4 = FPMA(c4, cs5, qpool=qp[1], **a)
            self.fpma3 = FPMA(c3, c4, qpool=qp[0], **a)
        else:
            self.fpn4, self.fpn3 = UpAdd(c4, cs5), UpAdd(c3, c4)
        self.early = EARLY[cfg["seg_stride"]]
        self.seg_head = SegHeadMulti(seg_ch, skips=[self.backbone[i].conv.out_channels if i == 0 else
                                                    self.backbone[i].cv2.conv.out_channels for i in self.early])
        self.ctam = (nn.ModuleList(CTAM(c, (cs,), qpool=p, **a) for c, cs, p in zip(self.channels, seg_ch, qp))
                     if cfg["ctam"] else None)
        self.csam = CSAM(self.channels, qpools=qp, **a) if cfg["csam"] else None
        self.xtam = (nn.ModuleList(XTAM(cs, c, qpool=p, **a) for cs, c, p in zip(seg_ch, self.channels, qp))
                     if cfg["xtam"] else None)
        for name in GN_PARTS:
            if getattr(self, name, None) is not None:
                to_groupnorm(getattr(self, name), cfg["gn_groups"])
        if cfg["dual_bn"]:
            for name in DUALBN_PARTS:
                to_dualbn(getattr(self, name))
        apply_widths(self, cfg["widths"], cfg["gn_groups"])  # a pruned network: its narrowed layers
        self.active_domain = "source"
        self.frozen = ()  # names of parts whose BatchNorm statistics stay fixed in train mode (stage_setup)
        if verbose:
            print(self.summary())

    def forward(self, x, tasks=TASKS, need_attn=False, raw=None):
        tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        if not tasks or any(t not in TASKS for t in tasks):
            raise ValueError(f"tasks {tasks!r}: expected a non-empty subset of {TASKS}")
        if need_attn and "seg" not in tasks:
            raise ValueError("need_attn needs the seg task: the attention maps are compared with the predicted vessels")
        n, b = self.features_and_skips(x) if "seg" in tasks else (self.features(x), [])  # [N3, N4, N5], [B2, B1]
        s = self.seg_stream(*n) if "seg" in tasks or self.ctam is not None else None  # [S3, S4, S5]: CTAM's keys
        seg_out = self.seg_head(self.exchange(s, n), x.shape[-2:], b) if "seg" in tasks else None
        det_out, maps = None, None
        if "det" in tasks:
            d, maps = self.cross_task(n, s, need_attn)
            det_out = self.detect(self.csam(d) if self.csam is not None else d, raw)
        elif need_attn and self.ctam is not None:  # a seg batch's alignment term: CTAM's maps only, no CSAM/Detect
            maps = [m.attention_maps(nk, [sk]) for m, nk, sk in zip(self.ctam, n, s)]
        if need_attn and maps is not None:
            seg_out["attn"] = [m[0] for m in maps]  # (B, h', w') per scale over S_k's pooled grid
        return det_out, seg_out

    def features_and_skips(self, x):
        """-> (neck outputs [N3, N4, N5], the fine path's skips [B2 (B, C, H/4, W/4), B1 (B, C', H/2, W/2)]: the
        backbone's layers 2 and 0 as seg_stride asks, [] at 8)."""
        if not self.early:
            return self.features(x), []
        check_imgsz(*x.shape[-2:])
        b, skips = self.backbone(x, self.early)
        return self.neck(*b), skips

    def seg_stream(self, n3, n4, n5):
        """Neck outputs -> [S3, S4, S5], (B, C3 | C4 | 256w, H/s, W/s): the top-down path by FPMA, or a plain FPN."""
        s5 = self.s5(n5)  # (B, 256w, H/32, W/32)
        top4, top3 = (self.fpma4, self.fpma3) if self.cfg["fpma"] else (self.fpn4, self.fpn3)
        s4 = top4(n4, s5)  # (B, C4, H/16, W/16)
        s3 = top3(n3, s4)  # (B, C3, H/8, W/8)
        return [s3, s4, s5]

    def cross_task(self, n, s, need_attn):
        """-> ([D3, D4, D5] with N_k's shapes, per scale CTAM's maps or None): D_k = CTAM(N_k <- S_k), or N_k."""
        if self.ctam is None:
            return list(n), None
        d, maps = zip(*(m(nk, [sk], need_attn) for m, nk, sk in zip(self.ctam, n, s)))
        return list(d), maps

    def exchange(self, s, n):
        """The seg head's inputs: [S_k], or with xtam [S_k + gate * attn(S_k <- N_k)], S_k's shapes. The det features
        are N_k, not D_k: a seg-only forward (every seg batch) runs no det stream, so D_k does not exist there, and
        the vessels must not depend on which tasks were asked for. N_k is what the det stream starts from, what
        Detect sees while CTAM's and CSAM's gates are closed. Both directions read the features before the exchange."""
        if self.xtam is None:
            return s
        return [m(sk, nk) for m, sk, nk in zip(self.xtam, s, n)]

    # ---- domain switch for DualBatchNorm2d

    def set_domain(self, domain):
        """Route every DualBatchNorm2d through its `source` or `target` branch; returns self."""
        if domain not in ("source", "target"):
            raise ValueError(f"domain {domain!r}: expected 'source' (retinography) or 'target' (angiography)")
        self.active_domain = domain
        for m in self.modules():
            if isinstance(m, DualBatchNorm2d):
                m.domain = domain
        return self

    @contextlib.contextmanager
    def domain(self, domain):
        """`with model.domain("target"): ...` -- the previous domain is restored on exit."""
        prev = self.active_domain
        self.set_domain(domain)
        try:
            yield self
        finally:
            self.set_domain(prev)

    def train(self, mode=True):
        super().train(mode)
        for name in getattr(self, "frozen", ()):  # frozen parts keep their statistics
            for m in getattr(self, name).modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    # ---- summary and loading

    def parts(self):
        """{name: modules} of the parts this model has (a switched-off one is absent)."""
        top = [self.fpma4, self.fpma3] if self.cfg["fpma"] else [self.fpn4, self.fpn3]
        parts = {"backbone": [self.backbone], "neck": [self.neck], "seg stream": [self.s5, *top], "CTAM": [self.ctam],
                 "xTAM": [self.xtam], "CSAM": [self.csam], "seg head": [self.seg_head], "Detect": [self.detect]}
        return {k: ms for k, ms in parts.items() if ms[0] is not None}

    def summary(self, imgsz=None):
        """Parameters per part and GFLOPs (attention included) of one image at imgsz (default cfg imgsz)."""
        imgsz = imgsz or self.cfg["imgsz"]
        per = " | ".join(f"{k} {sum(count_params(m) for m in ms):,}" for k, ms in self.parts().items())
        d, w, mc = self.scale
        return (f"CAMTL scale ({d:.2f}, {w:.3g}, {mc}), nc {self.nc}: {count_params(self):,} parameters, "
                f"{gflops(self, imgsz):.1f} GFLOPs at {imgsz}\n  {per}")

    @classmethod
    def from_ultralytics(cls, path, nc=None, verbose=True, **cfg):
        """As YOLOv8.from_ultralytics (scale and nc from the checkpoint unless given): backbone, neck and Detect
        all from one `yolov8*.pt` / `yolov8*-seg.pt`; cfg holds any other CAMTL keys."""
        sd = read_ultralytics(path)
        ck_nc = map_ultralytics(sd)[1]
        cfg = {"scale": infer_scale(sd), "nc": nc or ck_nc or 80, **cfg}
        return cls.from_pretrained(cfg, det=path, verbose=verbose)

    @classmethod
    def from_pretrained(cls, cfg=None, det=None, seg=None, stage_ckpt=None, stage=None, verbose=True):
        """Build, then load in order: COCO checkpoints (`load_coco`), stage_setup(stage), our stage checkpoint
        (`load_stage`). Model keys of the stage checkpoint's config fill what cfg leaves unset. A file that is not
        what it should be: CheckpointError naming it."""
        ckpt = read_checkpoint(stage_ckpt, STAGE_CHECKPOINT) if stage_ckpt else None
        base = {k: v for k, v in saved_config((ckpt or {}).get("config", {})).items() if k in CAMTL_DEFAULTS}
        model = cls({**base, **(cfg or {})}, verbose=False)
        said = model.load_coco(det, seg)
        if verbose and (det or seg or ckpt is None):
            print("CAMTL weights: " + "; ".join(said))
        if stage:
            stage_setup(model, stage)
        if ckpt is not None:  # after stage_setup, so its GroupNorm/DualBN layout receives the tensors
            model.load_stage(ckpt, stage_ckpt, verbose)
        if verbose:
            print(model.summary())
        return model

    def load_coco(self, det=None, seg=None):
        """Backbone+neck from `seg` (a yolov8{S}-seg.pt), else `det`; Detect from `det` (yolov8{S}.pt), else `seg`;
        the class branch stays fresh when nc differs. -> what came from where, for the log."""
        coco = {}
        for p in {det, seg} - {None, ""}:
            try:
                coco[p] = map_ultralytics(read_ultralytics(p), self.nc)
            except CheckpointError as e:
                raise CheckpointError(f"{e}; expected an official Ultralytics yolov8*.pt / yolov8*-seg.pt "
                                      "(re-download, or remove it for random init)") from None
        said = []
        for path, prefixes, what in ((seg or det, ("backbone.", "neck."), "backbone+neck"),
                                     (det or seg, ("detect.",), "Detect")):
            if not path:
                said.append(f"{what} random")
                continue
            sd, ck_nc = coco[path]
            try:
                load_matching(self, {k: v for k, v in sd.items() if k.startswith(prefixes)}, path, verbose=False)
            except ValueError as e:  # e.g. a yolov8s.pt renamed yolov8n.pt
                raise CheckpointError(f"{e}; expected COCO weights of this model's scale {self.scale}") from None
            fresh = f" (class branch fresh: nc {self.nc} vs {ck_nc})" if what == "Detect" and ck_nc != self.nc else ""
            said.append(f"{what} <- {path}{fresh}")
        fresh = [name for name, on in (("seg stream", True), ("CTAM", self.ctam is not None),
                                       ("CSAM", self.csam is not None), ("xTAM", self.xtam is not None),
                                       ("seg head", True), ("EMA attention", self.cfg["ema_attention"])) if on]
        return said + ["random: " + ", ".join(fresh)]

    def load_stage(self, ckpt, path, verbose=True):
        """Our checkpoint's weights ({"model": state dict, ...}; a last.pt's EMA, as load_checkpoint takes it);
        plain BN loads into both DualBN branches."""
        try:
            load_matching(self, ckpt.get("ema") or ckpt["model"], path, verbose=verbose)
        except ValueError as e:
            raise CheckpointError(f"{e}; expected a stage checkpoint of this model's scale and config") from None


def camtl_config(cfg, stage):
    """The model keys of a training config for a stage. Stage 1 trains one set of BN statistics; camtl splits
    them into source/target branches (dual_bn), both seeded from stage 1."""
    mcfg = {k: cfg[k] for k in CAMTL_DEFAULTS if k in cfg}
    mcfg["dual_bn"] = bool(mcfg.get("dual_bn")) and stage == "camtl"
    return mcfg


def stage_setup(model, stage):
    """What a training stage trains, in place, idempotent; returns the model. The normalisation layout is the
    constructor's (GroupNorm in the seg stream always; DualBatchNorm2d in backbone, neck and Detect with dual_bn).
    domainshift1: Detect, CTAM, CSAM frozen (no gradients, BN statistics fixed). camtl: everything trainable."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: expected one of {STAGES}")
    model.requires_grad_(True)
    model.detect.dfl.requires_grad_(False)  # DFL's bins are constants
    parts = ("detect", "ctam", "csam") if stage == "domainshift1" else ()
    model.frozen = tuple(name for name in parts if getattr(model, name) is not None)  # a switched-off part is None
    for name in model.frozen:
        getattr(model, name).requires_grad_(False)
    return model.train(model.training)


# -----------------------------------------------------------------------------
# building a network from what a user hands us: our checkpoints, or an Ultralytics yolov8*.pt (files are read in
# checkpoints.py)

# the two domains of a DualBN model: its BatchNorm branches, and the data each is for
DOMAINS = {"source": "fundus photographs", "target": "angiograms"}


def default_domain(cfg):
    """The domain a checkpoint was trained for last: camtl target, domainshift1 source."""
    return "source" if (cfg or {}).get("stage") == "domainshift1" else "target"


def class_names(nc):
    """Detection class names: the one class of the angiography sets is a stenosis."""
    return ["stenosis"] if nc == 1 else [f"class{i}" for i in range(nc)]


STAGE_CHECKPOINT = ("the stage checkpoint yolov8{S}-{stage}.pt that train.py writes; replace or delete it, or train "
                    "that stage again")


def load_checkpoint(path, device="cpu"):
    """One of our checkpoints (a run's last.pt / best.pt, or a stage's yolov8{S}-{stage}.pt) -> (CAMTL in eval
    mode, its training config completed by configs/defaults.py). EMA weights when the file has them (they are
    what validation scored); DualBN routed to the stage's domain (camtl: target = angiography). CheckpointError
    naming the path for any file that is not one."""
    ckpt = read_checkpoint(path, "a nanoCAMTL checkpoint")
    cfg = saved_config(ckpt.get("config", {}))
    cfg["stage"] = stage = ckpt.get("stage") or cfg.get("stage") or "camtl"
    model = CAMTL.from_pretrained(camtl_config(cfg, stage), stage=stage, verbose=False)
    which = "ema" if ckpt.get("ema") else "model"
    # a small best.pt / stage product holds the EMA's weights under "model": its "weights" says so, else its config
    shown = ckpt.get("weights") or ("ema" if ckpt.get("ema") or ("optimizer" not in ckpt and cfg["ema"]) else "model")
    try:  # strict: our own file must fit exactly, or we would score random weights
        model.load_state_dict(ckpt[which])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its {shown} weights do not fit the model its config describes "
                              f"({str(e).strip().splitlines()[0][:150]})") from None
    model.set_domain("target" if stage == "camtl" else "source")
    mid = ckpt.get("mid_epoch")  # a last.pt written inside an epoch (SIGTERM)
    epoch = (f", epoch {mid['epoch'] + 1} to batch {mid['batch']}" if mid else
             f", epoch {ckpt['epoch'] + 1}" if "epoch" in ckpt else "")
    print(f"{path}: {stage} checkpoint{epoch}, {shown} weights")
    return model.to(device).eval(), cfg


def load_weights(path, device="cpu"):
    """Our checkpoint -> (CAMTL, its config); any other file is tried as an Ultralytics yolov8*.pt -> (YOLOv8,
    None). Neither: CheckpointError, one line naming the path and both reasons (one when they are the same)."""
    try:
        return load_checkpoint(path, device)
    except CheckpointError as e:
        ours = str(e).removeprefix(f"{path}: ").removesuffix("; expected a nanoCAMTL checkpoint")
    try:
        return YOLOv8.from_ultralytics(path, verbose=False).to(device).eval(), None
    except CheckpointError as e:
        theirs = str(e).removeprefix(f"{path}: ")
    why = ours if ours == theirs else f"as a nanoCAMTL checkpoint: {ours}; as an Ultralytics one: {theirs}"
    raise CheckpointError(f"{path}: {why}; expected a nanoCAMTL checkpoint (.pt from train.py) or an Ultralytics "
                          "yolov8*.pt") from None
