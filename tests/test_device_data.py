"""The training set held on the device (``data_on_device``): batched crop and flip equal to
torchvision's per sample, masks that follow their images, the epoch order of the worker
loader, exact resume, and a training run. Run on CPU, where ``data_on_device: true`` takes the
same code path as on CUDA."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from dhat_seg import cache as C
from dhat_seg.config import load_config
from dhat_seg.data.base import TensorImageDataset
from dhat_seg.run.device_data import DeviceResident, crop_flip, draw_augmentation, epoch_permutation, why_not_resident
from dhat_seg.errors import UserError
from dhat_seg.run.experiment import Experiment
from dhat_seg.run.train_loop import EpochLoader, _SeededSampler
from run_helpers import killed_after_first_epoch, metrics
from test_cache import build, check_masked_batches, gt_attention, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(sample: torch.Tensor, top: int, left: int, flip: bool, padding: int, mode: str) -> torch.Tensor:
    """torchvision's pad + crop + horizontal flip of one C x H x W sample (in float32)."""
    h, w = sample.shape[-2:]
    padded = TF.pad(sample.float(), [padding], fill=0, padding_mode=mode)
    out = TF.crop(padded, top, left, h, w)
    return TF.horizontal_flip(out) if flip else out


@pytest.mark.parametrize("mode", ["constant", "reflect"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.bool])
def test_crop_flip_equals_torchvision_sample_by_sample(mode, dtype):
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (12, 3, 9, 7), generator=g)
    batch = batch.float() / 255 if dtype == torch.float32 else (batch > 127 if dtype == torch.bool else batch.to(dtype))
    offsets, flips = draw_augmentation(12, 3, True, g)
    assert 0 < int(flips.sum()) < 12 and offsets.min() >= 0 and offsets.max() <= 6
    out = crop_flip(batch, offsets, flips, 3, mode)
    assert out.dtype == dtype and out.shape == batch.shape
    for i in range(12):
        expected = reference(batch[i], int(offsets[i, 0]), int(offsets[i, 1]), bool(flips[i]), 3, mode)
        assert torch.equal(out[i].float(), expected), i
    assert not torch.equal(out, batch)  # the augmentation did something, so the comparison means something


def test_no_padding_and_no_flip_is_the_identity():
    batch = torch.rand(4, 3, 5, 5)
    offsets, flips = draw_augmentation(4, 0, False, torch.Generator().manual_seed(1))
    assert torch.equal(crop_flip(batch, offsets, flips, 0), batch) and not flips.any()


@pytest.mark.parametrize("storage", ["bits", "uint8"])
def test_masks_follow_their_images_on_the_device(tmp_path, storage):
    ds = tiny(augment=True)
    cache = build(gt_attention(ds, soft=storage == "uint8")[0], ds, tmp_path / "c")
    data = DeviceResident(C.MaskedDataset(ds, cache), torch.device("cpu"), batch_size=16, seed=1)
    batches = data.epoch(0)
    assert len(batches) == 4 and all(len(b[0]) == 16 for b in batches)
    seen, flipped, shifted, changed = check_masked_batches(batches, ds, storage)
    assert seen == set(range(len(ds))) and flipped > 5 and shifted > 30 and changed > 30


def plain_batches(data: DeviceResident, epoch: int) -> list[tuple[list[int], torch.Tensor]]:
    return [(b[2].tolist(), b[0]) for b in data.epoch(epoch)]


def test_order_is_the_worker_loader_s_and_an_epoch_is_redrawn_exactly():
    ds = tiny(augment=True)
    data = DeviceResident(ds, torch.device("cpu"), batch_size=16, seed=5)
    sampler = _SeededSampler(len(ds), 5)
    sampler.epoch = 1
    assert [i for i, _ in sampler] == epoch_permutation(len(ds), 5, 1).tolist()
    first, second = plain_batches(data, 0), plain_batches(data, 1)
    assert [i for idx, _ in second for i in idx] == epoch_permutation(len(ds), 5, 1).tolist()
    assert [idx for idx, _ in first] != [idx for idx, _ in second]
    again = plain_batches(DeviceResident(ds, torch.device("cpu"), batch_size=16, seed=5), 1)  # a resumed epoch 2
    assert all(a == b and torch.equal(x, y) for (a, x), (b, y) in zip(again, second))


def test_the_ranks_shares_make_up_one_process_s_batches():
    ds = tiny(augment=True)
    single = plain_batches(DeviceResident(ds, torch.device("cpu"), batch_size=16, seed=2), 0)
    ranks = [plain_batches(DeviceResident(ds, torch.device("cpu"), batch_size=8, seed=2, rank=r, world=2), 0)
             for r in range(2)]
    for b, (index, images) in enumerate(single):
        shares = {i: image for r in range(2) for i, image in zip(ranks[r][b][0], ranks[r][b][1])}
        assert sorted(shares) == sorted(index)
        assert all(torch.equal(shares[i], image) for i, image in zip(index, images))  # the same augmentation


def test_what_cannot_live_on_the_device_is_named():
    ds = tiny()
    assert why_not_resident(ds) is None
    resized = TensorImageDataset(ds.images, ds.labels, image_size=(16, 16), name="x", split="train", num_classes=10,
                                 class_names=[str(i) for i in range(10)])
    assert "resized on access" in why_not_resident(resized)
    with pytest.raises(UserError, match="data_on_device=true cannot hold this training set on the device: its images "
                                        "are resized on access"):
        DeviceResident(resized, torch.device("cpu"), batch_size=4, seed=0)
    assert "not held in memory" in why_not_resident(torch.utils.data.TensorDataset(torch.zeros(3)))


def test_epoch_loader_chooses_the_device_only_where_asked_or_on_cuda():
    ds = tiny(augment=True)
    auto = EpochLoader(batch_size=16, num_workers=0, seed=0, pin_memory=False, on_device=None)
    auto.epoch(ds, 0)
    assert not auto.resident  # CPU: the DataLoader, the figures of before
    on = EpochLoader(batch_size=16, num_workers=0, seed=0, pin_memory=False, on_device=True)
    batch = next(iter(on.epoch(ds, 0)))
    assert on.resident and batch[0].shape == (16, 3, 32, 32) and batch[0].dtype == torch.float32
    assert 0.0 <= float(batch[0].min()) and float(batch[0].max()) <= 1.0


def test_dhat_trains_from_the_device_and_resumes_exactly(tmp_path):
    cfg = load_config(None, dict(data="synthetic", image_size=16, model="small_cnn", train_size=48, test_size=8, val_size=8,
                                 epochs=2, batch_size=16, attack_steps=1, inv_steps=1, val_examples=8, val_attack_steps=1,
                                 device="cpu", milestones=[], method="dhat", attention="oracle", data_on_device=True))
    straight = tmp_path / "straight"
    summary = Experiment(cfg, straight, cache_dir=tmp_path / "c", progress=False, on_epoch=lambda r: None).run()
    assert summary["epochs"] == 2
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert 0 < records[1]["train_fg_frac"] < 1  # the masks came along
    resumed = tmp_path / "resumed"
    killed_after_first_epoch(straight, resumed)
    again = Experiment(cfg, resumed, cache_dir=tmp_path / "c", progress=False, on_epoch=lambda r: None).run(resume=True)
    assert again == summary and metrics(resumed) == metrics(straight)
    assert (resumed / "checkpoints" / "epoch_0002" / "model.safetensors").read_bytes() == \
        (straight / "checkpoints" / "epoch_0002" / "model.safetensors").read_bytes()


def test_the_train_flag_is_the_setting(tmp_path):
    from typer.testing import CliRunner

    from cli_helpers import assert_one_line_error
    from dhat_seg.cli import app

    result = CliRunner().invoke(app, ["train", "--data-on-device", "--set", "data_on_device=false", "--out",
                                      str(tmp_path / "r")])
    assert_one_line_error(result, "data_on_device is set twice, to True (--data-on-device) and False (--set)")
