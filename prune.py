"""Structured pruning: whole channels removed from a network, so it is physically smaller and faster.

A *site* is a Conv whose output channels feed exactly one consumer convolution and nothing else, so removing some
of them only shrinks that consumer's input. Concatenations and residual sums tie channels across modules; the
sites are the hidden widths such ties never reach:
- every Bottleneck's first Conv (its residual adds the second Conv's output, never the first's);
- SPPF's first Conv (its four pooled copies are concatenated: the consumer loses each kept channel 4 times);
- the hidden Convs of Detect's box and class branches and of the seg head's per-scale branches (P3's last one
  feeds the fine path too when there is one, so it stays), and the fine path's first Conv of each step;
- the backbone's strided Convs 1, 3, 5 and 7 (each feeds only the next C2f's 1x1 conv).
A pruned network is described by its widths {site: channels}, kept in the config (`widths`): CAMTL builds the
scale's network, then narrows each site (`apply_widths`), so a checkpoint of a pruned network loads wherever a
checkpoint loads. `prune` picks which channels stay: those whose BN-folded filters are largest.
"""
import torch
import torch.nn as nn

from modules import SPPF, Bottleneck, Conv, DualBatchNorm2d, gn_groups


def sites(model):
    """-> {name: (producer Conv, consumer nn.Conv2d, copies)}: every prunable width of a CAMTL or YOLOv8, in module
    order; `copies`: how many times the consumer reads each produced channel (SPPF: 4)."""
    out = {}
    fine = getattr(getattr(model, "seg_head", None), "fine", None)
    for name, m in model.named_modules():
        if isinstance(m, Bottleneck):
            out[f"{name}.cv1"] = (m.cv1, m.cv2.conv, 1)
        elif isinstance(m, SPPF):
            out[f"{name}.cv1"] = (m.cv1, m.cv2.conv, 4)
        elif isinstance(m, nn.Sequential) and name.startswith(("detect.cv2.", "detect.cv3.", "seg_head.heads.",
                                                               "seg_head.fine.")):  # not detect.cv4: training only
            last = len(m) - 1 if not (fine is not None and name == "seg_head.heads.0") else len(m) - 2
            for j in range(min(last, len(m) - 1)):
                if isinstance(m[j], Conv):
                    nxt = m[j + 1]
                    out[f"{name}.{j}"] = (m[j], nxt.conv if isinstance(nxt, Conv) else nxt, 1)
    for i in (1, 3, 5, 7):
        out[f"backbone.{i}"] = (model.backbone[i], model.backbone[i + 1].cv1.conv, 1)
    return {k: out[k] for k in sorted(out, key=list(dict(model.named_modules())).index)}


def _slice(t, idx, dim):
    return nn.Parameter(t.detach().index_select(dim, idx).clone(), requires_grad=t.requires_grad) \
        if isinstance(t, nn.Parameter) else t.index_select(dim, idx).clone()


def _narrow_norm(norm, idx, max_groups):
    """The norm after a Conv, keeping channels idx: BatchNorm (and each DualBN branch) keep their statistics;
    GroupNorm takes the group count its new width gets when built (modules.gn_groups)."""
    if isinstance(norm, DualBatchNorm2d):
        norm.source, norm.target = (_narrow_norm(b, idx, max_groups) for b in (norm.source, norm.target))
        return norm
    if isinstance(norm, nn.GroupNorm):
        new = nn.GroupNorm(gn_groups(len(idx), max_groups), len(idx), eps=norm.eps)
    elif isinstance(norm, nn.BatchNorm2d):
        new = nn.BatchNorm2d(len(idx), eps=norm.eps, momentum=norm.momentum)
        new.running_mean, new.running_var = _slice(norm.running_mean, idx, 0), _slice(norm.running_var, idx, 0)
        new.num_batches_tracked = norm.num_batches_tracked.clone()
    else:  # Identity: a fused Conv
        return norm
    new.weight, new.bias = _slice(norm.weight, idx, 0), _slice(norm.bias, idx, 0)
    return new.to(norm.weight.device).train(norm.training)


def _narrow_conv(conv, idx, dim):
    """A copy of nn.Conv2d conv keeping output (dim 0) or input (dim 1) channels idx."""
    assert conv.groups == 1 and conv.padding_mode == "zeros", "sites are plain convolutions"
    w = conv.weight
    c_out, c_in = (len(idx), conv.in_channels) if dim == 0 else (conv.out_channels, len(idx))
    new = nn.Conv2d(c_in, c_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=conv.bias is not None)
    new.weight = _slice(w, idx, dim)
    if conv.bias is not None:
        new.bias = _slice(conv.bias, idx, 0) if dim == 0 else conv.bias
    return new.to(w.device).train(conv.training)


def narrow(model, name, keep, max_groups=32):
    """Keep only channels `keep` (sorted 1-D indices) of site `name`: the producer Conv's filters and norm, the
    consumer's matching input channels. In place."""
    producer, consumer, copies = sites(model)[name]
    c = producer.conv.out_channels
    keep = torch.as_tensor(keep, dtype=torch.long, device=producer.conv.weight.device)
    producer.conv = _narrow_conv(producer.conv, keep, 0)
    producer.bn = _narrow_norm(producer.bn, keep, max_groups)
    reads = torch.cat([keep + k * c for k in range(copies)])  # the consumer's input = `copies` copies of the output
    parent = next(m for m in model.modules() if any(ch is consumer for ch in m.children()))
    attr = next(n for n, ch in parent.named_children() if ch is consumer)
    setattr(parent, attr, _narrow_conv(consumer, reads, 1))


class WidthsError(ValueError):
    """`widths` that do not fit the network the rest of the config builds."""


def apply_widths(model, widths, max_groups=32):
    """Narrow each site named in widths {site: channels} to that many channels (the first ones: the weights that
    fill them are loaded afterwards). A name that is no site, or a width outside 1..today's: WidthsError."""
    have = sites(model)
    for name, n in widths.items():
        if name not in have:
            raise WidthsError(f"widths: {name!r} is not a prunable layer of this network (the config's scale and "
                              f"switches build another one)")
        c = have[name][0].conv.out_channels
        if not (isinstance(n, int) and 1 <= n <= c):
            raise WidthsError(f"widths: {name} = {n!r}: expected an int from 1 to its {c} channels")
        if n < c:
            narrow(model, name, torch.arange(n), max_groups)
    return model


@torch.no_grad()
def importance(producer):
    """Per output channel of a Conv: the norm of its filter as the network computes it, BN folded in (weight x
    gamma / sqrt(var + eps)); a GroupNorm's gamma only (it has no running statistics); the active DualBN branch."""
    w = producer.conv.weight.flatten(1).norm(dim=1)  # (C,)
    bn = getattr(producer.bn, "active", producer.bn)
    if isinstance(bn, nn.BatchNorm2d):
        return w * bn.weight.abs() / (bn.running_var + bn.eps).sqrt()
    if isinstance(bn, nn.GroupNorm):
        return w * bn.weight.abs()
    return w


# left whole by `prune` unless asked: the seg head is about 4% of CAMTL-n's FLOPs, and narrowing it cost vessel Dice
# that fine-tuning did not bring back, while detection came back (docs/design.md, compression)
WHOLE = ("seg_head.",)


def kept(c, ratio):
    """How many of c channels stay: c * (1 - ratio) rounded to a multiple of 8 (the channel blocks oneDNN's and the
    GPUs' convolution kernels work in), at least 8; c itself when c <= 8."""
    return c if c <= 8 else min(c, max(8, 8 * round(c * (1 - ratio) / 8)))


def prune(model, ratio, max_groups=32, whole=WHOLE):
    """Remove the fraction `ratio` (0 < ratio < 1) of every site's channels (`kept`), the least important ones, in
    place; sites whose name starts with one of `whole` stay whole. -> the widths {site: channels} that describe the
    pruned network."""
    if not 0 < ratio < 1:
        raise ValueError(f"prune ratio {ratio}: expected a fraction between 0 and 1, e.g. 0.3")
    widths = {}
    for name, (producer, _, _) in sites(model).items():
        if name.startswith(whole):
            continue
        c = producer.conv.out_channels
        n = kept(c, ratio)
        keep = importance(producer).topk(n).indices.sort().values
        narrow(model, name, keep, max_groups)
        widths[name] = n
    return widths
