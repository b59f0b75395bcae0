"""A rank-0-only step of the RL stage that fails must stop every rank with its error.

The learned reward embedder is trained by rank 0 alone (``RLStage.setup``). When that raised,
rank 0 exited while the other ranks waited in a barrier: on NCCL (or on another node, which
the launcher does not kill) a hang until the group's timeout, with no message. Two gloo ranks
with a short group timeout stand in for the launch; everything before and after the rank-0
step is stubbed.
"""
from __future__ import annotations

from types import SimpleNamespace

from tests.training.gloo_ranks import run_two_ranks


def _setup_rank(rank: int, out: str) -> None:
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
    stage.setup(trainer, {})


def test_reward_embedder_failure_on_rank0_stops_every_rank_with_its_error(tmp_path):
    r0, r1 = run_two_ranks(_setup_rank, tmp_path)
    assert r0 == r1 == ("RLConfigError", "rl.embedder: cannot train the reward embedder (injected)")
