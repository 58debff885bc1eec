"""Small helpers for data-parallel training under `torchrun` (torch DistributedDataParallel).

`torchrun --nproc_per_node N -m wsi_vssm train cells ...` starts N processes with RANK, LOCAL_RANK and WORLD_SIZE
in their environment. `init_from_env()` joins them into one process group (NCCL on CUDA, gloo on CPU); without
torchrun (WORLD_SIZE unset or 1) every helper here is a no-op and training runs as a single process.

torch.distributed is imported inside the functions, so `import wsi_vssm` does not pull it in.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # this process's device: "cpu" or "cuda:<local_rank>" ("cuda" in a single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init_from_env(device: str = "cpu") -> DistContext:
    """Join the process group torchrun describes in the environment; a single-process context without it.

    `device`: "cpu" or "cuda". On CUDA each process takes GPU LOCAL_RANK and the backend is NCCL; else gloo.
    Calling it again once the group exists returns the context of the existing group.
    """
    import torch

    world = env_world_size()
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    if world <= 1:
        return DistContext(device="cuda" if cuda else "cpu")
    import torch.distributed as dist

    if not dist.is_available():
        from wsi_vssm.errors import UsageError

        raise UsageError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       device=f"cuda:{local_rank}" if cuda else "cpu")


@contextmanager
def session(device: str = "cpu") -> Iterator[DistContext]:
    """`init_from_env(device)` for the block; destroys the process group on exit only if this call created it."""
    owned = env_world_size() > 1 and not is_initialized()
    ctx = init_from_env(device)
    try:
        yield ctx
    finally:
        if owned:
            cleanup()


def is_main() -> bool:
    """True on rank 0, or when not distributed (RANK from the environment before/after the group exists)."""
    if is_initialized():
        import torch.distributed as dist

        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def barrier() -> None:
    if is_initialized():
        import torch.distributed as dist

        dist.barrier()


def all_reduce_mean(tensor):
    """The mean of `tensor` over all processes (a new tensor; `tensor` itself unchanged). Identity alone."""
    if not is_initialized():
        return tensor
    import torch.distributed as dist

    t = tensor.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every process (picklable objects); `obj` itself when not distributed."""
    if not is_initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard(indices, rank: int, world: int) -> np.ndarray:
    """This rank's share of `indices`: every `world`-th item from `rank` on, after padding `indices` by repeating
    it from the start up to a multiple of `world`. All shards have the same length (so every rank runs the same
    number of steps), and step k's batches of all ranks together are step k's batch of a single process with a
    `world` times larger batch (for batches that divide the shard)."""
    idx = np.asarray(indices)
    if world <= 1:
        return idx
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} not in [0, {world})")
    if len(idx) == 0:
        return idx
    pad = (-len(idx)) % world
    if pad:
        idx = np.concatenate([idx, np.resize(idx, pad)])
    return idx[rank::world]


def cleanup() -> None:
    """Destroy the process group, if any."""
    if is_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


def depthwise_channels_last(model) -> None:
    """Depthwise weights (C, 1, k, k) in the channels-last strides their gradients come back in from the
    channels-last blocks: the same bytes, so DDP's buckets match the gradients and it does not warn "Grad strides
    do not match bucket view strides" (it did, once per process). Before the optimiser, so its state matches."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] == 1:
            m.weight.data = m.weight.data.clone(memory_format=torch.channels_last)  # .contiguous() would keep them


def dist_meta(batch_size: int, ctx: DistContext) -> dict:
    """The model metadata's record of how many processes trained it, and on what."""
    return {"distributed": {"world_size": ctx.world_size, "batch_size_per_process": batch_size,
                            "effective_batch_size": batch_size * ctx.world_size, "device": ctx.device.split(":")[0]}}
