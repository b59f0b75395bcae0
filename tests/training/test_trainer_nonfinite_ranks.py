"""A loss that is not finite on one rank only stops every rank, and no rank's message calls
its own finite value 'not finite' (it used to: rank 1 printed 'loss is not finite (0.5)')."""
from __future__ import annotations

from types import SimpleNamespace

from tests.training.gloo_ranks import run_two_ranks


def _rank(rank: int, out: str) -> list:
    from pgen_engine.training.rl import _stop_if_not_finite
    from pgen_engine.training.trainer import Trainer

    value = float("nan") if rank == 0 else 0.5
    res = []
    for check in (Trainer(SimpleNamespace(output_dir=out), None).check_finite, _stop_if_not_finite):
        try:
            check(value, "loss", 3)
            res.append(["returned", ""])
        except Exception as e:  # noqa: BLE001 - what each rank saw is the result
            res.append([type(e).__name__, str(e)])
    return res


def test_non_finite_loss_on_one_rank_stops_both_and_names_where(tmp_path):
    r0, r1 = run_two_ranks(_rank, tmp_path)
    for (name0, msg0), (name1, msg1) in zip(r0, r1):
        assert name0 == name1 == "NonFiniteError"
        assert msg0.startswith("step 3: loss is not finite (nan)")
        assert msg1.startswith("step 3: loss is not finite (on another rank") and "(0.5)" not in msg1
