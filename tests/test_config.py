"""Typed run configs: YAML + overrides, validation errors, DeepSpeed JSON, LR schedule."""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from pgen_engine.config import ConfigError, RLConfig, RunConfig, SFTConfig, config_from_dict, dump_config, load_config
from pgen_engine.training.engine import build_deepspeed_config, lr_lambda

REPO = Path(__file__).resolve().parents[1]


def _ds(cfg: RunConfig, world: int, device: str) -> dict:
    return build_deepspeed_config(cfg.train, cfg.deepspeed, world, device)
SHIPPED = sorted((REPO / "configs").glob("*_sft.yaml"))


def test_shipped_configs_load_and_round_trip(tmp_path):
    assert {p.name for p in SHIPPED} >= {"demo_sft.yaml", "movielens_sft.yaml", "janus_pro_1b_sft.yaml",
                                        "janus_pro_7b_sft.yaml"}
    for p in SHIPPED:
        cfg = load_config(p)
        assert cfg.stage == "sft"
        again = tmp_path / p.name
        again.write_text(dump_config(cfg))
        assert load_config(again) == cfg
    for name in ("janus_pro_1b_sft.yaml", "janus_pro_7b_sft.yaml"):
        cfg = load_config(REPO / "configs" / name)
        ds = _ds(cfg, 8, "cuda")
        assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
        assert "peak per GPU:" in (REPO / "configs" / name).read_text()  # the header quotes pgen plan


def test_overrides_are_typed_and_applied():
    cfg = config_from_dict({}, overrides=["train.max_steps=7", "train.warmup_steps=2", "output_dir=/tmp/x", "train.lr=2e-4",
                                          "train.betas=[0.8, 0.9]", "deepspeed.offload_optimizer=true",
                                          "data.synth={users: 9, items: 11}", "model.checkpoint=null"])
    assert cfg.train.max_steps == 7 and cfg.output_dir == "/tmp/x"
    assert cfg.train.lr == pytest.approx(2e-4) and cfg.train.betas == (0.8, 0.9)
    assert cfg.deepspeed.offload_optimizer is True
    assert cfg.data.synth.users == 9 and cfg.data.synth.items == 11
    assert cfg.model.checkpoint is None


@pytest.mark.parametrize("tree, overrides, needle", [
    ({"train": {"max_stepz": 3}}, [], "unknown key 'train.max_stepz'"),
    ({"trian": {}}, [], "unknown key 'trian'"),
    ({}, ["train.max_steps=3.5"], "train.max_steps=3.5: expected int"),
    ({}, ["train.max_steps=true"], "train.max_steps=True: expected int"),
    ({}, ["deepspeed.offload_params=yes please"], "deepspeed.offload_params='yes please': expected bool"),
    ({}, ["train.betas=[0.9]"], "train.betas"),
    ({}, ["train.trainable=[vision_tower]"], "train.trainable"),
    ({}, ["train.global_batch_size=10", "train.micro_batch_size=4"], "not a multiple"),
    ({}, ["deepspeed.zero_stage=2", "deepspeed.offload_params=true"], "requires deepspeed.zero_stage=3"),
    ({}, ["data.tokenizer=magic"], "data.tokenizer='magic': expected one of"),
    ({}, ["train.cond_dropout_p=1.5"], "cond_dropout_p"),
    ({}, ["stage=pretrain"], "stage='pretrain'"),
    ({}, ["train.max_steps"], "expected key=value"),
    ({"train": {"max_steps": 3}}, ["train.max_steps.x=1"], "not a section"),
    ({}, ["train.max_steps.x=1"], "train.max_steps={'x': 1}: expected int"),
])
def test_bad_configs_raise_one_line(tree, overrides, needle):
    with pytest.raises(ConfigError) as e:
        config_from_dict(tree, "cfg.yaml", overrides)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: sft\ntrain:\n  max_steps: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a folder, expected a YAML run config file"):  # was "not found"
        load_config(tmp_path)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"stage: sft\noutput_dir: caf\xe9\n")  # used to raise a bare UnicodeDecodeError
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(invalid continuation byte at byte 26\)"):
        load_config(latin1)


def test_grad_accum_arithmetic_random():
    rng = random.Random()
    for _ in range(50):
        micro, world, accum = rng.randint(1, 7), rng.randint(1, 9), rng.randint(1, 5)
        cfg = config_from_dict({"train": {"micro_batch_size": micro, "global_batch_size": micro * world * accum}})
        ds = _ds(cfg, world, "cpu")
        assert ds["gradient_accumulation_steps"] == accum
        assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * accum * world
        # one more rank than the global batch can be split over
        bad = config_from_dict({"train": {"micro_batch_size": micro, "global_batch_size": micro * world}})
        with pytest.raises(ConfigError, match=f"world_size={world + 1}"):
            _ds(bad, world + 1, "cpu")


def test_deepspeed_json_switches():
    cfg = config_from_dict({}, overrides=["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true",
                                          "deepspeed.offload_params=true", "train.grad_clip=0.5"])
    ds = _ds(cfg, 1, "cpu")
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] is False and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW" and "torch_adam" not in ds["optimizer"]["params"]
    gpu = _ds(config_from_dict({}, overrides=["deepspeed.zero_stage=0"]), 1, "cuda")
    assert gpu["bf16"]["enabled"] is True and gpu["zero_optimization"] == {"stage": 0}
    assert gpu["optimizer"]["params"]["torch_adam"] is True
    fp32 = _ds(config_from_dict({}, overrides=["deepspeed.precision=fp32"]), 1, "cuda")
    assert fp32["bf16"]["enabled"] is False


def test_lr_schedule_warmup_then_cosine():
    cfg = config_from_dict({}, overrides=["train.max_steps=37", "train.warmup_steps=5", "train.min_lr_ratio=0.2"])
    f = lr_lambda(cfg.train)
    vals = [f(s) for s in range(40)]
    assert vals[0] == pytest.approx(1 / 5) and vals[4] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(vals[:5], vals[1:5]))
    assert all(a >= b for a, b in zip(vals[5:36], vals[6:37]))
    assert vals[36] == pytest.approx(0.2) and vals[39] == pytest.approx(0.2)
    no_warm = lr_lambda(config_from_dict({}, overrides=["train.warmup_steps=0", "train.max_steps=3"]).train)
    assert no_warm(0) == pytest.approx(1.0) and math.isfinite(no_warm(10))


def test_stage_sections_are_typed_fields():
    cfg = config_from_dict({"stage": "rl", "rl": {"group_size": 8}})
    assert cfg.rl == RLConfig(group_size=8) and cfg.sft is None
    assert "rl:" in dump_config(cfg) and "sft:" not in dump_config(cfg)
    assert config_from_dict({"stage": "rl"}).rl == RLConfig()  # omitted section = defaults
    assert config_from_dict({"sft": {}}).sft == SFTConfig()
    with pytest.raises(ConfigError, match="rl.group_size='big': expected int"):
        config_from_dict({"stage": "rl", "rl": {"group_size": "big"}})
    with pytest.raises(ConfigError, match="section 'rl' given but stage is 'sft'"):
        config_from_dict({"stage": "sft", "rl": {}})
    with pytest.raises(ConfigError, match="unknown key 'rl.groupsize'"):
        config_from_dict({"stage": "rl"}, overrides=["rl.groupsize=3"])
    assert isinstance(config_from_dict({}), RunConfig)


def test_importing_the_trainers_changes_no_config_state():
    before = dump_config(config_from_dict({"stage": "rl"}))
    import pgen_engine.training.stages  # noqa: F401

    assert dump_config(config_from_dict({"stage": "rl"})) == before


@pytest.mark.parametrize("glob, world, micro, accum", [
    (32, 1, 32, 1), (32, 2, 16, 1), (32, 4, 8, 1), (128, 8, 16, 1), (96, 1, 32, 3), (48, 2, 24, 1), (7, 1, 7, 1),
])
def test_micro_batch_derived_from_global_world_and_memory_hint(glob, world, micro, accum):
    cfg = config_from_dict({"train": {"micro_batch_size": None, "global_batch_size": glob}})
    assert cfg.train.micro_batch_for(world) == micro and cfg.train.grad_accum_steps(world) == accum
    ds = _ds(cfg, world, "cpu")
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world == glob


def test_micro_batch_memory_hint_and_errors():
    cfg = config_from_dict({"train": {"micro_batch_size": None, "global_batch_size": 24, "max_micro_batch_size": 5}})
    assert cfg.train.micro_batch_for(1) == 4 and cfg.train.grad_accum_steps(1) == 6  # largest divisor of 24 <= 5
    assert cfg.train.micro_batch_for(2) == 4 and cfg.train.grad_accum_steps(2) == 3
    with pytest.raises(ConfigError, match="global_batch_size=24 is not divisible by world_size=5"):
        cfg.train.grad_accum_steps(5)
    with pytest.raises(ConfigError, match="max_micro_batch_size=0"):
        config_from_dict({"train": {"max_micro_batch_size": 0}})
    # an explicit micro-batch is used as given, and checked against the world size
    given = config_from_dict({"train": {"micro_batch_size": 32, "global_batch_size": 32}})
    with pytest.raises(ConfigError, match="global_batch_size=32 is not divisible by train.micro_batch_size=32 x "
                                          "world_size=2"):
        given.train.grad_accum_steps(2)


def test_demo_configs_work_unchanged_on_one_and_two_ranks():
    want = {"demo_sft.yaml": {1: 32, 2: 16}, "demo_rl.yaml": {1: 16, 2: 16}}  # derived micro-batch per world size
    for name, micro in want.items():
        cfg = load_config(REPO / "configs" / name)
        assert cfg.train.micro_batch_size is None  # omitted: derived
        for world in (1, 2):
            ds = _ds(cfg, world, "cpu")
            assert ds["train_batch_size"] == cfg.train.global_batch_size
            assert ds["train_micro_batch_size_per_gpu"] == micro[world]


@pytest.mark.parametrize("key", ["output_dir", "data.dataset_dir", "data.work_dir", "model.checkpoint"])
def test_empty_paths_are_refused(key):
    # `output_dir=` used to be accepted as "" and training wrote into the current directory
    with pytest.raises(ConfigError, match=rf"{key}='': expected a folder path"):
        config_from_dict({}, "cfg.yaml", [f"{key}=''"])


@pytest.mark.parametrize("override,needle", [
    # each used to pass config loading (pgen plan exit 0) and fail only when the RL stage built
    # its reward, after the data and model were prepared
    ("rl.rewards.bogus={weight: 1}", "unknown component 'bogus'"),
    ("rl.rewards={preference: {weight: .nan}}", "weight must be a finite number"),
    ("rl.rewards={preference: {weight: 1, agg: median}}", "agg must be 'mean' or 'max'"),
    ("rl.rewards={preference: {weight: 1, wieght: 1}}", "bad option(s) ['wieght']"),
])
def test_rl_reward_spec_is_checked_at_load(override, needle):
    with pytest.raises(ConfigError, match=r"rl\.rewards: ") as e:
        config_from_dict({"stage": "rl"}, "rl.yaml", [override])
    assert needle in str(e.value)


def test_rl_embedder_type_is_checked_at_load():
    with pytest.raises(ConfigError, match=r"rl\.embedder\.type='clipp': expected one of \['pixel_stats'"):
        config_from_dict({"stage": "rl"}, "rl.yaml", ["rl.embedder={type: clipp, path: /m}"])


@pytest.mark.parametrize("override,needle", [
    # each used to load and fail only after data preparation and the DeepSpeed engine build, as
    # "error: rl.embedder: expected non-negative integer" (numpy), a bare "invalid literal for int()"
    ("rl.embedder={type: cocons_cnn, seed: -1}", "rl.embedder: reward embedder: seed must be an int in [0, 2**63 - 1], got -1"),
    ("rl.embedder={type: cocons_cnn, steps: 0}", "rl.embedder: reward embedder: window, steps >= 1"),
    ("rl.embedder={type: cocons_cnn, steps: abc}", "rl.embedder: reward embedder: steps must be an int, got 'abc'"),
    ("rl.embedder={type: cocons_cnn, stepz: 3}", "rl.embedder: reward embedder: unknown field(s) ['stepz']"),
])
def test_rl_cocons_embedder_fields_are_checked_at_load(override, needle):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"stage": "rl"}, "rl.yaml", [override])
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert config_from_dict({"stage": "rl"}, "rl.yaml", ["rl.embedder={type: cocons_cnn, seed: 3, steps: 40}"])


@pytest.mark.parametrize("override,needle", [
    # each used to load (pgen plan exit 0) and fail only after the synthetic data, the tokenizer
    # fit and the token cache had run: a traceback from numpy / torch / build_splits, or (NaN
    # grad_clip / weight_decay) a run whose weights all turn NaN
    ("train.eps=-1", "train.eps=-1.0: expected a finite number > 0"),
    ("train.eps=.nan", "train.eps=nan: expected a finite number > 0"),
    ("train.grad_clip=.nan", "train.grad_clip=nan: expected a finite number >= 0"),
    ("train.weight_decay=.inf", "train.weight_decay=inf: expected a finite number >= 0"),
    ("data.min_interactions=2", "data.min_interactions=2: expected >= 3"),
    ("data.max_windows_per_user=0", "data.max_windows_per_user=0: expected >= 1 or null"),
    ("data.vq_time_budget_s=.nan", "data.vq_time_budget_s=nan: expected > 0"),
    ("deepspeed.reduce_bucket_size=-5", "deepspeed.reduce_bucket_size=-5: expected >= 0"),
    ("seed=-1", "seed=-1: expected a seed in [0, 2**63 - 1]"),
    ("seed=18446744073709551616", "seed=18446744073709551616: expected a seed"),
    ("data.synth={seed: -2}", "data.synth.seed=-2: expected a seed"),
    # model.init.seed past 64 bits used to fail after data preparation with torch's bare
    # "Overflow when unpacking long long", leaving config.resolved.yaml behind
    ("model.init.seed=18446744073709551616", "model.init.seed=18446744073709551616: expected a seed"),
    ("model.init.seed=-3", "model.init.seed=-3: expected a seed in [0, 2**63 - 1]"),
    # each named alone (was "train: save_every=500 (>= 0), keep_checkpoints=2 (>= 1), log_every=0 (>= 1)")
    ("train.log_every=0", "train.log_every=0: expected >= 1"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0: expected >= 1"),
    ("train.save_every=-1", "train.save_every=-1: expected >= 0"),
    ("train.global_batch_size=0", "train.global_batch_size=0: expected >= 1"),
    ("train.micro_batch_size=0", "train.micro_batch_size=0: expected >= 1"),
    ("train.grad_clip=-1", "train.grad_clip=-1.0: expected a finite number >= 0"),
    ("model.init.vocab_size=100", "model.init.vocab_size=100: expected >= 262"),
])
def test_values_that_fail_late_are_refused_at_load(override, needle):
    with pytest.raises(ConfigError) as e:
        config_from_dict({}, "cfg.yaml", [override])
    msg = str(e.value)
    assert msg.startswith("cfg.yaml: ") and needle in msg and "\n" not in msg


def test_boundary_values_still_load():
    cfg = config_from_dict({}, "cfg.yaml", ["seed=0", "data.min_interactions=3", "data.max_windows_per_user=1",
                                            "train.grad_clip=0", "train.weight_decay=0", "model.init.vocab_size=262",
                                            "deepspeed.stage3_param_persistence_threshold=0"])
    assert (cfg.seed, cfg.data.min_interactions, cfg.model.init.vocab_size) == (0, 3, 262)


def test_duplicate_yaml_keys_are_refused_with_both_lines(tmp_path):
    # plain YAML keeps the last of two equal keys: a second `train:` section silently dropped
    # train.lr of the first one, and a repeated key inside a section kept only its last value
    dup = tmp_path / "dup.yaml"
    dup.write_text("stage: sft\ntrain:\n  lr: 0.5\ntrain:\n  max_steps: 20\n")
    with pytest.raises(ConfigError, match=r"^.*dup\.yaml: line 4 invalid YAML \(duplicate key 'train' \(first on line "
                                          r"2\)\)$"):
        load_config(dup)
    dup.write_text("train:\n  lr: 0.5\n  max_steps: 20\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"line 4 invalid YAML \(duplicate key 'lr' \(first on line 2\)\)"):
        load_config(dup)
    # anchors and merge keys still work: an explicit key after `<<:` overrides the merged one
    ok = tmp_path / "ok.yaml"
    ok.write_text("train:\n  betas: &bb [0.8, 0.9]\n  <<: {max_steps: 20, lr: 0.5}\n  lr: 0.1\n")
    cfg = load_config(ok)
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.betas) == (0.1, 20, (0.8, 0.9))
