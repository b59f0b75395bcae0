"""Data preparation runs on rank 0 alone; any failure there must stop every rank with its error.

``_prepare_on_main`` turns the expected input errors into one line for every rank; anything
else (a bug, a CUDA out-of-memory while a GPU tokenizer encodes the catalogue) used to escape on
rank 0 only while the other ranks waited in the broadcast of its result: a hang on NCCL or on
another node, 'Connection closed by peer' on gloo. Two gloo ranks stand in for the launch.
"""
from __future__ import annotations

import datetime
import os
import socket
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _prepare_rank(rank: int, port: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))
    from pgen_engine.training import sft_data
    from pgen_engine.training.distributed import DistInfo

    def oom(cfg):
        raise RuntimeError("CUDA out of memory (injected)")

    def reached(*args, **kwargs):
        raise AssertionError("went past data preparation after rank 0 failed")

    sft_data.ensure_dataset = oom
    sft_data.model_dtype = lambda *a: torch.float32
    sft_data.load_dataset = reached
    cfg = SimpleNamespace(deepspeed=None, data=SimpleNamespace(dataset_dir=out))
    try:
        sft_data.prepare_sft_data(cfg, DistInfo(rank, 2, rank, torch.device("cpu")))
        res = ("returned", "")
    except BaseException as e:  # noqa: BLE001 - what each rank saw is the result
        res = (type(e).__name__, str(e))
    torch.save(res, f"{out}/rank{rank}.pt")
    try:
        dist.destroy_process_group()
    finally:
        os._exit(0)


def test_unexpected_failure_in_rank0_data_prep_stops_every_rank(tmp_path):
    mp.start_processes(_prepare_rank, args=(_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0 == ("RuntimeError", "CUDA out of memory (injected)")
    assert r1 == ("RankFailedError", "rank 0 failed: RuntimeError: CUDA out of memory (injected)")
