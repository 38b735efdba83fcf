"""Data-parallel helpers for draft training under torchrun / torch.distributed.

Every rank builds the same plan of global batches (seeded by (seed, epoch)), takes its own part of
each with `shard_indices`, and DDP averages the gradients. All helpers are no-ops (world size 1)
when torch.distributed is not initialised, so single-process training runs the same code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside 0..{self.world_size - 1}")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def is_main(self) -> bool:
        return self.rank == 0


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def current() -> DistEnv:
    """The process group's view, or a single-process DistEnv when none is initialised.

    A torchrun launch with WORLD_SIZE > 1 but no process group is a caller's mistake (every rank
    would silently train the whole data set alone), so it raises."""
    if not _initialised():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            raise RuntimeError(f"WORLD_SIZE={world} but torch.distributed is not initialised; "
                               "call msd_engine.train.distributed.init_from_env() first")
        return DistEnv()
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local) if dist.get_backend() == "nccl" else torch.device("cpu")
    return DistEnv(rank, world, local, device)


def init_from_env(backend: Optional[str] = None) -> DistEnv:
    """Initialise the default process group from torchrun's environment variables.

    backend None: nccl when CUDA is available (one GPU per LOCAL_RANK), else gloo."""
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(f"torchrun environment variables missing: {missing} (launch with torchrun)")
    if _initialised():
        return current()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend {backend!r} not one of ('nccl', 'gloo')")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, init_method="env://", rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))
    return current()


def shutdown() -> None:
    """Destroy the default process group (the end of a torchrun launch); a no-op without one."""
    if _initialised():
        dist.destroy_process_group()


def is_main() -> bool:
    return not _initialised() or dist.get_rank() == 0


def barrier() -> None:
    if _initialised():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor holding the sum over ranks (the input itself is left unchanged)."""
    out = tensor.detach().clone()
    if _initialised():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor holding the mean over ranks."""
    out = all_reduce_sum(tensor)
    return out / dist.get_world_size() if _initialised() else out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (picklable objects)."""
    if not _initialised():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard_indices(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank `rank`'s contiguous part of one global batch: sizes differ by at most one, earlier ranks
    take the extra ones, and the parts concatenated in rank order are the batch itself. A rank may
    get an empty part when the batch is shorter than `world` (the last batch of an epoch)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside 0..{world - 1} (world {world})")
    base, extra = divmod(len(indices), world)
    start = rank * base + min(rank, extra)
    return list(indices[start:start + base + (rank < extra)])
