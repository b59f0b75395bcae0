"""Rollouts through the hybrid engine: the ZeRO-3 policy's own weights serve RL generation.

One RL step switches the same parameters between two uses:

1. **rollout** — :meth:`HybridEngine.rollout` gathers every ZeRO-3 shard *once* for the
   whole phase (:func:`pgen_engine.training.engine.gathered_module`), detaches DeepSpeed's per-module
   fetch/release hooks so the many small decode forwards do not re-partition and re-gather
   the weights token by token, and runs :class:`pgen_engine.generation.Generator` on the
   module in place (no second copy of the weights). Optionally the optimizer states are
   moved off the device first (``engine.offload_states()``) to make room for the gathered
   weights and the KV cache. On exit the Generator (and its KV cache) is dropped, the
   hooks are re-registered, the shards are re-partitioned and the optimizer states
   reloaded — so the update phase sees exactly the training layout again.
2. **update** — ordinary ZeRO-3 training forwards/backwards (:mod:`.rl`).

Rollout log-probs: the Generator samples from the CFG-mixed distribution and, with
``return_logprobs=True``, also returns each sampled token's log-prob under the distribution
the GRPO ratio uses (:attr:`RolloutParams.policy_distribution`, see :mod:`.grpo`): the guided
mix ``log_softmax((u + s (c - u)) / T)`` (the sampling distribution itself) or the
conditional branch ``log_softmax(c / T)``, computed inside its decode step (CUDA-graph safe;
on CPU inside the C++ wave loop, see :class:`pgen_engine.generation.backends.CppBackend`).
Comparing it with the trainer's recomputation (:func:`.sequences.guided_policy_logprobs` /
:func:`.sequences.policy_logprobs`) gives the logged ``logprob_gap``.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from pgen_engine.generation.generator import LOGPROB_DISTRIBUTIONS, UNCOND_MODES, Generator
from pgen_engine.generation.sampling_params import SamplingParams

from .engine import can_offload_states, gathered_module, optimizer_states_offloaded
from .memory_ledger import MemoryLedger, module_param_bytes, optimizer_state_bytes


# ----------------------------------------------------------------------------- rollout
@torch.no_grad()
def _aligned(model, features: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Per-prompt tower outputs ``[n_i, T_img, D_vision]`` -> aligned ``[n_i, T_img, H]`` on the
    model's device (the aligner, as :meth:`JanusModel.embed_inputs` applies it to ``image_features``)."""
    out = []
    for f in features:
        if f is None or f.shape[0] == 0:
            out.append(None)
            continue
        if f.ndim != 3:
            raise ValueError(f"image_features entries must be [n_img, T_img, D_vision], got {tuple(f.shape)}")
        out.append(model.aligner(f.to(model.device, model.dtype)))
    return out


def generator_rows(num_prompts: int, group_size: int, max_batch_size: int) -> int:
    """Output rows the rollout's Generator is sized for on this rank.

    What this rank really generates per Generator call: whole prompt groups, at most
    ``max_batch_size // group_size`` prompts (at least one) and never more than the
    ``num_prompts`` this rank holds, times ``group_size`` samples. Sizing by
    ``max_batch_size`` alone would allocate KV cache for prompts this rank never sees
    (``rl.rollout_batch_size`` counts rows over the whole decode, not per rank).
    :mod:`pgen_engine.training.plan` sizes the planned cache with this same function.
    """
    if num_prompts < 1 or group_size < 1 or max_batch_size < 1:
        raise ValueError(f"generator_rows: num_prompts={num_prompts}, group_size={group_size} and "
                         f"max_batch_size={max_batch_size} must be >= 1")
    per_call = max(1, max_batch_size // group_size)
    return min(per_call, num_prompts) * group_size


@dataclasses.dataclass(frozen=True)
class RolloutParams:
    """How a rollout samples: the Generator's :class:`~pgen_engine.generation.SamplingParams`
    plus the two settings only RL has.

    Attributes:
        num_samples: G samples per prompt (the GRPO group), >= 1.
        sampling: guidance scale, temperature, top-k / top-p (the generation rules, checked
            once when it was built); its ``seed`` is ignored (each rollout call passes one
            request seed per prompt). RL samples: ``greedy`` and ``guidance_scale <= 0`` are refused.
        uncond_mode: the CFG unconditional prompt, ``"pad"`` or ``"short"``.
        policy_distribution: which log-probs the rollout records: ``"guided"`` (the CFG mix it
            samples from) or ``"conditional"`` (the conditional branch; the default here, so
            direct callers keep their behaviour: ``rl.policy_distribution`` picks it in a run).
    """

    num_samples: int = 8
    sampling: SamplingParams = SamplingParams()
    uncond_mode: str = "pad"
    policy_distribution: str = "conditional"

    def __post_init__(self) -> None:
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"RolloutParams.num_samples={self.num_samples!r}: expected an int >= 1")
        if not isinstance(self.sampling, SamplingParams):
            raise TypeError(f"RolloutParams.sampling must be a pgen_engine.generation.SamplingParams, "
                            f"got {type(self.sampling).__name__}")
        if self.sampling.guidance_scale <= 0:
            raise ValueError(f"RolloutParams: guidance_scale={self.sampling.guidance_scale}: expected > 0")
        if self.sampling.greedy:
            raise ValueError("RolloutParams: greedy=True would make a group's samples identical; RL rollouts sample")
        if self.uncond_mode not in UNCOND_MODES:
            raise ValueError(f"RolloutParams.uncond_mode={self.uncond_mode!r}: expected one of {UNCOND_MODES}")
        if self.policy_distribution not in LOGPROB_DISTRIBUTIONS:
            raise ValueError(f"RolloutParams.policy_distribution={self.policy_distribution!r}: expected one of "
                             f"{LOGPROB_DISTRIBUTIONS}")

    def generation(self, seeds: Sequence[int]) -> SamplingParams:
        """The Generator's settings for one call, with its per-prompt request ``seeds``."""
        return self.sampling.replace(seed=seeds)


@dataclasses.dataclass
class Rollout:
    """Result of one rollout phase.

    Attributes:
        tokens: int64 ``[B*G, T]``; row ``i*G + j`` is sample ``j`` of prompt ``i``.
        logprobs: float32 ``[B*G, T]`` rollout log-probs (of ``params.policy_distribution``).
        kv_bytes: bytes of the KV cache the Generator held (released when this returns).
        gathered_bytes: parameter bytes materialised on this rank during the rollout.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    kv_bytes: int
    gathered_bytes: int


class HybridEngine:
    """Switches one policy between ZeRO-3 training and KV-cached generation.

    Args:
        module: the policy (``engine.module`` under DeepSpeed).
        engine: the DeepSpeed engine, or None (plain module).
        max_batch_size: rows decoded at once; prompts are chunked so each Generator call
            is one wave of whole prompt groups.
        max_seq_len: longest prompt + image tokens.
        offload_optimizer_states: call ``engine.offload_states()`` / ``reload_states()``
            around the rollout (frees device memory for gathered weights + KV cache).
        ledger: optional :class:`MemoryLedger` receiving rollout bytes.
    """

    def __init__(self, module: torch.nn.Module, engine=None, *, max_batch_size: int = 64,
                 max_seq_len: int | None = None, offload_optimizer_states: bool = False,
                 ledger: MemoryLedger | None = None, sample_backend: str = "auto"):
        if max_batch_size < 1:
            raise ValueError(f"HybridEngine: max_batch_size={max_batch_size} must be >= 1")
        self.module = module
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.offload_optimizer_states = offload_optimizer_states
        self.ledger = ledger
        self.sample_backend = sample_backend
        if offload_optimizer_states and not can_offload_states(engine):
            raise ValueError("HybridEngine: offload_optimizer_states=True needs a DeepSpeed engine with offload_states()")

    def rollout(self, prompts: Sequence[Sequence[int]], code_masks: Sequence[Sequence[bool]] | None,
                params: RolloutParams, seeds: Sequence[int],
                pixel_values: Sequence[torch.Tensor] | None = None,
                image_features: Sequence[torch.Tensor] | None = None) -> Rollout:
        """Sample ``params.num_samples`` images per prompt with the policy's own weights.

        Args:
            prompts: B token-id lists (no padding), each ending with begin-of-image.
            code_masks: B bool lists (True where the id is a history VQ code) or None.
            params: sampling settings.
            seeds: B request seeds (results of a prompt do not depend on its batch mates).
            pixel_values: pixels history mode: B float32 ``[n_i, 3, S, S]`` history images
                filling prompt ``i``'s ``<image>`` placeholders; None in codes mode.
            image_features: instead of ``pixel_values``: B vision-tower outputs ``[n_i, T_img, D_vision]``
                of those images (:meth:`~pgen_engine.models.janus.JanusModel.vision_hidden`, e.g. a
                frozen tower's feature cache). Only the aligner runs here (once per prompt, with
                the gathered weights); the Generator gets the aligned features as ``image_embeds``
                and never calls the vision tower.
        Returns:
            :class:`Rollout`; the KV cache is already released when this returns.
        """
        B, G = len(prompts), params.num_samples
        if B == 0:
            raise ValueError("HybridEngine.rollout: no prompts")
        if pixel_values is not None and image_features is not None:
            raise ValueError("HybridEngine.rollout: give pixel_values or image_features, not both")
        if pixel_values is not None and len(pixel_values) != B:
            raise ValueError(f"HybridEngine.rollout: {B} prompts but {len(pixel_values)} pixel_values entries")
        if image_features is not None and len(image_features) != B:
            raise ValueError(f"HybridEngine.rollout: {B} prompts but {len(image_features)} image_features entries")
        if not isinstance(params, RolloutParams):
            raise TypeError(f"HybridEngine.rollout: params must be a RolloutParams, got {type(params).__name__}")
        if len(seeds) != B or (code_masks is not None and len(code_masks) != B):
            raise ValueError(f"HybridEngine.rollout: {B} prompts but {len(seeds)} seeds / "
                             f"{None if code_masks is None else len(code_masks)} code masks")
        per_call = max(1, self.max_batch_size // G)
        if G > self.max_batch_size:
            raise ValueError(f"HybridEngine.rollout: num_samples={G} exceeds max_batch_size={self.max_batch_size}")
        m = self.module
        was_training = m.training
        T = m.num_image_tokens
        max_len = self.max_seq_len or (max(len(p) for p in prompts) + T)
        toks, lps = [], []
        kv_bytes = gathered = 0
        with optimizer_states_offloaded(self.engine, self.offload_optimizer_states), \
                gathered_module(m, self.engine):
            gathered = module_param_bytes(m)
            m.eval()
            try:
                gen = Generator(m, max_batch_size=generator_rows(B, G, self.max_batch_size), max_seq_len=max_len,
                                uncond_mode=params.uncond_mode, sample_backend=self.sample_backend)
                for lo in range(0, B, per_call):
                    hi = min(B, lo + per_call)
                    px = None if pixel_values is None else torch.cat(list(pixel_values[lo:hi])).to(m.device)
                    emb = None if image_features is None else _aligned(m, image_features[lo:hi])
                    out, lp = gen.generate([list(p) for p in prompts[lo:hi]], None, px,
                                           gen_code_mask=None if code_masks is None else [list(c) for c in code_masks[lo:hi]],
                                           num_samples=G, sampling=params.generation(seeds[lo:hi]),
                                           return_logprobs=True, image_embeds=emb,
                                           logprob_distribution=params.policy_distribution)
                    lps.append(lp)
                    toks.append(out)
                kv_bytes = gen.cache_nbytes()  # sized by the calls: their largest wave
                del gen  # drops the KV cache (and captured graphs) before the update phase
            finally:
                m.train(was_training)
            if self.ledger is not None:
                self.ledger.record("rollout", "gathered_weights", gathered)
                self.ledger.record("rollout", "kv", kv_bytes)
                if self.engine is not None and not self.offload_optimizer_states:
                    self.ledger.record("rollout", "optimizer_states", optimizer_state_bytes(self.engine.optimizer))
        return Rollout(torch.cat(toks), torch.cat(lps), kv_bytes, gathered)
