"""Process-group setup and every collective the package makes, in one place.

``deepspeed train.py`` exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
``python train.py`` runs one process without a launcher, so those are filled in here
(DeepSpeed would otherwise try MPI discovery). On CUDA the NCCL backend is used; on CPU
gloo (DeepSpeed's CPU accelerator adds its shared-memory all-reduce on top).

Communication device: a NCCL group accepts only CUDA tensors, gloo accepts CPU tensors.
Every helper here builds its tensor on :func:`comm_device` (the device the default
group's backend serves, parsed from ``torch.distributed.get_backend()``, e.g. ``"nccl"``
-> CUDA, ``"gloo"`` -> CPU, ``"cuda:gloo"`` -> CUDA) and hands results back on the
caller's device or as Python numbers. No other module of the package calls
``torch.distributed`` collectives (``tests/training/test_distributed.py`` scans for it).
Without a process group every helper is the identity for one rank.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import pickle
import socket
import sys
import warnings
import zlib
from typing import Any, Callable, Literal, TypeVar

import torch
import torch.distributed as dist

from pgen_engine.errors import PgenUserError, one_line

T = TypeVar("T")


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
    """Initialise (once) the default process group and return this process's DistInfo.

    The group is a plain ``torch.distributed`` one (``env://``); DeepSpeed's engine build
    adopts an existing default group instead of creating its own.
    """
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
        _forget_deepspeed_groups()
        dist.init_process_group(backend=backend, init_method="env://", rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _forget_deepspeed_groups() -> None:
    """Drop DeepSpeed's module-level clones of an earlier default group (``deepspeed.utils.groups``):
    after ``shutdown()`` and a new group in the same process (SFT then RL from Python, a notebook),
    the next ``deepspeed.initialize`` used the destroyed clone and failed ("Group ... is not
    registered"). DeepSpeed re-clones the new world group on first use."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                 "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_DATA_PARALLEL_GROUP", "_ALL_TO_ALL_GROUP"):
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()


def initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Ranks in the default group (1 without one)."""
    return dist.get_world_size() if initialized() else 1


def comm_device_type() -> str:
    """The device type collective tensors must live on for the default group's backend.

    ``"nccl"`` -> ``"cuda"``; ``"gloo"`` / ``"mpi"`` -> ``"cpu"``; a device-mapped backend
    string (``"cpu:gloo,cuda:nccl"``, ``"cuda:gloo"``) -> ``"cpu"`` when it maps CPU, else
    the device type it maps. ``"cpu"`` without a process group.
    """
    if not initialized():
        return "cpu"
    backend = str(dist.get_backend()).lower()
    if ":" in backend:
        devices = [part.split(":", 1)[0].strip() for part in backend.split(",")]
        return "cpu" if "cpu" in devices else devices[0]
    return "cuda" if backend == "nccl" else "cpu"


def comm_device() -> torch.device:
    """The device for collective tensors: the current CUDA device when :func:`comm_device_type`
    is ``"cuda"``, else that device type."""
    kind = comm_device_type()
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


ReduceOp = Literal["sum", "max", "min"]
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce(t: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
    """``t`` reduced element-wise over all ranks, returned as a new tensor on ``t``'s device.

    ``t`` (any shape and device) is copied to :func:`comm_device`, reduced there, and
    copied back; ``t`` itself is not modified. Identity (a copy) without a process group.
    """
    if op not in _OPS:
        raise ValueError(f"all_reduce: op must be one of {sorted(_OPS)}, got {op!r}")
    if not initialized():
        return t.clone()
    buf = t.detach().to(comm_device(), copy=True)
    dist.all_reduce(buf, op=_OPS[op])
    return buf.to(t.device)


def all_ranks_true(flag: bool) -> bool:
    """True only when ``flag`` is True on every rank (a MIN all-reduce)."""
    if not initialized():
        return flag
    return bool(all_reduce(torch.tensor([1 if flag else 0], dtype=torch.int32), "min").item())


def same_on_all_ranks(text: str) -> bool:
    """True when ``text`` is the same string on every rank (its length and CRC-32, MAX and MIN all-reduced).

    For a check before a collective whose size depends on per-rank data (a metrics row's keys):
    tensors of different lengths on NCCL hang or read garbage instead of failing. Every rank
    gets the same answer, so every rank can raise together.
    """
    if not initialized():
        return True
    data = text.encode()
    sig = torch.tensor([len(data), zlib.crc32(data)], dtype=torch.float64)  # both exact in float64
    return bool(torch.equal(all_reduce(sig, "max"), all_reduce(sig, "min")))


def mean_over_ranks(value: float) -> float:
    """The mean of a Python float over all ranks (the value itself without a process group)."""
    if not initialized():
        return value
    return float(all_reduce(torch.tensor([value], dtype=torch.float64)).item()) / world_size()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if initialized():
        # on NCCL the barrier runs on the comm device; device_ids avoids torch guessing it
        if comm_device_type() == "cuda":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def shutdown() -> None:
    """Leave the default process group cleanly: a barrier, then ``destroy_process_group``.

    No-op without a process group. Why the barrier: gloo's worker thread releases a finished
    collective's tensors after the caller's ``wait`` returned; a rank that reaches interpreter
    exit while that thread still holds them can abort in teardown ("terminate called without an
    active exception"). Waiting for every rank first gives the thread time to drain its queue,
    and destroying the group joins it before Python finalises.
    """
    if not initialized():
        return
    barrier()
    dist.destroy_process_group()


def leave_after_failure() -> None:
    """Destroy the default process group without a barrier (no-op without one or after :func:`shutdown`).

    For a run that stopped on an error: the other ranks may never reach a barrier, and a group
    left to interpreter teardown can abort there ("terminate called without an active
    exception") after the error line was printed, turning exit status 1 into a SIGABRT.
    Ranks still inside a collective with this one get an error instead of waiting.
    """
    if initialized():
        with contextlib.suppress(Exception):  # best effort: the run's own error is what matters
            dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (identity without a process group)."""
    if not initialized():
        return obj
    box = [obj]
    # broadcast_object_list pickles into a tensor: it must go on the group's device
    dist.broadcast_object_list(box, src=src, device=comm_device() if comm_device_type() != "cpu" else None)
    return box[0]


class RankFailedError(RuntimeError):
    """Raised on the ranks that waited for rank 0's work when that work raised a bug (not a
    :class:`PgenUserError`, which is re-raised as itself); rank 0 keeps its own traceback."""


def on_main(fn: Callable[[], T], is_main: bool) -> T:
    """``fn()`` on rank 0 only; every rank raises if it raised (collective: call on every rank).

    Returns ``fn()``'s result on every rank (it must pickle); ``fn`` must make no collective.
    Rank 0's outcome is broadcast once, on a CPU gloo group whose timeout (:data:`WAIT_TIMEOUT`)
    outlasts long rank-0 work (a VQ tokenizer fit, a token cache: longer than NCCL's 10 min
    default, which killed the waiting ranks with a watchdog timeout). So a rank-0-only failure
    (a cache build, a reward embedder fit, a checkpoint write) stops every rank at once instead
    of leaving the others in the next collective until the group's timeout (a hang, on NCCL or
    on another node). The other ranks raise a :class:`PgenUserError` as the same error (same
    class and message), anything else as :class:`RankFailedError` naming rank 0's exception.
    """
    error: BaseException | None = None
    result = None
    if is_main:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others know
            error = e
    shared = None
    if error is not None:
        shared = (error if isinstance(error, PgenUserError) and _pickles(error)
                  else f"rank 0 failed: {type(error).__name__}: {one_line(error)}")
    box = [(shared, result)]
    if initialized():
        # on a CPU gloo group with a long timeout: rank 0's work (a VQ tokenizer fit, a token
        # cache) may outlast the default group's (NCCL: 10 min), and the others only wait here
        dist.broadcast_object_list(box, src=0, group=_wait_group())
    shared, result = box[0]
    if error is not None:
        raise error
    if isinstance(shared, BaseException):
        raise shared
    if shared is not None:
        raise RankFailedError(shared)
    return result


WAIT_TIMEOUT = datetime.timedelta(hours=24)
_wait: dict[str, Any] = {}


def _wait_group():
    """The gloo group :func:`on_main` waits on (made on first use; every rank calls on_main)."""
    if _wait.get("of") is not dist.group.WORLD:  # a new default group (tests make several)
        _wait.update(of=dist.group.WORLD, group=dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT))
    return _wait["group"]


def _pickles(e: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(e))
        return True
    except Exception:  # noqa: BLE001 - any failure means: send the message instead
        return False
