"""Resume edge cases found by an audit: missing checkpoint files, config and data changes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pgen_engine.training.checkpoints import ResumeError, load_resumable, save_resumable
from pgen_engine.training.distributed import DistInfo, init_distributed
from tests.training.test_checkpoints import _engine, _step

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dist_info() -> DistInfo:
    return init_distributed()


@pytest.mark.parametrize("kind", ["model_states", "optim_states"])
def test_a_checkpoint_missing_a_deepspeed_file_is_one_resume_error_naming_it(dist_info, tmp_path, kind):
    # a missing *model_states.pt used to end in DeepSpeed's bare AssertionError traceback
    # (state_dict_factory: `assert len(self.ckpt_list) > 0`)
    eng = _engine(3)
    _step(eng, torch.randn(4, 7))
    ck = save_resumable(eng, tmp_path, 1, {"micro_batches": 1}, dist_info, keep=1)
    (victim,) = ck.glob(f"*{kind}.pt")
    victim.unlink()
    with pytest.raises(ResumeError, match=rf"{ck}: cannot load the DeepSpeed state \({victim.name}: missing\); "
                                          r"the checkpoint is corrupt or truncated"):
        load_resumable(eng, ck, dist_info)


def test_resume_auto_in_a_finished_run_without_checkpoints_is_refused(tmp_path):
    # `--resume auto` where final/ exists but no complete checkpoint (deleted to save space, or all
    # half-written) used to train from scratch silently and replace the finished run's final/
    from pgen_engine.config import load_config
    from pgen_engine.training.stages import run_stage

    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "final" / "config.json").write_text("{}")
    (out / "checkpoints" / ".tmp-step00000004").mkdir(parents=True)
    cfg = load_config(REPO / "configs" / "demo_sft.yaml", [f"output_dir={out}", f"data.dataset_dir={tmp_path / 'd'}"])
    with pytest.raises(ResumeError, match=r"output_dir=.*run holds a finished run \(.*run/final\) but no complete "
                                          r"checkpoint .* to resume from; --resume auto would train it again"):
        run_stage(cfg, resume="auto")
    assert not (tmp_path / "d").exists() and (out / "final" / "config.json").read_text() == "{}"
    run_stage_ok = tmp_path / "empty"  # an empty folder still starts fresh under --resume auto (pgen demo)
    from pgen_engine.training.resume import check_fresh_start
    check_fresh_start(run_stage_ok, resume_auto=True)


# ---------------------------------------------------------------- the SFT data position on resume
def _sft_setup(tmp_path, client: dict, micro: int, saved_train: dict | None = None, n: int = 20):
    """SFTStage.setup on a fake trainer: ``n`` examples, 1 rank, this run's micro-batch ``micro``."""
    import json
    from types import SimpleNamespace

    from pgen_engine.config import load_config
    from pgen_engine.training.checkpoints import META
    from pgen_engine.training.sft import SFTStage

    cfg = load_config(REPO / "configs" / "demo_sft.yaml", [f"output_dir={tmp_path}", f"train.micro_batch_size={micro}"])
    ck = tmp_path / "checkpoints" / "step00000002"
    ck.mkdir(parents=True, exist_ok=True)
    (ck / META).write_text(json.dumps({"step": 2, "world_size": 1, "zero_stage": 3,
                                       "config": {"train": saved_train or {}}}))
    trainer = SimpleNamespace(dist=DistInfo(0, 1, 0, torch.device("cpu")), last_saved=ck,
                              data=SimpleNamespace(dataset=list(range(n)), special=None),
                              te=SimpleNamespace(micro_batch_size=micro, model=torch.nn.Linear(1, 1)))
    stage = SFTStage(cfg)
    stage.setup(trainer, client)
    return stage, stage.batches.loader.batch_sampler


@pytest.mark.parametrize("client,saved_train", [
    ({"micro_batches": 3, "micro_batch_size": 4}, None),
    ({"micro_batches": 3}, {"micro_batch_size": 4}),  # a checkpoint from before the client state held it
    ({"micro_batches": 3}, {"micro_batch_size": None, "max_micro_batch_size": 4}),  # derived from the memory hint
])
def test_resume_with_another_micro_batch_continues_at_the_same_example(tmp_path, client, saved_train):
    # 3 micro-batches of 4 = 12 examples into epoch 0; resumed with train.micro_batch_size=2 the
    # count used to be read as 3 batches of 2 (example 6): examples 6-11 trained twice
    stage, sampler = _sft_setup(tmp_path, client, micro=2, saved_train=saved_train)
    assert (sampler.epoch, sampler.position) == (0, 6) and stage.consumed == 6
    assert stage.client_state()["micro_batch_size"] == 2
    # next epoch: 20 examples -> 5 batches of 4; 7 consumed = epoch 1 + 2 batches = 8 examples
    stage, sampler = _sft_setup(tmp_path, {"micro_batches": 7, "micro_batch_size": 4}, micro=2)
    assert (sampler.epoch, sampler.position) == (1, 4) and stage.consumed == 10 + 4


def test_resume_with_a_micro_batch_that_cannot_continue_at_the_example_is_refused(tmp_path):
    with pytest.raises(ResumeError, match=r"stopped after 12 examples per rank into epoch 0, not a whole number of "
                                          r"train\.micro_batch_size=8 batches \(it trained with 4\)"):
        _sft_setup(tmp_path, {"micro_batches": 3, "micro_batch_size": 4}, micro=8)
    stage, sampler = _sft_setup(tmp_path, {"micro_batches": 3, "micro_batch_size": 4}, micro=4)  # unchanged
    assert (sampler.epoch, sampler.position) == (0, 3) and stage.consumed == 3


# ---------------------------------------------------------------- resuming on other data
class _Stop(Exception):
    """Raised where data preparation would start: the checks before it are what these tests judge."""


def _stop_at_data(monkeypatch) -> None:
    from pgen_engine.training import trainer as trainer_mod

    def stop(*a, **k):
        raise _Stop

    monkeypatch.setattr(trainer_mod, "prepare_sft_data", stop)


def _tiny(tmp_path, *extra: str):
    from pgen_engine.config import load_config
    return load_config(REPO / "configs" / "demo_sft.yaml", [
        f"output_dir={tmp_path / 'run'}", f"data.dataset_dir={tmp_path / 'synth'}", f"data.work_dir={tmp_path / 'work'}",
        "data.synth.users=12", "data.synth.items=24", "data.patch_size=16", "data.codebook_size=16",
        "data.kmeans_iters=2", "train.micro_batch_size=4", "train.global_batch_size=4", "train.max_steps=2",
        "train.warmup_steps=1", "logging.progress=false", *extra])


def test_resume_on_another_tokenizer_or_dataset_is_refused_before_the_engine_is_built(tmp_path, monkeypatch):
    # the config may be unchanged while the data is not: another data.work_dir (a resumable change)
    # with another tokenizer in it, or a dataset regenerated in place. The weights used to continue
    # silently on codes that mean other images.
    import json

    from pgen_engine.config import config_to_dict
    from pgen_engine.training import trainer as trainer_mod
    from pgen_engine.training.checkpoints import META
    from pgen_engine.training.stages import run_stage

    cfg = _tiny(tmp_path)
    ck = tmp_path / "run" / "checkpoints" / "step00000001"
    ck.mkdir(parents=True)
    (ck / META).write_text(json.dumps({"step": 1, "world_size": 1, "zero_stage": 3, "config": config_to_dict(cfg),
                                       "data_hash": "0" * 64}))

    def no_engine(*a, **k):
        raise AssertionError("the engine was built")

    monkeypatch.setattr(trainer_mod, "build_engine", no_engine)
    with pytest.raises(ResumeError, match=rf"{ck}: trained on other data \(data hash 000000000000, this run's "
                                          r"[0-9a-f]{12}: the dataset in data\.dataset_dir"):
        run_stage(cfg, resume="auto")
    # the same data gives the same hash: the check passes and the run goes on to build the engine
    from pgen_engine.training.sft_data import prepare_sft_data, training_data_hash
    same = training_data_hash(prepare_sft_data(cfg, DistInfo(0, 1, 0, torch.device("cpu"))))
    (ck / META).write_text(json.dumps({"step": 1, "world_size": 1, "zero_stage": 3, "config": config_to_dict(cfg),
                                       "data_hash": same}))
    with pytest.raises(AssertionError, match="the engine was built"):
        run_stage(cfg, resume="auto")


def test_resuming_another_folders_checkpoint_into_a_folder_holding_a_run_is_refused(tmp_path):
    # `--resume A/checkpoints/stepN output_dir=B` with B holding its own run used to go on: B's
    # config.resolved.yaml rewritten at once, A's continuation saved among B's checkpoints ('latest'
    # then naming an older step than B's newest) and B's final/ replaced at the end
    import json

    from pgen_engine.config import config_to_dict
    from pgen_engine.training.checkpoints import META
    from pgen_engine.training.stages import run_stage

    cfg = _tiny(tmp_path)
    other = tmp_path / "a" / "checkpoints" / "step00000001"
    other.mkdir(parents=True)
    (other / META).write_text(json.dumps({"step": 1, "world_size": 1, "zero_stage": 3, "config": config_to_dict(cfg)}))
    held = tmp_path / "run" / "checkpoints" / "step00000002"
    held.mkdir(parents=True)
    (held / META).write_text("{}")
    (tmp_path / "run" / "config.resolved.yaml").write_text("B's config\n")
    with pytest.raises(ResumeError, match=rf"--resume {other}: output_dir=.*run already holds another training run "
                                          r"\(.*step00000002\), which this one would mix"):
        run_stage(cfg, resume=str(other))
    assert (tmp_path / "run" / "config.resolved.yaml").read_text() == "B's config\n"
    assert not (tmp_path / "synth").exists()


def test_resume_with_more_steps_warns_that_the_lr_schedule_changed(tmp_path, monkeypatch, capsys):
    # train.max_steps is a resumable change, but the cosine is stretched with it: resuming a finished
    # 4-step run with max_steps=8 jumped the LR from its floor back up, silently
    import json

    from pgen_engine.config import config_to_dict
    from pgen_engine.training.checkpoints import META
    from pgen_engine.training.stages import run_stage

    saved = config_to_dict(_tiny(tmp_path, "train.max_steps=4"))
    ck = tmp_path / "run" / "checkpoints" / "step00000004"
    ck.mkdir(parents=True)
    (ck / META).write_text(json.dumps({"step": 4, "world_size": 1, "zero_stage": 3, "config": saved}))

    _stop_at_data(monkeypatch)
    with pytest.raises(_Stop):
        run_stage(_tiny(tmp_path, "train.max_steps=8"), resume="auto")
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(err) == 1 and f"{ck}: resumed at step 4 with train.max_steps 4 -> 8" in err[0], err
    assert "lr at step 5: 0.0003 before, 0.00" in err[0]
    saved = config_to_dict(_tiny(tmp_path, "train.max_steps=4", "train.min_lr_ratio=1.0"))
    (ck / META).write_text(json.dumps({"step": 4, "world_size": 1, "zero_stage": 3, "config": saved}))
    with pytest.raises(_Stop):  # the same schedule (a constant LR after warmup): nothing to say
        run_stage(_tiny(tmp_path, "train.max_steps=8", "train.min_lr_ratio=1.0"), resume="auto")
    assert "warning:" not in capsys.readouterr().err


def test_resuming_a_checkpoint_of_the_other_stage_names_the_stages(tmp_path):
    # an SFT checkpoint given to an RL config (or back) used to be refused with the first 8 of ~37
    # differing keys (model.*, rl.* '(unset)' ...), the stage itself cut off behind '... (29 more)'
    import json

    from pgen_engine.config import config_to_dict, load_config
    from pgen_engine.training.checkpoints import META
    from pgen_engine.training.resume import check_resume_config

    sft = config_to_dict(load_config(REPO / "configs" / "demo_sft.yaml"))
    rl = config_to_dict(load_config(REPO / "configs" / "demo_rl.yaml", [f"model.checkpoint={tmp_path}"]))
    ck = tmp_path / "step00000004"
    ck.mkdir()
    for saved, now in ((sft, rl), (rl, sft)):
        (ck / META).write_text(json.dumps({"step": 4, "world_size": 1, "zero_stage": 3, "config": saved}))
        with pytest.raises(ResumeError, match=rf"{ck}: a checkpoint of stage '{saved['stage']}', this config is "
                                              rf"stage '{now['stage']}'; a stage resumes only its own checkpoints"):
            check_resume_config(ck, {**now, "train": {**now["train"], "max_steps": 100}})


def test_a_checkpoint_of_another_world_size_is_refused_before_data_and_model_loading(tmp_path, monkeypatch):
    # the world-size check lived in load_resumable only: a 2-rank checkpoint resumed on 1 rank was
    # refused after data preparation and the engine build (for a 7B model, ~15 GB loaded per rank)
    import json

    from pgen_engine.config import config_to_dict
    from pgen_engine.training import trainer as trainer_mod
    from pgen_engine.training.checkpoints import META
    from pgen_engine.training.stages import run_stage

    cfg = _tiny(tmp_path)
    ck = tmp_path / "run" / "checkpoints" / "step00000001"
    ck.mkdir(parents=True)
    (ck / META).write_text(json.dumps({"step": 1, "world_size": 2, "zero_stage": 3, "config": config_to_dict(cfg)}))

    def no_data(*a, **k):
        raise AssertionError("data was prepared")

    monkeypatch.setattr(trainer_mod, "prepare_sft_data", no_data)
    with pytest.raises(ResumeError, match=rf"{ck}: saved with world_size=2, this run has 1; resume with the same "
                                          r"number of ranks"):
        run_stage(cfg, resume="auto")


def test_a_hand_edited_world_size_or_zero_stage_is_a_resume_error_not_a_traceback(dist_info, tmp_path):
    import json

    from pgen_engine.training.checkpoints import META

    eng = _engine(4)
    _step(eng, torch.randn(4, 7))
    ck = save_resumable(eng, tmp_path, 1, {"micro_batches": 1}, dist_info, keep=1)
    meta = json.loads((ck / META).read_text())
    (ck / META).write_text(json.dumps({**meta, "world_size": "one"}))
    with pytest.raises(ResumeError, match=r"saved with world_size=one, this run has 1"):
        load_resumable(eng, ck, dist_info)
    (ck / META).write_text(json.dumps({**meta, "zero_stage": "three"}))
    with pytest.raises(ResumeError, match=r"saved with ZeRO stage three, this run uses 3"):
        load_resumable(eng, ck, dist_info)


def test_the_data_hash_of_a_run_from_model_checkpoint_covers_the_models_weights(tmp_path):
    # a resume whose model.checkpoint was replaced at the same path (an SFT final/ exported again
    # after more steps) took the frozen parameters (not in a ZeRO-3 checkpoint) and RL's KL
    # reference from the other model, silently
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from pgen_engine.training.sft_data import training_data_hash

    model = tmp_path / "final"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "janus"}')
    w = torch.zeros(3 << 18)  # 3 MiB: the middle sample is read too
    save_file({"w": w}, model / "model.safetensors")
    tok = SimpleNamespace(fingerprint=lambda: "tok")
    data = SimpleNamespace(tokenizer=tok, model_dir=model, dataset=SimpleNamespace(examples=[], cache=set()))
    before = training_data_hash(data, with_model=True)
    assert training_data_hash(data, with_model=True) == before  # the same files: the same hash
    w[len(w) // 2] = 1.0
    save_file({"w": w}, model / "model.safetensors")
    assert training_data_hash(data, with_model=True) != before
    assert training_data_hash(data) == training_data_hash(data, with_model=False)  # an init model: not hashed


def test_frozen_parameters_are_restored_from_a_zero3_checkpoint(dist_info, tmp_path):
    # pins what the model hash is for: DeepSpeed restores frozen parameters itself; what a resume
    # still reads from model.checkpoint is RL's reference and the vision-feature cache
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    def frozen_first(seed):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5))
        net[0].weight.requires_grad_(False)
        cfg = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
               "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}, "steps_per_print": 10 ** 9}
        eng, *_ = deepspeed.initialize(model=net, model_parameters=[p for p in net.parameters() if p.requires_grad],
                                       config=cfg)
        return eng

    a = frozen_first(0)
    _step(a, torch.randn(4, 7))
    ck = save_resumable(a, tmp_path, 1, {}, dist_info, keep=1)
    b = frozen_first(1)
    load_resumable(b, ck, dist_info)
    with GatheredParameters([a.module[0].weight, b.module[0].weight]):
        assert torch.equal(a.module[0].weight, b.module[0].weight)


def test_a_finished_checkpoint_resumed_into_another_folder_leaves_a_checkpoint_there(tmp_path):
    # `--resume A/checkpoints/step00000002 output_dir=B train.max_steps=2` exported B/final/ without a
    # checkpoint in B: B then held a finished run that neither --resume auto nor another --resume PATH
    # could continue
    from pgen_engine.training.checkpoints import latest_checkpoint
    from pgen_engine.training.stages import run_stage

    run_stage(_tiny(tmp_path))
    a = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert a is not None and a.name == "step00000002"
    out = tmp_path / "b"
    summary = run_stage(_tiny(tmp_path, f"output_dir={out}"), resume=str(a))
    assert summary["resumed_from"] == 2 and (out / "final" / "config.json").is_file()
    mine = latest_checkpoint(out / "checkpoints")
    assert mine is not None and mine.name == "step00000002" and summary["checkpoint"] == str(mine)
    more = run_stage(_tiny(tmp_path, f"output_dir={out}", "train.max_steps=3"), resume="auto")
    assert more["resumed_from"] == 2 and more["steps"] == 3


def test_resume_in_another_precision_warns(tmp_path, monkeypatch, capsys):
    # deepspeed.precision=auto is bf16 on a GPU and fp32 on the CPU: a GPU checkpoint resumed on a
    # CPU machine (the config unchanged) continued in fp32 with no word (DeepSpeed converts the states)
    import json

    from pgen_engine.config import config_to_dict
    from pgen_engine.training.checkpoints import META
    from pgen_engine.training.stages import run_stage

    cfg = _tiny(tmp_path)
    ck = tmp_path / "run" / "checkpoints" / "step00000001"
    ck.mkdir(parents=True)
    meta = {"step": 1, "world_size": 1, "zero_stage": 3, "config": config_to_dict(cfg), "precision": "bf16"}
    (ck / META).write_text(json.dumps(meta))

    _stop_at_data(monkeypatch)
    with pytest.raises(_Stop):
        run_stage(cfg, resume="auto")
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(err) == 1 and f"{ck}: trained in bf16, this run trains in fp32 (deepspeed.precision=auto on cpu)" \
        in err[0], err
    (ck / META).write_text(json.dumps({**meta, "precision": "fp32"}))
    with pytest.raises(_Stop):
        run_stage(cfg, resume="auto")
    assert "warning:" not in capsys.readouterr().err


def test_checkpoints_record_the_precision_they_were_trained_in(tmp_path):
    import json

    from pgen_engine.training.checkpoints import META, latest_checkpoint
    from pgen_engine.training.stages import run_stage

    run_stage(_tiny(tmp_path, "train.max_steps=1"))
    meta = json.loads((latest_checkpoint(tmp_path / "run" / "checkpoints") / META).read_text())
    assert meta["precision"] == "fp32" and len(meta["data_hash"]) == 64


def test_bf16_on_a_cpu_is_a_config_error_before_data_preparation(tmp_path, monkeypatch):
    # used to end in build_engine's ValueError traceback, after the data had been prepared
    from pgen_engine.config import ConfigError
    from pgen_engine.training import trainer as trainer_mod
    from pgen_engine.training.stages import run_stage

    def no_data(*a, **k):
        raise AssertionError("data was prepared")

    monkeypatch.setattr(trainer_mod, "prepare_sft_data", no_data)
    with pytest.raises(ConfigError, match=r"deepspeed\.precision=bf16: needs a CUDA device, this run is on cpu"):
        run_stage(_tiny(tmp_path, "deepspeed.precision=bf16"))


def test_resume_auto_that_finds_no_checkpoint_after_logged_steps_warns(tmp_path, monkeypatch, capsys):
    # a run stopped before its first complete checkpoint (or whose checkpoints lost their metadata):
    # --resume auto started from step 0 and dropped the logged rows with nothing said
    from pgen_engine.training.stages import run_stage

    _stop_at_data(monkeypatch)
    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp-step00000004").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 6.2}\n')
    with pytest.raises(_Stop):
        run_stage(_tiny(tmp_path), resume="auto")
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(err) == 1 and "--resume auto: no complete checkpoint under" in err[0] and "starting from step 0" in err[0]
    (out / "metrics.jsonl").write_text("")
    with pytest.raises(_Stop):  # nothing logged: a plain fresh start
        run_stage(_tiny(tmp_path), resume="auto")
    assert "warning:" not in capsys.readouterr().err


def test_resume_with_another_micro_batch_reproduces_the_uninterrupted_losses(tmp_path):
    # end to end: before the fix the resumed losses differed from the uninterrupted run's by up to
    # 0.18 (the data position was read in the new micro-batch size); now only the accumulation order differs
    import json
    import shutil

    from pgen_engine.training.stages import run_stage

    steps = ["train.max_steps=6", "train.save_every=3", "train.keep_checkpoints=5", "train.global_batch_size=8"]
    run_stage(_tiny(tmp_path, *steps))
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step00000003", b / "checkpoints" / "step00000003")
    run_stage(_tiny(tmp_path, *steps, f"output_dir={b}", "train.micro_batch_size=2"), resume="auto")

    def losses(out):
        return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}

    ref, got = losses(tmp_path / "run"), losses(b)
    assert sorted(got) == [4, 5, 6]
    for s in got:
        assert abs(ref[s] - got[s]) <= 1e-5, f"step {s}: uninterrupted {ref[s]} vs resumed {got[s]}"


def test_a_second_run_in_an_output_dir_in_use_is_refused(tmp_path, monkeypatch):
    # a job relaunched (--resume auto) while the old one still ran trained beside it: both wrote the
    # same .tmp-stepN folders, each one's clear() deleting the other's half-written checkpoint
    import fcntl

    from pgen_engine.training import trainer as trainer_mod
    from pgen_engine.training.stages import run_stage

    _stop_at_data(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    with open(out / trainer_mod.RUN_LOCK, "a+b") as held:  # the other run
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ResumeError, match=r"output_dir=.*run: in use by another training run \(it holds "
                                              r".*\.run\.lock\)"):
            run_stage(_tiny(tmp_path), resume="auto")
        assert not (out / "config.resolved.yaml").exists()
    for _ in range(2):  # the lock is released when a run ends, failed or not
        with pytest.raises(_Stop):
            run_stage(_tiny(tmp_path), resume="auto")


def _missing_model_file_rank(rank: int, out: str) -> None:
    import json

    import torch.distributed as tdist

    from pgen_engine.training import checkpoints as C
    from tests.training.test_checkpoints_rank_failures import _Engine

    ckpt = Path(out) / "checkpoints" / "step00000001"
    if rank == 0:  # rank 1's model states file is gone (another node's disk lost it)
        ckpt.mkdir(parents=True)
        (ckpt / C.META).write_text(json.dumps({"step": 1, "world_size": 2, "zero_stage": 3}))
        for r in (0, 1):
            torch.save(C.rng_state(), ckpt / f"rng_rank{r}.pt")
            torch.save({"r": r}, ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        torch.save({"r": 0}, ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    tdist.barrier()
    C.load_resumable(_Engine(), ckpt, DistInfo(rank, 2, rank, torch.device("cpu")))


def test_a_model_states_file_missing_on_rank1_stops_every_rank_with_one_line(tmp_path):
    from tests.training.gloo_ranks import run_two_ranks

    r0, r1 = run_two_ranks(_missing_model_file_rank, tmp_path)
    assert r1[0] == "ResumeError" and "(zero_pp_rank_1_mp_rank_00_model_states.pt: missing)" in r1[1], r1
    assert r0[0] == "ResumeError" and "(another rank's partition is corrupt)" in r0[1], r0


@pytest.mark.parametrize("leftover", ["folder", "file"])
def test_a_final_that_is_not_an_export_is_refused_before_data_preparation(tmp_path, monkeypatch, leftover):
    # used to train every step and then stop at the export, which never replaces a folder that is
    # not a checkpoint ("choose an empty or new folder": the user cannot choose final/'s name)
    from pgen_engine.config import ConfigError
    from pgen_engine.training import trainer as trainer_mod
    from pgen_engine.training.stages import run_stage

    def no_data(*a, **k):
        raise AssertionError("data was prepared")

    cfg = _tiny(tmp_path)
    final = Path(cfg.output_dir) / "final"
    final.parent.mkdir(parents=True, exist_ok=True)
    if leftover == "folder":
        final.mkdir()
        (final / "model.safetensors").write_bytes(b"half")
    else:
        final.write_text("x")
    monkeypatch.setattr(trainer_mod, "prepare_sft_data", no_data)
    with pytest.raises(ConfigError, match=r"final: exists and is not a (checkpoint|folder).*move or delete it"):
        run_stage(cfg)


@pytest.mark.parametrize("overrides,says", [
    (["model.init.hidden_size=36"], "RoPE requires an even rotary dimension"),  # head size 9
    (["model.init.vision_hidden_size=30", "model.init.vision_heads=4"],
     "vision_hidden_size=30 must be a multiple of vision_heads=4")])
def test_a_model_init_transformers_cannot_build_is_refused_before_data_preparation(tmp_path, monkeypatch,
                                                                                   overrides, says):
    from pgen_engine.config import ConfigError
    from pgen_engine.training import trainer as trainer_mod
    from pgen_engine.training.stages import run_stage

    def no_data(*a, **k):
        raise AssertionError("data was prepared")

    monkeypatch.setattr(trainer_mod, "prepare_sft_data", no_data)
    with pytest.raises(ConfigError, match=f"^model.init: .*{says}"):
        run_stage(_tiny(tmp_path, *overrides))


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path, capsys):
    # resuming step 2 while step 4 existed in the same folder left step 4 in the rotation: it
    # counted against train.keep_checkpoints (the new run's step 2 was deleted first, leaving the
    # abandoned trajectory's step 4 as the 'newest' checkpoint beside the new step 3)
    from pgen_engine.training.checkpoints import META, complete_checkpoints, latest_checkpoint
    from pgen_engine.training.stages import run_stage

    steps = ["train.save_every=2", "train.keep_checkpoints=2"]
    run_stage(_tiny(tmp_path, "train.max_steps=4", *steps))
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step00000002", "step00000004"]
    capsys.readouterr()
    summary = run_stage(_tiny(tmp_path, "train.max_steps=3", *steps), resume=str(root / "step00000002"))
    assert summary["resumed_from"] == 2
    assert [p.name for p in complete_checkpoints(root)] == ["step00000002", "step00000003"]
    assert latest_checkpoint(root).name == "step00000003"
    assert (root / "abandoned" / "step00000004" / META).is_file()
    err = capsys.readouterr().err
    assert "step00000004" in err and str(root / "abandoned" / "step00000004") in err


def test_set_aside_newer_keeps_both_when_a_step_was_abandoned_twice(tmp_path):
    from pgen_engine.training.checkpoints import LATEST, META, latest_checkpoint
    from pgen_engine.training.resume import set_aside_newer

    def make(name, mark):
        (tmp_path / name).mkdir()
        (tmp_path / name / META).write_text("{}")
        (tmp_path / name / "mark").write_text(mark)

    make("step00000001", "kept")
    make("step00000003", "first")
    (tmp_path / LATEST).write_text("step00000003\n")
    assert set_aside_newer(tmp_path / "step00000001") == [tmp_path / "abandoned" / "step00000003"]
    make("step00000002", "older, kept")
    make("step00000003", "second")
    assert set_aside_newer(tmp_path / "step00000002") == [tmp_path / "abandoned" / "step00000003-2"]
    assert (tmp_path / "abandoned" / "step00000003" / "mark").read_text() == "first"
    assert (tmp_path / "abandoned" / "step00000003-2" / "mark").read_text() == "second"
    assert latest_checkpoint(tmp_path).name == "step00000002" and (tmp_path / "step00000001").is_dir()
    assert set_aside_newer(tmp_path / "step00000002") == []  # nothing newer: nothing moves
