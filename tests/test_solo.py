"""Tests of the SOLO / SOLOv2 attention plugin (plugins/solo.py, plugins/solo_net.py).

Checkpoint layouts are written out by hand below from mmdetection's SOLOHead /
SOLOV2Head / MaskFeatModule / FPN and WXinlong/SOLO's SOLOHead / SOLOv2Head /
MaskFeatHead sources (mmcv ConvModule = ``.conv`` + ``.gn``; no conv bias with GN),
independently of the plugin's remapping code. Models are tiny (ResNet-18, 32-channel
FPN and heads) and randomly initialised; nothing is downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from dhat_seg.attention import AttentionContext, AttentionSpec, validate_attention
from dhat_seg.errors import UserError
from dhat_seg.plugins import solo as plugin
from dhat_seg.plugins import solo_net as net

C, FEAT, STACKED, NCLS, MF, MO = 32, 32, 2, 3, 32, 32  # tiny widths (GN 32 groups still divides them)
GRIDS = (40, 36, 24, 16, 12)  # mmdet's num_grids
SMALL_GRIDS = (8, 6, 4, 3, 2)  # SOLO reads its grids from the weights: small ones keep the tests fast
R18_FPN_IN = (64, 128, 256, 512)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------
# Hand-written checkpoint layouts
# ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def backbone_keys() -> dict[str, tuple]:
    # mmdet's ResNet uses torchvision's names (it is initialised from torchvision://resnet50)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    return {f"backbone.{k}": tuple(v.shape) for k, v in sd.items() if not k.startswith("fc.")}


def fpn_keys() -> dict[str, tuple]:
    keys = {}
    for i, cin in enumerate(R18_FPN_IN):
        keys[f"neck.lateral_convs.{i}.conv.weight"] = (C, cin, 1, 1)
        keys[f"neck.lateral_convs.{i}.conv.bias"] = (C,)
        keys[f"neck.fpn_convs.{i}.conv.weight"] = (C, C, 3, 3)
        keys[f"neck.fpn_convs.{i}.conv.bias"] = (C,)
    return keys


def conv_gn(prefix: str, cout: int, cin: int, k: int = 3) -> dict[str, tuple]:
    return {f"{prefix}.conv.weight": (cout, cin, k, k), f"{prefix}.gn.weight": (cout,), f"{prefix}.gn.bias": (cout,)}


def mmdet_solo_keys() -> dict[str, tuple]:
    """mmdet 2.x/3.x SOLO: mask_head.{mask_convs, cls_convs, conv_mask_list, conv_cls}."""
    keys = {**backbone_keys(), **fpn_keys()}
    for i in range(STACKED):
        keys.update(conv_gn(f"mask_head.mask_convs.{i}", FEAT, C + 2 if i == 0 else FEAT))
        keys.update(conv_gn(f"mask_head.cls_convs.{i}", FEAT, C if i == 0 else FEAT))
    for lvl, g in enumerate(GRIDS):
        keys[f"mask_head.conv_mask_list.{lvl}.weight"] = (g * g, FEAT, 1, 1)
        keys[f"mask_head.conv_mask_list.{lvl}.bias"] = (g * g,)
    keys["mask_head.conv_cls.weight"] = (NCLS, FEAT, 3, 3)
    keys["mask_head.conv_cls.bias"] = (NCLS,)
    return keys


def mask_feat_keys(prefix: str, pred: str) -> dict[str, tuple]:
    keys = conv_gn(f"{prefix}.convs_all_levels.0.conv0", MF, C)
    for i in range(1, 4):
        for j in range(i):
            cin = (C + 2 if i == 3 else C) if j == 0 else MF
            keys.update(conv_gn(f"{prefix}.convs_all_levels.{i}.conv{j}", MF, cin))
    keys.update(conv_gn(f"{prefix}.{pred}", MO, MF, k=1))
    return keys


def mmdet_solov2_keys() -> dict[str, tuple]:
    """mmdet 2.x/3.x SOLOv2: mask_head.{kernel_convs, cls_convs, conv_kernel, conv_cls, mask_feature_head}."""
    keys = {**backbone_keys(), **fpn_keys()}
    for i in range(STACKED):
        keys.update(conv_gn(f"mask_head.kernel_convs.{i}", FEAT, C + 2 if i == 0 else FEAT))
        keys.update(conv_gn(f"mask_head.cls_convs.{i}", FEAT, C if i == 0 else FEAT))
    keys["mask_head.conv_cls.weight"] = (NCLS, FEAT, 3, 3)
    keys["mask_head.conv_cls.bias"] = (NCLS,)
    keys["mask_head.conv_kernel.weight"] = (MO, FEAT, 3, 3)
    keys["mask_head.conv_kernel.bias"] = (MO,)
    keys.update(mask_feat_keys("mask_head.mask_feature_head", "conv_pred"))
    return keys


def original_keys(variant: str) -> dict[str, tuple[str, tuple]]:
    """WXinlong/SOLO layout: original key -> (mmdet key, shape)."""
    out = {k: (k, s) for k, s in {**backbone_keys(), **fpn_keys()}.items()}
    kernel_or_ins, mmdet_branch = ("ins_convs", "mask_convs") if variant == "solo" else ("kernel_convs", "kernel_convs")
    for i in range(STACKED):
        for k, s in conv_gn(f"bbox_head.{kernel_or_ins}.{i}", FEAT, C + 2 if i == 0 else FEAT).items():
            out[k] = (k.replace(f"bbox_head.{kernel_or_ins}.", f"mask_head.{mmdet_branch}."), s)
        for k, s in conv_gn(f"bbox_head.cate_convs.{i}", FEAT, C if i == 0 else FEAT).items():
            out[k] = (k.replace("bbox_head.cate_convs.", "mask_head.cls_convs."), s)
    # the original heads predict num_classes - 1 categories (81 - 1 = 80 on COCO)
    out["bbox_head.solo_cate.weight"] = ("mask_head.conv_cls.weight", (NCLS, FEAT, 3, 3))
    out["bbox_head.solo_cate.bias"] = ("mask_head.conv_cls.bias", (NCLS,))
    if variant == "solo":
        for lvl, g in enumerate(GRIDS):
            out[f"bbox_head.solo_ins_list.{lvl}.weight"] = (f"mask_head.conv_mask_list.{lvl}.weight", (g * g, FEAT, 1, 1))
            out[f"bbox_head.solo_ins_list.{lvl}.bias"] = (f"mask_head.conv_mask_list.{lvl}.bias", (g * g,))
    else:
        out["bbox_head.solo_kernel.weight"] = ("mask_head.conv_kernel.weight", (MO, FEAT, 3, 3))
        out["bbox_head.solo_kernel.bias"] = ("mask_head.conv_kernel.bias", (MO,))
        # MaskFeatHead: conv_pred is an nn.Sequential holding one ConvModule
        for k, s in mask_feat_keys("mask_feat_head", "conv_pred.0").items():
            new = k.replace("mask_feat_head.conv_pred.0.", "mask_head.mask_feature_head.conv_pred.")
            out[k] = (new.replace("mask_feat_head.", "mask_head.mask_feature_head."), s)
    return out


def random_state(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, s in shapes.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            state[k] = torch.rand(s, generator=g) + 0.5
        else:
            state[k] = torch.randn(s, generator=g) * 0.1
    return state


def save(tmp_path, name, state, nested):
    path = tmp_path / name
    obj = {"meta": {"mmdet_version": "3.3.0", "CLASSES": ("a", "b", "c"), "epoch": 36}, "state_dict": state} if nested else state
    torch.save(obj, path)
    return path


# ---------------------------------------------------------------------------------
# (1) checkpoint loading
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("variant,keys", [("solo", mmdet_solo_keys), ("solov2", mmdet_solov2_keys)])
def test_mmdet_checkpoint_loads_every_key(tmp_path, variant, keys, nested):
    state = random_state(keys())
    model = net.build_from_checkpoint(save(tmp_path, "m.pth", state, nested), variant="auto", depth=18)
    assert model.cfg.variant == variant and model.cfg.depth == 18
    assert (model.cfg.fpn_channels, model.cfg.feat_channels, model.cfg.stacked_convs, model.cfg.num_classes) == (C, FEAT, STACKED, NCLS)
    own = model.state_dict()
    assert set(own) == set(state)  # every checkpoint key used, every model key filled
    for k, v in state.items():
        assert torch.equal(own[k], v), k
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("variant", ["solo", "solov2"])
def test_original_repo_checkpoint_is_remapped(tmp_path, variant):
    layout = original_keys(variant)
    state = random_state({k: s for k, (_, s) in layout.items()}, seed=1)
    model = net.build_from_checkpoint(save(tmp_path, "o.pth", state, nested=True), depth=18)
    assert model.cfg.variant == variant
    own = model.state_dict()
    assert set(own) == {new for new, _ in layout.values()}
    for old, (new, _) in layout.items():
        assert torch.equal(own[new], state[old]), (old, new)


def test_solov2_light_widths_and_solo_grids_come_from_the_weights(tmp_path):
    shapes = mmdet_solo_keys()
    small = SMALL_GRIDS
    for lvl, g in enumerate(small):
        shapes[f"mask_head.conv_mask_list.{lvl}.weight"] = (g * g, FEAT, 1, 1)
        shapes[f"mask_head.conv_mask_list.{lvl}.bias"] = (g * g,)
    model = net.build_from_checkpoint(save(tmp_path, "g.pth", random_state(shapes), True), depth=18)
    assert model.cfg.num_grids == small


def test_missing_unexpected_and_misshaped_keys_are_user_errors(tmp_path):
    base = random_state(mmdet_solov2_keys())
    missing = dict(base)
    del missing["mask_head.cls_convs.1.gn.bias"]
    with pytest.raises(UserError, match=r"missing: mask_head\.cls_convs\.1\.gn\.bias"):
        net.build_from_checkpoint(save(tmp_path, "a.pth", missing, True), depth=18)
    wrong = dict(base)
    wrong["backbone.layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    with pytest.raises(UserError, match=r"mis-shaped.*backbone\.layer2\.0\.conv1\.weight"):
        net.build_from_checkpoint(save(tmp_path, "b.pth", wrong, True), depth=18)
    extra = dict(base, **{"mask_head.something_else.weight": torch.zeros(3)})
    with pytest.raises(UserError, match=r"unexpected: mask_head\.something_else\.weight"):
        net.build_from_checkpoint(save(tmp_path, "c.pth", extra, True), depth=18)
    # BatchNorm step counters carry no information for inference: optional
    no_counters = {k: v for k, v in base.items() if not k.endswith("num_batches_tracked")}
    net.build_from_checkpoint(save(tmp_path, "d.pth", no_counters, True), depth=18)


def test_variant_and_depth_must_match_the_checkpoint(tmp_path):
    path = save(tmp_path, "s.pth", random_state(mmdet_solo_keys()), True)
    with pytest.raises(UserError, match="variant='solov2'.*variant=solo "):
        net.build_from_checkpoint(path, variant="solov2", depth=18)
    with pytest.raises(UserError, match="depth=18"):
        net.build_from_checkpoint(path, variant="solo", depth=50)


class NotATensor:  # an arbitrary pickled object, as in old checkpoints' metadata
    pass


def test_checkpoint_needing_unpickling_is_refused_with_advice(tmp_path):
    path = tmp_path / "old.pth"
    torch.save({"meta": NotATensor(), "state_dict": random_state(mmdet_solo_keys())}, path)
    with pytest.raises(UserError, match="never unpickles.*weights_only=False"):
        net.build_from_checkpoint(path, depth=18)


def test_safetensors_and_missing_or_foreign_files(tmp_path):
    from safetensors.torch import save_file

    state = random_state(mmdet_solov2_keys())
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    assert net.build_from_checkpoint(path, depth=18).cfg.variant == "solov2"
    with pytest.raises(UserError, match="does not exist"):
        net.build_from_checkpoint(tmp_path / "nope.pth")
    foreign = tmp_path / "classifier.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(UserError, match="no SOLO head weights"):
        net.build_from_checkpoint(foreign)


# ---------------------------------------------------------------------------------
# (2) matrix NMS, hand-computed
# ---------------------------------------------------------------------------------


def masks_of(rows):
    return torch.tensor(rows, dtype=torch.bool).view(len(rows), 1, -1)


def test_matrix_nms_hand_computed():
    # areas 2, 3, 2; IoU(0,1) = 2/3, IoU(0,2) = 0, IoU(1,2) = 1/(3+2-1) = 1/4
    masks = masks_of([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    same = torch.zeros(3, dtype=torch.long)
    g = net.matrix_nms_decay(masks, same, scores, kernel="gaussian", sigma=2.0)
    # mask 1: min(exp(-2(2/3)^2) / 1 [by 0], 1 / exp(-2(2/3)^2) [itself], 1 / exp(-2/16) [row 2]) = exp(-8/9)
    # mask 2: by 0: 1; by 1: exp(-2/16) / exp(-8/9) > 1 (mask 1 is itself suppressed); row 2: exp(1/8) -> 1
    assert torch.allclose(g, torch.tensor([0.9, 0.8 * math.exp(-8 / 9), 0.7]), atol=1e-6)
    lin = net.matrix_nms_decay(masks, same, scores, kernel="linear")
    # mask 1: (1 - 2/3) / 1 = 1/3; mask 2: min(1, (1 - 1/4) / (1 - 2/3) = 2.25, 1 / (1 - 1/4)) = 1
    assert torch.allclose(lin, torch.tensor([0.9, 0.8 / 3, 0.7]), atol=1e-6)
    # different classes never suppress each other
    assert torch.allclose(net.matrix_nms_decay(masks, torch.tensor([0, 1, 2]), scores), scores)

    # a suppressor that is not itself suppressed: IoU(1,2) = 1/3, cmax(1) = 0
    masks = masks_of([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]])
    g = net.matrix_nms_decay(masks, same, scores)
    assert torch.allclose(g, torch.tensor([0.9, 0.8, 0.7 * math.exp(-2 / 9)]), atol=1e-6)
    # the paper's form exp(-(iou^2 - cmax^2) / sigma') with sigma' = 0.5 is the same
    assert math.isclose(float(g[2]), 0.7 * math.exp(-((1 / 3) ** 2) / 0.5), rel_tol=1e-6)


def test_mask_matrix_nms_sorts_filters_and_keeps_top():
    masks = masks_of([[0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])  # input order: 0.7, 0.9, 0.8
    scores = torch.tensor([0.7, 0.9, 0.8])
    labels = torch.zeros(3, dtype=torch.long)
    decayed, keep = net.mask_matrix_nms(masks, labels, scores, filter_thr=0.5)
    assert keep.tolist() == [1, 0]  # 0.8 * exp(-8/9) = 0.33 < 0.5 is dropped
    assert torch.allclose(decayed, torch.tensor([0.9, 0.7]))
    decayed, keep = net.mask_matrix_nms(masks, labels, scores, max_num=2)
    assert keep.tolist() == [1, 0] and len(decayed) == 2
    decayed, keep = net.mask_matrix_nms(masks, labels, scores, nms_pre=1)
    assert keep.tolist() == [1]


# ---------------------------------------------------------------------------------
# The network against mmdet's (memory-hungry) reference computation
# ---------------------------------------------------------------------------------


def tiny_cfg(variant, **kw):
    return net.SoloConfig(variant=variant, depth=18, fpn_channels=C, feat_channels=FEAT, stacked_convs=STACKED,
                          num_classes=NCLS, mask_feat_channels=MF, mask_out_channels=MO, **kw)


def test_points_nms_and_coordinates():
    s = torch.tensor([[[[0.1, 0.5], [0.4, 0.3]]]])
    # each cell is compared with its upper-left 2x2 window: 0.4 survives (0.1, 0.4), 0.3 does not (0.5)
    assert torch.equal(net.points_nms(s), torch.tensor([[[[0.1, 0.5], [0.4, 0.0]]]]))
    c = net.coord_features(torch.zeros(2, 5, 3, 4))
    assert c.shape == (2, 2, 3, 4)
    assert torch.equal(c[0, 0, 0], torch.linspace(-1, 1, 4)) and torch.equal(c[0, 1, :, 0], torch.linspace(-1, 1, 3))


def mmdet_reference(model, images, input_size, score_thr=0.1, mask_thr=0.5, filter_thr=0.05, max_num=100):
    """mmdet's _predict_by_feat_single, transcribed, on the full S^2 mask maps of
    SOLOHead.forward (itself checked against a functional reference below)."""
    x, (h, w) = model.preprocess(images, input_size)
    all_masks, all_scores = model.mask_head.forward(model.features(x))
    results = []
    for b in range(images.shape[0]):
        cls = torch.cat([s[b].permute(1, 2, 0).reshape(-1, NCLS) for s in all_scores])
        mask_preds = torch.cat([m[b] for m in all_masks])
        score_mask = cls > score_thr
        cls_scores = cls[score_mask]
        inds = score_mask.nonzero()
        labels = inds[:, 1]
        lvl_interval = torch.tensor(GRIDS).pow(2).cumsum(0)
        strides = torch.ones(int(lvl_interval[-1]))
        strides[: lvl_interval[0]] *= model.cfg.strides[0]
        for lvl in range(1, 5):
            strides[lvl_interval[lvl - 1] : lvl_interval[lvl]] *= model.cfg.strides[lvl]
        strides = strides[inds[:, 0]]
        mask_preds = mask_preds[inds[:, 0]]
        masks = mask_preds > mask_thr
        sum_masks = masks.sum((1, 2)).float()
        keep = sum_masks > strides
        masks, mask_preds, sum_masks, cls_scores, labels = masks[keep], mask_preds[keep], sum_masks[keep], cls_scores[keep], labels[keep]
        cls_scores = cls_scores * (mask_preds * masks).sum((1, 2)) / sum_masks
        scores, keep_inds = net.mask_matrix_nms(masks, labels, cls_scores, sum_masks, 500, max_num, "gaussian", 2.0, filter_thr)
        fs = mask_preds.shape[-2:]
        up = F.interpolate(mask_preds[keep_inds].unsqueeze(0), size=(fs[0] * 4, fs[1] * 4), mode="bilinear")[:, :, :h, :w]
        up = F.interpolate(up, size=images.shape[-2:], mode="bilinear").squeeze(0)
        results.append((scores, labels[keep_inds], up > mask_thr))
    return results


def test_solo_predict_matches_mmdet_reference():
    torch.manual_seed(0)
    model = net.SOLO(tiny_cfg("solo")).eval()
    with torch.no_grad():
        model.mask_head.conv_cls.bias.fill_(-2.0)  # a few dozen candidates, not thousands
        model.mask_head.conv_cls.weight.mul_(30.0)
        for conv in model.mask_head.conv_mask_list:
            conv.weight.mul_(30.0)
    images = torch.rand(2, 3, 40, 48)
    ref = mmdet_reference(model, images, input_size=64)
    got = model.predict(images, input_size=64)
    assert sum(len(r[0]) for r in ref) > 0, "the reference found no instance: the comparison would be vacuous"
    for (scores, labels, masks), inst in zip(ref, got):
        assert torch.allclose(inst.scores, scores, atol=1e-5)
        assert torch.equal(inst.labels, labels)
        assert torch.equal(inst.masks, masks)
        assert not inst.fallback


def test_solov2_cell_masks_equal_dynamic_convolution():
    torch.manual_seed(1)
    model = net.SOLO(tiny_cfg("solov2")).eval()
    x, _ = model.preprocess(torch.rand(2, 3, 64, 64), 0)
    with torch.no_grad():
        out = model.mask_head.run(model.features(x))
        cells = torch.tensor([0, 5, 1700, 3871])
        got = model.mask_head.cell_masks(out, 1, cells)
    feats = out.state["mask_feats"][1]  # E x h x w
    assert feats.shape[-2:] == (16, 16)  # stride 4
    for i, cell in enumerate(cells.tolist()):
        kernel = out.state["kernels"][1, cell]
        assert torch.allclose(got[i], torch.sigmoid((kernel[:, None, None] * feats).sum(0)), atol=1e-5)


# ---------------------------------------------------------------------------------
# Independent functional forward, written from mmdet's ResNet/FPN/SOLOHead/SOLOV2Head/
# MaskFeatModule, reading the weights by their checkpoint names
# ---------------------------------------------------------------------------------


def _coords(x):
    b, _, h, w = x.shape
    xs = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(b, 1, h, w)
    ys = torch.linspace(-1, 1, h).view(1, 1, h, 1).expand(b, 1, h, w)
    return torch.cat([x, xs, ys], 1)  # generate_coordinate: [x, y]


def _cgr(sd, prefix, x):  # ConvModule(conv, GN(32), ReLU), conv without bias
    w = sd[f"{prefix}.conv.weight"]
    x = F.conv2d(x, w, padding=w.shape[-1] // 2)
    return F.relu(F.group_norm(x, 32, sd[f"{prefix}.gn.weight"], sd[f"{prefix}.gn.bias"]))


def _bilinear(x, **kw):
    return F.interpolate(x, mode="bilinear", align_corners=False, **kw)


def reference_fpn(sd, x):
    tv = torchvision.models.resnet18(weights=None)
    tv.load_state_dict({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}, strict=False)
    tv.eval()
    x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    cs = []
    for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
        x = layer(x)
        cs.append(x)
    lat = [F.conv2d(c, sd[f"neck.lateral_convs.{i}.conv.weight"], sd[f"neck.lateral_convs.{i}.conv.bias"]) for i, c in enumerate(cs)]
    for i in (3, 2, 1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
    outs = [F.conv2d(l, sd[f"neck.fpn_convs.{i}.conv.weight"], sd[f"neck.fpn_convs.{i}.conv.bias"], padding=1) for i, l in enumerate(lat)]
    return outs + [F.max_pool2d(outs[-1], 1, stride=2)]


def reference_levels(p):
    return [_bilinear(p[0], scale_factor=0.5), p[1], p[2], p[3], _bilinear(p[4], size=p[3].shape[-2:])]


def _local_max(s):
    return s * (F.max_pool2d(s, 2, stride=1, padding=1)[:, :, :-1, :-1] == s)


def reference_solo_head(sd, p):
    feats = reference_levels(p)
    size = (feats[0].shape[-2] * 2, feats[0].shape[-1] * 2)
    masks, scores = [], []
    for i, x in enumerate(feats):
        m = _coords(x)
        for j in range(STACKED):
            m = _cgr(sd, f"mask_head.mask_convs.{j}", m)
        m = F.conv2d(_bilinear(m, scale_factor=2), sd[f"mask_head.conv_mask_list.{i}.weight"], sd[f"mask_head.conv_mask_list.{i}.bias"])
        masks.append(_bilinear(m.sigmoid(), size=size))
        c = x
        for j in range(STACKED):
            if j == 0:  # cls_down_index
                c = _bilinear(c, size=GRIDS[i])
            c = _cgr(sd, f"mask_head.cls_convs.{j}", c)
        scores.append(_local_max(F.conv2d(c, sd["mask_head.conv_cls.weight"], sd["mask_head.conv_cls.bias"], padding=1).sigmoid()))
    return masks, scores


def reference_solov2_head(sd, p):
    mf = "mask_head.mask_feature_head"
    total = _cgr(sd, f"{mf}.convs_all_levels.0.conv0", p[0])
    for i in (1, 2, 3):
        x = _coords(p[i]) if i == 3 else p[i]
        for j in range(i):
            x = _bilinear(_cgr(sd, f"{mf}.convs_all_levels.{i}.conv{j}", x), scale_factor=2)
        total = total + x
    mask_feats = _cgr(sd, f"{mf}.conv_pred", total)
    kernels, scores = [], []
    for i, x in enumerate(reference_levels(p)):
        x = _bilinear(_coords(x), size=GRIDS[i])
        k, c = x, x[:, :-2]
        for j in range(STACKED):
            k = _cgr(sd, f"mask_head.kernel_convs.{j}", k)
            c = _cgr(sd, f"mask_head.cls_convs.{j}", c)
        kernels.append(F.conv2d(k, sd["mask_head.conv_kernel.weight"], sd["mask_head.conv_kernel.bias"], padding=1))
        scores.append(_local_max(F.conv2d(c, sd["mask_head.conv_cls.weight"], sd["mask_head.conv_cls.bias"], padding=1).sigmoid()))
    return mask_feats, kernels, scores


def close(a, b):
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max().clamp_min(1e-6)))


@pytest.mark.parametrize("variant,keys", [("solo", mmdet_solo_keys), ("solov2", mmdet_solov2_keys)])
def test_network_matches_functional_reference(tmp_path, variant, keys):
    sd = random_state(keys(), seed=3)
    model = net.build_from_checkpoint(save(tmp_path, "r.pth", sd, True), depth=18)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        p = model.features(x)
        ref_p = reference_fpn(sd, x)
        assert len(p) == 5 and all(close(a, b) for a, b in zip(p, ref_p))
        if variant == "solo":
            masks, scores = model.mask_head.forward(p)
            ref_masks, ref_scores = reference_solo_head(sd, ref_p)
            assert all(close(a, b) for a, b in zip(masks, ref_masks))
            assert all(close(a, b) for a, b in zip(scores, ref_scores))
        else:
            out = model.mask_head.run(p)
            ref_feats, ref_kernels, ref_scores = reference_solov2_head(sd, ref_p)
            assert close(out.state["mask_feats"], ref_feats)
            flat = lambda ts: torch.cat([t.permute(0, 2, 3, 1).flatten(1, 2) for t in ts], 1)  # noqa: E731
            assert close(out.state["kernels"], flat(ref_kernels))
            assert close(out.cls_scores, flat(ref_scores))


# ---------------------------------------------------------------------------------
# (3) the attention function, (4) check_ready, (5) registration
# ---------------------------------------------------------------------------------


def tiny_checkpoint(tmp_path, variant, mask_bias=None, cls_bias=None, seed=0):
    torch.manual_seed(seed)
    model = net.SOLO(tiny_cfg(variant, num_grids=SMALL_GRIDS if variant == "solo" else GRIDS))
    with torch.no_grad():
        if cls_bias is not None:
            model.mask_head.conv_cls.weight.zero_()
            model.mask_head.conv_cls.bias.fill_(cls_bias)
        if mask_bias is not None:  # SOLO: every cell predicts a constant mask
            for conv in model.mask_head.conv_mask_list:
                conv.weight.zero_()
                conv.bias.fill_(mask_bias)
    path = tmp_path / f"{variant}_{mask_bias}_{cls_bias}.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path)


def solo_spec() -> AttentionSpec:
    specs = []
    plugin.register_attention_methods(register=specs.append)
    assert len(specs) == 1
    return specs[0]


def build(spec, **options):
    opts = spec.resolve_options({"depth": 18, "input_size": 32, **options})
    return spec.build(AttentionContext(options=opts, device=torch.device("cpu"), image_size=(32, 32)))


@pytest.mark.parametrize("variant", ["solo", "solov2"])
def test_attention_function_returns_a_valid_mask(tmp_path, variant):
    spec = solo_spec()
    fn = build(spec, checkpoint=tiny_checkpoint(tmp_path, variant))
    images, labels = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2])
    for mode in ("union", "best"):  # the mode only changes the post-processing
        fn.options["mode"] = mode
        result = fn(images, labels)
        assert result.shape == (3, 1, 32, 32) and result.dtype == torch.bool and result.device == images.device
        validate_attention(result, images, "solo")
    odd = torch.rand(2, 3, 24, 40)  # non-square: the shorter side is resized to input_size
    validate_attention(fn(odd, labels[:2]), odd, "solo")


def test_union_best_and_fallback_semantics(tmp_path):
    spec = solo_spec()
    images, labels = torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    # every cell confident, every mask covering the image: foreground everywhere
    fn = build(spec, checkpoint=tiny_checkpoint(tmp_path, "solo", mask_bias=10.0, cls_bias=10.0))
    assert fn(images, labels).all()
    # nothing confident: "empty" gives no foreground, "best" returns the best cell's mask
    fn = build(spec, checkpoint=tiny_checkpoint(tmp_path, "solo", mask_bias=10.0, cls_bias=-10.0), fallback="best")
    assert fn(images, labels).all()
    assert all(inst.fallback and len(inst.scores) == 1 for inst in fn.instances(images))
    fn.options["fallback"] = "empty"
    assert not fn(images, labels).any()
    # confident instances whose masks are empty (below mask_thr): no foreground even with fallback
    assert not build(spec, checkpoint=tiny_checkpoint(tmp_path, "solo", mask_bias=-10.0, cls_bias=10.0))(images, labels).any()


def test_combine_instances():
    masks = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 1]]], dtype=torch.bool)
    assert torch.equal(plugin.combine_instances(masks, "union"), torch.tensor([[1, 0], [0, 1]], dtype=torch.bool))
    assert torch.equal(plugin.combine_instances(masks, "best"), masks[0])
    assert not plugin.combine_instances(torch.zeros(0, 2, 3, dtype=torch.bool), "union").any()


def test_check_ready_and_option_errors(tmp_path):
    spec = solo_spec()
    message = spec.readiness()
    assert "--attention-checkpoint" in message and "download.openmmlab.com" in message and "solov2_r50" in message
    missing = spec.readiness({"checkpoint": str(tmp_path / "absent.pth")})
    assert "does not exist" in missing and "--attention-checkpoint" in missing
    with pytest.raises(UserError, match="--attention-checkpoint"):
        spec.build(AttentionContext(options=spec.resolve_options({})))
    path = tiny_checkpoint(tmp_path, "solov2")
    assert spec.readiness({"checkpoint": path}) is None
    with pytest.raises(UserError, match="mode='all'"):
        spec.readiness({"checkpoint": path, "mode": "all"})
    with pytest.raises(UserError, match="has no option 'thr'"):
        spec.resolve_options({"thr": "0.3"})
    assert spec.resolve_options({"score_thr": "0.3", "max_instances": "4"})["max_instances"] == 4


def test_spec_fields():
    spec = solo_spec()
    assert spec.name == "solo" and spec.kind == "image"
    for key in ("checkpoint", "variant", "depth", "input_size", "score_thr", "mask_thr", "mode", "max_instances"):
        assert key in spec.default_options
    assert spec.default_options["variant"] == "auto" and spec.default_options["depth"] == 50


def _all_builtins_present() -> bool:
    from dhat_seg.attention.plugin_manager import BUILTIN_PLUGINS

    return all(importlib.util.find_spec(f"dhat_seg.plugins.{n}") is not None for n in BUILTIN_PLUGINS)


@pytest.mark.skipif(not _all_builtins_present(), reason="another built-in plugin module does not exist yet")
def test_listed_by_the_plugin_manager():
    from dhat_seg.attention import plugin_manager

    plugin_manager.reset()
    try:
        methods = plugin_manager.attention_methods()
        assert "solo" in methods and methods["solo"].kind == "image"
    finally:
        plugin_manager.reset()
