"""Data-parallel training over several processes, launched by ``torchrun``.

``torchrun --nproc-per-node N -m dhat_seg train ...`` starts N processes; each reads its
rank from the environment (RANK, WORLD_SIZE, LOCAL_RANK), joins the process group (NCCL on
CUDA, gloo on CPU), trains on its shard of every global batch (``batch_size / N`` samples,
so the global batch is the configured one) and averages the gradients with the others
before each step. Rank 0 alone writes the run directory (config, metrics, checkpoints,
summary); every rank reads a checkpoint to resume.

Why gradients are averaged by hand rather than by ``DistributedDataParallel``: a DHAT step
runs the model many times before one backward (attacks, inverse attacks, the background
forward, AWP's proxy step), and attacks differentiate through the model for the inputs
only. DDP's reducer expects one forward per backward and would all-reduce the attacks'
parameter gradients too. One all-reduce of the flattened parameter gradients after the
backward is the same arithmetic (the mean over ranks of the per-rank mean losses' gradients
= the gradient of the global batch's mean loss, with equal shards) for every method.

Batch norm: per process by default (each rank normalises with its own shard's statistics,
as DDP does without SyncBatchNorm); rank 0's running statistics are broadcast at every
epoch's end, so validation and checkpoints see one model. ``sync_bn: true`` converts the
model's BatchNorm layers to :class:`torch.nn.SyncBatchNorm` (CUDA only; every rank must run
the same forwards, so methods that draw per batch what to run, such as AGAIN, refuse it).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
from torch import nn

from dhat_seg.errors import UserError

#: How long a rank waits for the others at a collective (a mask build or an attention
#: model trained by one rank holds the others at a barrier).
TIMEOUT = datetime.timedelta(hours=6)


@dataclass(frozen=True)
class Dist:
    """This process's place in the group: ``rank`` of ``world`` (``local_rank`` on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this process writes the run directory and prints results (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over the ranks (in place; itself when alone)."""
        if self.enabled:
            torch.distributed.all_reduce(tensor)
            tensor.div_(self.world)
        return tensor

    def agreed_signal(self, signum: int | None) -> int | None:
        """A stop signal any rank received (the largest number), so that all stop at the same batch."""
        if not self.enabled:
            return signum
        flag = torch.tensor([signum or 0], dtype=torch.int64, device=_collective_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None

    def average_gradients(self, model: nn.Module) -> None:
        """Replace every parameter gradient by its mean over the ranks (one all-reduce).
        Every rank must hold gradients for the same parameters (the same method and model)."""
        if not self.enabled:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.mean(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_state(self, model: nn.Module, buffers_only: bool = False) -> None:
        """Copy rank 0's parameters (unless ``buffers_only``) and buffers (BN statistics) to every rank."""
        if not self.enabled:
            return
        tensors = ([] if buffers_only else list(model.parameters())) + list(model.buffers())
        with torch.no_grad():
            for t in tensors:
                torch.distributed.broadcast(t.data, src=0)


SINGLE = Dist()


def convert_sync_batchnorm(model: nn.Module) -> None:
    """Replace every BatchNorm layer inside ``model`` by a SyncBatchNorm with its state, in
    place (the optimiser is built after, so it sees the new layers' parameters)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        else:
            convert_sync_batchnorm(child)


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def env_world() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"environment variable WORLD_SIZE={os.environ['WORLD_SIZE']!r} is invalid; expected an "
                        "integer (set by torchrun)") from None


def init_from_env(device: str) -> tuple[Dist, str]:
    """Join torchrun's process group; returns this process's :class:`Dist` and the device
    it trains on (``cuda:LOCAL_RANK`` when ``device`` is auto/cuda and CUDA is there).
    Outside torchrun: (:data:`SINGLE`, ``device``) and nothing is initialised."""
    world = env_world()
    if world <= 1:
        return SINGLE, device
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available() or device.startswith("cuda")
    if use_cuda:
        if device.startswith("cuda:"):
            raise UserError(f"--device {device!r} names one GPU, but torchrun runs {world} processes; expected "
                            "--device cuda (each process takes the GPU of its LOCAL_RANK)")
        if not torch.cuda.is_available():
            raise UserError("--device cuda was given but CUDA is not available; expected --device cpu for gloo")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    return Dist(rank, world, local), device


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_distributable(cfg, dist: Dist) -> None:
    """UserError for settings a multi-process run cannot honour (before any work)."""
    if not dist.enabled:
        if cfg.sync_bn:
            raise UserError("sync_bn=true needs several processes (torchrun --nproc-per-node N -m dhat_seg train ...); "
                            "expected sync_bn=false in a single process")
        return
    if cfg.batch_size % dist.world:
        raise UserError(f"batch_size={cfg.batch_size} cannot be split over {dist.world} processes; expected a "
                        f"multiple of {dist.world} (the global batch; each process trains on batch_size / {dist.world})")
    from dhat_seg.training_methods import TRAINING_METHODS, reads_base

    for name in [cfg.method] + ([cfg.base] if reads_base(cfg.method) else []):
        entry = TRAINING_METHODS.get(name)
        if entry is not None and entry.stateful:
            raise UserError(f"method {name!r} keeps {entry.stateful} that dhat-seg does not synchronise across processes "
                            "yet; expected a single process for it (python -m dhat_seg train ...)")
    if cfg.sync_bn and not cfg.device.startswith("cuda"):
        raise UserError("sync_bn=true needs CUDA (torch's SyncBatchNorm has no CPU kernels); expected sync_bn=false "
                        "with gloo on CPU")
    if cfg.sync_bn and cfg.method == "again" and cfg.options("again").form == "paper":
        raise UserError("sync_bn=true with method 'again' could deadlock: each process draws per batch whether it runs "
                        "AGAIN's forwards; expected sync_bn=false")
