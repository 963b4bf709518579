"""The ``oracle`` attention plugin: the dataset's own ground-truth masks, degraded on request.

References are computed by hand here (numpy shifts of the exact masks), not by the
plugin's torch code: dilation = OR of the mask shifted by every offset in the
(2k+1) x (2k+1) square, erosion = AND of those shifts with pixels from outside the
image counting as foreground, a shift = slicing into a zero array.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dhat_seg.attention import AttentionContext, foreground_iou, plugin_manager, validate_attention
from dhat_seg.attention.model import build_attention
from dhat_seg.cache import dataset_for
from dhat_seg.config import load_config
from dhat_seg.errors import UserError
from dhat_seg.plugins import oracle as O

from cli_helpers import assert_one_line_error

N = 48


def config(**overrides):
    values = dict(data="synthetic", train_size=120, test_size=40, val_size=16, attention="oracle", device="cpu")
    values.update(overrides)
    return load_config(None, values)


def oracle(cfg=None, **options):
    cfg = cfg or config()
    if options:
        cfg.attention_options = {**cfg.attention_options, **{k: str(v) for k, v in options.items()}}
    fn = build_attention(cfg, num_classes=10, device=torch.device("cpu"))
    # the checked function of a run (validates every result); labels are not read
    return lambda images, labels=None: fn(images, torch.zeros(images.shape[0], dtype=torch.long))


@pytest.fixture(scope="module")
def train():
    ds = dataset_for(config(), "train")
    images = torch.stack([ds.load_image(i) for i in range(N)])
    return ds, images, ds.gt_masks[:N].unsqueeze(1)


def mean_iou(masks, truth) -> float:
    return foreground_iou(masks, truth).mean().item()


def shifted(a: np.ndarray, dx: int, dy: int, fill: bool) -> np.ndarray:
    """a (..., H, W) moved dx right and dy down; pixels from outside take ``fill``."""
    h, w = a.shape[-2:]
    out = np.full_like(a, fill)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = a[..., ys, xs]
    return out


def dilate_by_hand(a: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros_like(a)
    for dy in range(-k, k + 1):
        for dx in range(-k, k + 1):
            out |= shifted(a, dx, dy, False)
    return out


def erode_by_hand(a: np.ndarray, k: int) -> np.ndarray:
    out = np.ones_like(a)
    for dy in range(-k, k + 1):
        for dx in range(-k, k + 1):
            out &= shifted(a, dx, dy, True)
    return out


# ---------------------------------------------------------------------------------


def test_spec_registration():
    specs = []
    O.register_attention_methods(register=specs.append)
    (s,) = specs
    assert (s.name, s.kind, s.version) == ("oracle", "image", "1")
    assert dict(s.default_options) == {"dilate": 0, "erode": 0, "shift_x": 0, "shift_y": 0, "flip": 0.0, "seed": 0}
    assert "oracle" in plugin_manager.BUILTIN_PLUGINS and s.readiness() is None


def test_exact_masks_give_iou_one_on_every_split(train):
    ds, images, truth = train
    fn = oracle()
    out = validate_attention(fn(images, torch.zeros(N)), images, "oracle")
    assert out.dtype == torch.bool and torch.equal(out, truth) and mean_iou(out, truth) == 1.0
    # images of the other splits are found too (indexed only when first needed)
    for split in ("val", "test", "test-mixed-rand"):
        other = dataset_for(config(), split)
        idx = list(range(0, len(other), 3))
        imgs = torch.stack([other.load_image(i) for i in idx])
        assert torch.equal(fn(imgs, None), other.gt_masks[idx].unsqueeze(1)), split
    # a batch in any order, with repeats, gets each image's own mask
    perm = torch.tensor([5, 0, 5, 17, 3])
    assert torch.equal(fn(images[perm], None), truth[perm])


def test_dilation_and_erosion_match_by_hand_and_lower_iou(train):
    _, images, truth = train
    gt = truth.numpy()
    ious = {}
    for k in (1, 2, 3):
        dil = oracle(dilate=k)(images)
        ero = oracle(erode=k)(images)
        assert np.array_equal(dil.numpy(), dilate_by_hand(gt, k)), k
        assert np.array_equal(ero.numpy(), erode_by_hand(gt, k)), k
        assert bool((dil | truth).eq(dil).all()) and bool((ero & truth).eq(ero).all())  # superset / subset
        ious[k] = (mean_iou(dil, truth), mean_iou(ero, truth))
    assert 1.0 > ious[1][0] > ious[2][0] > ious[3][0]
    assert 1.0 > ious[1][1] > ious[2][1] > ious[3][1]
    # composable: dilate then erode by the same k (a closing) contains the object
    closed = oracle(dilate=2, erode=2)(images)
    assert bool((closed | truth).eq(closed).all()) and mean_iou(closed, truth) > ious[1][0]


def test_shift_matches_by_hand_and_lowers_iou(train):
    _, images, truth = train
    gt = truth.numpy()
    ious = []
    for dx, dy in [(1, 0), (0, -2), (3, 3), (-5, 2)]:
        out = oracle(shift_x=dx, shift_y=dy)(images)
        assert np.array_equal(out.numpy(), shifted(gt, dx, dy, False)), (dx, dy)
        ious.append(mean_iou(out, truth))
    assert all(i < 1.0 for i in ious)
    assert mean_iou(oracle(shift_x=1)(images), truth) > mean_iou(oracle(shift_x=2)(images), truth) > \
        mean_iou(oracle(shift_x=4)(images), truth)
    assert not oracle(shift_x=40)(images).any()  # moved out of the image entirely


def test_pixel_flips_are_seeded_per_sample_and_lower_iou(train):
    _, images, truth = train
    ious = []
    for p in (0.02, 0.1, 0.3):
        out = oracle(flip=p)(images)
        flipped = (out ^ truth).float().mean().item()
        assert abs(flipped - p) < 0.15 * p + 0.005, (p, flipped)  # 48 x 1024 pixels
        ious.append(mean_iou(out, truth))
    assert 1.0 > ious[0] > ious[1] > ious[2]
    fn = oracle(flip=0.1)
    whole = fn(images)
    # a sample's noise depends on the sample only: not on its batch, position or process
    assert torch.equal(fn(images[[7, 3]]), whole[[7, 3]])
    assert torch.equal(oracle(flip=0.1)(images[10:20]), whole[10:20])
    assert not torch.equal(oracle(flip=0.1, seed=1)(images), whole)
    assert not torch.equal(whole[0], whole[1] ^ truth[1] ^ truth[0])  # not the same noise for every sample
    assert torch.equal(oracle(flip=1.0)(images), ~truth)
    assert torch.equal(oracle(flip=0.0)(images), truth)


def test_degradations_compose(train):
    _, images, truth = train
    alone = {"dilate": mean_iou(oracle(dilate=1)(images), truth), "shift": mean_iou(oracle(shift_x=2)(images), truth),
             "flip": mean_iou(oracle(flip=0.05)(images), truth)}
    both = mean_iou(oracle(dilate=1, shift_x=2, flip=0.05)(images), truth)
    assert both < min(alone.values())
    # order: dilate, erode, shift, flip; by hand for dilate + shift
    out = oracle(dilate=1, shift_x=-2, shift_y=1)(images)
    assert np.array_equal(out.numpy(), shifted(dilate_by_hand(truth.numpy(), 1), -2, 1, False))


def test_option_errors():
    for options, match in [({"dilate": -1}, "dilate=-1"), ({"erode": -2}, "erode=-2"), ({"flip": 1.5}, "flip=1.5"),
                           ({"flip": -0.1}, "flip=-0.1")]:
        with pytest.raises(UserError, match=match):
            oracle(**options)
    with pytest.raises(UserError, match="attention method .oracle.: option shift_x=.1.5. is invalid; expected an integer"):
        oracle(shift_x="1.5")
    with pytest.raises(UserError, match="has no option 'dilation'"):
        oracle(dilation=1)


def png_folder(root, n_per_class: int = 6):
    """A CIFAR-like image folder (32 x 32 RGB, two classes, train/ and test/): no masks."""
    from PIL import Image

    g = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n_per_class):
                Image.fromarray(g.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def test_data_without_masks_is_a_user_error(tmp_path):
    cfg = config(data="folder", data_root=str(png_folder(tmp_path / "imgs")), train_size=None, test_size=None, val_size=2)
    with pytest.raises(UserError, match="ground-truth foreground masks.*'folder/train' has none.*--data synthetic"):
        oracle(cfg)
    from dhat_seg.cli import app

    result = CliRunner().invoke(app, ["masks", "build", "--attention", "oracle", "--data", "folder", "--set",
                                      f"data_root={tmp_path / 'imgs'}", "--set", "val_size=2", "--set", "device=cpu", "--set", "train_size=10",
                                      "--cache-dir", str(tmp_path / "cache")])
    assert_one_line_error(result, "oracle", "has none")


def test_unknown_images_and_missing_config_are_user_errors(train):
    ds, images, _ = train
    augmented = dataset_for(config(), "train")
    from dhat_seg.data.transforms import JointAugment

    torch.manual_seed(0)
    aug = JointAugment(padding=4, flip=True)
    batch = torch.stack([aug(images[i], None)[0] for i in range(8)])
    assert augmented.fingerprint() == ds.fingerprint()
    with pytest.raises(UserError, match="not one of the un-augmented images.*mask_source"):
        oracle()(batch)
    spec = plugin_manager.get_attention_spec("oracle")
    with pytest.raises(UserError, match="needs the run's data settings"):
        spec.build(AttentionContext(options=spec.resolve_options({})))


def test_masks_build_score_and_training_through_the_cache(tmp_path):
    from dhat_seg.cache import MaskCache, list_caches
    from dhat_seg.cli import app

    settings = ["--set", "train_size=40", "--set", "val_size=8", "--set", "device=cpu", "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, ["masks", "build", "--attention", "oracle", "--attention-opt", "dilate=1", *settings])
    assert result.exit_code == 0, result.output
    assert "storage       bits" in result.output
    (directory,) = list_caches(tmp_path / "cache")
    cache = MaskCache.open(directory)
    ds = dataset_for(config(train_size=40, val_size=8), "train")
    assert torch.equal(cache.get_many(range(len(ds))), torch.from_numpy(dilate_by_hand(ds.gt_masks.unsqueeze(1).numpy(), 1)))
    assert json.loads((directory / "meta.json").read_text())["key"]["method"]["options"]["dilate"] == 1
    result = CliRunner().invoke(app, ["masks", "score", "--attention", "oracle", "--n", "20", *settings])
    assert result.exit_code == 0, result.output
    row = next(line.split() for line in result.output.splitlines() if line.startswith("oracle"))
    assert row[2:4] == ["1.0", "1.0"]


@pytest.mark.slow
def test_training_takes_its_masks_from_the_oracle(tmp_path):
    """The trainer builds the run's mask cache with the oracle (it hands the run's
    configuration to the attention context)."""
    from dhat_seg.run.experiment import Experiment

    cfg = load_config(None, dict(method="dhat", data="synthetic", model="small_cnn", train_size=48, test_size=16, val_size=8,
                                 epochs=1, batch_size=20, attack_steps=1, inv_steps=1, val_examples=8, val_attack_steps=1,
                                 attention="oracle", device="cpu"))
    logs: list[str] = []
    Experiment(cfg, tmp_path / "run", log=logs.append, cache_dir=tmp_path / "cache", progress=False).run()
    assert any(line.startswith("mask cache: building") and "oracle" in line for line in logs)
