"""Image folders with foreground masks (ROOT/masks/<split>/) and Backgrounds-Challenge test
splits (ROOT/test-mixed-rand/ ...): what ``--data folder`` reads, and its clear errors.

Expected masks are computed here with numpy and PIL directly (threshold at half the
maximum, PIL bilinear resize, >= 128), not by the loader's code path.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from dhat_seg.data import build_dataset
from dhat_seg.data.registry import available_splits
from dhat_seg.errors import UserError

CLASSES = ("cat", "dog")


def _image(rng, h=24, w=20):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _box(h=24, w=20, top=4, left=5, size=10):
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[top:top + size, left:left + size] = 1
    return mask


def write_folder(root, *, per_class=4, splits=("train", "test"), masks=("train", "test"), seed=0):
    """Images of 24 x 20 pixels; masks: a box shifted per image, alternating 0/255 PNG and
    0/1 channels-last .npy files. Returns {relative image path: the mask as 0/1 array}."""
    rng = np.random.default_rng(seed)
    truth = {}
    for split in splits:
        for c, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                Image.fromarray(_image(rng)).save(root / split / cls / f"im{k}.png")
                mask = _box(top=k + c, left=2 * k)
                truth[f"{split}/{cls}/im{k}"] = mask
                if split in masks:
                    (root / "masks" / split / cls).mkdir(parents=True, exist_ok=True)
                    if k % 2:
                        np.save(root / "masks" / split / cls / f"im{k}.npy", np.repeat(mask[..., None], 3, axis=2))
                    else:
                        Image.fromarray(mask * 255).save(root / "masks" / split / cls / f"im{k}.png")
    return truth


def expected_mask(mask01, size):
    small = Image.fromarray(mask01.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(small) >= 128)


def test_masks_are_read_resized_and_follow_the_images(tmp_path):
    truth = write_folder(tmp_path)
    test = build_dataset("folder", "test", root=tmp_path, image_size=16)
    train = build_dataset("folder", "train", root=tmp_path, image_size=16, val_size=3)
    val = build_dataset("folder", "val", root=tmp_path, image_size=16, val_size=3)
    for ds in (test, train, val):
        assert ds.gt_masks.shape == (len(ds), 16, 16) and ds.gt_masks.dtype == torch.bool
        for i, path in enumerate(ds.files):
            key = path.relative_to(tmp_path).with_suffix("").as_posix()
            assert torch.equal(ds.gt_masks[i], expected_mask(truth[key], 16)), key
    assert {p.stem for p in val.files} and not set(train.files) & set(val.files)
    native = build_dataset("folder", "test", root=tmp_path, image_size=20)  # no resize of square 20 from 24 x 20
    assert native.gt_masks.shape == (8, 20, 20)


def test_masks_enter_the_fingerprint(tmp_path):
    write_folder(tmp_path)
    fp = build_dataset("folder", "test", root=tmp_path, image_size=16).fingerprint()
    assert build_dataset("folder", "test", root=tmp_path, image_size=16).fingerprint() == fp
    Image.fromarray(np.zeros((24, 20), dtype=np.uint8)).save(tmp_path / "masks" / "test" / "cat" / "im0.png")
    changed = build_dataset("folder", "test", root=tmp_path, image_size=16)
    assert changed.fingerprint() != fp and not changed.gt_masks[0].any()


def test_a_folder_without_masks_has_none(tmp_path):
    write_folder(tmp_path, masks=("train",))
    assert build_dataset("folder", "test", root=tmp_path).gt_masks is None
    assert build_dataset("folder", "train", root=tmp_path, val_size=2).gt_masks is not None


@pytest.mark.parametrize("defect, message", [
    ("missing", r"1 of 8 images in .*test have no mask in .*masks.test \(first: expected .*im3.png or .npy\)"),
    ("twice", r"two masks for one image .*im0"),
    ("size", r"mask .*im0.png is 10x10 but its image .*im0.png is 24x20"),
    ("garbage", r"cannot read mask .*im1.npy"),
    ("shape", r"mask .*im1.npy is a float64 array of shape \(2, 2, 2, 2\)"),
])
def test_bad_masks_are_clear_errors(tmp_path, defect, message):
    write_folder(tmp_path)
    where = tmp_path / "masks" / "test" / "cat"
    if defect == "missing":
        (where / "im3.npy").unlink()
    elif defect == "twice":
        np.save(where / "im0.npy", _box())
    elif defect == "size":
        Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(where / "im0.png")
    elif defect == "garbage":
        (where / "im1.npy").write_bytes(b"not a numpy file")
    else:
        np.save(where / "im1.npy", np.zeros((2, 2, 2, 2)))
    with pytest.raises(UserError, match=message):
        build_dataset("folder", "test", root=tmp_path, image_size=16).gt_masks


def test_pickled_mask_files_are_refused(tmp_path):
    write_folder(tmp_path)
    np.save(tmp_path / "masks" / "test" / "cat" / "im1.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="cannot read mask .*im1.npy.*pickle"):
        build_dataset("folder", "test", root=tmp_path).gt_masks


def test_background_challenge_splits_of_a_folder(tmp_path):
    write_folder(tmp_path, splits=("train", "test", "test-mixed-rand", "test-no-fg"), masks=())
    assert available_splits("folder", tmp_path) == ("train", "val", "test", "test-mixed-rand", "test-no-fg")
    assert available_splits("folder", tmp_path / "nowhere") == ()
    assert available_splits("synthetic") == ("train", "val", "test", "test-mixed-rand", "test-only-fg", "test-no-fg")
    no_fg = build_dataset("folder", "test-no-fg", root=tmp_path)
    assert torch.equal(no_fg.backgrounds, no_fg.labels) and no_fg.labels.tolist() == [0] * 4 + [1] * 4
    assert build_dataset("folder", "test-mixed-rand", root=tmp_path).backgrounds is None
    with pytest.raises(UserError, match=r"has no test-only-fg/ subfolder"):
        build_dataset("folder", "test-only-fg", root=tmp_path)
    with pytest.raises(UserError, match=r"split 'test-shuffled' is unknown for dataset 'folder'"):
        build_dataset("folder", "test-shuffled", root=tmp_path)


def export_built_in(root, cfg):
    """The built-in data of ``cfg`` written as an image folder: every split as lossless PNGs
    (class folders c0..c9 sort in label order), ``test-no-fg`` filed under the background's
    class as ImageNet-9's ``no_fg`` is, and the train and test masks."""
    from dhat_seg.data import split_for

    for split in ("train", "test", "test-mixed-rand", "test-only-fg", "test-no-fg"):
        ds = split_for(dataclasses.replace(cfg, val_size=0) if split == "train" else cfg, split)
        labels = ds.backgrounds if split == "test-no-fg" else ds.labels
        for i in range(len(ds)):
            folder = root / split / f"c{int(labels[i])}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
            if split in ("train", "test"):
                (root / "masks" / split / folder.name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(ds.gt_masks[i].numpy().astype(np.uint8) * 255).save(
                    root / "masks" / split / folder.name / f"{i:05d}.png")


def test_a_folder_of_the_built_in_images_evaluates_as_the_built_in_data(tmp_path):
    """Equivalence: the Backgrounds-Challenge accuracies, the BG-gap and the oracle's IoU of
    one model are the same on the built-in data and on the same images read as a folder."""
    import yaml

    from dhat_seg.config import TrainConfig
    from dhat_seg.evaluation.report import run_eval
    from dhat_seg.models import create_model
    from dhat_seg.run.checkpoint import save_weights

    base = dict(model="small_cnn", image_size=16, train_size=60, test_size=40, val_size=0.2, method="dhat",
                attention="oracle", device="cpu", seed=0)
    built_in = TrainConfig(**base, data="synthetic")
    export_built_in(tmp_path / "images", built_in)
    folder = TrainConfig(**base, data="folder", data_root=str(tmp_path / "images"))
    torch.manual_seed(0)
    model = create_model("small_cnn", 10)
    reports, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a busy machine
    try:
        for name, cfg in (("built-in", built_in), ("folder", folder)):
            run = tmp_path / name
            run.mkdir()
            (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
            save_weights(model, run / "model.safetensors", "small_cnn")
            reports.append(run_eval(run, attacks="clean,pgd10", n_examples=40, gap_attack="none", iou_examples=40,
                                    device="cpu", seed=1, show_progress=False, cache_dir=str(tmp_path / "cache")))
    finally:
        torch.set_num_threads(threads)
    a, b = reports
    assert a["background_challenge"]["n"] == 40 and a["bg_gap"]["n"] == 40
    assert a["background_challenge"] == b["background_challenge"] and a["bg_gap"] == b["bg_gap"]
    assert a["accuracy"] == b["accuracy"]
    assert a["attention_iou"]["mean_iou"] == b["attention_iou"]["mean_iou"] == 1.0


def test_the_datasets_command_lists_and_checks_a_folder(tmp_path):
    from typer.testing import CliRunner

    from dhat_seg.cli import app

    from cli_helpers import assert_one_line_error

    listed = CliRunner().invoke(app, ["datasets"])
    assert listed.exit_code == 0 and "ROOT/masks/<split>/" in listed.output
    assert "test-no-fg" in next(line for line in listed.output.splitlines() if line.startswith("folder"))
    write_folder(tmp_path / "f", splits=("train", "test", "test-mixed-rand"), masks=("test",))
    checked = CliRunner().invoke(app, ["datasets", "--data-root", str(tmp_path / "f"), "--read-masks"])
    assert checked.exit_code == 0, checked.output
    lines = {line.split()[0]: line.split() for line in checked.output.splitlines() if line[:1].isalpha()}
    assert lines["train"][1:4] == ["7", "2", "train/"] and lines["val"][1] == "1"
    fraction = 100 * sum(_box(top=k + c, left=2 * k).mean() for c in range(2) for k in range(4)) / 8
    assert lines["test"][1:5] == ["8", "2", "test/", "8"] and f"(foreground {fraction:.1f} %)" in checked.output
    assert lines["test-mixed-rand"][-1] == "-"
    assert "Backgrounds-Challenge accuracies: no (test-only-fg/, test-no-fg/ missing); attention IoU: yes" in checked.output
    (tmp_path / "f" / "masks" / "test" / "dog" / "im2.png").unlink()
    assert_one_line_error(CliRunner().invoke(app, ["datasets", "--data-root", str(tmp_path / "f")]),
                          "1 of 8 images", "im2.png or .npy")
    assert_one_line_error(CliRunner().invoke(app, ["datasets", "--data-root", str(tmp_path / "none")]),
                          "is not a folder")
    write_folder(tmp_path / "flat", splits=("train",), masks=())
    flat = CliRunner().invoke(app, ["datasets", "--data-root", str(tmp_path / "flat" / "train")])
    assert flat.exit_code == 0 and "./ (val carved out)" in flat.output and "attention IoU: no (no test/ split)" in flat.output


def test_test_splits_of_a_folder_draw_the_same_subset(tmp_path):
    """ImageNet-9's variants list the same objects in the same order: a --set test_size subset
    keeps them paired across test, test-mixed-rand, test-only-fg and test-no-fg."""
    write_folder(tmp_path, per_class=6, splits=("train", "test", "test-mixed-rand", "test-only-fg"), masks=())
    subsets = [build_dataset("folder", s, root=tmp_path, size=5, seed=3) for s in ("test", "test-mixed-rand", "test-only-fg")]
    names = [[p.relative_to(tmp_path / d.split).as_posix() for p in d.files] for d in subsets]
    assert len(names[0]) == 5 and names[0] == names[1] == names[2]
    assert names[0] != [p.relative_to(tmp_path / "test").as_posix() for p in
                        build_dataset("folder", "test", root=tmp_path, size=5, seed=4).files]
