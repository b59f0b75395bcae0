"""Test harness: run one function on two local gloo ranks and collect what each rank saw.

Stands in for a 2-rank launch in the rank-failure tests: each spawned process joins a gloo
group (short timeout, so a rank left waiting fails the test instead of hanging it), calls
``target(rank, out, *args)`` and records ``["returned", ""]`` (or what ``target`` returned) or
the ``[exception class, message]`` it raised, in ``out/rank{rank}.json``.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> str:
    """A TCP port free on 127.0.0.1 now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _entry(rank: int, target: Callable[..., Any], port: str, out: str, timeout_s: float, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        res = target(rank, out, *args)
        res = ["returned", ""] if res is None else res
    except BaseException as e:  # noqa: BLE001 - what each rank saw is the result
        res = [type(e).__name__, str(e)]
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    try:
        dist.destroy_process_group()
    finally:
        os._exit(0)  # skip interpreter teardown (gloo threads): the result is already on disk


def run_two_ranks(target: Callable[..., Any], out: str | os.PathLike, *args: Any, timeout_s: float = 20) -> list:
    """Run ``target(rank, out, *args)`` (a module-level function: it is pickled) on ranks 0 and 1.

    Returns the two recorded results, rank 0 first (lists become tuples).
    """
    mp.start_processes(_entry, args=(target, free_port(), str(out), timeout_s, args), nprocs=2,
                       start_method="spawn")
    return [_tuple(json.loads(Path(out, f"rank{r}.json").read_text())) for r in (0, 1)]


def _tuple(x: Any) -> Any:
    return tuple(x) if isinstance(x, list) and len(x) == 2 and all(isinstance(v, str) for v in x) else x
