"""Checkpoint writes, exports and resumes that fail on one rank must stop every rank together.

``save_resumable`` / ``export_hf`` did their rank-0 file work (mkdir, meta + rename + ``latest``,
the Hugging Face export) and then called ``barrier()``; a per-rank RNG file was written before a
barrier too. An OSError on one rank (full disk, read-only folder, another node's local disk) left
the others in the barrier; a missing RNG file of one rank on resume left the others going on into
the first step's collectives, a truncated ZeRO partition of one rank left the others inside
DeepSpeed's load: a hang on NCCL or on another node, 'Connection closed by peer' on
gloo. Two gloo ranks with a fake engine stand in for the launch.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from tests.training.gloo_ranks import run_two_ranks


class _Engine:
    def save_checkpoint(self, root, tag, client_state, save_latest):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)

    def zero_optimization_stage(self):
        return 3

    def load_checkpoint(self, root, tag, load_optimizer_states, load_lr_scheduler_states):
        # like DeepSpeed: each rank reads its own partition files, then a collective
        for f in sorted((Path(root) / tag).glob(f"zero_pp_rank_{dist.get_rank()}_*.pt")):
            torch.load(f)
        dist.barrier()
        return str(Path(root) / tag), {"step": 1}


class _Unwritable:
    def __reduce__(self):
        raise OSError(28, "No space left on device")


def _rank(rank: int, out: str, case: str) -> None:
    from pgen_engine.training import checkpoints as C
    from pgen_engine.training.distributed import DistInfo

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    info = DistInfo(rank, 2, rank, torch.device("cpu"))
    if case == "publish" and rank == 0:
        C.atomic_write_json = disk_full
    if case == "rng" and rank == 1:
        C.rng_state = lambda: _Unwritable()
    if case == "export":
        C.gather_state_dict = lambda module, d: {}
        if rank == 0:
            C.JanusModel = disk_full
    if case in ("resume", "rng_shape"):
        ckpt = Path(out) / "checkpoints" / "step00000001"
        if rank == 0:  # rank 1's RNG file is missing (another node's disk lost it), or holds something else
            ckpt.mkdir(parents=True)
            (ckpt / C.META).write_text(json.dumps({"step": 1, "world_size": 2, "zero_stage": 3}))
            torch.save(C.rng_state(), ckpt / "rng_rank0.pt")
            for r in (0, 1):  # DeepSpeed's per-rank files, present (load_resumable checks them first)
                for kind in ("model", "optim"):
                    torch.save({"r": r}, ckpt / f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt")
            if case == "rng_shape":
                torch.save({"python": 1}, ckpt / "rng_rank1.pt")
        dist.barrier()
    if case == "shard":
        ckpt = Path(out) / "checkpoints" / "step00000001"
        if rank == 0:  # rank 1's optimizer partition is truncated (killed while writing, disk full)
            ckpt.mkdir(parents=True)
            (ckpt / C.META).write_text(json.dumps({"step": 1, "world_size": 2, "zero_stage": 3}))
            for r in (0, 1):
                torch.save(C.rng_state(), ckpt / f"rng_rank{r}.pt")
                torch.save({"r": r}, ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
                torch.save({"r": r}, ckpt / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
            (ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"PK\x03\x04 truncated")
        dist.barrier()
    if case in ("resume", "rng_shape", "shard"):
        C.load_resumable(_Engine(), ckpt, info)
    elif case == "export":
        C.export_hf(SimpleNamespace(config=None, special_tokens=None), Path(out) / "final", info)
    else:
        C.save_resumable(_Engine(), Path(out) / "checkpoints", 1, {}, info, keep=2)


def _run(tmp_path, case):
    return run_two_ranks(_rank, tmp_path, case)


def test_failed_checkpoint_publish_on_rank0_stops_every_rank(tmp_path):
    r0, r1 = _run(tmp_path, "publish")
    # a CheckpointWriteError (a PgenUserError: one line from train.py) naming the checkpoint, the same on every rank
    assert r0[0] == "CheckpointWriteError" and r0 == r1, (r0, r1)
    assert "step00000001: could not write it ([Errno 28] No space left on device" in r0[1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == []  # no .tmp-step00000001 left
    assert not (tmp_path / "checkpoints" / "latest").exists()


def test_failed_rng_write_on_rank1_stops_every_rank(tmp_path):
    r0, r1 = _run(tmp_path, "rng")
    assert r1[0] == "CheckpointWriteError" and "could not write it ([Errno 28] No space left on device" in r1[1]
    assert r0[0] == "RankFailedError" and "could not write its RNG state" in r0[1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == []  # no latest, no .tmp-step00000001


def test_failed_export_on_rank0_stops_every_rank(tmp_path):
    r0, r1 = _run(tmp_path, "export")
    assert r0 == ("OSError", "[Errno 28] No space left on device")
    assert r1 == ("RankFailedError", "rank 0 failed: OSError: [Errno 28] No space left on device")


def test_missing_rng_state_on_rank1_stops_every_rank_on_resume(tmp_path):
    r0, r1 = _run(tmp_path, "resume")
    assert r1[0] == "ResumeError" and "missing RNG state for rank 1" in r1[1]
    assert r0[0] == "ResumeError" and "another rank could not restore its RNG state" in r0[1]


def test_rng_state_of_another_shape_on_rank1_stops_every_rank_on_resume(tmp_path):
    r0, r1 = _run(tmp_path, "rng_shape")
    assert r1[0] == "ResumeError" and "rng_rank1.pt: cannot restore the RNG state" in r1[1]
    assert r0[0] == "ResumeError" and "another rank could not restore its RNG state" in r0[1]


def test_truncated_zero_partition_of_rank1_stops_every_rank_before_deepspeed_loads(tmp_path):
    r0, r1 = _run(tmp_path, "shard")
    assert r1[0] == "ResumeError" and "(zero_pp_rank_1_mp_rank_00_optim_states.pt: truncated" in r1[1]
    assert r0[0] == "ResumeError" and "(another rank's partition is corrupt)" in r0[1]
