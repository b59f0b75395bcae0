"""A rank-0-only step of the RL stage that fails must stop every rank with its error.

The learned reward embedder is trained by rank 0 alone (``RLStage.setup``). When that raised,
rank 0 exited while the other ranks waited in a barrier: on NCCL (or on another node, which
the launcher does not kill) a hang until the group's timeout, with no message. Two gloo ranks
with a short group timeout stand in for the launch; everything before and after the rank-0
step is stubbed.
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


def _setup_rank(rank: int, port: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))
    from pgen_engine.stage_config import RLConfigError
    from pgen_engine.training import rl as rl_mod

    def fail_on_rank0(*args, **kwargs):
        if rank == 0:
            raise RLConfigError("rl.embedder: cannot train the reward embedder (injected)")

    def reached(*args, **kwargs):
        raise AssertionError("went past the rank-0 step after rank 0 failed")

    rl_mod.load_dataset = lambda *a, **k: SimpleNamespace(items={})
    rl_mod.work_dir = lambda cfg: out
    rl_mod.reward_embedder_spec = lambda rl, work: {"type": "cocons_cnn"}
    rl_mod.ensure_reward_embedder = fail_on_rank0
    rl_mod.build_reward_env = reached
    stage = object.__new__(rl_mod.RLStage)
    stage.cfg = SimpleNamespace(data=SimpleNamespace(dataset_dir=out))
    stage.rl = SimpleNamespace()
    trainer = SimpleNamespace(dist=SimpleNamespace(rank=rank, world_size=2, is_main=rank == 0),
                              data=SimpleNamespace(dataset=SimpleNamespace(cache=None),
                                                   tokenizer=SimpleNamespace(decode=None),
                                                   splits=SimpleNamespace(train_sequences={})))
    try:
        stage.setup(trainer, {})
        res = ("returned", "")
    except BaseException as e:  # noqa: BLE001 - what each rank saw is the result
        res = (type(e).__name__, str(e))
    torch.save(res, f"{out}/rank{rank}.pt")
    try:
        dist.destroy_process_group()
    finally:
        os._exit(0)


def test_reward_embedder_failure_on_rank0_stops_every_rank_with_its_error(tmp_path):
    mp.start_processes(_setup_rank, args=(_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0 == r1 == ("RLConfigError", "rl.embedder: cannot train the reward embedder (injected)")
