"""Typed run configs: YAML + overrides, validation errors, DeepSpeed JSON, LR schedule."""
from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import pytest

from pgen_engine.config import (ConfigError, RunConfig, STAGES, build_deepspeed_config, config_from_dict,
                                dump_config, load_config, lr_lambda, register_stage_section)

REPO = Path(__file__).resolve().parents[1]
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
        ds = build_deepspeed_config(cfg, 8, "cuda")
        assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
        assert "peak per GPU: " in (REPO / "configs" / name).read_text()  # quoted from pgen plan


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


def test_grad_accum_arithmetic_random():
    rng = random.Random()
    for _ in range(50):
        micro, world, accum = rng.randint(1, 7), rng.randint(1, 9), rng.randint(1, 5)
        cfg = config_from_dict({"train": {"micro_batch_size": micro, "global_batch_size": micro * world * accum}})
        ds = build_deepspeed_config(cfg, world, "cpu")
        assert ds["gradient_accumulation_steps"] == accum
        assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * accum * world
        # one more rank than the global batch can be split over
        bad = config_from_dict({"train": {"micro_batch_size": micro, "global_batch_size": micro * world}})
        with pytest.raises(ConfigError, match=f"world_size={world + 1}"):
            build_deepspeed_config(bad, world + 1, "cpu")


def test_deepspeed_json_switches():
    cfg = config_from_dict({}, overrides=["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true",
                                          "deepspeed.offload_params=true", "train.grad_clip=0.5"])
    ds = build_deepspeed_config(cfg, 1, "cpu")
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] is False and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW" and "torch_adam" not in ds["optimizer"]["params"]
    gpu = build_deepspeed_config(config_from_dict({}, overrides=["deepspeed.zero_stage=0"]), 1, "cuda")
    assert gpu["bf16"]["enabled"] is True and gpu["zero_optimization"] == {"stage": 0}
    assert gpu["optimizer"]["params"]["torch_adam"] is True
    fp32 = build_deepspeed_config(config_from_dict({}, overrides=["deepspeed.precision=fp32"]), 1, "cuda")
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


def test_registered_stage_section():
    @dataclasses.dataclass
    class ToySection:
        group_size: int = 4

    register_stage_section("toy", ToySection)
    try:
        cfg = config_from_dict({"stage": "toy", "toy": {"group_size": 8}})
        assert cfg.stage_config == ToySection(8)
        assert "toy:" in dump_config(cfg)
        with pytest.raises(ConfigError, match="toy.group_size"):
            config_from_dict({"stage": "toy", "toy": {"group_size": "big"}})
        with pytest.raises(ConfigError, match="section 'toy' given but stage is 'sft'"):
            config_from_dict({"stage": "sft", "toy": {}})
    finally:
        STAGES.pop("toy")
    assert isinstance(config_from_dict({}), RunConfig)
