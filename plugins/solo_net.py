"""SOLO and SOLOv2 instance segmentation in plain torch (no mmcv / mmdet).

Wang et al., "SOLO: Segmenting Objects by Locations" (ECCV 2020) and "SOLOv2: Dynamic
and Fast Instance Segmentation" (NeurIPS 2020). The modules reproduce the structure and
state-dict names of mmdetection's ``SOLO`` / ``SOLOv2`` detectors (2.x and 3.x), so
their model-zoo checkpoints load without conversion:

* ``backbone.*``: mmdet ``ResNet`` (style "pytorch") = torchvision's ResNet without
  ``fc``; eval-mode BatchNorm.
* ``neck.lateral_convs.{i}.conv.*`` / ``neck.fpn_convs.{i}.conv.*``: mmdet ``FPN``
  (4 inputs, 5 outputs, the 5th by stride-2 max pooling, nearest top-down upsampling).
* ``mask_head.*``: ``SOLOHead`` (mask_convs, cls_convs, conv_mask_list, conv_cls) or
  ``SOLOV2Head`` (kernel_convs, cls_convs, conv_kernel, conv_cls,
  mask_feature_head.convs_all_levels / conv_pred). Stacked convs are mmcv
  ``ConvModule``s: ``.conv`` (no bias) + ``.gn`` (GroupNorm 32) + ReLU.

Checkpoints of the original SOLO repository (WXinlong/SOLO, an mmdet 1.x fork:
``bbox_head.ins_convs / cate_convs / solo_ins_list / solo_cate``, SOLOv2
``bbox_head.kernel_convs / solo_kernel`` and ``mask_feat_head.*``) are renamed to the
mmdet names by :func:`remap_state_dict`.

Inference follows mmdet's ``predict_by_feat`` (test_cfg of the COCO configs: score_thr
0.1, mask_thr 0.5, nms_pre 500, Gaussian matrix NMS with sigma 2, filter_thr 0.05) with
one change that does not alter any result: mask logits are computed only for the grid
cells whose class score passes the threshold (SOLO's 1x1 ``conv_mask_list`` rows are
gathered, exactly as SOLOv2 does with its dynamic kernels), instead of materialising
all 3872 mask channels per image.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dhat_seg.errors import UserError

#: mmdet's Normalize: ImageNet mean / std on a 0-255 RGB image (``to_rgb=True``).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
#: Images are zero-padded (after normalisation) to a multiple of this (mmdet's Pad).
SIZE_DIVISOR = 32

VARIANTS = ("solo", "solov2")
DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
          101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}


@dataclass(frozen=True)
class SoloConfig:
    """Architecture of a SOLO / SOLOv2 model (defaults: the R50 COCO configs).

    Attributes:
        variant: "solo" (SOLOHead) or "solov2" (SOLOV2Head).
        depth: ResNet depth, one of 18, 34, 50, 101, 152.
        fpn_channels: FPN output channels = the head's ``in_channels``.
        feat_channels: channels of the head's stacked convs (SOLO 256, SOLOv2 512,
            SOLOv2-light 256).
        stacked_convs: number of stacked convs per branch (SOLO 7, SOLOv2 4, light 2).
        num_classes: classes of ``conv_cls`` (COCO: 80).
        num_grids: S of each level (the number of grid cells per side).
        strides: per-level minimum mask area, in pixels of the stride-4 mask map
            (mmdet reuses the ``strides`` list for this filter).
        cls_down_index: SOLO: index of the cls conv before which features are resized
            to S x S.
        mask_feat_channels: SOLOv2 mask feature branch width (128).
        mask_out_channels: SOLOv2 unified mask feature channels E = kernel length (256,
            light: 128).
        mask_levels: SOLOv2 mask feature branch uses FPN levels 0 .. mask_levels - 1.
        gn_groups: GroupNorm groups of the head (32 in every mmdet config).
    """

    variant: str = "solov2"
    depth: int = 50
    fpn_channels: int = 256
    feat_channels: int = 512
    stacked_convs: int = 4
    num_classes: int = 80
    num_grids: tuple[int, ...] = (40, 36, 24, 16, 12)
    strides: tuple[int, ...] = (8, 8, 16, 32, 32)
    cls_down_index: int = 0
    mask_feat_channels: int = 128
    mask_out_channels: int = 256
    mask_levels: int = 4
    gn_groups: int = 32

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise UserError(f"SOLO variant {self.variant!r} is invalid; expected one of {', '.join(VARIANTS)}")
        if self.depth not in DEPTHS:
            raise UserError(f"ResNet depth {self.depth!r} is invalid; expected one of {', '.join(map(str, DEPTHS))}")
        if len(self.num_grids) != len(self.strides):
            raise UserError(f"SOLO num_grids {self.num_grids} and strides {self.strides} must have the same length")


# ---------------------------------------------------------------------------------
# Building blocks (names follow mmcv's ConvModule so that state dicts match).
# ---------------------------------------------------------------------------------


class ConvGNReLU(nn.Module):
    """mmcv ``ConvModule(norm_cfg=GN)``: conv without bias (bias="auto"), GroupNorm, ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.gn = nn.GroupNorm(groups, cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.gn(self.conv(x)))


class ConvOnly(nn.Module):
    """mmcv ``ConvModule(norm_cfg=None, act_cfg=None)`` as used by the FPN: a biased conv."""

    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def coord_features(x: Tensor) -> Tensor:
    """The two CoordConv channels SOLO concatenates: x then y, each linspace(-1, 1).

    mmdet ``generate_coordinate``: B x 2 x H x W, channel 0 varies along the width.
    """
    b, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    y, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, y]).unsqueeze(0).expand(b, -1, -1, -1)


def points_nms(scores: Tensor) -> Tensor:
    """Keep only 2x2 local maxima of the category map (SOLO's "points NMS").

    ``max_pool2d(k=2, s=1, p=1)`` cropped to the input size compares each cell with its
    upper-left neighbours; cells that are not the maximum are zeroed.
    """
    local_max = F.max_pool2d(scores, 2, stride=1, padding=1)[:, :, :-1, :-1]
    return scores * (local_max == scores)


class ResNetBackbone(nn.Module):
    """mmdet ``ResNet(style='pytorch', out_indices=(0, 1, 2, 3))``: C2..C5.

    The modules are torchvision's (same names and shapes as mmdet's, which is why
    mmdet initialises its backbone from ``torchvision://resnet50``), without weights.
    """

    def __init__(self, depth: int):
        super().__init__()
        import torchvision

        tv = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = tv.conv1, tv.bn1, tv.relu, tv.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = tv.layer1, tv.layer2, tv.layer3, tv.layer4
        expansion = 1 if DEPTHS[depth][0] == "basic" else 4
        self.out_channels = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return outs


class FPN(nn.Module):
    """mmdet ``FPN(start_level=0, num_outs=5, add_extra_convs=False)`` (Lin et al. 2017)."""

    def __init__(self, in_channels: list[int], out_channels: int, num_outs: int = 5):
        super().__init__()
        self.num_outs = num_outs
        self.lateral_convs = nn.ModuleList(ConvOnly(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvOnly(out_channels, out_channels, 3) for _ in in_channels)

    def forward(self, inputs: list[Tensor]) -> list[Tensor]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down path, nearest upsampling to the exact size
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        while len(outs) < self.num_outs:  # extra levels: max_pool2d(kernel 1, stride 2)
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs


def resize_feats(feats: list[Tensor]) -> list[Tensor]:
    """SOLO's level resizing: P2 halved (to the P3 size), P6 doubled (to the P5 size)."""
    out = list(feats)
    out[0] = F.interpolate(feats[0], scale_factor=0.5, mode="bilinear", align_corners=False)
    out[-1] = F.interpolate(feats[-1], size=feats[-2].shape[-2:], mode="bilinear", align_corners=False)
    return out


# ---------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------


@dataclass
class HeadOutput:
    """What a head produces for a batch, in a form both variants share.

    Attributes:
        cls_scores: B x S_total x C category scores after sigmoid and points NMS, the
            grid cells of all levels concatenated (cell index = level offset + row * S
            + col, as in mmdet).
        mask_size: (h, w) of the stride-4 mask map.
        state: variant-specific tensors :meth:`SOLOHead.cell_masks` needs.
    """

    cls_scores: Tensor
    mask_size: tuple[int, int]
    state: dict[str, Any] = field(default_factory=dict)


class SOLOHead(nn.Module):
    """mmdet ``SOLOHead`` (SOLO, Wang et al. 2020, sec. 3): a category branch predicting
    an S x S x C score grid and a mask branch predicting S^2 masks per level."""

    def __init__(self, cfg: SoloConfig):
        super().__init__()
        self.cfg = cfg
        c, f, g = cfg.fpn_channels, cfg.feat_channels, cfg.gn_groups
        self.mask_convs = nn.ModuleList(ConvGNReLU(c + 2 if i == 0 else f, f, 3, g) for i in range(cfg.stacked_convs))
        self.cls_convs = nn.ModuleList(ConvGNReLU(c if i == 0 else f, f, 3, g) for i in range(cfg.stacked_convs))
        self.conv_mask_list = nn.ModuleList(nn.Conv2d(f, s * s, 1) for s in cfg.num_grids)
        self.conv_cls = nn.Conv2d(f, cfg.num_classes, 3, padding=1)

    def _mask_feat(self, x: Tensor) -> Tensor:
        x = torch.cat([x, coord_features(x)], 1)
        for conv in self.mask_convs:
            x = conv(x)
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    def _cls_logits(self, x: Tensor, grid: int) -> Tensor:
        for j, conv in enumerate(self.cls_convs):
            if j == self.cfg.cls_down_index:
                x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
            x = conv(x)
        return self.conv_cls(x)

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """mmdet's eval-mode ``SOLOHead.forward``: all S^2 mask probabilities of every
        level upsampled to the stride-4 size, and the points-NMS'd category scores.
        Memory-hungry (3872 maps per image); :meth:`run` + :meth:`cell_masks` compute
        the same values for selected cells only."""
        feats = resize_feats(feats)
        size = (feats[0].shape[-2] * 2, feats[0].shape[-1] * 2)
        masks, scores = [], []
        for i, x in enumerate(feats):
            m = self.conv_mask_list[i](self._mask_feat(x)).sigmoid()
            masks.append(F.interpolate(m, size=size, mode="bilinear", align_corners=False))
            scores.append(points_nms(self._cls_logits(x, self.cfg.num_grids[i]).sigmoid()))
        return masks, scores

    def run(self, feats: list[Tensor]) -> HeadOutput:
        feats = resize_feats(feats)
        size = (feats[0].shape[-2] * 2, feats[0].shape[-1] * 2)
        mask_feats, scores = [], []
        for i, x in enumerate(feats):
            mask_feats.append(self._mask_feat(x))
            s = points_nms(self._cls_logits(x, self.cfg.num_grids[i]).sigmoid())
            scores.append(s.permute(0, 2, 3, 1).flatten(1, 2))
        return HeadOutput(torch.cat(scores, 1), size, {"mask_feats": mask_feats})

    def cell_masks(self, out: HeadOutput, image: int, cells: Tensor) -> Tensor:
        """Mask probabilities (K x h x w, stride 4) of grid cells ``cells`` of one image.

        Row k of ``conv_mask_list[level]`` is a 1x1 conv producing cell k's mask, so
        gathering rows gives exactly mmdet's values for those cells.
        """
        offsets = level_offsets(self.cfg.num_grids, cells.device)
        levels = torch.bucketize(cells, offsets[1:], right=True)
        result = out.state["mask_feats"][0].new_empty(len(cells), *out.mask_size)
        for lvl in levels.unique().tolist():
            pick = (levels == lvl).nonzero().flatten()
            local = cells[pick] - offsets[lvl]
            conv = self.conv_mask_list[lvl]
            feat = out.state["mask_feats"][lvl][image : image + 1]
            m = F.conv2d(feat, conv.weight[local], conv.bias[local]).sigmoid()
            result[pick] = F.interpolate(m, size=out.mask_size, mode="bilinear", align_corners=False)[0]
        return result


class MaskFeatModule(nn.Module):
    """mmdet ``MaskFeatModule`` (SOLOv2 sec. 3.2.2, "unified mask feature"): FPN levels
    0..3 convolved and upsampled to stride 4, summed (CoordConv on the coarsest), then
    a 1x1 ConvModule to E channels."""

    def __init__(self, cfg: SoloConfig):
        super().__init__()
        c, f, g = cfg.fpn_channels, cfg.mask_feat_channels, cfg.gn_groups
        end = cfg.mask_levels - 1
        self.convs_all_levels = nn.ModuleList()
        for i in range(cfg.mask_levels):
            seq = nn.Sequential()
            if i == 0:
                seq.add_module("conv0", ConvGNReLU(c, f, 3, g))
            for j in range(i):
                cin = (c + 2 if i == end else c) if j == 0 else f
                seq.add_module(f"conv{j}", ConvGNReLU(cin, f, 3, g))
                seq.add_module(f"upsample{j}", nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.convs_all_levels.append(seq)
        self.conv_pred = ConvGNReLU(f, cfg.mask_out_channels, 1, g)

    def forward(self, feats: list[Tensor]) -> Tensor:
        inputs = feats[: len(self.convs_all_levels)]
        total = self.convs_all_levels[0](inputs[0])
        for i in range(1, len(inputs)):
            x = inputs[i]
            if i == len(inputs) - 1:
                x = torch.cat([x, coord_features(x)], 1)
            total = total + self.convs_all_levels[i](x)
        return self.conv_pred(total)


class SOLOV2Head(nn.Module):
    """mmdet ``SOLOV2Head`` (SOLOv2, Wang et al. 2020, sec. 3.2): per grid cell a
    dynamic 1x1 kernel (length E) convolved with the unified mask feature."""

    def __init__(self, cfg: SoloConfig):
        super().__init__()
        self.cfg = cfg
        c, f, g = cfg.fpn_channels, cfg.feat_channels, cfg.gn_groups
        self.kernel_convs = nn.ModuleList(ConvGNReLU(c + 2 if i == 0 else f, f, 3, g) for i in range(cfg.stacked_convs))
        self.cls_convs = nn.ModuleList(ConvGNReLU(c if i == 0 else f, f, 3, g) for i in range(cfg.stacked_convs))
        self.conv_cls = nn.Conv2d(f, cfg.num_classes, 3, padding=1)
        self.conv_kernel = nn.Conv2d(f, cfg.mask_out_channels, 3, padding=1)
        self.mask_feature_head = MaskFeatModule(cfg)

    def run(self, feats: list[Tensor]) -> HeadOutput:
        mask_feats = self.mask_feature_head(feats)
        kernels, scores = [], []
        for i, x in enumerate(resize_feats(feats)):
            x = torch.cat([x, coord_features(x)], 1)
            x = F.interpolate(x, size=self.cfg.num_grids[i], mode="bilinear", align_corners=False)
            k, c = x, x[:, :-2]  # the category branch does not see the coordinates
            for conv in self.kernel_convs:
                k = conv(k)
            for conv in self.cls_convs:
                c = conv(c)
            kernels.append(self.conv_kernel(k).permute(0, 2, 3, 1).flatten(1, 2))
            scores.append(points_nms(self.conv_cls(c).sigmoid()).permute(0, 2, 3, 1).flatten(1, 2))
        return HeadOutput(torch.cat(scores, 1), tuple(mask_feats.shape[-2:]),
                          {"mask_feats": mask_feats, "kernels": torch.cat(kernels, 1)})

    def cell_masks(self, out: HeadOutput, image: int, cells: Tensor) -> Tensor:
        """sigmoid(mask_feats * kernel) for the given cells of one image: K x h x w."""
        kernels = out.state["kernels"][image, cells]
        feat = out.state["mask_feats"][image : image + 1]
        return F.conv2d(feat, kernels[:, :, None, None]).sigmoid()[0]


def level_offsets(num_grids, device) -> Tensor:
    """Start index of each level's cells in the concatenated cell list (plus the total)."""
    sizes = torch.tensor([0] + [s * s for s in num_grids], device=device)
    return sizes.cumsum(0)


# ---------------------------------------------------------------------------------
# Matrix NMS
# ---------------------------------------------------------------------------------


def matrix_nms_decay(masks: Tensor, labels: Tensor, scores: Tensor, areas: Tensor | None = None,
                     kernel: str = "gaussian", sigma: float = 2.0) -> Tensor:
    """Matrix NMS (SOLOv2 paper, sec. 4.2 and Fig. 3): decayed scores, one pass.

    ``scores`` must be sorted in decreasing order. For each mask j and each
    higher-scored mask i of the same label, the decay is f(iou_ij) / f(cmax_i) with
    cmax_i the largest IoU of mask i with any higher-scored mask (how much i was itself
    suppressed); mask j keeps the smallest decay over i:

    * gaussian: f(iou) = exp(-sigma * iou^2) (mmdet's form; the paper writes
      exp(-iou^2 / sigma) with sigma = 0.5, the same thing for mmdet's sigma = 2),
    * linear: f(iou) = 1 - iou.

    Args:
        masks: N x H x W boolean masks.
        labels: N class labels (suppression only within a class).
        scores: N scores, sorted decreasingly.
        areas: N mask areas (computed when None).
    Returns:
        N decayed scores (same order).
    """
    n = len(scores)
    if n == 0:
        return scores
    flat = masks.reshape(n, -1).float()
    areas = flat.sum(1) if areas is None else areas.float()
    inter = flat @ flat.T
    union = areas[:, None] + areas[None, :] - inter
    iou = (inter / union.clamp_min(1e-6)).triu(diagonal=1)
    same = (labels[:, None] == labels[None, :]).triu(diagonal=1)
    decay_iou = iou * same
    cmax = decay_iou.max(0).values[:, None]  # row i: cmax of the suppressor i
    if kernel == "gaussian":
        decay = torch.exp(-sigma * (decay_iou**2 - cmax**2))
    elif kernel == "linear":
        decay = (1 - decay_iou) / (1 - cmax).clamp_min(1e-6)
    else:
        raise UserError(f"matrix NMS kernel {kernel!r} is invalid; expected 'gaussian' or 'linear'")
    return scores * decay.min(0).values


def mask_matrix_nms(masks: Tensor, labels: Tensor, scores: Tensor, areas: Tensor | None = None,
                    nms_pre: int = -1, max_num: int = -1, kernel: str = "gaussian", sigma: float = 2.0,
                    filter_thr: float = -1) -> tuple[Tensor, Tensor]:
    """mmdet ``mask_matrix_nms``: sort, keep ``nms_pre``, decay, drop scores below
    ``filter_thr``, keep the ``max_num`` best.

    Returns:
        (scores, keep): decayed scores in decreasing order and the indices of the kept
        masks in the input.
    """
    order = scores.argsort(descending=True)
    if nms_pre > 0:
        order = order[:nms_pre]
    areas = masks.flatten(1).sum(1).float() if areas is None else areas
    decayed = matrix_nms_decay(masks[order], labels[order], scores[order], areas[order], kernel, sigma)
    if filter_thr > 0:
        ok = decayed >= filter_thr
        order, decayed = order[ok], decayed[ok]
    decayed, resort = decayed.sort(descending=True)
    order = order[resort]
    if max_num > 0:
        order, decayed = order[:max_num], decayed[:max_num]
    return decayed, order


# ---------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------


@dataclass
class Instances:
    """Instances found in one image, best first."""

    scores: Tensor  # N
    labels: Tensor  # N
    masks: Tensor  # N x H x W bool, at the input image size
    fallback: bool = False  # True when no instance passed the thresholds and the best cell was returned


class SOLO(nn.Module):
    """Backbone + FPN + SOLO/SOLOv2 head with mmdet's state-dict layout."""

    def __init__(self, cfg: SoloConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNetBackbone(cfg.depth)
        self.neck = FPN(self.backbone.out_channels, cfg.fpn_channels, num_outs=len(cfg.num_grids))
        self.mask_head = SOLOHead(cfg) if cfg.variant == "solo" else SOLOV2Head(cfg)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: Tensor, input_size: int) -> tuple[Tensor, tuple[int, int]]:
        """[0, 1] RGB images -> mmdet's network input and the resized (unpadded) size.

        Resize so that the shorter side is ``input_size`` (keeping the aspect ratio;
        0 = keep the size), scale to 0-255, normalise with ImageNet mean/std (mmdet's
        ``to_rgb=True`` pipeline on RGB input), zero-pad bottom/right to a multiple of 32.
        """
        h, w = images.shape[-2:]
        if input_size > 0 and min(h, w) != input_size:
            scale = input_size / min(h, w)
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
        x = (images * 255.0 - self.pixel_mean) / self.pixel_std
        rh, rw = x.shape[-2:]
        ph, pw = -rh % SIZE_DIVISOR, -rw % SIZE_DIVISOR
        return F.pad(x, (0, pw, 0, ph)), (rh, rw)

    def features(self, x: Tensor) -> list[Tensor]:
        return self.neck(self.backbone(x))

    @torch.no_grad()
    def predict(self, images: Tensor, input_size: int = 0, score_thr: float = 0.1, mask_thr: float = 0.5,
                nms_pre: int = 500, max_num: int = 100, filter_thr: float = 0.05, kernel: str = "gaussian",
                sigma: float = 2.0, fallback_best: bool = False) -> list[Instances]:
        """Instance masks of a batch of [0, 1] images (B x 3 x H x W), batched through
        backbone, FPN and head; post-processing per image as in mmdet's
        ``_predict_by_feat_single``.

        Args:
            score_thr: category-score threshold of candidate cells.
            mask_thr: mask-probability threshold.
            nms_pre / max_num / filter_thr / kernel / sigma: matrix NMS settings.
            fallback_best: when nothing survives, return the single highest-scoring
                cell (its mask thresholded at ``mask_thr``) with ``fallback=True``
                instead of no instance.
        """
        height, width = images.shape[-2:]
        x, resized = self.preprocess(images.float(), input_size)
        out = self.mask_head.run(self.features(x))
        return [
            self._postprocess(out, b, resized, (height, width), score_thr, mask_thr, nms_pre, max_num,
                              filter_thr, kernel, sigma, fallback_best)
            for b in range(images.shape[0])
        ]

    def _cell_strides(self, cells: Tensor) -> Tensor:
        offsets = level_offsets(self.cfg.num_grids, cells.device)
        levels = torch.bucketize(cells, offsets[1:], right=True)
        return torch.tensor(self.cfg.strides, device=cells.device, dtype=torch.float32)[levels]

    def _to_image(self, probs: Tensor, resized: tuple[int, int], original: tuple[int, int], mask_thr: float) -> Tensor:
        """Stride-4 probabilities -> padded input size -> crop -> original size -> bool."""
        up = F.interpolate(probs[None], scale_factor=4, mode="bilinear", align_corners=False)
        up = up[:, :, : resized[0], : resized[1]]
        return F.interpolate(up, size=original, mode="bilinear", align_corners=False)[0] > mask_thr

    def _postprocess(self, out: HeadOutput, b: int, resized, original, score_thr, mask_thr, nms_pre, max_num,
                     filter_thr, kernel, sigma, fallback_best) -> Instances:
        scores = out.cls_scores[b]  # S x C
        cand = (scores > score_thr).nonzero()
        if len(cand):
            cells, inverse = cand[:, 0].unique(return_inverse=True)
            probs = self.mask_head.cell_masks(out, b, cells)
            masks = probs > mask_thr
            areas = masks.flatten(1).sum(1).float()
            # maskness: mean probability inside the mask; masks smaller than the level's stride are dropped
            maskness = (probs * masks).flatten(1).sum(1) / areas.clamp_min(1)
            ok = (areas > self._cell_strides(cells))[inverse]
            cand, inverse = cand[ok], inverse[ok]
            if len(cand):
                cand_scores = scores[cand[:, 0], cand[:, 1]] * maskness[inverse]
                final, keep = mask_matrix_nms(masks[inverse], cand[:, 1], cand_scores, areas[inverse], nms_pre,
                                              max_num, kernel, sigma, filter_thr)
                if len(keep):
                    chosen = inverse[keep]
                    return Instances(final, cand[keep, 1], self._to_image(probs[chosen], resized, original, mask_thr))
        device = scores.device
        if not fallback_best:
            return Instances(scores.new_zeros(0), torch.zeros(0, dtype=torch.long, device=device),
                             torch.zeros(0, *original, dtype=torch.bool, device=device))
        best = scores.flatten().argmax()
        cell, label = best // scores.shape[1], best % scores.shape[1]
        probs = self.mask_head.cell_masks(out, b, cell.view(1))
        return Instances(scores.flatten()[best].view(1), label.view(1),
                         self._to_image(probs, resized, original, mask_thr), fallback=True)


# ---------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------

#: Original SOLO repository (mmdet 1.x fork) name -> mmdet 2.x / 3.x name, by prefix.
ORIGINAL_TO_MMDET = (
    ("bbox_head.ins_convs.", "mask_head.mask_convs."),
    ("bbox_head.cate_convs.", "mask_head.cls_convs."),
    ("bbox_head.solo_ins_list.", "mask_head.conv_mask_list."),
    ("bbox_head.solo_cate.", "mask_head.conv_cls."),
    ("bbox_head.kernel_convs.", "mask_head.kernel_convs."),
    ("bbox_head.solo_kernel.", "mask_head.conv_kernel."),
    ("mask_feat_head.conv_pred.0.", "mask_head.mask_feature_head.conv_pred."),
    ("mask_feat_head.", "mask_head.mask_feature_head."),
)


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The flat state dict of a checkpoint file, never unpickling arbitrary objects.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``, which accepts tensors and plain containers
    (mmdet's ``meta`` dict of strings and numbers loads). The weights may be nested
    under ``state_dict`` (mmdet) or ``model``; a DataParallel ``module.`` prefix is
    removed.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"SOLO checkpoint {str(path)!r} does not exist; expected a .pth or .safetensors file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as exc:
            raise UserError(f"SOLO checkpoint {str(path)!r} is not a valid safetensors file: {exc}") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UserError(_unsafe_checkpoint_message(path, exc)) from None
        except Exception as exc:
            raise UserError(f"SOLO checkpoint {str(path)!r} cannot be read ({str(exc).splitlines()[0]}); "
                            "expected a PyTorch .pth or a .safetensors file") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(f"SOLO checkpoint {str(path)!r} holds no state dict; expected a mmdetection or SOLO checkpoint")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise UserError(f"SOLO checkpoint {str(path)!r}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                            "expected a state dict of tensors")
        state[key[len("module."):] if key.startswith("module.") else key] = value
    return state


def _unsafe_checkpoint_message(path: Path, exc: Exception) -> str:
    names = ""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        if found:
            names = f" (it references {', '.join(found[:4])})"
    except Exception:  # old (non-zip) checkpoints cannot be inspected; the message stays generic
        pass
    return (
        f"SOLO checkpoint {str(path)!r} contains Python objects besides tensors{names}, and dhat-seg never "
        "unpickles them. Convert it once where you trust the file: python -c \"import torch; "
        f"c = torch.load('{path}', map_location='cpu', weights_only=False); "
        "torch.save(c.get('state_dict', c), 'solo_weights.pth')\" and pass solo_weights.pth "
        "(or save it with safetensors.torch.save_file as a .safetensors file)"
    )


def checkpoint_format(state: Mapping[str, Tensor]) -> str:
    """"mmdet" (``mask_head.*``, mmdetection 2.x/3.x) or "original" (``bbox_head.*``,
    WXinlong/SOLO)."""
    if any(k.startswith("mask_head.") for k in state):
        return "mmdet"
    if any(k.startswith(("bbox_head.", "mask_feat_head.")) for k in state):
        return "original"
    raise UserError("checkpoint has no SOLO head weights (no 'mask_head.*' or 'bbox_head.*' keys); "
                    "expected an mmdetection SOLO/SOLOv2 or a WXinlong/SOLO checkpoint")


def remap_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a checkpoint's keys to this module's (= mmdetection 2.x/3.x) names."""
    if checkpoint_format(state) == "mmdet":
        return dict(state)
    out = {}
    for key, value in state.items():
        for old, new in ORIGINAL_TO_MMDET:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def detect_variant(state: Mapping[str, Tensor]) -> str:
    """"solo" or "solov2" from (remapped) keys; decoupled SOLO and DCN are refused."""
    if any("conv_mask_list_x" in k or "mask_convs_x" in k for k in state):
        raise UserError("checkpoint is a Decoupled SOLO model, which is not supported; use a SOLO or SOLOv2 checkpoint")
    if any("conv_offset" in k for k in state):
        raise UserError("checkpoint uses deformable convolutions (DCN), which are not supported; "
                        "use a SOLO/SOLOv2 checkpoint without DCN (e.g. R50-FPN)")
    if "mask_head.conv_kernel.weight" in state:
        return "solov2"
    if "mask_head.conv_mask_list.0.weight" in state:
        return "solo"
    raise UserError("checkpoint is neither SOLO (mask_head.conv_mask_list.*) nor SOLOv2 (mask_head.conv_kernel.*)")


def _count(state: Mapping[str, Tensor], prefix: str) -> int:
    idx = {k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)}
    return len([i for i in idx if i.isdigit()])


def infer_depth(state: Mapping[str, Tensor]) -> int:
    """ResNet depth from the backbone's block counts and block type."""
    blocks = tuple(_count(state, f"backbone.layer{i}.") for i in range(1, 5))
    kind = "bottleneck" if "backbone.layer1.0.conv3.weight" in state else "basic"
    for depth, spec in DEPTHS.items():
        if spec == (kind, blocks):
            return depth
    raise UserError(f"checkpoint backbone has {kind} blocks {blocks}, which is no ResNet-18/34/50/101/152")


def _shape(state: Mapping[str, Tensor], key: str, dim: int) -> int:
    if key not in state:
        raise UserError(f"SOLO checkpoint lacks {key!r}; expected a complete SOLO/SOLOv2 checkpoint")
    return int(state[key].shape[dim])


def infer_config(state: Mapping[str, Tensor], variant: str = "auto", depth: int | None = None,
                 gn_groups: int = 32) -> SoloConfig:
    """The architecture a (remapped) state dict was trained with, read from its shapes.

    Channel widths, stacked convs, classes, SOLO grid numbers and the SOLOv2 mask
    branch come from the weights (so SOLO, SOLOv2 and SOLOv2-light all load); SOLOv2
    grid numbers are not stored and are mmdet's [40, 36, 24, 16, 12]. ``variant`` and
    ``depth``, when given, must agree with the checkpoint.
    """
    found = detect_variant(state)
    if variant not in ("auto", found):
        raise UserError(f"SOLO variant={variant!r} but the checkpoint is a {found} model; "
                        f"pass --attention-opt variant={found} or variant=auto")
    found_depth = infer_depth(state)
    if depth is not None and depth != found_depth:
        raise UserError(f"SOLO depth={depth} but the checkpoint has a ResNet-{found_depth} backbone; "
                        f"pass --attention-opt depth={found_depth}")
    head = "mask_head."
    cfg = dict(variant=found, depth=found_depth, gn_groups=gn_groups,
               fpn_channels=_shape(state, "neck.lateral_convs.0.conv.weight", 0),
               feat_channels=_shape(state, head + "cls_convs.0.conv.weight", 0),
               stacked_convs=_count(state, head + "cls_convs."),
               num_classes=_shape(state, head + "conv_cls.weight", 0))
    if found == "solo":
        grids = []
        for i in range(_count(state, head + "conv_mask_list.")):
            cells = _shape(state, f"{head}conv_mask_list.{i}.weight", 0)
            side = math.isqrt(cells)
            if side * side != cells:
                raise UserError(f"{head}conv_mask_list.{i}.weight has {cells} outputs; expected a square grid S*S")
            grids.append(side)
        if len(grids) != len(SoloConfig.strides):
            raise UserError(f"SOLO checkpoint has {len(grids)} mask levels; expected {len(SoloConfig.strides)}")
        cfg["num_grids"] = tuple(grids)
    else:
        mf = head + "mask_feature_head."
        cfg.update(mask_feat_channels=_shape(state, mf + "convs_all_levels.0.conv0.conv.weight", 0),
                   mask_out_channels=_shape(state, mf + "conv_pred.conv.weight", 0),
                   mask_levels=_count(state, mf + "convs_all_levels."))
        kernel_len = _shape(state, head + "conv_kernel.weight", 0)
        if kernel_len != cfg["mask_out_channels"]:
            raise UserError(f"SOLOv2 kernels have {kernel_len} weights for {cfg['mask_out_channels']} mask feature "
                            "channels; only dynamic_conv_size=1 is supported")
    return SoloConfig(**cfg)


def load_strict(model: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Copy ``state`` into ``model``: every checkpoint key used, every model key filled,
    no shape mismatch (BatchNorm ``num_batches_tracked`` counters may be absent: they
    do not affect inference). Otherwise a UserError listing a few offending keys."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                   if k in state and state[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped (checkpoint vs model)", wrong)):
            if keys:
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:3])}{more}")
        raise UserError(f"SOLO {source} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)


def build_from_checkpoint(path: str | Path, variant: str = "auto", depth: int | None = None,
                          device: torch.device | str | None = None, gn_groups: int = 32) -> SOLO:
    """Read, remap and strictly load a SOLO/SOLOv2 checkpoint; frozen, eval mode."""
    state = remap_state_dict(read_checkpoint(path))
    cfg = infer_config(state, variant=variant, depth=depth, gn_groups=gn_groups)
    model = SOLO(cfg)
    load_strict(model, state, source=f"checkpoint {str(path)!r}")
    model.requires_grad_(False).eval()
    return model.to(device) if device is not None else model


__all__ = [
    "SoloConfig", "SOLO", "SOLOHead", "SOLOV2Head", "MaskFeatModule", "FPN", "ResNetBackbone", "Instances",
    "matrix_nms_decay", "mask_matrix_nms", "points_nms", "coord_features", "read_checkpoint", "remap_state_dict",
    "checkpoint_format", "detect_variant", "infer_config", "infer_depth", "load_strict", "build_from_checkpoint",
]
