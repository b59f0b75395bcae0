"""Process-group setup and small collective helpers for DeepSpeed runs.

``deepspeed train.py`` exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
``python train.py`` runs one process without a launcher, so those are filled in here
(DeepSpeed would otherwise try MPI discovery). On CUDA the NCCL backend is used; on CPU
gloo (DeepSpeed's CPU accelerator adds its shared-memory all-reduce on top).
"""
from __future__ import annotations

import dataclasses
import os
import socket

import torch


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, local rank and its torch device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed() -> DistInfo:
    """Initialise (once) the default process group and return this process's DistInfo."""
    import warnings

    import deepspeed
    import torch.distributed as dist

    # DeepSpeed still calls torch.distributed APIs that torch deprecates (reduce_scatter_tensor, ...).
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (identity without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_ranks_true(flag: bool) -> bool:
    """True only when ``flag`` is True on every rank (a MIN all-reduce)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def mean_over_ranks(value: float) -> float:
    """The mean of a Python float over all ranks (the value itself without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()
