"""Data-parallel training across processes with PyTorch's DistributedDataParallel.

``torchrun --nproc-per-node N -m polytask fit ...`` starts N processes with the ``torch.distributed``
environment variables set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
:func:`init_from_env` joins them into one process group (gloo for CPU tensors, nccl for CUDA ones).

What the trainer does with it (see :class:`polytask.train.Trainer` and ``docs/distributed.md``):

* ``batch_size`` stays the *global* batch: every rank draws the same permutation (same seed) and
  takes its own contiguous slice of each global batch, so the shards are disjoint and together
  cover the epoch; the number of steps and the learning-rate schedule match a one-process run.
* Each rank's task loss is rescaled by ``world * n_rank / n_global`` (labels present on the rank /
  in the global batch), so the average over ranks of the rescaled losses *is* the loss of the
  global batch, also with missing labels and uneven shards. Balancers see those global values
  (one all-reduce of 2K numbers per step) while the gradients flow through the local rescaled losses.
* Loss-level balancers: DDP's own gradient averaging. Gradient-level balancers: the engine averages
  the per-task gradient blocks across ranks before any Gramian or direction is formed.
* Only rank 0 evaluates, logs, shows progress and writes checkpoints; the others wait at a barrier.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "all_reduce_mean", "barrier", "choose_backend", "current", "init_from_env", "shard"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the process group."""

    rank: int
    world_size: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def choose_backend(device: torch.device | str = "cpu") -> str:
    """``nccl`` for CUDA tensors, ``gloo`` otherwise (gloo is PyTorch's CPU backend)."""
    return "nccl" if torch.device(device).type == "cuda" and dist.is_nccl_available() else "gloo"


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when absent)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got '{raw}'") from None


def current() -> DistContext | None:
    """The initialised process group with more than one process, else ``None``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return DistContext(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def init_from_env(device: torch.device | str = "cpu") -> DistContext | None:
    """Join the process group described by torchrun's environment variables.

    Returns ``None`` for a plain one-process run (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``); an already
    initialised group is reused.
    """
    ctx = current()
    if ctx is not None:
        return ctx
    if env_world_size() < 2:
        return None
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set; launch with torchrun "
            "(e.g. torchrun --nproc-per-node 2 -m polytask fit ...)"
        )
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))  # nccl binds the process to this GPU
    dist.init_process_group(backend=choose_backend(device))
    return current()


def shard(index: torch.Tensor, ctx: DistContext | None) -> torch.Tensor:
    """This rank's contiguous slice of a global batch's ``index`` (the whole of it without a group)."""
    if ctx is None:
        return index
    return index.tensor_split(ctx.world_size)[ctx.rank]


def all_reduce_mean(tensors: list[torch.Tensor], ctx: DistContext) -> None:
    """Average ``tensors`` in place across ranks, in one collective call (gloo has no AVG op)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(part.view_as(t))


def barrier(ctx: DistContext | None) -> None:
    if ctx is not None:
        dist.barrier()
