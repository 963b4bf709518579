"""Multi-process runs through torchrun, two CPU processes with the gloo backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dhat_seg.cache import mask_key
from dhat_seg.cache.build import build_masks
from dhat_seg.cache.store import MaskCache
from dhat_seg.config import load_config
from dhat_seg.run.distributed import SINGLE, check_distributable, Dist
from dhat_seg.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from dist_fixtures import TEST_SPEC, grad_inputs, noisy_attention, tiny_data, tiny_linear_model  # noqa: E402
from run_helpers import killed_after_first_epoch, metrics  # noqa: E402

HERE = Path(__file__).parent


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=HERE.parent)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_a_sharded_mask_build_is_byte_identical_to_one_process(tmp_path):
    torchrun(str(HERE / "dist_worker.py"), "masks", str(tmp_path / "sharded"))
    ds = tiny_data()
    key = mask_key(ds, TEST_SPEC, {})
    single = build_masks(noisy_attention, ds, tmp_path / "single", key, chunk_size=16, batch_size=8, progress=False,
                         log=lambda m: None)
    sharded = MaskCache.open(tmp_path / "sharded", key)
    chunks = sorted(p.name for p in (tmp_path / "single").glob("chunk_*.npy"))
    assert len(chunks) == 4 and chunks == sorted(p.name for p in (tmp_path / "sharded").glob("chunk_*.npy"))
    for name in chunks:
        assert (tmp_path / "single" / name).read_bytes() == (tmp_path / "sharded" / name).read_bytes(), name
    assert all(torch.equal(single[i], sharded[i]) for i in range(len(ds)))
    assert not list((tmp_path / "sharded").glob(".shard-*.json"))  # the finaliser removed the shard records


def test_averaged_gradients_equal_the_global_batch_gradient(tmp_path):
    torchrun(str(HERE / "dist_worker.py"), "grads", str(tmp_path / "g"))
    model = tiny_linear_model()
    x, y = grad_inputs()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"g.rank{rank}.pt", weights_only=True)
        for name, p in model.named_parameters():
            torch.testing.assert_close(got[name], p.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("overrides,match", [
    ({"batch_size": 33}, "batch_size=33 cannot be split over 2 processes"),
    ({"method": "sglr"}, "method 'sglr' keeps per-sample soft labels"),
    ({"method": "dhat", "base": "cfa"}, "method 'cfa' keeps class-wise statistics"),
    ({"sync_bn": True}, "sync_bn=true needs CUDA"),
])
def test_settings_a_multi_process_run_cannot_honour_are_refused(overrides, match):
    cfg = load_config("quick", {"device": "cpu", **overrides})
    with pytest.raises(UserError, match=match):
        check_distributable(cfg, Dist(0, 2, 0))


def test_sync_bn_needs_several_processes():
    with pytest.raises(UserError, match="sync_bn=true needs several processes"):
        check_distributable(load_config("quick", {"sync_bn": True}), SINGLE)


TRAIN = ["-m", "dhat_seg", "train", "--config", "quick", "--method", "dhat", "--attention", "oracle", "--epochs", "2",
         "--device", "cpu", "--set", "train_size=160", "--set", "test_size=32", "--set", "val_size=16",
         "--set", "val_examples=16", "--set", "attack_steps=1", "--set", "inv_steps=1", "--set", "val_attack_steps=1",
         "--set", "milestones=[1]"]



def test_torchrun_trains_with_a_sharded_cache_and_resumes_exactly(tmp_path):
    import json

    cache, straight = tmp_path / "cache", tmp_path / "straight"
    out = torchrun(*TRAIN, "--out", str(straight), "--cache-dir", str(cache))
    assert "with 2 processes" in out.stderr and out.stdout.count("run dir") == 1  # rank 0 alone prints the result
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["epochs"] == 2 and [m["epoch"] for m in metrics(straight)] == [1, 2]  # one writer
    resumed = tmp_path / "resumed"
    killed_after_first_epoch(straight, resumed)
    torchrun(*TRAIN, "--out", str(resumed), "--cache-dir", str(cache), "--resume")
    assert metrics(resumed) == metrics(straight)
    assert json.loads((resumed / "summary.json").read_text()) == summary
    assert (resumed / "checkpoints" / "epoch_0002" / "model.safetensors").read_bytes() == \
        (straight / "checkpoints" / "epoch_0002" / "model.safetensors").read_bytes()


def test_torchrun_without_out_is_refused(tmp_path):
    env = dict(os.environ, WORLD_SIZE="2", RANK="0")
    result = subprocess.run([sys.executable, *TRAIN], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode != 0 and "under torchrun, --out is required" in result.stderr
    assert "Traceback" not in result.stderr
