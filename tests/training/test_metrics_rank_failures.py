"""The metrics logger writes on rank 0 only; a failure there must stop every rank together.

Rank 0 raising while building the logger (``logging.tensorboard=true`` without the package) or
appending a row (full disk) used to exit rank 0 alone while the others went on into the next
training step's ZeRO-3 gathers: a hang on NCCL or on another node; on gloo 'Connection closed
by peer' on the other ranks instead of the cause. Two gloo ranks stand in for the launch.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

from tests.training.gloo_ranks import run_two_ranks


def _rank(rank: int, out: str, case: str) -> None:
    from pgen_engine.training.metrics import MetricsLogger

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if case == "tensorboard":
        sys.modules["torch.utils.tensorboard"] = None  # as if the package were not installed
    logger = MetricsLogger(out, is_main=rank == 0, total_steps=2, progress=False, tensorboard=case == "tensorboard")
    if case == "write":
        if rank == 0:
            logger._file = SimpleNamespace(write=disk_full, flush=disk_full, close=lambda: None)
        logger.log({"step": 1, "loss": 1.0})


def _run(tmp_path, case):
    return run_two_ranks(_rank, tmp_path, case)


def test_logger_that_cannot_open_on_rank0_stops_every_rank_with_one_line(tmp_path):
    r0, r1 = _run(tmp_path, "tensorboard")
    assert r0 == r1
    assert r0[0] == "PgenUserError" and "logging.tensorboard=true needs the 'tensorboard' package" in r0[1]


def test_failed_metrics_write_on_rank0_stops_every_rank(tmp_path):
    r0, r1 = _run(tmp_path, "write")
    assert r0 == ("OSError", "[Errno 28] No space left on device")
    assert r1 == ("RankFailedError", "rank 0 failed: OSError: [Errno 28] No space left on device")


def _reduce_rank(rank: int, out: str) -> None:
    from pgen_engine.training.metrics import reduce_row

    row = {"step": 1, "reward": 1.0, "kl": 0.1}
    if rank == 1:
        row["reward/extra"] = 0.5  # a component only this rank logged
    reduce_row(row, 2)


def test_rows_with_different_keys_stop_every_rank_instead_of_a_mismatched_all_reduce(tmp_path):
    # reduce_row all-reduces one tensor per row: with a key only rank 1 has, the tensors differ in
    # length, which gloo reports obscurely and NCCL may not report at all (a hang or garbage)
    r0, r1 = run_two_ranks(_reduce_rank, tmp_path)
    assert r0[0] == r1[0] == "RuntimeError"
    assert "differ in their keys between ranks" in r0[1] and "reward/extra" in r1[1] and "reward/extra" not in r0[1]
