"""U^2-Net and U^2-Net-p (Qin et al., "U^2-Net: Going Deeper with Nested U-Structure for
Salient Object Detection", Pattern Recognition 2020) in plain torch, and their weights
from an ONNX graph or from the original repository's ``.pth`` files.

The modules follow ``model/u2net.py`` of the original repository (xuebinqin/U-2-Net)
layer for layer, with its attribute names (``stage1.rebnconvin.conv_s1.weight``,
``stage1.rebnconvin.bn_s1.running_mean``, ``side1.weight``, ``outconv.bias``, ...), so
its ``u2net.pth`` / ``u2netp.pth`` state dicts load as they are. The code is written
from the paper's architecture and checked against the ONNX export that rembg ships
(``tests/test_u2net.py``: onnxruntime and this module give the same sigmoid output to
a max abs difference of 6.2e-5 on built-in images at 320 x 320, float32 rounding).

Why a plain module and not an ONNX converter (onnx2torch):

* The ONNX exports in circulation (rembg's ``u2netp.onnx``, PyTorch 1.9, opset 11) have
  BatchNorm folded into the convolutions and numeric initializer names ("1967") for
  all but the side and fusion convolutions. :func:`load_onnx_weights` therefore
  takes the Conv nodes in graph order (the exporter's trace order, which is the
  forward order) and assigns them to this module's convolutions in the order its
  forward pass runs them (:func:`conv_execution_order`; the tests check it against
  hooks on a real forward pass), checking each weight shape, dilation, padding and
  stride; a BatchNormalization node after a Conv is folded into it. Only the ``onnx``
  package (to read the protobuf) is needed, not onnxruntime.
* onnx2torch 1.5.15 does convert that graph, and batches and other input sizes work
  (the Resize sizes come from Shape ops), but the result is a torch.fx graph of about
  1,050 modules, with a Shape/Gather/Cast/Concat chain around each of the 38 resizes,
  its Slice converter warns that it relies on an indexing behaviour torch deprecated,
  it depends on torchvision and has had no release since 2024-08, and it cannot load
  the original ``.pth`` weights. A module of ~200 lines has none of these problems.

All convolutions run with their BatchNorm folded in (:meth:`U2Net.fuse_batchnorm`):
one conv + ReLU per REBNCONV block at inference.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Architectures: encoder and decoder stages (block, in, mid, out), side-output widths.
#: "u2netp" is the 4.7 MB model (1.1 M parameters), "u2net" the 176 MB one (44 M).
ARCHITECTURES: dict[str, dict] = {
    "u2netp": {
        "encoder": [("rsu7", 3, 16, 64), ("rsu6", 64, 16, 64), ("rsu5", 64, 16, 64), ("rsu4", 64, 16, 64),
                    ("rsu4f", 64, 16, 64), ("rsu4f", 64, 16, 64)],
        "decoder": [("rsu4f", 128, 16, 64), ("rsu4", 128, 16, 64), ("rsu5", 128, 16, 64), ("rsu6", 128, 16, 64),
                    ("rsu7", 128, 16, 64)],
        "side": [64, 64, 64, 64, 64, 64],
    },
    "u2net": {
        "encoder": [("rsu7", 3, 32, 64), ("rsu6", 64, 32, 128), ("rsu5", 128, 64, 256), ("rsu4", 256, 128, 512),
                    ("rsu4f", 512, 256, 512), ("rsu4f", 512, 256, 512)],
        "decoder": [("rsu4f", 1024, 256, 512), ("rsu4", 1024, 128, 256), ("rsu5", 512, 64, 128), ("rsu6", 256, 32, 64),
                    ("rsu7", 128, 16, 64)],
        "side": [64, 64, 128, 256, 512, 512],
    },
}


def upsample_like(src: Tensor, tar: Tensor) -> Tensor:
    """Bilinear resize of ``src`` to ``tar``'s spatial size (half-pixel centres, as the
    original ``F.upsample(..., mode='bilinear')`` and the ONNX export's Resize with
    ``pytorch_half_pixel``)."""
    if src.shape[-2:] == tar.shape[-2:]:
        return src
    return F.interpolate(src, size=tar.shape[-2:], mode="bilinear", align_corners=False)


class REBNCONV(nn.Module):
    """3 x 3 conv (dilation ``dirate``) + BatchNorm + ReLU."""

    def __init__(self, in_ch: int, out_ch: int, dirate: int = 1):
        super().__init__()
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dirate, dilation=dirate)
        self.bn_s1: nn.Module = nn.BatchNorm2d(out_ch)
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu_s1(self.bn_s1(self.conv_s1(x)))


class RSU(nn.Module):
    """Residual U-block RSU-L (L = 4..7): an L-level U-Net inside a residual connection.

    Encoder: ``rebnconv1 .. rebnconv{L-1}`` with a 2 x 2 max-pool (ceil mode) after
    each but the last, ``rebnconv{L}`` dilated by 2 at the bottom; decoder
    ``rebnconv{L-1}d .. rebnconv1d`` on the concatenation of the upsampled deeper
    output and the encoder feature of the same level.
    """

    def __init__(self, height: int, in_ch: int, mid_ch: int, out_ch: int):
        super().__init__()
        self.height = height
        self.rebnconvin = REBNCONV(in_ch, out_ch, dirate=1)
        for i in range(1, height):
            setattr(self, f"rebnconv{i}", REBNCONV(out_ch if i == 1 else mid_ch, mid_ch, dirate=1))
            if i < height - 1:
                setattr(self, f"pool{i}", nn.MaxPool2d(2, stride=2, ceil_mode=True))
        setattr(self, f"rebnconv{height}", REBNCONV(mid_ch, mid_ch, dirate=2))
        for i in range(height - 1, 0, -1):
            setattr(self, f"rebnconv{i}d", REBNCONV(mid_ch * 2, out_ch if i == 1 else mid_ch, dirate=1))

    def forward(self, x: Tensor) -> Tensor:
        hxin = self.rebnconvin(x)
        feats = []
        hx = hxin
        for i in range(1, self.height):
            hx = getattr(self, f"rebnconv{i}")(hx)
            feats.append(hx)
            if i < self.height - 1:
                hx = getattr(self, f"pool{i}")(hx)
        hx = getattr(self, f"rebnconv{self.height}")(hx)
        d = getattr(self, f"rebnconv{self.height - 1}d")(torch.cat((hx, feats[-1]), 1))
        for i in range(self.height - 2, 0, -1):
            d = getattr(self, f"rebnconv{i}d")(torch.cat((upsample_like(d, feats[i - 1]), feats[i - 1]), 1))
        return d + hxin


class RSU4F(nn.Module):
    """RSU-4F: RSU-4 with dilations 1, 2, 4, 8 instead of pooling (full resolution)."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int):
        super().__init__()
        self.rebnconvin = REBNCONV(in_ch, out_ch, dirate=1)
        self.rebnconv1 = REBNCONV(out_ch, mid_ch, dirate=1)
        self.rebnconv2 = REBNCONV(mid_ch, mid_ch, dirate=2)
        self.rebnconv3 = REBNCONV(mid_ch, mid_ch, dirate=4)
        self.rebnconv4 = REBNCONV(mid_ch, mid_ch, dirate=8)
        self.rebnconv3d = REBNCONV(mid_ch * 2, mid_ch, dirate=4)
        self.rebnconv2d = REBNCONV(mid_ch * 2, mid_ch, dirate=2)
        self.rebnconv1d = REBNCONV(mid_ch * 2, out_ch, dirate=1)

    def forward(self, x: Tensor) -> Tensor:
        hxin = self.rebnconvin(x)
        hx1 = self.rebnconv1(hxin)
        hx2 = self.rebnconv2(hx1)
        hx3 = self.rebnconv3(hx2)
        hx4 = self.rebnconv4(hx3)
        hx3d = self.rebnconv3d(torch.cat((hx4, hx3), 1))
        hx2d = self.rebnconv2d(torch.cat((hx3d, hx2), 1))
        return self.rebnconv1d(torch.cat((hx2d, hx1), 1)) + hxin


def _block(kind: str, in_ch: int, mid_ch: int, out_ch: int) -> nn.Module:
    if kind == "rsu4f":
        return RSU4F(in_ch, mid_ch, out_ch)
    return RSU(int(kind[3:]), in_ch, mid_ch, out_ch)


class U2Net(nn.Module):
    """U^2-Net (``arch="u2net"``) or U^2-Net-p (``arch="u2netp"``), 3 -> 1 channel.

    ``forward(x)`` takes ImageNet-normalised images B x 3 x S x S and returns the
    fused saliency map sigmoid(d0), B x 1 x S x S (the first output of the original
    model and of its ONNX export); ``side_outputs=True`` returns all seven
    (d0, d1, ..., d6) like the original.
    """

    def __init__(self, arch: str = "u2netp"):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown U^2-Net architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
        self.arch = arch
        cfg = ARCHITECTURES[arch]
        for i, spec in enumerate(cfg["encoder"], start=1):
            setattr(self, f"stage{i}", _block(*spec))
            if i < 6:
                setattr(self, f"pool{i}{i + 1}", nn.MaxPool2d(2, stride=2, ceil_mode=True))
        for i, spec in zip(range(5, 0, -1), cfg["decoder"]):
            setattr(self, f"stage{i}d", _block(*spec))
        for i, width in enumerate(cfg["side"], start=1):
            setattr(self, f"side{i}", nn.Conv2d(width, 1, 3, padding=1))
        self.outconv = nn.Conv2d(6, 1, 1)

    def forward(self, x: Tensor, side_outputs: bool = False):
        enc = []
        hx = x
        for i in range(1, 7):
            hx = getattr(self, f"stage{i}")(hx)
            enc.append(hx)
            if i < 6:
                hx = getattr(self, f"pool{i}{i + 1}")(hx)
        dec = {6: enc[5]}
        d = enc[5]
        for i in range(5, 0, -1):
            d = getattr(self, f"stage{i}d")(torch.cat((upsample_like(d, enc[i - 1]), enc[i - 1]), 1))
            dec[i] = d
        d1 = self.side1(dec[1])
        sides = [d1] + [upsample_like(getattr(self, f"side{i}")(dec[i]), d1) for i in range(2, 7)]
        d0 = self.outconv(torch.cat(sides, 1))
        if side_outputs:
            return tuple(torch.sigmoid(t) for t in [d0, *sides])
        return torch.sigmoid(d0)

    def rebnconvs(self) -> list[REBNCONV]:
        return [m for m in self.modules() if isinstance(m, REBNCONV)]

    def fuse_batchnorm(self) -> "U2Net":
        """Fold every BatchNorm (eval statistics) into its convolution; returns self."""
        for block in self.rebnconvs():
            bn = block.bn_s1
            if isinstance(bn, nn.BatchNorm2d):
                w, b = fold_batchnorm(block.conv_s1.weight, block.conv_s1.bias, bn.weight, bn.bias, bn.running_mean,
                                      bn.running_var, bn.eps)
                with torch.no_grad():
                    block.conv_s1.weight.copy_(w)
                    block.conv_s1.bias.copy_(b)
                block.bn_s1 = nn.Identity()
        return self

    def drop_batchnorm(self) -> "U2Net":
        """Replace every BatchNorm by the identity (for weights that have it folded in)."""
        for block in self.rebnconvs():
            block.bn_s1 = nn.Identity()
        return self


def fold_batchnorm(weight: Tensor, bias: Tensor | None, gamma: Tensor, beta: Tensor, mean: Tensor, var: Tensor,
                   eps: float) -> tuple[Tensor, Tensor]:
    """Conv weight and bias with a following BatchNorm folded in (in float64, then the
    weight's dtype): w * s, (b - mean) * s + beta with s = gamma / sqrt(var + eps)."""
    dtype = weight.dtype
    scale = gamma.double() / torch.sqrt(var.double() + eps)
    b = bias.double() if bias is not None else torch.zeros_like(mean, dtype=torch.float64)
    w = weight.double() * scale.view(-1, *([1] * (weight.dim() - 1)))
    return w.to(dtype), ((b - mean.double()) * scale + beta.double()).to(dtype)


def _block_conv_names(block: nn.Module) -> list[str]:
    """REBNCONV names of an RSU / RSU-4F block in the order its forward runs them."""
    depth = block.height if isinstance(block, RSU) else 4
    return (["rebnconvin"] + [f"rebnconv{i}" for i in range(1, depth + 1)]
            + [f"rebnconv{i}d" for i in range(depth - 1, 0, -1)])


def conv_execution_order(model: U2Net) -> list[tuple[str, nn.Conv2d]]:
    """(name, conv) of every convolution of ``model`` in the order its forward pass runs
    them, which is the order ONNX exports list them in (tests/test_u2net.py checks it
    against hooks on a real forward pass)."""
    names = []
    for stage in [f"stage{i}" for i in range(1, 7)] + [f"stage{i}d" for i in range(5, 0, -1)]:
        names += [f"{stage}.{n}.conv_s1" for n in _block_conv_names(getattr(model, stage))]
    names += [f"side{i}" for i in range(1, 7)] + ["outconv"]
    modules = dict(model.named_modules())
    return [(name, modules[name]) for name in names]


def recorded_conv_order(model: U2Net, size: int = 32) -> list[str]:
    """Names of the convolutions in the order a real forward pass (eval mode, CPU,
    ``size`` x ``size`` zeros) runs them, recorded with hooks."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _inp: order.append(names[mod]))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return order


class GraphMismatch(ValueError):
    """An ONNX graph or state dict that is not the expected U^2-Net architecture."""


def _conv_attributes(node) -> dict[str, list[int]]:
    import onnx

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return {k: list(attrs[k]) for k in ("dilations", "pads", "strides", "kernel_shape") if k in attrs} | {
        "group": [int(attrs.get("group", 1))]}


def onnx_convs(model_proto) -> list[tuple[str, Tensor, Tensor | None, dict]]:
    """(weight name, weight, bias, attributes) of every Conv node in graph order, with a
    BatchNormalization node that consumes a Conv's output folded into that Conv."""
    from onnx import numpy_helper

    graph = model_proto.graph
    inits = {t.name: t for t in graph.initializer}
    # Constant nodes can also carry weights (some exporters emit them instead of initializers)
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    inits.setdefault(node.output[0], attr.t)

    def tensor(name: str) -> Tensor:
        if name not in inits:
            raise GraphMismatch(f"input {name!r} of a Conv node is not a stored weight (weights computed at run time are not supported)")
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        weight = tensor(node.input[1])
        bias = tensor(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        bns = [c for c in consumers.get(node.output[0], []) if c.op_type == "BatchNormalization"]
        if bns:
            bn = bns[0]
            eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
            gamma, beta, mean, var = (tensor(n) for n in bn.input[1:5])
            weight, bias = fold_batchnorm(weight, bias, gamma, beta, mean, var, eps)
        out.append((node.input[1], weight, bias, _conv_attributes(node)))
    return out


def load_onnx_weights(model: U2Net, convs: list[tuple[str, Tensor, Tensor | None, dict]]) -> None:
    """Copy the Conv weights of an ONNX graph (:func:`onnx_convs`) into ``model``
    (BatchNorm dropped), matching them in execution order; raises :class:`GraphMismatch`
    naming the first convolution that does not fit."""
    model.drop_batchnorm()
    order = conv_execution_order(model)
    if len(convs) != len(order):
        raise GraphMismatch(f"the graph has {len(convs)} convolutions; {model.arch} has {len(order)}")
    for k, ((name, conv), (onnx_name, weight, bias, attrs)) in enumerate(zip(order, convs)):
        expected = {"kernel_shape": list(conv.kernel_size), "dilations": list(conv.dilation),
                    "pads": [conv.padding[0], conv.padding[1]] * 2, "strides": list(conv.stride), "group": [conv.groups]}
        if tuple(weight.shape) != tuple(conv.weight.shape):
            raise GraphMismatch(f"convolution {k} ({onnx_name!r}) has weight shape {tuple(weight.shape)} where "
                                f"{model.arch}'s {name} has {tuple(conv.weight.shape)}")
        for attr, value in expected.items():
            if attr in attrs and attrs[attr] != value:
                raise GraphMismatch(f"convolution {k} ({onnx_name!r}) has {attr}={attrs[attr]} where {model.arch}'s "
                                    f"{name} has {value}")
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias if bias is not None else torch.zeros_like(conv.bias))


def detect_architecture(convs_or_state) -> str | None:
    """"u2netp" or "u2net" from an ONNX conv list or a state dict, None when neither fits."""
    if isinstance(convs_or_state, Mapping):
        w = convs_or_state.get("stage1.rebnconv1.conv_s1.weight")
        mid = int(w.shape[0]) if isinstance(w, Tensor) and w.dim() == 4 else None
    else:
        mid = int(convs_or_state[1][1].shape[0]) if len(convs_or_state) > 1 and convs_or_state[1][1].dim() == 4 else None
    for arch, cfg in ARCHITECTURES.items():
        if mid == cfg["encoder"][0][2]:
            return arch
    return None
