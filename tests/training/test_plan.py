"""Memory planner: real code paths on meta tensors, exit codes, and the train.py start-up check."""
from __future__ import annotations

import re

import pytest
import torch

import pgen_engine as pg
from pgen_engine.config import config_from_dict, load_config
from pgen_engine.training import plan as P
from pgen_engine.training.plan import activations as P_act
from pgen_engine.training.plan import startup as P_startup
from pgen_engine.training.engine import build_deepspeed_config
from pgen_engine.training.rollout import generator_rows

from tests.conftest import REPO

PEAK_LINE = re.compile(r"^peak per GPU: (\d+\.\d) GiB of (\d+\.\d) GiB$")


def _rl_tree(ckpt, **rl) -> dict:
    return {
        "stage": "rl", "output_dir": "runs/x", "model": {"checkpoint": str(ckpt)},
        "data": {"tokenizer_image_size": 32, "patch_size": 8, "codebook_size": 64, "history_k": 2,
                 "instruction": "next"},
        "train": {"micro_batch_size": 4, "global_batch_size": 16, "max_steps": 2, "warmup_steps": 0},
        "deepspeed": {"zero_stage": 3, "activation_checkpointing": True},
        "rl": {"group_size": 4, "prompts_per_step": 8, "rollout_batch_size": 64, "reference": "partitioned",
               **rl},
    }


@pytest.fixture(scope="module")
def sft_cfg():
    return load_config(REPO / "configs" / "demo_sft.yaml", ["train.micro_batch_size=8"])


def test_sft_plan_table_and_peak_line(sft_cfg):
    plan = P.plan_run(sft_cfg, gpus=2, gpu_mem_gib=80, config_name="demo_sft")
    assert [p.name for p in plan.phases] == ["sft step"]
    text = P.format_plan(plan)
    m = PEAK_LINE.match(text.splitlines()[-1])
    assert m and float(m.group(2)) == 80.0
    assert abs(float(m.group(1)) - plan.peak.total / P.GIB) < 0.051
    assert plan.fits and plan.overflow_line() is None
    items = plan.phases[0].items
    assert items["param shards"] > 0 and items["optimizer states"] > 0 and items["activations (checkpointing off)"] > 0


def test_overflow_names_the_phase(sft_cfg):
    plan = P.plan_run(sft_cfg, gpus=1, gpu_mem_gib=0.01, config_name="demo_sft")
    assert not plan.fits
    line = plan.overflow_line()
    assert "sft step phase needs" in line and "\n" not in line


def test_zero3_states_follow_the_deepspeed_config(sft_cfg):
    """Per-rank shards of every parameter; offload switches move states off the device."""
    mcfg, _ = P.resolve_model_config(sft_cfg)
    model = P.meta_model(mcfg, torch.bfloat16, sft_cfg.train.trainable)
    params = [p for _, p in P.unique_params(model)]
    ds = build_deepspeed_config(sft_cfg.train, sft_cfg.deepspeed, 1, "cuda")
    for world in (1, 3, 8):
        st = P.zero_states(model, ds, world)
        assert st.param_shards == sum(-(-p.numel() // world) for p in params) * 2
        trainable = sum(-(-p.numel() // world) for p in params if p.requires_grad)
        assert st.grads == trainable * 2 and st.optimizer == trainable * 12
        assert st.full_weights == sum(p.numel() for p in params) * 2
    off = config_from_dict({"deepspeed": {"offload_optimizer": True, "offload_params": True}}, "t")
    st = P.zero_states(model, build_deepspeed_config(off.train, off.deepspeed, 1, "cuda"), 4)
    assert st.optimizer == st.grads == st.param_shards == st.step_fp32_grads == 0


def test_activation_checkpointing_is_measured_smaller(sft_cfg):
    mcfg, _ = P.resolve_model_config(sft_cfg)
    model = P.meta_model(mcfg, torch.bfloat16, sft_cfg.train.trainable)
    on = P.objective_peak_bytes(model, 4, 200, checkpointing=True, train=True)
    off = P.objective_peak_bytes(model, 4, 200, checkpointing=False, train=True)
    off2 = P.objective_peak_bytes(model, 8, 200, checkpointing=False, train=True)
    nograd = P.objective_peak_bytes(model, 4, 200, checkpointing=False, train=False)
    assert 0 < on < off and nograd < off
    assert 1.6 < off2 / off < 2.4  # activations grow with the micro-batch
    assert not any(p.requires_grad and p.grad is not None for p in model.parameters())


@pytest.mark.slow  # the Triton interpreter runs forward and backward: minutes on a loaded CPU
def test_meta_measurement_matches_the_same_ops_on_real_tensors(tiny_ckpt, monkeypatch):
    """The fused ops' fake kernels on meta give the live bytes their kernels give on real
    tensors (here the Triton kernels under the CPU interpreter, float32), up to the
    interpreter's own lag: it keeps the previous kernel's arguments alive until its next
    launch (op by op the live bytes re-converge at every launch), so the real run's peak is
    at or a little above the meta one, never below."""
    groups = ["language_model", "generation_head", "generation_aligner", "generation_embeddings"]
    real = pg.load_model(tiny_ckpt, dtype=torch.float32)
    from pgen_engine.training.engine import set_trainable

    set_trainable(real, groups)
    meta = P.meta_model(real.config, torch.float32, groups)
    meta_batch = P_act._meta_batch
    for ckpt, train in ((False, True), (True, True), (False, False)):
        want = P.objective_peak_bytes(meta, 2, 40, checkpointing=ckpt, train=train)
        monkeypatch.setattr(P_act, "_meta_batch", lambda *a: tuple(torch.zeros_like(t, device="cpu") if t.dtype != torch.long
                                                               or t.shape[1] != 40 else torch.ones_like(t, device="cpu")
                                                               for t in meta_batch(*a)))
        got = P.objective_peak_bytes(real, 2, 40, checkpointing=ckpt, train=train)
        monkeypatch.setattr(P_act, "_meta_batch", meta_batch)
        assert want <= got <= 1.25 * want, (ckpt, train, got, want)


def test_meta_kv_cache_equals_the_real_generators(tiny_ckpt):
    """The planner's cache bytes are the real Generator's on a real (CPU) model."""
    from pgen_engine.generation import Generator

    real = pg.load_model(tiny_ckpt, dtype=torch.bfloat16)
    meta = P.meta_model(real.config, torch.bfloat16, ["language_model"])
    T = real.num_image_tokens
    boi = real.special_tokens.boi
    for rows, seq, samples in ((4, T + 24, 2), (12, T + 30, 4)):
        gen = Generator(real, max_batch_size=rows, max_seq_len=seq)
        ids = torch.randint(6, 200, (rows // samples, seq - T))
        # history prompts: an interior begin-of-image token at another place in each (titles of
        # other lengths), which the "pad" unconditional prompt keeps, so each has its own
        ids[:, -1] = boi
        ids[torch.arange(len(ids)), 2 + torch.arange(len(ids))] = boi
        gen.generate(ids, num_samples=samples, guidance_scale=5.0, seed=1)
        want = gen.last_stats["kv_bytes_peak"]
        assert want == gen.cache_nbytes() > 0
        assert P.rollout_kv_bytes(meta, rows, seq, "pad", samples, 5.0) == want


def test_rl_plan_sizes_the_cache_by_this_ranks_prompts(tiny_ckpt):
    cfg = config_from_dict(_rl_tree(tiny_ckpt), "t")
    kv = {}
    for gpus in (1, 2, 4):
        plan = P.plan_run(cfg, gpus=gpus, gpu_mem_gib=80)
        assert [p.name for p in plan.phases] == ["rollout", "log-probs", "update"]
        kv[gpus] = plan.phases[0].items["KV cache"]
    # 8 prompts x 4 samples on one GPU, 16 rows on two, 8 on four: bytes follow the rows (each
    # prompt once, its unconditional prompt once, every row's own image tokens)
    assert kv[1] > kv[2] > kv[4] and kv[1] <= 2 * kv[2]
    mcfg, _ = P.resolve_model_config(cfg)
    meta = P.meta_model(mcfg, torch.bfloat16, cfg.train.trainable)
    plen, _ = P.prompt_tokens(cfg)
    rl = cfg.rl
    assert kv[2] == P.rollout_kv_bytes(meta, generator_rows(4, 4, 64), plen + mcfg.num_image_tokens, "pad",
                                       rl.group_size, rl.guidance_scale)


def test_rl_offload_switch_empties_the_rollout_states(tiny_ckpt):
    on = P.plan_run(config_from_dict(_rl_tree(tiny_ckpt, offload_optimizer_states=True), "t"), gpus=2, gpu_mem_gib=80)
    off = P.plan_run(config_from_dict(_rl_tree(tiny_ckpt), "t"), gpus=2, gpu_mem_gib=80)
    assert "optimizer states" not in on.phases[0].items and off.phases[0].items["optimizer states"] > 0
    assert on.phases[2].items["optimizer states"] == off.phases[2].items["optimizer states"]


def test_prompt_length_uses_the_checkpoints_tokenizer_or_bytes(tiny_ckpt):
    cfg = config_from_dict(_rl_tree(tiny_ckpt), "t")
    n, where = P.prompt_tokens(cfg)
    T = (32 // 8) ** 2
    # <bos> "User: next\n" (bytes) + 2 x (<boi> 16 codes <eoi> "\n") + "Assistant:" <boi>
    assert n == 1 + len("User: next\n") + 2 * (1 + T + 1 + 1) + len("Assistant:") + 1
    assert "byte" in where


def test_unknown_checkpoint_is_a_plan_error(tmp_path, sft_cfg):
    cfg = config_from_dict({"model": {"checkpoint": str(tmp_path / "nowhere")}}, "t")
    with pytest.raises(P.PlanError, match="no config.json"):
        P.plan_run(cfg, gpus=1, gpu_mem_gib=80)
    cfg = config_from_dict({"model": {"checkpoint": "checkpoints/Janus-Pro-1B"}}, "t")
    mcfg, note = P.resolve_model_config(cfg)
    assert mcfg.text.hidden_size == 2048 and mcfg.text.num_layers == 24 and "reference geometry" in note


# ----------------------------------------------------------------------------- train.py start-up
def test_train_refuses_a_launch_that_cannot_fit(monkeypatch, capsys):
    import train

    monkeypatch.setattr(P_startup, "launch_gpu_bytes", lambda: 1 << 20)  # a 1 MiB "GPU"
    rc = train.main(["--config", str(REPO / "configs" / "demo_sft.yaml"), "output_dir=/nonexistent/never"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and len(err) == 1
    assert err[0].startswith("error: memory plan: the sft step phase needs") and "0.0 GiB" in err[0]


def test_preflight_is_skipped_on_cpu_and_with_pgen_plan_0(monkeypatch, sft_cfg):
    monkeypatch.setattr(P_startup, "launch_gpu_bytes", lambda: None)
    assert P.preflight(sft_cfg, "x") is None  # no CUDA: skipped
    monkeypatch.setenv("PGEN_PLAN", "0")
    assert P.preflight(sft_cfg, "x", gpu_bytes=1) is None
    monkeypatch.setenv("PGEN_PLAN", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    plan = P.preflight(sft_cfg, "x", gpu_bytes=80 * P.GIB)
    assert plan.gpus == 2 and plan.fits
    with pytest.raises(P.PlanOverflowError, match="sft step phase"):
        P.preflight(sft_cfg, "x", gpu_bytes=1 << 20)


# ----------------------------------------------------------------------------- shipped configs
SHIPPED = ("janus_pro_1b_sft", "janus_pro_7b_sft", "janus_pro_1b_rl", "janus_pro_7b_rl")


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_fit_8x80_and_headers_quote_the_plan(name, tmp_path, monkeypatch):
    # the headers quote a checkout without checkpoints or dataset (paths resolve against the cwd)
    monkeypatch.chdir(tmp_path)
    path = REPO / "configs" / f"{name}.yaml"
    plan = P.plan_run(load_config(path), gpus=8, gpu_mem_gib=80, config_name=f"configs/{name}.yaml")
    assert plan.fits, P.format_plan(plan)
    peak = P.format_plan(plan).splitlines()[-1]
    header = [l for l in path.read_text().splitlines() if l.startswith("#")]
    assert any(peak in l for l in header), f"{path.name} header does not quote '{peak}'"


@pytest.mark.slow
def test_impossible_real_run_exits_3(capsys):
    from pgen_engine.cli import main

    assert main(["plan", "--config", str(REPO / "configs" / "janus_pro_7b_rl.yaml"), "--gpus", "1"]) == 3
    assert PEAK_LINE.match(capsys.readouterr().out.strip().splitlines()[-1])
