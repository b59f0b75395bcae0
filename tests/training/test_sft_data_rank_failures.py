"""Data preparation runs on rank 0 alone; any failure there must stop every rank with its error.

``_prepare_on_main`` turns the expected input errors into one line for every rank; anything
else (a bug, a CUDA out-of-memory while a GPU tokenizer encodes the catalogue) used to escape on
rank 0 only while the other ranks waited in the broadcast of its result: a hang on NCCL or on
another node, 'Connection closed by peer' on gloo. Two gloo ranks stand in for the launch.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from tests.training.gloo_ranks import run_two_ranks


def _prepare_rank(rank: int, out: str) -> None:
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
    sft_data.prepare_sft_data(cfg, DistInfo(rank, 2, rank, torch.device("cpu")))


def test_unexpected_failure_in_rank0_data_prep_stops_every_rank(tmp_path):
    r0, r1 = run_two_ranks(_prepare_rank, tmp_path)
    assert r0 == ("RuntimeError", "CUDA out of memory (injected)")
    assert r1 == ("RankFailedError", "rank 0 failed: RuntimeError: CUDA out of memory (injected)")
