"""Building blocks of nanoCAMTL: YOLOv8's layers and the attention/normalisation modules of CA-MTL.

Read top to bottom: helpers, YOLOv8 blocks (Conv, Bottleneck, C2f, SPPF, DFL, Detect), EMA attention,
CA-MTL's gated cross-attention (FPMA and its plain counterpart UpAdd, CTAM, XTAM, CSAM), the segmentation head,
and the normalisation helpers (GroupNorm, DualBatchNorm2d) with their converters.
Attribute names (`conv`, `bn`, `cv1`, `cv2`, `cv3`, `m`, `dfl`) follow YOLOv8 so that its checkpoints
map onto ours by name.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from box_ops import dist2bbox

# -----------------------------------------------------------------------------
# helpers


def make_anchors(feats, strides, offset=0.5):
    """Anchor centres (A, 2) in grid units and their strides (A, 1), level by level, row-major."""
    points, stride_col = [], []
    for f, s in zip(feats, strides):
        h, w = f.shape[-2:]
        sy = torch.arange(h, device=f.device, dtype=f.dtype) + offset
        sx = torch.arange(w, device=f.device, dtype=f.dtype) + offset
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_col.append(torch.full((h * w, 1), float(s), device=f.device, dtype=f.dtype))
    return torch.cat(points), torch.cat(stride_col)


def dfl_expectation(x, bins):
    """Distribution focal loss decoding, shared by Detect and the detection loss: (B, 4*n, A) logits over n bins
    per side -> (B, 4, A) expected distances in grid units, bins (n,) the bin values 0, 1, ..., n-1."""
    b, _, a = x.shape
    p = x.view(b, 4, len(bins), a).transpose(2, 3).softmax(3)  # (B, 4, A, n)
    return p @ bins.to(p.dtype)  # (B, 4, A)


def bilinear_matrix(n_in, n_out, device=None, dtype=None):
    """(n_out, n_in) weights of 1-D linear interpolation as F.interpolate(mode="bilinear", align_corners=False)
    takes them: output i samples input (i + 0.5) * n_in / n_out - 0.5, clamped to the edges."""
    s = ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = s.floor().long().clamp(max=n_in - 1)
    i1, f = (i0 + 1).clamp(max=n_in - 1), s - i0  # at the last input both taps are the edge: weights still sum to 1
    rows = torch.arange(n_out, device=device)
    m = torch.zeros(n_out, n_in, device=device, dtype=torch.float64)
    m.index_put_((rows, i0), 1 - f, accumulate=True)
    m.index_put_((rows, i1), f, accumulate=True)
    return m.to(dtype)


def upsample_bilinear(x, size):
    """F.interpolate(x, size, mode="bilinear", align_corners=False) as two matrix products, rows then columns:
    the same numbers (within float rounding), but on a CPU the backward of the seg head's one-channel 8x upsample
    to the input size is ~3x faster this way than ATen's kernel (its forward ~1.3x slower). (B, C, h, w) ->
    (B, C, H, W)."""
    rows = bilinear_matrix(x.shape[-2], size[0], x.device, x.dtype)  # (H, h)
    cols = bilinear_matrix(x.shape[-1], size[1], x.device, x.dtype)  # (W, w)
    return rows @ x @ cols.T  # (H, h) @ (B, C, h, w) @ (w, W) -> (B, C, H, W)


def fuse_conv_bn(conv, bn):
    """A Conv2d with bias that computes bn(conv(x)) with the BN's running statistics."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True).to(conv.weight.device)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C,)
    fused.weight.data = (conv.weight * scale.view(-1, 1, 1, 1)).detach()
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.data = ((bias - bn.running_mean) * scale + bn.bias).detach()
    fused.weight.requires_grad_(False)
    fused.bias.requires_grad_(False)
    return fused


# -----------------------------------------------------------------------------
# YOLOv8 blocks


class Conv(nn.Module):
    """Conv2d (no bias, 'same' padding) -> BatchNorm -> SiLU. After fuse(), bn is Identity."""

    def __init__(self, c1, c2, k=1, s=1, g=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def fuse(self):
        bn = getattr(self.bn, "active", self.bn)  # a DualBatchNorm2d folds in its active domain's branch
        if isinstance(bn, nn.BatchNorm2d):
            self.conv = fuse_conv_bn(self.conv, bn)
            self.bn = nn.Identity()


class Bottleneck(nn.Module):
    """Two 3x3 Convs with an optional residual (only when shapes allow)."""

    def __init__(self, c1, c2, shortcut=True):
        super().__init__()
        self.cv1 = Conv(c1, c2, 3)
        self.cv2 = Conv(c2, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP block with 2 convolutions: 1x1 to 2c, split, n bottlenecks chained on the second half,
    concat every intermediate (2 + n chunks of c), 1x1 to c2."""

    def __init__(self, c1, c2, n=1, shortcut=False):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = self.cv1(x)  # (B, 2c, H, W)
        ys, h = [y], y[:, self.c:]  # h (B, c, H, W): its second half, where the bottlenecks chain
        for m in self.m:
            h = m(h)
            ys.append(h)
        # cv1's whole output joins the concat, not its halves: the same values, and Inductor keeps the concat of an
        # int8 program channels_last only when an input is a whole channels_last buffer (else NCHW plus transposes)
        return self.cv2(torch.cat(ys, 1))  # (B, (2+n)c, H, W) -> (B, c2, H, W)


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools equal pools of 5, 9 and 13."""

    def __init__(self, c1, c2, k=5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1)
        self.cv2 = Conv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    """Distribution focal loss decoding: the expectation of a softmax over reg_max bins.

    The bin values live in a frozen 1x1 conv (0, 1, ..., reg_max-1) as in YOLOv8, so its checkpoints
    and parameter counts match ours."""

    def __init__(self, c1=16):
        super().__init__()
        self.c1 = c1
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)

    def forward(self, x):
        return dfl_expectation(x, self.conv.weight.view(-1))


class Detect(nn.Module):
    """YOLOv8 detection head: per level a box branch (cv2 -> 4*reg_max DFL logits) and a class
    branch (cv3 -> nc logits). Training: the raw maps; eval: decoded (B, 4+nc, A) xywh pixels + scores."""

    def __init__(self, nc=80, ch=(), strides=(8, 16, 32), reg_max=16, kpt_aux=False):
        super().__init__()
        self.nc, self.nl, self.reg_max = nc, len(ch), reg_max
        self.no = nc + 4 * reg_max
        c2 = max(16, ch[0] // 4, reg_max * 4)
        c3 = max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1))
                                 for c in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(c, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for c in ch)
        self.dfl = DFL(reg_max)
        # centre-keypoint auxiliary: per anchor the box centre (x, y, visibility logit). It trains
        # the shared features towards centre distance, which is stabler than IoU for tiny boxes; inference
        # never computes it and strip_aux() deletes it.
        c4 = max(ch[0] // 4, 3)
        self.cv4 = None
        if kpt_aux:
            self.cv4 = nn.ModuleList(nn.Sequential(Conv(c, c4, 3), Conv(c4, c4, 3), nn.Conv2d(c4, 3, 1)) for c in ch)
        self.strides = tuple(float(s) for s in strides)  # plain floats: a tensor would be data to torch.export
        self.bias_init()

    def bias_init(self):
        """Box logits start at 1; class logits at the prior of ~5 objects per 640 px image."""
        for a, b, s in zip(self.cv2, self.cv3, self.strides):
            a[-1].bias.data[:] = 1.0
            b[-1].bias.data[: self.nc] = math.log(5 / self.nc / (640 / s) ** 2)

    def forward(self, x, raw=None):
        """x: [P3, P4, P5] features. raw (default: self.training): the three maps the loss takes, else decoded."""
        raw = self.training if raw is None else raw
        aux = self.cv4 is not None and raw
        x = [torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])) + ((self.cv4[i](x[i]),) if aux else ()), 1)
             for i in range(self.nl)]  # (B, 64+nc, H, W), +3 keypoint channels when the auxiliary trains
        return x if raw else self.decode(x)

    def strip_aux(self):
        """Drop the keypoint auxiliary: the deployed detector is exactly the plain one."""
        self.cv4 = None
        return self

    def decode(self, x):
        b = x[0].shape[0]
        # rebuilt every call (microseconds), not cached: the module keeps no state, so torch.export traces it as is
        anchors, strides = make_anchors(x, self.strides)  # (A, 2), (A, 1)
        flat = torch.cat([xi[:, : self.no].reshape(b, self.no, -1) for xi in x], 2)  # (B, 64+nc, A)
        box, cls = flat.split((4 * self.reg_max, self.nc), 1)
        dbox = dist2bbox(self.dfl(box), anchors.t().unsqueeze(0), xywh=True, dim=1) * strides.t()
        return torch.cat((dbox, cls.sigmoid()), 1)  # (B, 4+nc, A)


# -----------------------------------------------------------------------------
# EMA: Efficient Multi-scale Attention (Ouyang et al., 2023), groups 8


class EMAttention(nn.Module):
    """Channels split into groups; a 1x1 branch gates each group by pooled row/column context, a 3x3
    branch sees local context; each branch's global descriptor weights the other's pixels (cross-spatial
    learning), and the sum of both gates the input. Output shape = input shape."""

    def __init__(self, c, groups=8):
        super().__init__()
        assert c % groups == 0, f"EMA attention: channels {c} not divisible by groups {groups}"
        self.g = groups
        cg = c // groups
        self.gn = nn.GroupNorm(cg, cg)
        self.conv1x1 = nn.Conv2d(cg, cg, 1)
        self.conv3x3 = nn.Conv2d(cg, cg, 3, padding=1)

    def forward(self, x):
        b, c, h, w = x.shape
        gx = x.reshape(b * self.g, c // self.g, h, w)  # (B*g, cg, H, W)
        xh = gx.mean(3, keepdim=True)  # (B*g, cg, H, 1)
        xw = gx.mean(2, keepdim=True).transpose(2, 3)  # (B*g, cg, W, 1)
        hw = self.conv1x1(torch.cat((xh, xw), 2))
        xh, xw = hw.split((h, w), 2)
        x1 = self.gn(gx * xh.sigmoid() * xw.transpose(2, 3).sigmoid())  # 1x1 branch
        x2 = self.conv3x3(gx)  # 3x3 branch
        a1 = x1.mean((2, 3)).softmax(-1).unsqueeze(1)  # (B*g, 1, cg)
        a2 = x2.mean((2, 3)).softmax(-1).unsqueeze(1)
        wts = a1 @ x2.flatten(2) + a2 @ x1.flatten(2)  # (B*g, 1, HW)
        return (gx * wts.view(b * self.g, 1, h, w).sigmoid()).reshape(b, c, h, w)


# -----------------------------------------------------------------------------
# CA-MTL attention: gated multi-head cross-attention over pooled keys/values
#
# The original attends densely at full resolution (memory quadratic in image area). Here queries stay
# on their own grid but every key/value map is average-pooled to at most `tokens` positions, so cost
# and memory grow linearly with the image area. Each residual branch is multiplied by a zero-initialised
# gate: a fresh module is the identity, so COCO weights keep giving COCO's outputs until training opens it.


def token_grid(h, w, tokens):
    """Largest grid (h', w') <= (h, w) of about the same aspect with h' * w' <= tokens."""
    if h * w <= tokens:
        return h, w
    hk = max(1, min(h, int(h * math.sqrt(tokens / (h * w)))))
    return hk, max(1, min(w, tokens // hk))


def pool_tokens(x, tokens):
    """(B, C, H, W) -> (B, C, h', w') by adaptive average pooling to token_grid (no-op when small enough)."""
    grid = token_grid(*x.shape[-2:], tokens)
    return x if grid == tuple(x.shape[-2:]) else F.adaptive_avg_pool2d(x, grid)


class CrossAttention(nn.Module):
    """Queries from x (c channels), average-pooled qpool x qpool; keys/values from one or more source maps
    (channels csrc), pooled to <= tokens positions in all (shared evenly), concatenated along the token axis.
    Output x + gate * up(proj(attention)), proj = 1x1 conv -> norm -> SiLU, up = bilinear back to x's grid
    (qpool 1: no pooling, no up), gate per channel, zero at init.

    With need_attn, also returns per source the key-attention map (B, h', w') over its pooled grid,
    averaged over heads and queries (rows sum to 1 over all sources). It is computed from queries pooled
    to the same budget, never from the full (B, heads, HW, N) weights; SDPA does not return those."""

    def __init__(self, c, csrc, dim=64, heads=2, tokens=128, qpool=1):
        super().__init__()
        assert dim % heads == 0, f"attention width {dim} not divisible by {heads} heads"
        self.heads, self.tokens, self.qpool = heads, tokens, qpool
        self.q = nn.Conv2d(c, dim, 1, bias=False)
        self.kv = nn.ModuleList(nn.Conv2d(cs, 2 * dim, 1, bias=False) for cs in csrc)
        self.proj = Conv(dim, c, 1)
        self.gate = nn.Parameter(torch.zeros(c))

    def split_heads(self, t):
        # (B, D, h, w) -> (B, heads, hw, d). SDPA's fast CPU kernel needs unit stride on the head dim: a
        # channels_last map already has it (a free view); a channels-first one is copied once
        t = t.flatten(2).unflatten(1, (self.heads, -1)).transpose(2, 3)
        return t if t.stride(-1) == 1 else t.contiguous()

    def keys_values(self, sources):
        """Sources pooled to the token budget (shared evenly) -> keys, values (B, heads, N, d) and the pooled maps."""
        n = self.tokens // len(sources)
        pooled = [pool_tokens(s, n) for s in sources]  # pool before the 1x1 conv: same result, cheaper
        k, v = torch.cat([f(s).flatten(2) for f, s in zip(self.kv, pooled)], 2).chunk(2, 1)  # 2 x (B, D, N)
        return self.split_heads(k), self.split_heads(v), pooled

    def forward(self, x, sources, need_attn=False):
        b, _, h, w = x.shape
        k, v, pooled = self.keys_values(sources)
        # the values are pooled to at most `tokens` positions (11x11 at 128, 16x16 at 256), so a query grid finer
        # than stride 16 px mostly adds SDPA work (at 512 px, P3's three attentions hold 3/4 of it); pooling before
        # the 1x1 conv gives the same queries
        hq, wq = max(1, h // self.qpool), max(1, w // self.qpool)
        xq = x if self.qpool == 1 else F.adaptive_avg_pool2d(x, (hq, wq))  # (B, C, hq, wq)
        q = self.split_heads(self.q(xq))  # (B, heads, hq*wq, d)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, heads, hq*wq, d), stored as (B, hq*wq, heads, d)
        o = self.proj(o.transpose(1, 2).reshape(b, hq, wq, -1).permute(0, 3, 1, 2))  # (B, c, hq, wq), no copy
        if (hq, wq) != (h, w):
            o = F.interpolate(o, (h, w), mode="bilinear", align_corners=False)  # (B, c, H, W)
        y = x + self.gate.view(1, -1, 1, 1) * o
        return y, (self.key_attention(x, k, pooled) if need_attn else None)

    def attention_maps(self, x, sources):
        """Only the key-attention maps of forward(x, sources, need_attn=True): no values, no output branch."""
        k, _, pooled = self.keys_values(sources)
        return self.key_attention(x, k, pooled)

    def key_attention(self, x, k, pooled):
        """Per source (B, h', w'): attention over the pooled keys, averaged over heads and (pooled) queries."""
        b = x.shape[0]
        qp = self.split_heads(self.q(pool_tokens(x, self.tokens)))  # (B, heads, Lq <= tokens, d)
        a = (qp @ k.transpose(2, 3) * qp.shape[-1] ** -0.5).softmax(-1).mean((1, 2))  # (B, N)
        sizes = [s.shape[-2] * s.shape[-1] for s in pooled]
        return [m.view(b, *s.shape[-2:]) for m, s in zip(a.split(sizes, 1), pooled)]


class FPMA(CrossAttention):
    """Feature-pyramid attention of the seg stream: fine-grid queries attend to the coarser map at its own
    resolution (no upsampling first); the output keeps the fine map's channels."""

    def __init__(self, c_fine, c_coarse, **kw):
        super().__init__(c_fine, (c_coarse,), **kw)

    def forward(self, fine, coarse):
        return super().forward(fine, [coarse])[0]


class UpAdd(nn.Module):
    """FPMA's plain counterpart (`fpma=False`): a feature pyramid's top-down step, fine + up(proj(coarse)), proj a
    1x1 Conv to the fine map's channels (before the upsample: cheaper), up nearest as in YOLOv8's neck."""

    def __init__(self, c_fine, c_coarse):
        super().__init__()
        self.proj = Conv(c_coarse, c_fine, 1)

    def forward(self, fine, coarse):
        return fine + F.interpolate(self.proj(coarse), size=fine.shape[-2:], mode="nearest")  # (B, C_fine, h, w)


class CTAM(CrossAttention):
    """Cross-task attention: detection queries (target) attend to segmentation features (one or more sources)
    of the same scale, so the detector looks where the vessels are. forward(target, sources, need_attn)."""


class XTAM(CrossAttention):
    """The other direction of DenseMTL's two-way exchange (CTAM is det <- seg): segmentation queries attend to the
    detection features of the same scale. forward(seg, det) -> seg's shape."""

    def __init__(self, c_seg, c_det, **kw):
        super().__init__(c_seg, (c_det,), **kw)

    def forward(self, seg, det):
        return super().forward(seg, [det])[0]


class CSAM(nn.Module):
    """Cross-scale attention: each finer level attends to all coarser ones (in parallel, from the inputs);
    the coarsest passes through unchanged."""

    def __init__(self, ch, qpools=None, **kw):
        super().__init__()
        qpools = qpools or (1,) * len(ch)  # query pooling per level, as CrossAttention's qpool
        self.attn = nn.ModuleList(CrossAttention(c, ch[i + 1:], qpool=qpools[i], **kw) for i, c in enumerate(ch[:-1]))

    def forward(self, xs):
        return [a(x, xs[i + 1:])[0] for i, (a, x) in enumerate(zip(self.attn, xs))] + list(xs[-1:])


# -----------------------------------------------------------------------------
# segmentation head


def resize_logits(x, size, training):
    """Bilinear resize of a logit map (B, 1, h, w) -> (B, 1, H, W): in training two matmuls, whose backward is the
    fast one on a CPU; in eval (validation, gflops, export) ATen's kernel, the faster forward, and no matmul FLOPs
    that grow with the cube of the side."""
    return upsample_bilinear(x, size) if training else F.interpolate(x, size, mode="bilinear", align_corners=False)


class SegHeadMulti(nn.Module):
    """Per scale three halving 3x3 Convs then a 1x1 conv to one vessel logit (deep supervision at
    p3/p4/p5); p4/p5 upsampled to p3, mixed by per-pixel softmax gates (1x1 conv over the three logits), a 3x3
    refine. With `skips` (the channels of the backbone's early maps, stride 4 first), a FinePath carries that
    stride-8 logit down to stride 4 (p2) and 2 (p1). `full`: the finest logit, bilinear to the input size.
    Returns {p3, p4, p5, [p2, [p1,]] full} logits."""

    def __init__(self, ch, skips=()):
        super().__init__()
        self.heads = nn.ModuleList(nn.Sequential(Conv(c, c // 2, 3), Conv(c // 2, c // 4, 3), Conv(c // 4, c // 8, 3),
                                                 nn.Conv2d(c // 8, 1, 1)) for c in ch)
        self.gate = nn.Conv2d(len(ch), len(ch), 1)
        self.refine = nn.Conv2d(1, 1, 3, padding=1)
        nn.init.dirac_(self.refine.weight)  # starts as the identity: `full` = the fused logits, upsampled
        nn.init.zeros_(self.refine.bias)
        self.fine = FinePath(ch[0] // 8 + 1, skips) if skips else None

    def forward(self, xs, size, skips=()):
        h3 = xs[0]
        for m in self.heads[0][:-1]:  # P3's head up to its last hidden map, which the fine path reads too
            h3 = m(h3)  # (B, C3/8, H/8, W/8)
        p = [self.heads[0][-1](h3)] + [m(x) for m, x in zip(self.heads[1:], xs[1:])]  # (B, 1, H/s, W/s) per scale
        up = torch.cat([p[0]] + [F.interpolate(t, p[0].shape[-2:], mode="bilinear", align_corners=False)
                                 for t in p[1:]], 1)  # (B, 3, H/8, W/8)
        fused = (self.gate(up).softmax(1) * up).sum(1, keepdim=True)  # (B, 1, H/8, W/8)
        r = self.refine(fused)  # (B, 1, H/8, W/8)
        out = {"p3": p[0], "p4": p[1], "p5": p[2]}
        if self.fine is not None:
            fine = self.fine(torch.cat((h3, r), 1), r, skips)  # [(B, 1, H/4, W/4), (B, 1, H/2, W/2)]
            out.update(zip(("p2", "p1"), fine))
            r = fine[-1]
        out["full"] = resize_logits(r, size, self.training)  # (B, 1, H, W)
        return out


class FinePath(nn.Module):
    """Vessels below stride 8 (seg_stride 4 or 2). Per step: the map so far upsampled x2 (nearest), concatenated
    with the backbone's own map at that stride (the skip: layer 2 at stride 4, layer 0 at stride 2), two 3x3 Convs,
    and a 1x1 conv to a logit *added* to the coarser logit upsampled. That 1x1 starts at zero,
    so a new fine path draws exactly the stride-8 head's vessels, upsampled, and learns only the residual detail.
    Each step is half as wide as its skip (16 and 8 channels at scale n): a layer at stride 4 or 2 runs over 4 or
    16 times the positions of one at stride 8, and twice the width costs 2.6x the step time (docs/benchmarks.md). No
    attention at these scales, for the same reason."""

    def __init__(self, c, skips):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.blocks, self.logits = nn.ModuleList(), nn.ModuleList()
        for cs in skips:
            w = max(cs // 2, 8)
            self.blocks.append(nn.Sequential(Conv(c + cs, w, 3), Conv(w, w, 3)))
            self.logits.append(nn.Conv2d(w, 1, 1))
            nn.init.zeros_(self.logits[-1].weight)
            nn.init.zeros_(self.logits[-1].bias)
            c = w

    def forward(self, x, logit, skips):
        """x (B, C, H/8, W/8) features at stride 8, logit (B, 1, H/8, W/8) the stride-8 vessels, skips [(B, Cs,
        H/4, W/4), (B, Cs', H/2, W/2)] -> one logit map per skip, [(B, 1, H/4, W/4), (B, 1, H/2, W/2)]."""
        out = []
        for block, head, s in zip(self.blocks, self.logits, skips):
            x = block(torch.cat((self.up(x), s), 1))  # (B, Cs/2, 2h, 2w)
            logit = head(x) + resize_logits(logit, x.shape[-2:], self.training)  # (B, 1, 2h, 2w)
            out.append(logit)
        return out


# -----------------------------------------------------------------------------
# normalisation: DualBatchNorm2d for the two domains, and converters BN -> GroupNorm / DualBN


class DualBatchNorm2d(nn.Module):
    """Two complete BatchNorms, `source` (retinography) and `target` (angiography), each with its own affine
    parameters and running statistics. `domain` picks the branch; the model's switch (CAMTL.set_domain)
    sets it on every DualBN, so no global state. A plain BatchNorm state dict loads into both branches."""

    def __init__(self, c, eps=1e-3, momentum=0.03):
        super().__init__()
        self.source = nn.BatchNorm2d(c, eps, momentum)
        self.target = nn.BatchNorm2d(c, eps, momentum)
        self.domain = "source"

    @classmethod
    def from_bn(cls, bn):
        """Both branches start as copies of bn (weights, statistics, requires_grad, train/eval)."""
        m = cls(bn.num_features, bn.eps, bn.momentum).to(bn.weight.device, bn.weight.dtype)
        for b in (m.source, m.target):
            b.load_state_dict(bn.state_dict())
        return m.requires_grad_(bn.weight.requires_grad).train(bn.training)

    @property
    def active(self):
        return getattr(self, self.domain)

    def forward(self, x):
        return self.active(x)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # a checkpoint from before DualBN (COCO, domainshift1) has plain BN keys: they seed both branches
        for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            if prefix + k in state_dict:
                v = state_dict.pop(prefix + k)
                for branch in ("source.", "target."):
                    state_dict.setdefault(prefix + branch + k, v)
        super()._load_from_state_dict(state_dict, prefix, *args)


def gn_groups(c, max_groups=32):
    """First of 32, 16, 8, 4, 2, 1 that divides c (and is at most max_groups)."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if g <= max_groups and c % g == 0)


def bn_to_gn(bn, max_groups=32):
    """GroupNorm with the BatchNorm's eps and affine parameters (running statistics have no counterpart)."""
    c = bn.num_features
    gn = nn.GroupNorm(gn_groups(c, max_groups), c, eps=bn.eps).to(bn.weight.device, bn.weight.dtype)
    gn.weight.data.copy_(bn.weight.data)
    gn.bias.data.copy_(bn.bias.data)
    return gn.requires_grad_(bn.weight.requires_grad)


def replace_bn(module, make):
    """Swap, in place, every BatchNorm2d under module (except a DualBN's own branches) for make(bn)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, make(child))
        elif not isinstance(child, DualBatchNorm2d):
            replace_bn(child, make)
    return module


def to_groupnorm(module, max_groups=32):
    return replace_bn(module, lambda bn: bn_to_gn(bn, max_groups))


def to_dualbn(module):
    return replace_bn(module, DualBatchNorm2d.from_bn)
