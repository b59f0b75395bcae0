"""A loss that is not finite on one rank only stops every rank, and no rank's message calls
its own finite value 'not finite' (it used to: rank 1 printed 'loss is not finite (0.5)')."""
from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist
import torch.multiprocessing as mp


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _rank(rank: int, port: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))
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
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()
    os._exit(0)


def test_non_finite_loss_on_one_rank_stops_both_and_names_where(tmp_path):
    mp.start_processes(_rank, args=(_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for (name0, msg0), (name1, msg1) in zip(r0, r1):
        assert name0 == name1 == "NonFiniteError"
        assert msg0.startswith("step 3: loss is not finite (nan)")
        assert msg1.startswith("step 3: loss is not finite (on another rank") and "(0.5)" not in msg1
