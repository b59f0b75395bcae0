"""The plan of a run: each phase's items (model states, activations, rollout cache, reserve)
assembled from the measurements of the sibling modules."""
from __future__ import annotations

import math

import torch

from pgen_engine.config import RunConfig
from pgen_engine.training.engine import build_deepspeed_config, resolve_precision
from pgen_engine.training.plan.activations import objective_peak_bytes, rollout_work_bytes
from pgen_engine.training.plan.model import meta_model, resolve_model_config, unique_params
from pgen_engine.training.plan.report import GIB, MemoryPlan, PhasePlan, PlanError
from pgen_engine.training.plan.rollout_kv import rollout_kv_bytes
from pgen_engine.training.plan.sequence import history_mode, prompt_tokens
from pgen_engine.training.plan.zero import ZeroStates, zero_states
from pgen_engine.training.reference import resolve_reference_mode
from pgen_engine.training.rl import updates_per_step
from pgen_engine.training.rollout import generator_rows
from pgen_engine.training.sft_data import caches_vision_features


# CUDA context (~0.5 GiB), NCCL communicators, CUDA-graph pools and allocator fragmentation.
RUNTIME_RESERVE_BYTES = 2 * GIB
SFT_PHASES = ("sft step",)
RL_PHASES = ("rollout", "log-probs", "update")


def _dtype(cfg: RunConfig) -> tuple[str, torch.dtype]:
    precision = resolve_precision(cfg.deepspeed, "cuda")  # the plan is for GPUs
    return precision, torch.bfloat16 if precision == "bf16" else torch.float32


def _reference_bytes(rl, states_ref: ZeroStates) -> int:
    mode = resolve_reference_mode(rl.reference, torch.device("cuda"))  # the plan is for GPUs
    if mode == "partitioned":
        return states_ref.param_shards + states_ref.persistent_params
    if mode == "device":
        return states_ref.full_weights
    return 0  # "cpu" keeps it on the host, "none" has none


def plan_run(cfg: RunConfig, *, gpus: int, gpu_mem_gib: float, config_name: str = "CONFIG") -> MemoryPlan:
    """Plan ``cfg`` on ``gpus`` GPUs of ``gpu_mem_gib`` GiB each.

    Raises:
        PlanError / ConfigError: an impossible configuration for ``gpus`` ranks or an
            unknown model geometry (one line).
    """
    if gpus < 1:
        raise PlanError(f"--gpus={gpus}: expected >= 1")
    if not (gpu_mem_gib > 0 and math.isfinite(gpu_mem_gib)):
        raise PlanError(f"--gpu-mem={gpu_mem_gib}: expected a positive number of GiB")
    rl = cfg.rl if cfg.stage == "rl" else None
    # checks the batch arithmetic for `gpus` ranks
    ds = build_deepspeed_config(cfg.train, cfg.deepspeed, gpus, "cuda",
                                offload_states=rl is not None and rl.offload_optimizer_states)
    precision, dtype = _dtype(cfg)
    mcfg, model_note = resolve_model_config(cfg)
    model = meta_model(mcfg, dtype, cfg.train.trainable)
    n_all = sum(p.numel() for _, p in unique_params(model))
    n_train = sum(p.numel() for _, p in unique_params(model) if p.requires_grad)
    st = zero_states(model, ds, gpus)
    plen, len_note = prompt_tokens(cfg)
    T = mcfg.num_image_tokens
    ckpt = cfg.deepspeed.activation_checkpointing
    micro = cfg.train.micro_batch_for(gpus)
    states = {"param shards": st.param_shards, "persistent params": st.persistent_params, "gradients": st.grads,
              "optimizer states": st.optimizer}
    train_work = {"gathered params (working set)": st.gather_working_set, "reduce bucket": st.reduce_bucket,
                  "optimizer step fp32 grads": st.step_fp32_grads}
    mode = history_mode(cfg)
    n_img = cfg.data.history_k if mode == "pixels" else 0
    cached = caches_vision_features(cfg, mode)
    how = "VQ codes" if not n_img else ("pixels, frozen tower: cached features in training" if cached
                                        else "pixels through the vision tower")
    notes = [f"sequence: {plen} prompt tokens ({len_note}) + {T} image tokens; history: {how}"]
    model_desc = f"{model_note}; {n_all / 1e9:.2f} B parameters, {n_train / 1e9:.2f} B trainable"
    phases: list[PhasePlan] = []
    seq = plen + T if rl is None else plen + T - 1
    # RL on the guided distribution: a second, unconditional-prompt forward per sequence
    useq = None
    if rl is not None and rl.policy_distribution == "guided" and rl.guidance_scale != 1:
        useq = seq if rl.uncond_mode == "pad" else 2 + T - 1
        notes.append(f"RL ratio on the guided distribution: each micro-batch also runs {micro} x {useq} "
                     f"unconditional-prompt tokens (rl.uncond_mode={rl.uncond_mode})")
    act = objective_peak_bytes(model, micro, seq, checkpointing=ckpt, train=True, history_images=n_img,
                               cached_features=cached, uncond_seq=useq)
    other = objective_peak_bytes(model, micro, seq, checkpointing=not ckpt, train=True, history_images=n_img,
                               cached_features=cached, uncond_seq=useq)
    notes.append(f"activations of {micro} x {seq} tokens: {act / GIB:.2f} GiB with activation checkpointing "
                 f"{'on' if ckpt else 'off'}, {other / GIB:.2f} GiB with it {'off' if ckpt else 'on'}")
    act_name = f"activations (checkpointing {'on' if ckpt else 'off'})"
    reserve = {"CUDA context / NCCL / allocator reserve": RUNTIME_RESERVE_BYTES}
    if rl is None:
        phases.append(PhasePlan("sft step", {**states, **train_work, act_name: act, **reserve}))
    else:
        if rl.prompts_per_step % gpus:
            raise PlanError(f"rl.prompts_per_step={rl.prompts_per_step} is not divisible by --gpus={gpus}")
        updates_per_step(rl, cfg.train)  # the run's own check: a rollout is whole optimizer batches

        prompts_here = rl.prompts_per_step // gpus
        rows = generator_rows(prompts_here, rl.group_size, rl.rollout_batch_size)
        kv = rollout_kv_bytes(model, rows, plen + T, rl.uncond_mode, rl.group_size, rl.guidance_scale)
        work = rollout_work_bytes(model, rows // rl.group_size, plen, rows, n_img)
        ref = _reference_bytes(rl, st)
        kept = {} if rl.offload_optimizer_states else {**states, "reduce bucket": st.reduce_bucket}
        if rl.offload_optimizer_states:
            notes.append("rollout: rl.offload_optimizer_states moves the policy's ZeRO states to the host")
        notes.append(f"rollout: {prompts_here} prompts x {rl.group_size} samples on each GPU; the Generator holds "
                     f"{rows} rows (x2 for CFG) of {plen + T} tokens")
        phases.append(PhasePlan("rollout", {**kept, f"reference ({rl.reference})": ref,
                                            "gathered weights (all)": st.full_weights, "KV cache": kv,
                                            "prefill + logits working set": work, **reserve}))
        score = objective_peak_bytes(model, micro, seq, checkpointing=ckpt, train=False, history_images=n_img,
                               cached_features=cached, uncond_seq=useq)
        phases.append(PhasePlan("log-probs", {**states, f"reference ({rl.reference})": ref,
                                              "gathered params (working set)": st.gather_working_set,
                                              "reduce bucket": st.reduce_bucket,
                                              "no-grad forward": score, **reserve}))
        phases.append(PhasePlan("update", {**states, f"reference ({rl.reference})": ref, **train_work,
                                           act_name: act, **reserve}))
    for p in phases:
        p.items = {k: v for k, v in p.items.items() if v}
    return MemoryPlan(config_name, gpus, int(gpu_mem_gib * GIB), precision, cfg.deepspeed.zero_stage, model_desc,
                      phases, notes)
