"""Resumable DeepSpeed checkpoints (1 rank, in process) and the Hugging Face export."""
from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import pytest
import torch

from pgen_engine.training.checkpoints import (LATEST, META, ResumeError, complete_checkpoints, export_hf,
                                              latest_checkpoint, load_resumable, rng_state, save_resumable,
                                              set_rng_state)
from pgen_engine.training.distributed import DistInfo, init_distributed
from tests.fs_faults import file_size_limit


@pytest.fixture(scope="module")
def dist_info() -> DistInfo:
    return init_distributed()


def _engine(seed: int):
    import deepspeed

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5))
    cfg = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}, "steps_per_print": 10 ** 9}
    eng, _, _, _ = deepspeed.initialize(
        model=net, model_parameters=net.parameters(), config=cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)))
    return eng


def _step(eng, x) -> float:
    loss = eng(x).pow(2).mean()
    eng.backward(loss)
    eng.step()
    return float(loss.detach())


def test_rng_state_round_trip():
    state = rng_state()
    a = (random.random(), torch.rand(3), __import__("numpy").random.rand())
    set_rng_state(state)
    b = (random.random(), torch.rand(3), __import__("numpy").random.rand())
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_save_resume_continues_identically(dist_info, tmp_path):
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    xs = [torch.randn(4, 7, generator=g) for _ in range(6)]
    eng = _engine(1)
    for x in xs[:3]:
        _step(eng, x)
    ck = save_resumable(eng, tmp_path, 3, {"micro_batches": 3}, dist_info, keep=2)
    assert ck.name == "step00000003" and (ck / META).is_file()
    assert (tmp_path / LATEST).read_text().strip() == "step00000003"
    noise = torch.rand(4)  # RNG draws after the save must be replayed after the load
    ref = [_step(eng, x) for x in xs[3:]]

    fresh = _engine(2)  # different initial weights, optimizer and schedule position
    client = load_resumable(fresh, ck, dist_info)
    assert client["step"] == 3 and client["micro_batches"] == 3
    assert torch.equal(torch.rand(4), noise)
    got = [_step(fresh, x) for x in xs[3:]]
    assert got == ref
    assert fresh.get_lr() == eng.get_lr()


def test_save_is_atomic_and_prunes(dist_info, tmp_path, monkeypatch):
    eng = _engine(3)
    x = torch.randn(4, 7)
    for s in (1, 2, 3):
        _step(eng, x)
        save_resumable(eng, tmp_path, s, {"micro_batches": s}, dist_info, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step00000002", "step00000003"]
    good = sorted(p.name for p in (tmp_path / "step00000003").iterdir())

    def crash(*args, **kwargs):
        tag = kwargs["tag"]
        (tmp_path / tag).mkdir(exist_ok=True)  # as DeepSpeed's makedirs
        (tmp_path / tag / "half_written.pt").write_bytes(b"\0" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(eng, "save_checkpoint", crash)
    with pytest.raises(OSError, match="disk full"):
        save_resumable(eng, tmp_path, 4, {"micro_batches": 4}, dist_info, keep=2)
    assert latest_checkpoint(tmp_path).name == "step00000003"
    assert sorted(p.name for p in (tmp_path / "step00000003").iterdir()) == good
    assert not (tmp_path / "step00000004").exists()


def test_resume_refuses_other_world_size_or_incomplete(dist_info, tmp_path):
    eng = _engine(4)
    _step(eng, torch.randn(4, 7))
    ck = save_resumable(eng, tmp_path, 1, {"micro_batches": 1}, dist_info, keep=1)
    meta = (ck / META).read_text().replace('"world_size": 1', '"world_size": 2')
    (ck / META).write_text(meta)
    with pytest.raises(ResumeError, match="world_size=2"):
        load_resumable(eng, ck, dist_info)
    (ck / META).unlink()
    with pytest.raises(ResumeError, match="not a complete checkpoint"):
        load_resumable(eng, ck, dist_info)


def test_export_hf_round_trips(dist_info, tmp_path):
    import pgen_engine as pg
    from pgen_engine.models.tiny import make_tiny_checkpoint

    src = make_tiny_checkpoint(tmp_path / "src", seed=5, codebook_size=29)
    model = pg.load_model(src)
    with torch.no_grad():
        model.generation_head.vision_head.weight.add_(torch.randn_like(model.generation_head.vision_head.weight))
    export_hf(model, tmp_path / "final", dist_info)
    back = pg.load_model(tmp_path / "final")
    for (n, a), (_, b) in zip(model.named_parameters(), back.named_parameters()):
        assert torch.equal(a, b), n


# ---------------------------------------------------------------- resuming under another config
def _saved(tmp_path, config):
    import json
    ck = tmp_path / "checkpoints" / "step00000010"
    ck.mkdir(parents=True)
    meta = {"step": 10, "world_size": 1, "zero_stage": 3}
    if config is not None:
        meta["config"] = config
    (ck / META).write_text(json.dumps(meta))
    return ck


def test_resume_refuses_other_training_settings_and_names_them(tmp_path):
    from pgen_engine.training.resume import check_resume_config
    saved = {"output_dir": "a", "train": {"lr": 5e-4, "max_steps": 100}, "rl": {"beta": 0.02, "rewards": {"x": 1}}}
    ck = _saved(tmp_path, saved)
    now = {"output_dir": "a", "train": {"lr": 1.5e-4, "max_steps": 100},
           "rl": {"beta": 0.02, "rewards": {"x": 1}, "policy_distribution": "guided"}}
    with pytest.raises(ResumeError) as e:
        check_resume_config(ck, now)
    msg = str(e.value)
    assert str(ck) in msg and "train.lr: 0.0005 -> 0.00015" in msg
    assert "rl.policy_distribution: (unset) -> 'guided'" in msg and "beta" not in msg


def test_resume_refuses_a_checkpoint_past_max_steps(tmp_path):
    # `--resume auto train.max_steps=2` on a step-10 checkpoint used to train nothing, re-export final/
    # and report success with summary.json "steps": 2
    from pgen_engine.training.resume import check_resume_config
    saved = {"output_dir": "a", "train": {"lr": 1e-3, "max_steps": 10}}
    ck = _saved(tmp_path, saved)
    with pytest.raises(ResumeError, match=r"step00000010: already trained 10 steps, past train\.max_steps=2; "
                                          r"resume with train\.max_steps >= 10"):
        check_resume_config(ck, {"output_dir": "a", "train": {"lr": 1e-3, "max_steps": 2}})
    check_resume_config(ck, {"output_dir": "a", "train": {"lr": 1e-3, "max_steps": 10}})  # a finished run: a no-op


def test_resume_allows_longer_runs_other_folders_and_rates(tmp_path):
    from pgen_engine.training.resume import check_resume_config, config_changes
    saved = {"output_dir": "a", "logging": {"progress": True}, "data": {"work_dir": "w", "history_k": 4},
             "train": {"lr": 1e-3, "max_steps": 100, "save_every": 20, "micro_batch_size": 8},
             "model": {"init": {"sizes": [1, 2]}}}
    now = {"output_dir": "b", "logging": {"progress": False}, "data": {"work_dir": "w2", "history_k": 4},
           "train": {"lr": 1e-3, "max_steps": 300, "save_every": 2, "micro_batch_size": 4},
           "model": {"init": {"sizes": (1, 2)}}}  # a tuple read back from JSON is a list
    assert config_changes(saved, now) == []
    check_resume_config(_saved(tmp_path, saved), now)
    assert config_changes(saved, {**now, "data": {"work_dir": "w", "history_k": 8}}) == ["data.history_k: 4 -> 8"]


def test_resume_accepts_checkpoints_written_before_configs_were_recorded(tmp_path):
    from pgen_engine.training.resume import check_resume_config
    check_resume_config(_saved(tmp_path, None), {"train": {"lr": 1.0}})


def test_resume_accepts_settings_added_later_only_at_their_default(tmp_path):
    """A run written before a setting existed resumes when the setting is at its default (the
    earlier behaviour); set to anything else it is a change like any other."""
    from pgen_engine.config import config_defaults, config_to_dict, load_config
    from pgen_engine.training.resume import check_resume_config, config_changes

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo_rl.yaml")
    now = config_to_dict(cfg)
    defaults = config_defaults(cfg)
    assert defaults["rl.prompt_windows"] == "sft" and defaults["model.init.code_init"] == "random"
    saved = json.loads(json.dumps(now))
    del saved["rl"]["prompt_windows"]  # a checkpoint from before rl.prompt_windows
    assert config_changes(saved, now, defaults) == []
    check_resume_config(_saved(tmp_path, saved), now, defaults)
    assert config_changes(saved, now) == ["rl.prompt_windows: (unset) -> 'sft'"]  # without defaults: strict
    other = json.loads(json.dumps(now))
    other["rl"]["prompt_windows"] = "unseen"
    assert config_changes(saved, other, defaults) == ["rl.prompt_windows: (unset) -> 'unseen'"]
    # a setting whose resolved value is not its declared default stays a change
    del saved["rl"]["policy_distribution"]
    assert config_changes(saved, now, defaults) == ["rl.policy_distribution: (unset) -> 'guided'"]


def test_corrupt_checkpoint_files_are_resume_errors_naming_them(dist_info, tmp_path):
    # each used to escape train.py as a traceback (JSONDecodeError; torch's RuntimeError
    # "PytorchStreamReader failed ..." or EOFError "Ran out of input")
    from pgen_engine.training.resume import check_resume_config

    eng = _engine(5)
    _step(eng, torch.randn(4, 7))
    ck = save_resumable(eng, tmp_path / "a", 1, {"micro_batches": 1}, dist_info, keep=1)
    states = sorted(ck.glob("*model_states.pt"))
    assert states
    states[0].write_bytes(states[0].read_bytes()[:200])
    with pytest.raises(ResumeError, match=rf"{ck}: cannot load the DeepSpeed state .*corrupt or truncated"):
        load_resumable(eng, ck, dist_info)
    ck = save_resumable(eng, tmp_path / "b", 1, {"micro_batches": 1}, dist_info, keep=1)
    (ck / f"rng_rank{dist_info.rank}.pt").write_bytes(b"")
    with pytest.raises(ResumeError, match=rf"rng_rank{dist_info.rank}\.pt: unreadable RNG state"):
        load_resumable(eng, ck, dist_info)
    (ck / META).write_text("{bad")
    with pytest.raises(ResumeError, match=rf"{META}: unreadable checkpoint metadata"):
        load_resumable(eng, ck, dist_info)
    with pytest.raises(ResumeError, match=rf"{META}: unreadable checkpoint metadata"):
        check_resume_config(ck, {})


def test_check_fresh_start_refuses_a_folder_that_holds_a_run(tmp_path):
    from pgen_engine.training.resume import ResumeError, check_fresh_start

    check_fresh_start(tmp_path / "new")  # nothing there: a fresh start is fine
    (tmp_path / "checkpoints" / ".tmp-step00000004").mkdir(parents=True)  # incomplete: not a run yet
    (tmp_path / "checkpoints" / "step00000002").mkdir()  # no pgen_checkpoint.json: incomplete too
    check_fresh_start(tmp_path)
    (tmp_path / "checkpoints" / "step00000002" / "pgen_checkpoint.json").write_text("{}")
    with pytest.raises(ResumeError, match=r"output_dir=.* already holds a training run \(.*step00000002\); "
                                          r"continue it with --resume auto"):
        check_fresh_start(tmp_path)
    only_final = tmp_path / "exported"
    (only_final / "final").mkdir(parents=True)
    (only_final / "final" / "config.json").write_text("{}")
    with pytest.raises(ResumeError, match=r"already holds a training run \(.*exported/final\)"):
        check_fresh_start(only_final)


class _FakeCuda:
    """torch.cuda's RNG calls for one process on ``device`` of ``count`` devices (no GPU needed)."""

    def __init__(self, device: int, count: int):
        self.device, self.states = device, {i: torch.tensor([i], dtype=torch.uint8) for i in range(count)}

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.device)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[self.device].clone())
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.states[i] for i in sorted(self.states)])

        def set_state(state, device="cuda"):
            self.states[self.device] = state.clone()
        monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)


def test_cuda_rng_state_is_this_ranks_device_only_and_old_lists_restore_by_index(monkeypatch):
    fake = _FakeCuda(device=1, count=4)
    fake.install(monkeypatch)
    state = rng_state()
    assert "cuda" not in state and torch.equal(state["cuda_device"], torch.tensor([1], dtype=torch.uint8))
    fake.states[1] = torch.tensor([9], dtype=torch.uint8)
    set_rng_state(state)
    assert torch.equal(fake.states[1], torch.tensor([1], dtype=torch.uint8))
    # a resume that sees fewer devices (one per rank) still restores this rank's own state
    single = _FakeCuda(device=0, count=1)
    single.install(monkeypatch)
    set_rng_state(state)
    assert torch.equal(single.states[0], torch.tensor([1], dtype=torch.uint8))
    # checkpoints written before hold every visible device's state: this rank takes its own index
    old = {k: v for k, v in state.items() if k != "cuda_device"}
    old["cuda"] = [torch.tensor([7], dtype=torch.uint8), torch.tensor([8], dtype=torch.uint8)]
    fake.install(monkeypatch)
    set_rng_state(old)
    assert torch.equal(fake.states[1], torch.tensor([8], dtype=torch.uint8))
    fake.device = 3
    with pytest.raises(ResumeError, match="saved with 2 visible CUDA device.*uses device 3"):
        set_rng_state(old)


# ---------------------------------------------------------------- a full disk while saving


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_full_disk_while_saving_is_one_line_and_leaves_no_half_written_folder(dist_info, tmp_path):
    # torch.save's zip writer reported the full disk as "RuntimeError: [enforce fail at inline_container.cc]
    # ... unexpected pos" (a traceback from train.py) and the half-written .tmp-step folder stayed behind
    from pgen_engine.errors import PgenUserError
    from pgen_engine.training.checkpoints import CheckpointWriteError

    eng = _engine(5)
    _step(eng, torch.randn(4, 7))
    save_resumable(eng, tmp_path, 1, {"micro_batches": 1}, dist_info, keep=2)
    before = _tree(tmp_path)
    _step(eng, torch.randn(4, 7))
    with file_size_limit(2048):
        with pytest.raises(CheckpointWriteError) as info:
            save_resumable(eng, tmp_path, 2, {"micro_batches": 2}, dist_info, keep=2)
    assert isinstance(info.value, PgenUserError) and str(tmp_path / "step00000002") in str(info.value)
    assert _tree(tmp_path) == before  # no .tmp-step00000002, step00000001 and latest untouched
    assert latest_checkpoint(tmp_path).name == "step00000001"
    ck = save_resumable(eng, tmp_path, 2, {"micro_batches": 2}, dist_info, keep=2)  # space again: it saves
    assert latest_checkpoint(tmp_path) == ck


def test_a_latest_pointer_that_cannot_be_written_is_not_left_stale(dist_info, tmp_path, monkeypatch):
    import pgen_engine.training.checkpoints as ckpts
    from pgen_engine.training.checkpoints import CheckpointWriteError

    eng = _engine(6)
    save_resumable(eng, tmp_path, 1, {"micro_batches": 1}, dist_info, keep=2)

    def no_space(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ckpts, "atomic_write_text", no_space)
    with pytest.raises(CheckpointWriteError, match="latest"):
        save_resumable(eng, tmp_path, 2, {"micro_batches": 2}, dist_info, keep=2)
    # 'latest' still naming step 1 made --resume auto go back to it
    assert latest_checkpoint(tmp_path).name == "step00000002"


def test_full_disk_while_exporting_keeps_the_earlier_export(dist_info, tmp_path):
    import pgen_engine as pg
    from pgen_engine.models.tiny import make_tiny_checkpoint
    from pgen_engine.training.checkpoints import CheckpointWriteError

    model = pg.load_model(make_tiny_checkpoint(tmp_path / "src", seed=5, codebook_size=29))
    out = tmp_path / "run" / "final"
    export_hf(model, out, dist_info)
    before = _tree(tmp_path / "run")
    with file_size_limit(4096):
        with pytest.raises(CheckpointWriteError, match=r"final.*File too large.*earlier final/ is kept"):
            export_hf(model, out, dist_info)
    assert _tree(tmp_path / "run") == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["final"]


@pytest.mark.parametrize("pointer", [b"\xff\xfe\x00garbage\n", b"", b"\n", b"step00000009\n"])
def test_a_garbled_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path, pointer):
    # non-UTF-8 bytes in 'latest' (a torn write by another tool, a disk error) were a UnicodeDecodeError
    # traceback from --resume auto
    for step in (1, 2):
        (tmp_path / f"step{step:08d}").mkdir()
        (tmp_path / f"step{step:08d}" / META).write_text("{}")
    (tmp_path / LATEST).write_bytes(pointer)
    assert latest_checkpoint(tmp_path) == tmp_path / "step00000002"


def test_a_pruned_checkpoint_whose_deletion_stops_part_way_is_not_complete(dist_info, tmp_path, monkeypatch):
    # rmtree(ignore_errors=True) that stopped after some files left a folder with its pgen_checkpoint.json
    # and without (some of) its ZeRO partitions: still 'complete', so --resume could pick a broken checkpoint
    import shutil

    import pgen_engine.training.checkpoints as ckpts

    eng = _engine(7)
    save_resumable(eng, tmp_path, 1, {"micro_batches": 1}, dist_info, keep=1)

    def partial_rmtree(path, ignore_errors=False):  # deletes the partition files, then fails (errors ignored)
        for f in Path(path).glob("*zero_pp_rank*"):
            f.unlink()

    monkeypatch.setattr(ckpts.shutil, "rmtree", partial_rmtree)
    save_resumable(eng, tmp_path, 2, {"micro_batches": 2}, dist_info, keep=1)
    monkeypatch.setattr(ckpts.shutil, "rmtree", shutil.rmtree)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step00000002"]


def test_a_checkpoints_folder_that_refuses_new_folders_is_one_line(dist_info, tmp_path, monkeypatch):
    # DeepSpeed logs a failed makedirs and goes on: a read-only checkpoints folder ended train.py with
    # torch's "RuntimeError: Parent directory .../.tmp-step00000002 does not exist" traceback
    from pgen_engine.training.checkpoints import CheckpointWriteError

    eng = _engine(8)
    save_resumable(eng, tmp_path, 1, {"micro_batches": 1}, dist_info, keep=2)
    before = _tree(tmp_path)
    real = os.mkdir

    def read_only(path, *a, **k):
        if str(path).startswith(str(tmp_path)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(CheckpointWriteError, match=r"step00000002: could not write it \(.*Permission denied"):
        save_resumable(eng, tmp_path, 2, {"micro_batches": 2}, dist_info, keep=2)
    monkeypatch.undo()
    assert _tree(tmp_path) == before


def test_resume_path_may_name_a_run_folder_its_checkpoints_folder_or_one_checkpoint(dist_info, tmp_path):
    from pgen_engine.training.resume import resolve_resume

    eng = _engine(4)
    _step(eng, torch.randn(4, 7))
    run = tmp_path / "run"
    save_resumable(eng, run / "checkpoints", 1, {"micro_batches": 1}, dist_info, keep=2)
    last = save_resumable(eng, run / "checkpoints", 2, {"micro_batches": 2}, dist_info, keep=2)
    for given in (run, run / "checkpoints", last):
        assert resolve_resume(str(given), tmp_path / "elsewhere") == last
    assert resolve_resume("auto", run) == last
    assert resolve_resume("auto", tmp_path / "empty") is None
    with pytest.raises(ResumeError, match="expected a run's output_dir, its checkpoints/ folder"):
        resolve_resume(str(tmp_path), tmp_path)


def test_resume_allows_memory_switches_and_one_path_spelt_two_ways(tmp_path, monkeypatch):
    from pgen_engine.training.resume import config_changes

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    saved = {"data": {"dataset_dir": "data", "num_workers": 0, "history_k": 4},
             "deepspeed": {"activation_checkpointing": False, "reduce_bucket_size": 5e8, "offload_optimizer": False}}
    for spelling in (str(tmp_path / "data"), "data/", "./data", str(tmp_path / "link")):
        now = {"data": {"dataset_dir": spelling, "num_workers": 4, "history_k": 4},
               "deepspeed": {"activation_checkpointing": True, "reduce_bucket_size": 2e8, "offload_optimizer": False}}
        assert config_changes(saved, now) == []
    other = {"data": {"dataset_dir": "elsewhere", "num_workers": 0, "history_k": 4},
             "deepspeed": {"activation_checkpointing": False, "reduce_bucket_size": 5e8, "offload_optimizer": True}}
    assert config_changes(saved, other) == ["data.dataset_dir: 'data' -> 'elsewhere'",
                                            "deepspeed.offload_optimizer: False -> True"]
