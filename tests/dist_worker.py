"""One rank of the multi-process tests (tests/test_distributed.py), started by torchrun:

    torchrun --nproc-per-node 2 tests/dist_worker.py masks OUT_DIR
    torchrun --nproc-per-node 2 tests/dist_worker.py grads OUT_FILE
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from dhat_seg.cache import mask_key
from dhat_seg.cache.sharded import Shard, build_sharded
from dhat_seg.run.distributed import init_from_env, shutdown

sys.path.insert(0, str(Path(__file__).parent))
from dist_fixtures import TEST_SPEC, grad_inputs, noisy_attention, tiny_data, tiny_linear_model  # noqa: E402


def masks(out: Path, dist) -> None:
    ds = tiny_data()
    key = mask_key(ds, TEST_SPEC, {})
    cache = build_sharded(noisy_attention, ds, out, key, Shard(dist.rank, dist.world, dist.barrier), chunk_size=16,
                          batch_size=8, progress=False, log=lambda m: None)
    assert len(cache) == len(ds)


def grads(out: Path, dist) -> None:
    model = tiny_linear_model()
    x, y = grad_inputs()
    half = len(x) // dist.world
    xs, ys = x[dist.rank * half : (dist.rank + 1) * half], y[dist.rank * half : (dist.rank + 1) * half]
    torch.nn.functional.cross_entropy(model(xs), ys).backward()
    dist.average_gradients(model)
    grads = {name: p.grad for name, p in model.named_parameters()}
    torch.save(grads, out.with_suffix(f".rank{dist.rank}.pt"))


if __name__ == "__main__":
    mode, target = sys.argv[1], Path(sys.argv[2])
    dist, _ = init_from_env("cpu")
    try:
        {"masks": masks, "grads": grads}[mode](target, dist)
    finally:
        shutdown()
