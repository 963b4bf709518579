"""Tests of the data layer: synthetic generation, dataset protocol, splits, augmentation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dhat_seg.data import (
    BACKGROUNDS,
    DATASETS,
    SHAPES,
    IndexedDataset,
    JointAugment,
    build_dataset,
    generate_synthetic,
    list_datasets,
)
from dhat_seg.data.synthetic import OBJECT_CONTRAST, OBJECT_SIDE
from dhat_seg.errors import UserError


@pytest.fixture(scope="module")
def pool():
    """A generated set of every class and background, 2000 samples at 32 x 32."""
    return generate_synthetic(2000, seed=11)


# ---------------------------------------------------------------------------------
# generate_synthetic
# ---------------------------------------------------------------------------------


def test_generation_is_deterministic_and_seed_sensitive():
    a = generate_synthetic(300, seed=3)
    b = generate_synthetic(300, seed=3)
    c = generate_synthetic(300, seed=4)
    for field in ("images", "labels", "masks", "backgrounds"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.masks, c.masks)


@pytest.mark.parametrize("size", [16, 32, 48])
def test_shapes_dtypes_ranges(size):
    a = generate_synthetic(64, seed=0, image_size=size)
    assert a.images.shape == (64, 3, size, size) and a.images.dtype == torch.uint8
    assert a.labels.shape == (64,) and a.labels.dtype == torch.int64
    assert a.masks.shape == (64, size, size) and a.masks.dtype == torch.bool
    assert a.backgrounds.shape == (64,) and a.backgrounds.dtype == torch.int64
    assert 0 <= int(a.labels.min()) and int(a.labels.max()) < 10
    assert 0 <= int(a.backgrounds.min()) and int(a.backgrounds.max()) < 10
    assert len(a) == 64


def test_every_class_and_background_occurs(pool):
    assert set(pool.labels.tolist()) == set(range(len(SHAPES)))
    assert set(pool.backgrounds.tolist()) == set(range(len(BACKGROUNDS)))


def test_mask_area_and_extent_within_bounds(pool):
    size = pool.masks.shape[-1]
    area = pool.masks.flatten(1).float().mean(1)
    assert area.min() > 0.02 and area.max() < 0.5
    rows = pool.masks.any(dim=2)
    cols = pool.masks.any(dim=1)
    extent = torch.maximum(rows.sum(1), cols.sum(1)).float() / size
    # the object's box side is OBJECT_SIDE of the image; every shape spans most of its box
    assert extent.min() >= 0.75 * OBJECT_SIDE[0] and extent.max() <= OBJECT_SIDE[1] + 1.5 / size
    # the object never touches two opposite borders (it fits inside the image)
    assert not (rows[:, 0] & rows[:, -1]).any() and not (cols[:, 0] & cols[:, -1]).any()


def test_mask_is_exactly_the_object(pool):
    """Inside the mask: one flat colour. Outside: every pixel is far from that colour."""
    images = pool.images[:500].float()
    masks = pool.masks[:500]
    for img, m in zip(images, masks):
        inside = img[:, m]  # 3 x K
        colour = inside[:, :1]
        assert torch.equal(inside, colour.expand_as(inside))
        outside = img[:, ~m]
        dist = (outside - colour).norm(dim=0) / 255
        # rounding to uint8 moves each channel by <= 0.5/255
        assert dist.min() >= OBJECT_CONTRAST - 2 / 255


def test_shapes_have_their_topology(pool):
    """Hand-checkable shape facts: rings and frames have a hole at their centre, filled
    shapes do not; bars are wider than tall; triangles are wider at the bottom."""
    for cls in range(len(SHAPES)):
        sel = (pool.labels == cls).nonzero().squeeze(1)[:50]
        for i in sel.tolist():
            m = pool.masks[i]
            ys, xs = m.nonzero(as_tuple=True)
            cy = (int(ys.min()) + int(ys.max())) // 2
            cx = (int(xs.min()) + int(xs.max())) // 2
            name = SHAPES[cls]
            if name in ("ring", "frame"):
                assert not m[cy, cx], (name, i)
            elif name in ("disc", "square", "plus", "diamond", "x-cross", "star"):
                assert m[cy, cx], (name, i)
            if name == "bar":
                assert xs.max() - xs.min() > 2 * (ys.max() - ys.min()), i
            if name == "triangle":
                top, bottom = m[int(ys.min())].sum(), m[int(ys.max())].sum()
                assert bottom > top, i


def test_rho_is_respected(pool):
    # labels and backgrounds are drawn before any pixel-level parameter, so they do not
    # depend on the image size: 8 x 8 images keep this statistics test cheap
    small = generate_synthetic(5000, seed=11, image_size=8)
    assert torch.equal(small.labels[:2000], pool.labels)
    same = (small.backgrounds == small.labels).float().mean().item()
    assert abs(same - 0.9) < 0.03
    # the other 10%: a uniformly random *other* texture
    off = small.backgrounds[small.backgrounds != small.labels] - small.labels[small.backgrounds != small.labels]
    counts = torch.bincount(off % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.5 * counts[1:].float().mean()
    mixed = generate_synthetic(5000, seed=11, image_size=8, background="random")
    assert abs((mixed.backgrounds == mixed.labels).float().mean().item() - 0.1) < 0.03
    # the two modes differ only in the background draw: same objects
    mixed32 = generate_synthetic(2000, seed=11, background="random")
    assert torch.equal(mixed32.labels, pool.labels) and torch.equal(mixed32.masks, pool.masks)
    assert (generate_synthetic(500, seed=1, rho=0.0).backgrounds != generate_synthetic(500, seed=1, rho=0.0).labels).all()
    one = generate_synthetic(500, seed=1, rho=1.0)
    assert torch.equal(one.backgrounds, one.labels)


def test_backgrounds_differ_from_object_rendering():
    """Same seed, only the background changes: pixels off the mask change, on it don't."""
    a = generate_synthetic(200, seed=5, rho=1.0)
    b = generate_synthetic(200, seed=5, background="random")
    differ = a.backgrounds != b.backgrounds
    assert differ.sum() > 100
    m = a.masks[:, None].expand_as(a.images)
    assert torch.equal(a.images[m], b.images[m])
    changed = (a.images != b.images).any(1) & ~a.masks
    assert (changed.flatten(1).float().mean(1)[differ] > 0.05).all()


def test_num_classes_option():
    a = generate_synthetic(400, seed=0, num_classes=3)
    assert set(a.labels.tolist()) == {0, 1, 2} and int(a.backgrounds.max()) < 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 0},
        {"n": -5},
        {"rho": 1.5},
        {"rho": -0.1},
        {"image_size": 4},
        {"background": "mixed"},
        {"num_classes": 1},
        {"num_classes": 11},
    ],
)
def test_generate_bad_input(kwargs):
    args = {"n": 10, "seed": 0, **kwargs}
    n = args.pop("n")
    with pytest.raises(UserError):
        generate_synthetic(n, **args)


# ---------------------------------------------------------------------------------
# Dataset protocol and splits
# ---------------------------------------------------------------------------------


def test_item_protocol_matches_stored_arrays():
    d = build_dataset("synthetic", "test", size=50)
    assert isinstance(d, IndexedDataset) and len(d) == 50
    assert d.name == "synthetic" and d.split == "test" and d.num_classes == 10 and d.image_size == (32, 32)
    for i in (0, 7, 49):
        image, label, index = d[i]
        assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert isinstance(label, int) and isinstance(index, int) and index == i
        assert label == int(d.labels[i])
        assert torch.equal((image * 255).round().to(torch.uint8), d.images[i])
    assert d[-1][2] == 49
    with pytest.raises(IndexError):
        d[50]
    assert d.gt_masks.shape == (50, 32, 32) and d.gt_masks.dtype == torch.bool
    assert d.labels.dtype == torch.int64
    images, labels, indices = next(iter(DataLoader(d, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))))
    assert images.shape == (16, 3, 32, 32)
    assert torch.equal(labels, d.labels[indices])


def test_defaults_and_sizes():
    assert len(build_dataset("synthetic", "train")) == 4500
    assert len(build_dataset("synthetic", "val")) == 500
    assert len(build_dataset("synthetic", "test")) == 1000
    assert len(build_dataset("synthetic", "test-mixed-rand", size=20)) == 20
    assert len(build_dataset("synthetic", "val", size=200, val_size=30)) == 30
    assert len(build_dataset("synthetic", "train", size=200, val_size=30)) == 170
    assert build_dataset("synthetic", "test", image_size=16, size=4)[0][0].shape == (3, 16, 16)


def test_val_and_train_partition_the_training_pool():
    kw = dict(size=300, seed=2, val_size=0.2)
    train = build_dataset("synthetic", "train", **kw)
    val = build_dataset("synthetic", "val", **kw)
    assert len(train) == 240 and len(val) == 60
    t, v = set(train.source_indices.tolist()), set(val.source_indices.tolist())
    assert not t & v and t | v == set(range(300))
    # the pool is the same data in both: put the pieces back together
    pool = torch.empty(300, 3, 32, 32, dtype=torch.uint8)
    pool[train.source_indices] = train.images
    pool[val.source_indices] = val.images
    # the pool is drawn from the same generator as a whole-pool build with val_size 0
    full = build_dataset("synthetic", "train", size=300, seed=2, val_size=0)
    assert torch.equal(pool, full.images)
    assert abs((train.backgrounds == train.labels).float().mean().item() - 0.9) < 0.08
    # another seed carves another validation set
    other = build_dataset("synthetic", "val", size=300, seed=3, val_size=0.2)
    assert not torch.equal(other.images, val.images)


def test_test_set_differs_from_training_pool():
    train = build_dataset("synthetic", "train", size=100, val_size=0)
    test = build_dataset("synthetic", "test", size=100)
    assert not torch.equal(train.images, test.images)
    mixed = build_dataset("synthetic", "test-mixed-rand", size=100)
    assert torch.equal(mixed.labels, test.labels) and torch.equal(mixed.gt_masks, test.gt_masks)
    assert build_dataset("synthetic", "test-same", size=100).fingerprint() == test.fingerprint()


def test_fingerprint_stable_and_sensitive():
    fp = build_dataset("synthetic", "val", size=200).fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert build_dataset("synthetic", "val", size=200).fingerprint() == fp
    assert build_dataset("synthetic", "val", size=200, augment=True).fingerprint() == fp
    assert build_dataset("synthetic", "val", size=200, seed=1).fingerprint() != fp
    assert build_dataset("synthetic", "val", size=200, rho=0.5).fingerprint() != fp
    assert build_dataset("synthetic", "train", size=200).fingerprint() != fp
    train = build_dataset("synthetic", "train", size=200)
    assert build_dataset("synthetic", "train", size=200, augment=True).fingerprint() == train.fingerprint()
    # stable across processes (no use of Python's salted hash())
    code = "from dhat_seg.data import build_dataset; print(build_dataset('synthetic','val',size=200).fingerprint())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == fp


def test_registry_lists_datasets():
    names = [info.name for info in list_datasets()]
    assert names == ["synthetic", "digits", "cifar10", "cifar100", "folder"]
    assert DATASETS["cifar10"].needs_download and not DATASETS["synthetic"].needs_download
    assert DATASETS["cifar100"].num_classes == 100
    with pytest.raises(Exception):
        DATASETS["cifar10"].num_classes = 3  # frozen


@pytest.mark.parametrize(
    "args, kwargs, needle",
    [
        (("imagenet", "train"), {}, "synthetic, digits, cifar10"),
        (("synthetic", "train"), {"salience": 1.0}, "salience"),
        (("digits", "train"), {"salience": -0.5}, "salience"),
        (("synthetic", "dev"), {}, "test-mixed-rand"),
        (("cifar10", "test-mixed-rand"), {}, "expected one of"),
        (("synthetic", "train"), {"rho": 1.5}, "rho"),
        (("synthetic", "train"), {"size": 0}, "size"),
        (("synthetic", "test"), {"size": -3}, "size"),
        (("synthetic", "train"), {"val_size": 1.5}, "val_size"),
        (("synthetic", "train"), {"size": 50, "val_size": 50}, "val_size"),
        (("synthetic", "val"), {"val_size": 0}, "empty"),
        (("synthetic", "train"), {"image_size": 4}, "image size"),
        (("folder", "train"), {}, "--data-root"),
        (("folder", "train"), {"root": "/nonexistent/dhat-seg-folder"}, "does not exist"),
    ],
)
def test_build_dataset_bad_input(args, kwargs, needle):
    with pytest.raises(UserError, match=None) as info:
        build_dataset(*args, **kwargs)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


# ---------------------------------------------------------------------------------
# CIFAR (never downloaded in tests)
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_without_download(tmp_path, name):
    with pytest.raises(UserError) as info:
        build_dataset(name, "train", root=tmp_path)
    assert "--download" in str(info.value) and "--data-root" in str(info.value)


def test_cifar_splits_with_a_fake_torchvision_dataset(monkeypatch):
    """The CIFAR loader's conversion, subsetting and carving, with torchvision's class
    replaced by an in-memory stand-in (same attributes: data N x 32 x 32 x 3, targets)."""
    import torchvision.datasets as tvd

    rng = np.random.default_rng(0)
    data = {True: rng.integers(0, 256, (120, 32, 32, 3), dtype=np.uint8), False: rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)}

    class FakeCIFAR10:
        base_folder = "cifar-10-batches-py"

        def __init__(self, root, train, download):
            self.data = data[train]
            self.targets = [i % 10 for i in range(len(self.data))]
            self.classes = [f"c{i}" for i in range(10)]

    monkeypatch.setattr(tvd, "CIFAR10", FakeCIFAR10)
    train = build_dataset("cifar10", "train", val_size=20)
    val = build_dataset("cifar10", "val", val_size=20)
    test = build_dataset("cifar10", "test")
    assert (len(train), len(val), len(test)) == (100, 20, 40)
    assert set(train.source_indices.tolist()) | set(val.source_indices.tolist()) == set(range(120))
    i = int(val.source_indices[3])
    assert torch.equal(val.images[3], torch.from_numpy(data[True][i]).permute(2, 0, 1))
    image, label, index = val[3]
    assert label == i % 10 and index == 3
    assert torch.allclose(image * 255, torch.from_numpy(data[True][i]).permute(2, 0, 1).float(), atol=1e-3)
    assert build_dataset("cifar10", "test", image_size=64)[0][0].shape == (3, 64, 64)
    sub = build_dataset("cifar10", "test", size=10)
    assert len(sub) == 10 and torch.equal(sub.images, test.images[sub.source_indices])
    assert train.gt_masks is None and train.class_names[0] == "c0"
    assert train.fingerprint() != val.fingerprint()


# ---------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------


def _write_pngs(folder, classes, per_class, size=(20, 12), seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(array).save(folder / c / f"img{k}.png")


def test_folder_dataset(tmp_path):
    _write_pngs(tmp_path / "train", ["cat", "dog"], 5)
    _write_pngs(tmp_path / "test", ["cat", "dog"], 2, seed=1)
    train = build_dataset("folder", "train", root=tmp_path, image_size=16, val_size=4)
    val = build_dataset("folder", "val", root=tmp_path, image_size=16, val_size=4)
    test = build_dataset("folder", "test", root=tmp_path, image_size=16)
    assert (len(train), len(val), len(test)) == (6, 4, 4)
    assert train.num_classes == 2 and train.class_names == ["cat", "dog"]
    assert not set(train.files) & set(val.files)
    image, label, index = test[2]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and index == 2
    path = test.files[2]
    assert label == (0 if path.parent.name == "cat" else 1)
    expected = np.array(Image.open(path).convert("RGB").resize((16, 16), Image.BILINEAR))
    assert torch.equal((image * 255).round().to(torch.uint8), torch.from_numpy(expected).permute(2, 0, 1))
    fp = test.fingerprint()
    assert build_dataset("folder", "test", root=tmp_path, image_size=16).fingerprint() == fp
    Image.fromarray(np.zeros((12, 20, 3), dtype=np.uint8)).save(path)  # change one file's content
    assert build_dataset("folder", "test", root=tmp_path, image_size=16).fingerprint() != fp


def test_folder_single_layout_and_errors(tmp_path):
    _write_pngs(tmp_path / "flat", ["a", "b", "c"], 3)
    d = build_dataset("folder", "train", root=tmp_path / "flat", val_size=0)
    assert len(d) == 9 and d.num_classes == 3 and d[0][0].shape == (3, 32, 32)
    with pytest.raises(UserError, match="no test/ subfolder"):
        build_dataset("folder", "test", root=tmp_path / "flat")
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(UserError, match="no images found"):
        build_dataset("folder", "train", root=tmp_path / "empty")
    _write_pngs(tmp_path / "bad" / "train", ["a"], 2)
    _write_pngs(tmp_path / "bad" / "test", ["zebra"], 1)
    with pytest.raises(UserError, match="zebra"):
        build_dataset("folder", "test", root=tmp_path / "bad")


# ---------------------------------------------------------------------------------
# Joint augmentation
# ---------------------------------------------------------------------------------


def _shift_with_zeros(x, dy, dx):
    """x (C x H x W) translated by (dy, dx) with zero fill: out[i, j] = x[i + dy, j + dx]."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
    xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    out[..., yd, xd] = x[..., ys, xs]
    return out


@pytest.mark.parametrize("padding_mode", ["constant", "reflect"])
def test_joint_augment_keeps_mask_aligned(padding_mode):
    torch.manual_seed(0)
    masks = generate_synthetic(40, seed=9).masks
    aug = JointAugment(padding=4, flip=True, padding_mode=padding_mode)
    for m in masks:
        mask = m[None]
        image = mask.float().expand(3, -1, -1).clone()
        out_image, out_mask = aug(image, mask)
        assert out_image.shape == (3, 32, 32) and out_mask.shape == (1, 32, 32) and out_mask.dtype == torch.bool
        assert type(out_image) is torch.Tensor and type(out_mask) is torch.Tensor
        assert torch.equal(out_image, out_mask.float().expand(3, -1, -1))


def test_joint_augment_is_a_crop_and_flip():
    """Each output equals the input shifted by some (dy, dx) in [-4, 4]^2 with zero fill,
    optionally mirrored; both flips and several shifts occur."""
    torch.manual_seed(1)
    x = torch.rand(3, 12, 12)
    aug = JointAugment(padding=4)
    candidates = {}
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            shifted = _shift_with_zeros(x, dy, dx)
            candidates[(dy, dx, False)] = shifted
            candidates[(dy, dx, True)] = shifted.flip(-1)
    seen = set()
    for _ in range(200):
        out, none = aug(x, None)
        assert none is None
        match = [k for k, c in candidates.items() if torch.equal(out, c)]
        assert match, "output is not a padded crop (+ flip) of the input"
        seen.update(match)
    assert any(k[2] for k in seen) and any(not k[2] for k in seen)
    assert len({k[:2] for k in seen}) > 10
    flip_only = JointAugment(padding=0, flip=True)
    outs = {torch.equal(flip_only(x)[0], x) for _ in range(50)}
    assert outs == {True, False}


def test_augment_flag_applies_to_train_only():
    train = build_dataset("synthetic", "train", size=100, augment=True)
    assert isinstance(train.transform, JointAugment)
    assert build_dataset("synthetic", "val", size=100, augment=True).transform is None
    torch.manual_seed(0)
    changed = 0
    for i in range(20):
        image, label, index = train[i]
        assert image.shape == (3, 32, 32) and index == i
        changed += not torch.equal((image * 255).round().to(torch.uint8), train.images[i])
    assert changed >= 10


def test_joint_augment_bad_input():
    with pytest.raises(UserError):
        JointAugment(padding=-1)
    with pytest.raises(UserError):
        JointAugment(padding_mode="wrap")


def test_folder_val_subfolder_is_used_instead_of_carving(tmp_path):
    _write_pngs(tmp_path / "train", ["a", "b"], 3)
    _write_pngs(tmp_path / "val", ["a", "b"], 1, seed=2)
    _write_pngs(tmp_path / "test", ["b"], 1, seed=3)
    train = build_dataset("folder", "train", root=tmp_path)
    val = build_dataset("folder", "val", root=tmp_path)
    test = build_dataset("folder", "test", root=tmp_path)
    assert (len(train), len(val), len(test)) == (6, 2, 1)
    assert all(p.parts[-3] == "val" for p in val.files)
    assert test.labels.tolist() == [1]  # "b" keeps its training label
