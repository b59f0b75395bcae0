"""The metrics logger writes on rank 0 only; a failure there must stop every rank together.

Rank 0 raising while building the logger (``logging.tensorboard=true`` without the package) or
appending a row (full disk) used to exit rank 0 alone while the others went on into the next
training step's ZeRO-3 gathers: a hang on NCCL or on another node; on gloo 'Connection closed
by peer' on the other ranks instead of the cause. Two gloo ranks stand in for the launch.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist
import torch.multiprocessing as mp


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _rank(rank: int, port: str, out: str, case: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))
    from pgen_engine.training.metrics import MetricsLogger

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    try:
        if case == "tensorboard":
            sys.modules["torch.utils.tensorboard"] = None  # as if the package were not installed
        logger = MetricsLogger(out, is_main=rank == 0, total_steps=2, progress=False,
                               tensorboard=case == "tensorboard")
        if case == "write":
            if rank == 0:
                logger._file = SimpleNamespace(write=disk_full, flush=disk_full, close=lambda: None)
            logger.log({"step": 1, "loss": 1.0})
        res = ["returned", ""]
    except BaseException as e:  # noqa: BLE001 - what each rank saw is the result
        res = [type(e).__name__, str(e)]
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    try:
        dist.destroy_process_group()
    finally:
        os._exit(0)


def _run(tmp_path, case):
    mp.start_processes(_rank, args=(_port(), str(tmp_path), case), nprocs=2, start_method="spawn")
    return [tuple(json.loads((tmp_path / f"rank{r}.json").read_text())) for r in (0, 1)]


def test_logger_that_cannot_open_on_rank0_stops_every_rank_with_one_line(tmp_path):
    r0, r1 = _run(tmp_path, "tensorboard")
    assert r0 == r1
    assert r0[0] == "PgenUserError" and "logging.tensorboard=true needs the 'tensorboard' package" in r0[1]


def test_failed_metrics_write_on_rank0_stops_every_rank(tmp_path):
    r0, r1 = _run(tmp_path, "write")
    assert r0 == ("OSError", "[Errno 28] No space left on device")
    assert r1 == ("RankFailedError", "rank 0 failed: OSError: [Errno 28] No space left on device")
