"""The hot loop's pieces: statistics read every few batches, the DataLoader built once."""

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from dhat_seg.config import load_config
from dhat_seg.errors import DivergenceError
from dhat_seg.run.experiment import Experiment
from dhat_seg.run.devices import worker_count
from dhat_seg.run.train_loop import DeviceStats, EpochLoader, sync_interval


class Noisy(Dataset):
    """Items that draw from torch's global generator, like the random crop and flip."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.full((2,), float(i)) + torch.rand(2), i, i


def batches(loader) -> list[tuple[list[float], list[int]]]:
    return [(b[0].flatten().tolist(), b[2].tolist()) for b in loader]


def test_single_process_loader_equals_a_fresh_shuffled_loader_per_epoch():
    loaders = EpochLoader(batch_size=4, num_workers=0, seed=3, pin_memory=False)
    for epoch in range(3):
        torch.manual_seed(100 + epoch)
        got = batches(loaders.epoch(Noisy(), epoch) if epoch == 0 else loaders.epoch(loaders._dataset, epoch))
        torch.manual_seed(100 + epoch)
        fresh = DataLoader(Noisy(), batch_size=4, shuffle=True, drop_last=True,
                           generator=torch.Generator().manual_seed(3 * 7919 + epoch))
        assert got == batches(fresh)
    assert len(got) == 2  # drop_last: 10 samples in batches of 4


def test_loader_is_built_once_per_dataset():
    loaders = EpochLoader(batch_size=4, num_workers=0, seed=0, pin_memory=False)
    data = Noisy()
    first = loaders.epoch(data, 0)
    assert loaders.epoch(data, 1) is first
    assert loaders.epoch(Noisy(), 2) is not first  # a callback replaced the dataset (new masks)


def test_worker_loader_is_exact_on_resume_and_independent_of_the_worker_count():
    one = EpochLoader(batch_size=4, num_workers=1, seed=5, pin_memory=False)
    data = Noisy()
    straight = [batches(one.epoch(data, e)) for e in range(2)]
    assert straight[0] != straight[1]
    resumed = EpochLoader(batch_size=4, num_workers=2, seed=5, pin_memory=False)
    assert batches(resumed.epoch(Noisy(), 1)) == straight[1]  # epoch 2 alone, with two workers
    indices = sorted(i for _, idx in straight[0] for i in idx)
    assert len(indices) == len(set(indices)) == 8


def test_sync_interval_and_worker_count():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert sync_interval(0, cpu) == 1 and sync_interval(0, cuda) == 50 and sync_interval(7, cpu) == 7
    assert worker_count(3, cuda) == 3 and worker_count(-1, cpu) == 0
    assert worker_count(-1, cuda, cpus=16) == 8 and worker_count(-1, cuda, cpus=4) == 3 and worker_count(-1, cuda, cpus=1) == 0


def test_device_stats_reads_in_intervals_and_checks_every_batch_in_order():
    seen = []
    buf = DeviceStats(3, lambda values, batch: seen.append((batch, values["loss"])))
    values = [1.0, 2.0, 4.0, 8.0, 16.0]
    read = [buf.add({"loss": torch.tensor(v), "max_logit_clean": torch.tensor(10 - v)}) for v in values]
    assert read == [False, False, True, False, False] and [b for b, _ in seen] == [0, 1, 2]
    summary = buf.summary()  # reads the rest
    assert seen == list(enumerate(values))
    assert summary == {"train_loss": round(sum(values) / 5, 5), "train_max_logit_clean": 9.0}


def test_device_stats_handle_batches_with_different_statistics():
    buf = DeviceStats(4, lambda values, batch: None)
    buf.add({"loss": torch.tensor(1.0), "a": torch.tensor(2.0)})
    buf.add({"loss": torch.tensor(3.0)})
    assert buf.summary() == {"train_loss": 2.0, "train_a": 1.0}  # means over all batches read


def test_a_divergence_is_raised_at_the_read_naming_its_batch():
    def check(values, batch):
        if not math.isfinite(values["loss"]):
            raise DivergenceError(f"batch {batch + 1}")

    buf = DeviceStats(4, check)
    buf.add({"loss": torch.tensor(1.0)})
    buf.add({"loss": torch.tensor(float("nan"))})
    with pytest.raises(DivergenceError, match="batch 2"):
        buf.flush()


TINY = dict(method="at", data="synthetic", model="small_cnn", train_size=64, test_size=16, val_size=8, epochs=2,
            batch_size=16, val_examples=8, val_attack_steps=1, attack_steps=1, device="cpu", milestones=[1])


def run(out, **overrides):
    cfg = load_config(None, {**TINY, **overrides})
    summary = Experiment(cfg, out, cache_dir=out.parent / "cache", progress=False, log=lambda m: None).run()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    summary = {k: v for k, v in summary.items() if k != "config_digest"}  # it names the option
    return summary, [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_reading_statistics_every_few_batches_changes_no_figure(tmp_path):
    torch.set_num_threads(1)
    every_batch = run(tmp_path / "a", sync_every=1)
    assert run(tmp_path / "b", sync_every=3) == every_batch
    assert every_batch[1][0]["train_loss"] > 0


def test_training_with_workers_is_independent_of_their_number(tmp_path):
    torch.set_num_threads(1)
    one = run(tmp_path / "a", num_workers=1)
    assert run(tmp_path / "b", num_workers=2) == one
