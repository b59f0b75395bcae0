"""The stage sections of a run config: ``sft:`` (:class:`SFTConfig`) and ``rl:`` (:class:`RLConfig`).

Plain typed fields of :class:`pgen_engine.config.RunConfig` (no registration): the YAML
loader type-checks them like every other section.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Optional

from pgen_engine.generation.sampling_params import SamplingParams as GenerationSampling
from pgen_engine.typed_config import ConfigError


@dataclasses.dataclass
class SFTConfig:
    """The ``sft:`` section (stage sft). SFT is configured by ``train`` and ``data`` alone today;
    the section exists so that stage-specific settings have a typed home, and ``sft: {}`` is valid."""


PROMPT_WINDOWS = ("sft", "unseen", "all")


class RLConfigError(ConfigError):
    """Invalid ``rl:`` section (one line naming the key)."""


@dataclasses.dataclass
class RLConfig:
    """The ``rl:`` section of a run config.

    Attributes:
        algorithm: "grpo" (group-normalised advantages) or "ppo" (batch-whitened, no critic).
        group_size: G samples per prompt (GRPO needs >= 2).
        prompts_per_step: prompts per RL step over all ranks (divisible by world size).
        ppo_epochs: passes over each rollout.
        clip_eps, clip_eps_high: ratio clip ``[1 - eps, 1 + eps_high]`` (eps_high null = eps).
        beta: KL coefficient (k3 estimator) to the frozen reference; 0 disables it.
        aggregation: "token" or "sequence" loss aggregation.
        scale_adv_by_std: GRPO divides by the group std.
        temperature, top_k, top_p, guidance_scale: rollout sampling, as one
            :class:`pgen_engine.generation.SamplingParams` in :attr:`sampling` (the same
            rules as ``pgen generate``); flat keys, as in earlier configs.
        uncond_mode: the CFG unconditional prompt of the rollout ("pad" or "short").
        policy_distribution: the distribution of the GRPO ratio and KL (see
            :mod:`pgen_engine.training.grpo`): "guided" (the CFG mix the rollout samples, two
            policy forwards per sequence: conditional and unconditional prompt) or
            "conditional" (the conditional branch only; off-policy when guidance_scale != 1).
            null (the default) resolves to "guided" when guidance_scale != 1, else "conditional".
        reference: where the frozen reference runs: "auto" (the training device: the GPU
            when there is one, else the CPU), "cpu", "device", "partitioned" (ZeRO-3, no
            optimizer) or "none" (only with beta == 0; KL is then not measured).
        offload_optimizer_states: DeepSpeed ``offload_states`` around the rollout.
        rollout_batch_size: rows decoded at once by the Generator.
        rewards: ``{component: {weight: w, ...}}`` for ``CompositeReward.from_config``.
        embedder: ``make_embedder`` spec for embedding-based rewards.
        future_horizon: at most this many future items per user (null = all).
        future_includes_target: the future items of a training window start with the
            window's own target (the next train-split item) instead of the item after it.
            The next item is the one the user's drifting interest is closest to; items
            further ahead have drifted further. Valid/test targets are never included.
        prompt_windows: which train-split windows RL prompts are drawn from: "sft" (the
            windows SFT trained on: the ``data.max_windows_per_user`` most recent per user),
            "unseen" (the user's older train windows that SFT never trained on) or "all".
            Why "unseen": after several SFT epochs the model has memorised its windows'
            targets, so a reward that scores the next item mostly re-rewards memorised answers;
            on windows SFT did not train on, it rewards predicting the drift. Every window's
            target and future items are train-split items either way. Measured on the
            synthetic demo: it raises the held-out reward, not attr_acc_future (README).
        ledger_scan_every: every N steps log ``mem/live_tensor_bytes`` (0 = off; slow).
        eval_prompts: held-out (valid-split) prompts scored before the first step and after
            the last one (``eval/reward``, ``eval/reward/<component>``; 0 = off). Fixed
            prompts and seeds, so the before/after numbers compare the same requests. Their
            future-item rewards score each valid prompt against its own valid target (a
            monitor only: training rewards never see held-out targets).
        eval_every: also evaluate every N steps (0 = only before and after).

    Resumable checkpoints follow ``train.save_every`` / ``train.keep_checkpoints``; the
    schedule's ``train.max_steps`` / ``train.warmup_steps`` count RL steps (each RL step
    makes ``ppo_epochs * prompts_per_step * group_size / train.global_batch_size``
    optimizer steps, the LR schedule is stretched accordingly).
    """

    algorithm: Literal["grpo", "ppo"] = "grpo"
    group_size: int = 8
    prompts_per_step: int = 8
    ppo_epochs: int = 1
    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None
    beta: float = 0.04
    aggregation: Literal["token", "sequence"] = "token"
    scale_adv_by_std: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance_scale: float = 5.0
    uncond_mode: Literal["pad", "short"] = "pad"
    policy_distribution: Optional[str] = None
    reference: Literal["auto", "cpu", "device", "partitioned", "none"] = "auto"
    offload_optimizer_states: bool = False
    rollout_batch_size: int = 64
    rewards: Any = dataclasses.field(default_factory=lambda: {"preference": {"weight": 1.0, "agg": "mean"}})
    embedder: Any = dataclasses.field(default_factory=lambda: {"type": "pixel_stats"})
    future_horizon: Optional[int] = None
    future_includes_target: bool = False
    prompt_windows: Literal["sft", "unseen", "all"] = "sft"
    ledger_scan_every: int = 0
    eval_prompts: int = 0
    eval_every: int = 0

    def __post_init__(self) -> None:
        def bad(key: str, expect: str) -> RLConfigError:
            return RLConfigError(f"rl.{key}={getattr(self, key)!r}: expected {expect}")

        if self.group_size < 1 or (self.algorithm == "grpo" and self.group_size < 2):
            raise bad("group_size", ">= 2 for grpo (>= 1 for ppo)")
        for key in ("prompts_per_step", "ppo_epochs", "rollout_batch_size"):
            if getattr(self, key) < 1:
                raise bad(key, ">= 1")
        if self.group_size > self.rollout_batch_size:
            raise bad("rollout_batch_size", f">= rl.group_size={self.group_size}")
        if not 0 < self.clip_eps < 1:
            raise bad("clip_eps", "a value in (0, 1)")
        if self.clip_eps_high is not None and not self.clip_eps_high > 0:
            raise bad("clip_eps_high", "> 0 or null")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise bad("beta", "a finite number >= 0")
        if self.beta > 0 and self.reference == "none":
            raise RLConfigError(f"rl.reference='none' needs rl.beta=0 (got beta={self.beta})")
        if self.guidance_scale <= 0:
            raise bad("guidance_scale", "> 0")
        if self.policy_distribution is None:
            self.policy_distribution = "guided" if self.guidance_scale != 1 else "conditional"
        elif self.policy_distribution not in ("guided", "conditional"):
            raise bad("policy_distribution", "'guided' or 'conditional' (or null: guided when guidance_scale != 1)")
        try:  # the Generator's own rules for the rollout sampling settings
            self.sampling
        except (TypeError, ValueError) as e:
            raise RLConfigError(f"rl.{getattr(e, 'field', 'sampling')}: {e}") from None
        if not isinstance(self.rewards, dict) or not self.rewards:
            raise bad("rewards", "a non-empty mapping {component: {weight: w, ...}}")
        # late import: the rewards package (torch, the embedders) must not load with every config, and
        # it reaches back to the config through pgen_engine.eval
        from pgen_engine.rewards.rewards import CompositeReward

        try:  # names, weights and options now, not after the data and the SFT model are prepared
            CompositeReward.from_config(self.rewards, None)
        except (TypeError, ValueError) as e:
            raise RLConfigError(f"rl.rewards: {e}") from None
        if self.group_size == 1 and (self.rewards.get("diversity") or {}).get("weight"):
            # DiversityReward scores an image alone in its group 0: the component would be 0 on every step
            raise RLConfigError("rl.rewards.diversity: in-group diversity needs rl.group_size >= 2 (got 1); "
                                "drop it or give it weight 0")
        if not isinstance(self.embedder, dict) or "type" not in self.embedder:
            raise bad("embedder", "a mapping with 'type' (e.g. {type: pixel_stats})")
        from pgen_engine.rewards.embedders import EMBEDDER_TYPES  # late import: as CompositeReward above

        if self.embedder["type"] not in EMBEDDER_TYPES or self.embedder["type"] == "model_vision":
            # else found only when the RL stage builds it; model_vision wraps a vision_model the RL stage never passes
            raise RLConfigError(f"rl.embedder.type={self.embedder['type']!r}: expected one of "
                                f"{[t for t in EMBEDDER_TYPES if t != 'model_vision']}")
        if self.embedder["type"] == "pixel_stats":  # no weights to load: its fields are checked by building it
            from pgen_engine.rewards.embedders import make_embedder  # late import: as CompositeReward above

            try:
                make_embedder(self.embedder)
            except (TypeError, ValueError) as e:
                raise RLConfigError(f"rl.embedder: {e}") from None
        if self.embedder["type"] == "cocons_cnn":  # its training fields, else checked after data prep + engine build
            from pgen_engine.rewards.cocons import reward_config_from_spec  # late import: as CompositeReward above

            try:
                reward_config_from_spec(self.embedder)
            except (TypeError, ValueError) as e:
                raise RLConfigError(f"rl.embedder: {e}") from None
        if self.future_horizon is not None and self.future_horizon < 1:
            raise bad("future_horizon", ">= 1 or null")
        if self.prompt_windows not in PROMPT_WINDOWS:
            raise bad("prompt_windows", f"one of {list(PROMPT_WINDOWS)}")
        for key in ("ledger_scan_every", "eval_prompts", "eval_every"):
            if getattr(self, key) < 0:
                raise bad(key, ">= 0")

    @property
    def guided_ratio(self) -> bool:
        """Whether the GRPO ratio / KL use the CFG-guided distribution: ``policy_distribution`` is
        "guided" and guidance is on (at scale 1 the guided mix is the conditional distribution,
        so the trainer skips the second, unconditional forward)."""
        return self.policy_distribution == "guided" and self.guidance_scale != 1.0

    @property
    def sampling(self) -> GenerationSampling:
        """The rollout's sampling settings as the Generator's SamplingParams (built from the
        flat keys; raises its SamplingParamsError naming the field when one is out of range)."""
        return GenerationSampling(guidance_scale=self.guidance_scale, temperature=self.temperature,
                                  top_k=self.top_k, top_p=self.top_p)
