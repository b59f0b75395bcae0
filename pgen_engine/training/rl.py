"""Online RL stage (``stage: rl``): GRPO / critic-free PPO on generated images.

One RL step (all ranks in lock-step; ``rl.prompts_per_step`` prompts are split over ranks):

1. **rollout** — :class:`HybridEngine` gathers the ZeRO-3 policy once and samples
   ``rl.group_size`` images per prompt through the KV-cached Generator (CFG, prefix
   sharing), returning tokens and their rollout log-probs; the KV cache is freed.
2. **reward** — codes -> images (the data tokenizer's decoder, i.e. the model's image
   space), then :class:`pgen_engine.rewards.CompositeReward` against each user's history /
   train-split future items / the catalogue / (synthetic) ground-truth attributes.
3. **logprobs** — old log-probs recomputed with the *training* numerics
   (``forward_train`` + ``image_token_logprobs`` at the sampling temperature), the
   reference model's log-probs, and the rollout-vs-trainer gap (``logprob_gap_max/mean``).
4. **update** — ``rl.ppo_epochs`` passes over the rollout in minibatches of
   ``train.global_batch_size`` sequences (micro-batches of ``train.micro_batch_size``),
   loss :func:`pgen_engine.training.grpo.policy_loss`.

Advantages: GRPO normalises within each prompt's group; PPO whitens over the whole
global batch (all-reduced), the batch mean being the critic-free baseline.

``metrics.jsonl`` rows: ``step``, ``reward`` (mean total), ``reward/<component>`` (mean),
``reward/<component>/{std,min,max}``, ``kl``, ``pg_loss``, ``clip_frac``, ``entropy``,
``logprob_gap_max``, ``logprob_gap_mean``, ``lr``, the ledger's ``mem/...`` bytes, and
timings ``time/{rollout,reward,logprobs,update}_s``.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np
import torch

from pgen_engine.config import ConfigError, register_stage_section

from . import grpo
from .distributed import all_ranks_true
from .errors import NonFiniteError
from .hybrid import HybridEngine, ReferencePolicy, SamplingParams
from .memory_ledger import MemoryLedger, SavedTensorMeter, optimizer_state_bytes


# ----------------------------------------------------------------------------- config
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
        temperature, top_k, top_p, guidance_scale, uncond_mode: rollout sampling.
        reference: "cpu", "device", "partitioned" (ZeRO-3, no optimizer) or "none" (only
            with beta == 0; KL is then not measured).
        offload_optimizer_states: DeepSpeed ``offload_states`` around the rollout.
        rollout_batch_size: rows decoded at once by the Generator.
        rewards: ``{component: {weight: w, ...}}`` for ``CompositeReward.from_config``.
        embedder: ``make_embedder`` spec for embedding-based rewards.
        future_horizon: at most this many future items per user (null = all).
        ledger_scan_every: every N steps log ``mem/live_tensor_bytes`` (0 = off; slow).
        eval_prompts: held-out (valid-split) prompts scored before the first step and after
            the last one (``eval/reward``, ``eval/reward/<component>``; 0 = off). Fixed
            prompts and seeds, so the before/after numbers compare the same requests.
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
    reference: Literal["cpu", "device", "partitioned", "none"] = "cpu"
    offload_optimizer_states: bool = False
    rollout_batch_size: int = 64
    rewards: Any = dataclasses.field(default_factory=lambda: {"preference": {"weight": 1.0, "agg": "mean"}})
    embedder: Any = dataclasses.field(default_factory=lambda: {"type": "pixel_stats"})
    future_horizon: Optional[int] = None
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
        from pgen_engine.generation.sampling_params import SamplingParams as GenerationSampling

        try:  # the Generator's own rules for the rollout sampling settings
            GenerationSampling(guidance_scale=self.guidance_scale, temperature=self.temperature, top_k=self.top_k,
                               top_p=self.top_p)
        except (TypeError, ValueError) as e:
            raise RLConfigError(f"rl.{getattr(e, 'field', 'sampling')}: {e}") from None
        if not isinstance(self.rewards, dict) or not self.rewards:
            raise bad("rewards", "a non-empty mapping {component: {weight: w, ...}}")
        if not isinstance(self.embedder, dict) or "type" not in self.embedder:
            raise bad("embedder", "a mapping with 'type' (e.g. {type: pixel_stats})")
        if self.future_horizon is not None and self.future_horizon < 1:
            raise bad("future_horizon", ">= 1 or null")
        for key in ("ledger_scan_every", "eval_prompts", "eval_every"):
            if getattr(self, key) < 0:
                raise bad(key, ">= 0")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.group_size, self.guidance_scale, self.temperature, self.top_k, self.top_p,
                              self.uncond_mode)


# importing this module makes ``stage: rl`` (with its ``rl:`` section) a valid run config
register_stage_section("rl", RLConfig)


# ----------------------------------------------------------------------------- training numerics
def build_sequences(prompts: Sequence[Sequence[int]], code_masks: Sequence[Sequence[bool]] | None,
                    tokens: torch.Tensor, group_size: int, pad_id: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded teacher-forcing inputs for sampled images.

    Row ``r = i*G + j`` is ``prompts[i] ++ tokens[r, :T-1]``; with left padding the last
    ``T`` positions of every row are exactly those predicting ``tokens[r, 0..T-1]``.

    Args:
        prompts: B id lists (each ends with begin-of-image).
        code_masks: B bool lists (history VQ codes) or None.
        tokens: int64 ``[B*G, T]``.
        group_size: G.
        pad_id: padding id.
    Returns:
        (input_ids int64 ``[B*G, L]``, gen_code_mask bool ``[B*G, L]``, attention_mask int64 ``[B*G, L]``)
        on ``tokens.device``.
    """
    N, T = tokens.shape
    if N != len(prompts) * group_size:
        raise ValueError(f"build_sequences: {N} token rows != {len(prompts)} prompts x group_size {group_size}")
    L = max(len(p) for p in prompts) + T - 1
    ids = torch.full((N, L), pad_id, dtype=torch.long)
    cm = torch.zeros((N, L), dtype=torch.bool)
    att = torch.zeros((N, L), dtype=torch.long)
    toks = tokens.cpu()
    for i, p in enumerate(prompts):
        S = len(p)
        row = torch.tensor(list(p), dtype=torch.long)
        pm = torch.tensor(list(code_masks[i]), dtype=torch.bool) if code_masks is not None else torch.zeros(S, dtype=torch.bool)
        for j in range(group_size):
            r = i * group_size + j
            ids[r, L - S - T + 1:L - T + 1] = row
            cm[r, L - S - T + 1:L - T + 1] = pm
            ids[r, L - T + 1:] = toks[r, :T - 1]
            cm[r, L - T + 1:] = True
            att[r, L - S - T + 1:] = 1
    dev = tokens.device
    return ids.to(dev), cm.to(dev), att.to(dev)


def row_pixels(pixel_values: Sequence[torch.Tensor | None] | None, group_size: int) -> list[torch.Tensor | None] | None:
    """Per-prompt history pixels ``[n_i,3,S,S]`` -> per-row (``r = i*G + j``) list, or None (codes mode)."""
    if pixel_values is None:
        return None
    return [pv for pv in pixel_values for _ in range(group_size)]


def slice_pixels(seqs, sl: slice, device, which: int = 3) -> torch.Tensor | None:
    """History images of rows ``sl`` of ``seqs`` = ``build_sequences(...) + (row_pixels(pixel_values),
    row_pixels(image_features))``: ``which`` 3 -> pixel_values, 4 -> cached vision-tower outputs."""
    rows = seqs[which][sl] if len(seqs) > which and seqs[which] is not None else []
    px = [p for p in rows if p is not None]
    return torch.cat(px).to(device) if px else None


def _history_args(seqs, sl: slice, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    feats = slice_pixels(seqs, sl, device, 4)
    return (None, feats) if feats is not None else (slice_pixels(seqs, sl, device, 3), None)


def policy_logprobs(model, input_ids: torch.Tensor, gen_code_mask: torch.Tensor, attention_mask: torch.Tensor,
                    targets: torch.Tensor, temperature: float, pixel_values: torch.Tensor | None = None,
                    image_features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of ``targets`` with the training numerics.

    Args:
        model: JanusModel (the policy's module or the reference).
        input_ids, gen_code_mask, attention_mask: ``[N, L]`` from :func:`build_sequences`.
        targets: int64 ``[N, T]`` sampled codes.
        temperature: the sampling temperature (the ratio's distribution is the conditional
            policy at that temperature).
        pixel_values: pixels history mode: ``[sum n_img, 3, S, S]`` of the rows, in row order
            (the same images the rollout's prompts were built with).
        image_features: instead of ``pixel_values``: the frozen tower's cached outputs of those
            images ``[sum n_img, T_img, D_vision]`` (no re-encoding per row / epoch).
    Returns:
        (logprobs fp32 ``[N, T]``, entropy fp32 ``[N, T]``); differentiable when grad is on.
    """
    N, T = targets.shape
    x = model.embed_inputs(input_ids, gen_code_mask, pixel_values, image_features)
    h = model.forward_train(x, attention_mask)[:, -T:]
    lp, ent = model.image_token_logprobs(h.reshape(N * T, -1), targets.reshape(-1).to(h.device),
                                         temperature=temperature)
    return lp.reshape(N, T).float(), ent.reshape(N, T).float()


# ----------------------------------------------------------------------------- optimisation adapter
class TorchOptimizerEngine:
    """The slice of DeepSpeed's engine API the RL loop uses, over a plain module + optimizer.

    Lets the trainer run (and be unit-tested) without a process group. ``backward``
    scales by ``1/grad_accum`` like DeepSpeed; ``step`` clips and steps only at the
    accumulation boundary.
    """

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, *, grad_accum: int = 1,
                 grad_clip: float = 0.0, scheduler=None):
        self.module, self.optimizer, self.grad_accum = module, optimizer, int(grad_accum)
        self.grad_clip, self.lr_scheduler = grad_clip, scheduler
        self._micro = 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro % self.grad_accum:
            return
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> None:
        return None  # not tracked; DeepSpeed's engine reports it


# ----------------------------------------------------------------------------- prompts and reward context
@dataclasses.dataclass
class PromptBatch:
    """Prompts of one RL step on this rank, with what the rewards need.

    Attributes:
        prompts / code_masks: B id lists / bool lists.
        seeds: B request seeds.
        history: B lists of history item ids; future: B lists of later train items.
        target_attributes: int64 ``[B, A]`` ground truth (synthetic data) or None.
        pixel_values: pixels history mode: B float32 ``[n_i, 3, S, S]`` history images; None in codes mode.
        image_features: frozen vision tower: B cached tower outputs ``[n_i, T_img, D_vision]`` of
            the same images (the trainer's log-probs use them instead of re-encoding), or None.
    """

    prompts: list[list[int]]
    code_masks: list[list[bool]] | None
    seeds: list[int]
    history: list[list[str]]
    future: list[list[str]]
    target_attributes: torch.Tensor | None = None
    pixel_values: list[torch.Tensor] | None = None
    image_features: list[torch.Tensor] | None = None


class RewardEnv:
    """Turns codes into scored images for a batch of prompts.

    Args:
        reward: a ``CompositeReward``.
        decode: ``codes int64 [N, T] -> uint8 [N, H, W, 3]``.
        item_images: ``item_ids -> uint8 [n, H, W, 3]`` in the same image space as ``decode``
            (history / future / catalogue items are embedded from these, cached).
        embedder: the reward embedder (None when no component needs embeddings).
        catalogue: item ids of the catalogue (novelty), or None.
        read_attributes: synthetic read-out, or None.
    """

    def __init__(self, reward, decode: Callable[[torch.Tensor], torch.Tensor],
                 item_images: Callable[[list[str]], torch.Tensor], embedder=None, *,
                 catalogue: list[str] | None = None, read_attributes=None):
        self.reward, self.decode, self.item_images = reward, decode, item_images
        self.embedder, self.catalogue, self.read_attributes = embedder, catalogue, read_attributes
        self._emb: dict[str, torch.Tensor] = {}
        self._cat: torch.Tensor | None = None

    def _embed_items(self, ids: list[str]) -> torch.Tensor:
        missing = [i for i in dict.fromkeys(ids) if i not in self._emb]
        if missing:
            e = self.embedder.embed(self.item_images(missing)).cpu()
            self._emb.update(zip(missing, e))
        dim = self.embedder.dim
        return torch.stack([self._emb[i] for i in ids]) if ids else torch.zeros(0, dim)

    def __call__(self, batch: PromptBatch, tokens: torch.Tensor, group_size: int
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (total float32 ``[B*G]``, {component: float32 ``[B*G]``}) on CPU."""
        from pgen_engine.rewards import RewardContext

        B = len(batch.prompts)
        images = self.decode(tokens)
        user_index = torch.arange(B).repeat_interleave(group_size)
        needs = self.embedder is not None
        dim = self.embedder.dim if needs else 1
        hist = [self._embed_items(h) if needs else torch.zeros(0, dim) for h in batch.history]
        fut = [self._embed_items(f) if needs else torch.zeros(0, dim) for f in batch.future]
        cat = None
        if needs and self.catalogue is not None:
            if self._cat is None:
                self._cat = self._embed_items(self.catalogue)
            cat = self._cat
        tgt = None
        if batch.target_attributes is not None:
            tgt = batch.target_attributes.repeat_interleave(group_size, dim=0)
        ctx = RewardContext(user_index=user_index, group_index=user_index.clone(), history_embeds=hist,
                            future_embeds=fut, catalogue_embeds=cat, target_attributes=tgt,
                            read_attributes=self.read_attributes)
        total, comps = self.reward(images, ctx)
        return total.float().cpu(), {k: v.float().cpu() for k, v in comps.items()}


# ----------------------------------------------------------------------------- trainer
class RLTrainer:
    """The RL loop over one policy (DeepSpeed engine or :class:`TorchOptimizerEngine`).

    Args:
        engine: has ``module``, ``backward(loss)``, ``step()``, ``optimizer``, ``get_lr()``. When
            ``engine.module`` is an :class:`~pgen_engine.training.sft.ObjectiveModule` (the
            DeepSpeed runs), every policy forward goes through ``engine(fn, ...)`` so ZeRO-3
            gathers what the objective touches; otherwise ``engine.module`` is the JanusModel.
        rl: the :class:`RLConfig`.
        reward_env: scores rollouts.
        reference: frozen reference policy, or None (beta must be 0).
        micro_batch_size: sequences per forward/backward.
        minibatch_size: sequences per optimizer step on this rank (= micro x grad_accum).
        world_size: ranks (PPO whitening all-reduces statistics).
        ledger: memory ledger (one is created when None).
        zero3_engine: the DeepSpeed engine to pass to the hybrid engine (None = plain module).
    """

    def __init__(self, engine, rl: RLConfig, reward_env: RewardEnv, reference: ReferencePolicy | None, *,
                 micro_batch_size: int, minibatch_size: int, world_size: int = 1,
                 ledger: MemoryLedger | None = None, zero3_engine=None, pad_id: int = 0):
        if rl.beta > 0 and reference is None:
            raise ValueError("RLTrainer: rl.beta > 0 needs a reference policy")
        if minibatch_size % micro_batch_size:
            raise ValueError(f"RLTrainer: minibatch {minibatch_size} not a multiple of micro-batch {micro_batch_size}")
        from .sft import ObjectiveModule

        self.engine, self.rl, self.reward_env, self.reference = engine, rl, reward_env, reference
        self.micro, self.minibatch, self.world_size = micro_batch_size, minibatch_size, world_size
        wrapped = isinstance(engine.module, ObjectiveModule)
        self.module = engine.module.model if wrapped else engine.module
        self._wrapped = wrapped
        self.ledger = ledger or MemoryLedger(self.module.device, scan_every=rl.ledger_scan_every)
        self.hybrid = HybridEngine(self.module, zero3_engine, max_batch_size=rl.rollout_batch_size,
                                   offload_optimizer_states=rl.offload_optimizer_states, ledger=self.ledger)
        self.pad_id = pad_id

    # -- pieces (public so tests and benchmarks can time/verify them) -------------
    def policy_forward(self, fn: Callable[..., Any], *args) -> Any:
        """``fn(policy_model, *args)``, through the DeepSpeed engine's forward when there is one."""
        return self.engine(fn, *args) if self._wrapped else fn(self.module, *args)

    def _forward_for(self, model) -> Callable[..., Any]:
        if model is self.module:
            return self.policy_forward
        if self.reference is not None and model is self.reference.module:
            return self.reference.forward
        return lambda fn, *args: fn(model, *args)

    @torch.no_grad()
    def score_logprobs(self, model, seqs, tokens: torch.Tensor) -> torch.Tensor:
        """No-grad training-numerics log-probs ``[N,T]`` of ``tokens`` under ``model``, in micro-batches.

        ``model`` is the policy (``self.module``), the reference (``self.reference.module``) or
        any plain JanusModel; the first two run through their engines (ZeRO-3 gathering).
        """
        forward = self._forward_for(model)
        was = model.training
        model.eval()
        dev = model.device
        out = []
        try:
            for lo in range(0, tokens.shape[0], self.micro):
                sl = slice(lo, lo + self.micro)
                lp, _ = forward(policy_logprobs, seqs[0][sl].to(dev), seqs[1][sl].to(dev), seqs[2][sl].to(dev),
                                tokens[sl].to(dev), self.rl.temperature, *_history_args(seqs, sl, dev))
                out.append(lp.cpu())
        finally:
            model.train(was)
        return torch.cat(out)

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """GRPO group-normalised or PPO batch-whitened (over all ranks) advantages ``[N]``."""
        if self.rl.algorithm == "grpo":
            return grpo.group_advantages(rewards, self.rl.group_size, scale_by_std=self.rl.scale_adv_by_std)
        if self.world_size > 1:
            import torch.distributed as dist

            s = torch.tensor([rewards.sum(), (rewards ** 2).sum(), rewards.numel()], dtype=torch.float64)
            dist.all_reduce(s)
            mean = s[0] / s[2]
            std = (s[1] / s[2] - mean ** 2).clamp(min=0).sqrt()
            return ((rewards.double() - mean) / (std + 1e-6)).float()
        return grpo.batch_advantages(rewards)

    def update(self, seqs, tokens, old_lp, ref_lp, adv) -> dict[str, float]:
        """``rl.ppo_epochs`` passes of minibatch updates; -> mean loss statistics."""
        rl, m = self.rl, self.module
        dev = m.device
        N = tokens.shape[0]
        if N % self.minibatch:
            raise ValueError(f"RL update: {N} sequences on this rank are not a multiple of the minibatch "
                             f"{self.minibatch} (train.global_batch_size / world size)")
        mask = torch.ones(tokens.shape, dtype=torch.bool)
        sums: dict[str, float] = {}
        count = 0
        m.train()
        act_bytes = 0
        params = [p for p in m.parameters()]
        for _ in range(rl.ppo_epochs):
            for lo in range(0, N, self.micro):
                sl = slice(lo, lo + self.micro)
                with SavedTensorMeter(exclude=params) as meter:
                    lp, ent = self.policy_forward(policy_logprobs, seqs[0][sl].to(dev), seqs[1][sl].to(dev),
                                                  seqs[2][sl].to(dev), tokens[sl].to(dev), rl.temperature,
                                                  *_history_args(seqs, sl, dev))
                    loss, st = grpo.policy_loss(
                        lp, old_lp[sl].to(dev), adv[sl].to(dev), mask[sl].to(dev),
                        ref_logp=None if ref_lp is None else ref_lp[sl].to(dev), beta=rl.beta,
                        clip_eps=rl.clip_eps, clip_eps_high=rl.clip_eps_high, aggregation=rl.aggregation)
                act_bytes = max(act_bytes, meter.bytes)
                value = float(loss.detach())
                # collective check: every rank must stop together, before backward's collectives
                if not all_ranks_true(math.isfinite(value)):
                    raise NonFiniteError(f"RL update: loss is not finite ({value}) — stopping without a checkpoint")
                self.engine.backward(loss)
                self.engine.step()
                st = {k: float(v) for k, v in st.items()}
                st["loss"] = value
                st["entropy"] = float(ent.detach().mean())
                for k, v in st.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        self.ledger.record("update", "activations", act_bytes)
        self.ledger.record("update", "optimizer_states", optimizer_state_bytes(self.engine.optimizer))
        return {k: v / count for k, v in sums.items()}

    @torch.no_grad()
    def evaluate(self, batch: PromptBatch) -> dict[str, float]:
        """Mean rollout reward of the current policy on ``batch`` (no update), averaged over ranks.

        Returns ``{"eval/reward": mean total, "eval/reward/<component>": mean}``; the
        samples use the run's sampling settings and the batch's own seeds.
        """
        ro = self.hybrid.rollout(batch.prompts, batch.code_masks, self.rl.sampling, batch.seeds,
                                 pixel_values=batch.pixel_values)
        total, comps = self.reward_env(batch, ro.tokens.cpu(), self.rl.group_size)
        row = {"eval/reward": float(total.mean())}
        row.update({f"eval/reward/{k}": float(v.mean()) for k, v in comps.items()})
        return reduce_row(row, self.world_size)

    # -- one step -----------------------------------------------------------------
    def step(self, step: int, batch: PromptBatch) -> dict[str, Any]:
        """Run one RL step on ``batch``; returns this rank's metrics row (not reduced)."""
        rl, led = self.rl, self.ledger
        led.begin_step()
        G = rl.group_size
        times = {}
        t0 = time.perf_counter()
        with led.phase("rollout"):
            ro = self.hybrid.rollout(batch.prompts, batch.code_masks, rl.sampling, batch.seeds,
                                     pixel_values=batch.pixel_values)
        tokens = ro.tokens.cpu()
        rollout_lp = ro.logprobs.detach().cpu().clone()
        del ro
        times["time/rollout_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with led.phase("reward"):
            total, comps = self.reward_env(batch, tokens, G)
        times["time/reward_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with led.phase("logprobs"):
            seqs = build_sequences(batch.prompts, batch.code_masks, tokens, G, self.pad_id) \
                + (row_pixels(batch.pixel_values, G), row_pixels(batch.image_features, G))
            old_lp = self.score_logprobs(self.module, seqs, tokens)
            ref_lp = None
            if self.reference is not None:
                ref_lp = self.score_logprobs(self.reference.module, seqs, tokens)
                led.record("logprobs", "reference_weights", self.reference.nbytes())
            gap_max, gap_mean = grpo.logprob_gap(rollout_lp, old_lp)
            adv = self.advantages(total)
        times["time/logprobs_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with led.phase("update"):
            st = self.update(seqs, tokens, old_lp, ref_lp, adv)
        times["time/update_s"] = time.perf_counter() - t0
        if ref_lp is None:
            st["kl"] = 0.0
        row: dict[str, Any] = {"step": step, "reward": float(total.mean()), "reward_std": float(total.std())
                               if total.numel() > 1 else 0.0}
        from pgen_engine.rewards import reward_stats

        stats = reward_stats(comps)
        for name in comps:
            row[f"reward/{name}"] = stats[f"reward/{name}/mean"]
        row.update({k: v for k, v in stats.items() if not k.endswith("/mean")})
        row.update(st)
        row["logprob_gap_max"], row["logprob_gap_mean"] = gap_max, gap_mean
        lr = self.engine.get_lr() if hasattr(self.engine, "get_lr") else None
        if lr:
            row["lr"] = float(lr[0])
        row.update(times)
        row.update(led.metrics())
        return row


def reduce_row(row: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Average numeric metrics over ranks (max for ``*_max`` and memory peaks)."""
    if world_size == 1:
        return row
    import torch.distributed as dist

    keys = sorted(k for k, v in row.items() if isinstance(v, (int, float)) and k != "step")
    vals = torch.tensor([float(row[k]) for k in keys], dtype=torch.float64)
    mx = vals.clone()
    dist.all_reduce(vals)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    out = dict(row)
    for i, k in enumerate(keys):
        out[k] = float(mx[i]) if (k.endswith("_max") or k.startswith("mem/")) else float(vals[i]) / world_size
    return out


# ----------------------------------------------------------------------------- data wiring for runs
class RLPromptSource:
    """Deterministic per-step prompt batches from the training windows.

    Step ``s`` draws ``prompts_per_step`` examples with a generator seeded by ``(seed, s)``
    (so resumed / multi-rank runs agree), rank ``r`` takes every ``world``-th of them.
    """

    def __init__(self, examples, splits, cache, builder, *, titles=None, ground_truth=None,
                 future_horizon: int | None = None, seed: int = 0, image_loader=None, vision_features=None):
        if not examples:
            raise ValueError("RLPromptSource: no training examples")
        if builder.mode == "pixels" and image_loader is None:
            raise ValueError("RLPromptSource: pixels history mode needs an image_loader (item id -> uint8 image)")
        self.image_loader, self.vision_features = image_loader, vision_features
        self.examples, self.splits, self.cache, self.builder = list(examples), splits, cache, builder
        self.titles, self.gt, self.horizon, self.seed = titles or {}, ground_truth, future_horizon, seed

    def _target_attributes(self, ex) -> list[int]:
        from pgen_engine.data.synth import attributes_to_codes

        steps = self.gt.get(ex.user_id)
        if not steps or ex.position >= len(steps):
            raise ValueError(f"ground truth has no step {ex.position} for user {ex.user_id}")
        return list(attributes_to_codes(steps[ex.position]["preferred"]))

    def batch(self, step: int, prompts_per_step: int, rank: int = 0, world: int = 1) -> PromptBatch:
        """This rank's share of step ``step``'s prompts (drawn with replacement)."""
        if prompts_per_step % world:
            raise ValueError(f"rl.prompts_per_step={prompts_per_step} is not divisible by world size {world}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.randint(0, len(self.examples), (prompts_per_step,), generator=g).tolist()[rank::world]
        return self._make(idx, step)

    def fixed_batch(self, n: int, rank: int = 0, world: int = 1) -> PromptBatch:
        """The same ``n`` distinct prompts (and sampling seeds) on every call: this rank's share.

        Used for before/after evaluation; ``n`` is capped at the number of examples and
        rounded down to a multiple of ``world``.
        """
        n = min(n, len(self.examples)) // world * world
        if n < 1:
            raise ValueError(f"fixed_batch: need >= {world} examples for {world} ranks, have {len(self.examples)}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 - 1)
        idx = torch.randperm(len(self.examples), generator=g)[:n].tolist()[rank::world]
        return self._make(idx, -1)

    def _make(self, idx: list[int], step: int) -> PromptBatch:
        from pgen_engine.data.prompts import normalize_pixels
        from pgen_engine.ops.rng import mix_seed

        prompts, masks, hist, fut, attrs, pix, feats = [], [], [], [], [], [], []
        for i in idx:
            ex = self.examples[i]
            titles = [self.titles.get(h, "") for h in ex.history] if self.builder.with_titles else None
            if self.builder.mode == "pixels":
                # the same prompt and pixels SFT trained on (SFTDataset.__getitem__)
                p = self.builder.build(titles=titles, num_history=len(ex.history))
                pix.append(normalize_pixels(torch.from_numpy(np.stack([self.image_loader(h) for h in ex.history]))))
                if self.vision_features is not None:
                    feats.append(self.vision_features(list(ex.history)))
            else:
                p = self.builder.build(self.cache.codes(list(ex.history)), titles)
            prompts.append(p.input_ids.tolist())
            masks.append(p.gen_code_mask.tolist())
            hist.append(list(ex.history))
            fut.append(self.splits.future_items(ex, self.horizon))
            if self.gt is not None:
                attrs.append(self._target_attributes(ex))
        seeds = mix_seed(torch.tensor(self.seed, dtype=torch.long),
                         torch.tensor([step * 1_000_003 + i for i in idx], dtype=torch.long)).tolist()
        return PromptBatch(prompts, masks, seeds, hist, fut,
                           torch.tensor(attrs, dtype=torch.long) if self.gt is not None else None,
                           pix if self.builder.mode == "pixels" else None, feats or None)


def build_reward_env(rl: RLConfig, tokenizer, cache, dataset_dir: str | Path, item_ids: list[str],
                     decode_with: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[RewardEnv, Any]:
    """The reward environment of a run; -> (RewardEnv, ground truth or None).

    Images live in the data tokenizer's space: generated codes and every item's cached
    codes are decoded by the same decoder, so rewards compare like with like.
    """
    from pgen_engine.rewards import CompositeReward, make_embedder

    try:
        embedder = make_embedder(rl.embedder)
    except (ValueError, TypeError, OSError) as e:
        raise RLConfigError(f"rl.embedder: {e}") from None
    try:
        reward = CompositeReward.from_config(rl.rewards, embedder)
    except (ValueError, TypeError) as e:
        raise RLConfigError(f"rl.rewards: {e}") from None
    decode = decode_with or tokenizer.decode
    gt = read_attrs = None
    if "attribute_match" in rl.rewards:
        from pgen_engine.data.synth import load_ground_truth, read_attributes

        try:
            gt = load_ground_truth(dataset_dir)
        except FileNotFoundError as e:
            raise RLConfigError(f"rl.rewards.attribute_match needs a synthetic dataset: {e}") from None
        read_attrs = read_attributes
    needs_cat = "novelty" in rl.rewards
    env = RewardEnv(reward, decode, lambda ids: decode(cache.codes(ids)),
                    embedder if reward.needs_embeddings else None,
                    catalogue=item_ids if needs_cat else None, read_attributes=read_attrs)
    return env, gt


# ----------------------------------------------------------------------------- stage entry point
def updates_per_step(cfg) -> int:
    """Optimizer steps one RL step makes: ``ppo_epochs * prompts_per_step * group_size / global_batch``.

    Raises ConfigError when the rollout is not a whole number of optimizer batches.
    """
    rl, t = cfg.stage_config, cfg.train
    n = rl.prompts_per_step * rl.group_size
    if n % t.global_batch_size:
        raise RLConfigError(f"rl.prompts_per_step={rl.prompts_per_step} x rl.group_size={rl.group_size} = {n} "
                            f"sequences per step is not a multiple of train.global_batch_size={t.global_batch_size}")
    return rl.ppo_epochs * (n // t.global_batch_size)


def _check_world(cfg, world_size: int) -> None:
    rl = cfg.stage_config
    if rl.prompts_per_step % world_size:
        raise RLConfigError(f"rl.prompts_per_step={rl.prompts_per_step} is not divisible by the {world_size} ranks")
    cfg.train.grad_accum_steps(world_size)  # raises ConfigError on impossible batch arithmetic


def _schedule_cfg(cfg, k: int):
    """``cfg`` with the LR schedule counted in optimizer steps (``k`` per RL step)."""
    t = cfg.train
    return dataclasses.replace(cfg, train=dataclasses.replace(t, max_steps=t.max_steps * k,
                                                              warmup_steps=t.warmup_steps * k))


def sft_tokenizer_path(checkpoint: str | Path) -> Path | None:
    """The image-tokenizer file of the SFT run that exported ``checkpoint`` (``<run>/final``), if known.

    Reads ``<checkpoint>/../config.resolved.yaml``; None when there is none (a checkpoint not
    made by this engine) or its tokenizer is not ``patch_kmeans``.
    """
    import yaml

    resolved = Path(checkpoint).parent / "config.resolved.yaml"
    if not resolved.is_file():
        return None
    tree = yaml.safe_load(resolved.read_text()) or {}
    data = tree.get("data") or {}
    if data.get("tokenizer", "patch_kmeans") != "patch_kmeans":
        return None
    work = data.get("work_dir") or str(Path(tree.get("output_dir", Path(checkpoint).parent)) / "data_work")
    return Path(work) / "tokenizer.safetensors"


def check_tokenizer_matches_checkpoint(cfg, tokenizer) -> None:
    """Fail when the RL run's image tokenizer is not the one its SFT checkpoint was trained with.

    A different PatchKMeans fit gives the same geometry but different codes, which would
    silently make the SFT policy's images meaningless; the run must reuse the SFT run's
    ``data.work_dir`` (and data settings).
    """
    from .sft_data import DataPrepError

    if cfg.model.checkpoint is None:
        return
    path = sft_tokenizer_path(cfg.model.checkpoint)
    if path is None or not path.is_file():
        return
    from pgen_engine.models.patch_kmeans import PatchKMeansTokenizer

    theirs = PatchKMeansTokenizer.load(path).fingerprint()
    if theirs != tokenizer.fingerprint():
        from .sft_data import work_dir

        raise DataPrepError(f"model.checkpoint={cfg.model.checkpoint}: trained with the image tokenizer {path}, "
                            f"but this run's data.work_dir={work_dir(cfg)} holds a different one; set data.* "
                            "(work_dir, codebook_size, ...) as in the SFT run")


def run(cfg, resume: str | None = None) -> dict[str, Any]:
    """Train ``cfg`` (stage rl) for ``train.max_steps`` RL steps; returns the summary (rank 0's view).

    Starts from ``model.checkpoint`` (an SFT run's ``final/``; null = a fresh tiny model,
    only useful for smoke tests) and reuses that run's data settings (dataset, tokenizer
    and token cache under ``data.work_dir``). Writes ``output_dir/{config.resolved.yaml,
    metrics.jsonl, checkpoints/, final/, summary.json}``; ``summary["final"]`` is the
    exported Hugging Face checkpoint, ``summary["eval_before"/"eval_after"]`` the held-out
    rewards when ``rl.eval_prompts`` > 0.

    Raises:
        NonFiniteError: loss or gradient norm not finite.
        DataPrepError, ConfigError, ResumeError: bad inputs, with one-line messages.
    """
    from pgen_engine.config import build_deepspeed_config, dump_config, resolve_precision
    from pgen_engine.data.dataset import load_dataset
    from pgen_engine.io_utils import atomic_write_json, atomic_write_text

    from .checkpoints import CHECKPOINTS, export_hf, load_resumable, save_resumable
    from .distributed import init_distributed
    from .engine import build_engine
    from .metrics import MetricsLogger
    from .sft import ObjectiveModule, register_zero3_external_params, resolve_resume
    from .sft_data import prepare_sft_data

    rl: RLConfig = cfg.stage_config
    if not isinstance(rl, RLConfig):
        raise RLConfigError("stage rl needs its rl: section (RLConfig)")
    k = updates_per_step(cfg)
    dist = init_distributed()
    _check_world(cfg, dist.world_size)
    if rl.offload_optimizer_states and (dist.device.type != "cuda" or cfg.deepspeed.zero_stage != 3
                                        or cfg.deepspeed.offload_optimizer):
        raise RLConfigError("rl.offload_optimizer_states=true needs a CUDA device, deepspeed.zero_stage=3 and "
                            "deepspeed.offload_optimizer=false (DeepSpeed offload_states moves FusedAdam states)")
    out = Path(cfg.output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.resolved.yaml", dump_config(cfg))
    torch.manual_seed(cfg.seed + dist.rank)
    data = prepare_sft_data(cfg, dist)
    check_tokenizer_matches_checkpoint(cfg, data.tokenizer)

    # the reference is loaded before the policy is wrapped, so ZeRO-3 never holds two full copies at once
    precision = resolve_precision(cfg.deepspeed, dist.device.type)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    sched_cfg = _schedule_cfg(cfg, k)
    reference = None
    if rl.reference != "none":
        reference = ReferencePolicy.from_checkpoint(
            data.model_dir, rl.reference, dtype=dtype, device=dist.device,
            ds_config=build_deepspeed_config(sched_cfg, dist.world_size, dist.device.type))
    te = build_engine(sched_cfg, data.model_dir, dist, wrap=ObjectiveModule)
    engine = te.engine
    zero3 = engine.zero_optimization_stage() == 3
    if zero3:
        register_zero3_external_params(engine.module)
    model = engine.module.model

    ckpt = resolve_resume(resume, out)
    start_step, client = 0, {}
    if ckpt is not None:
        client = load_resumable(engine, ckpt, dist)
        start_step = int(client["step"])

    ds = data.dataset  # SFTDataset: its cache / prompt builder / titles are what SFT trained on
    dataset = load_dataset(cfg.data.dataset_dir, check_images=False)
    reward_env, gt = build_reward_env(rl, data.tokenizer, ds.cache, cfg.data.dataset_dir, list(dataset.items))
    source = RLPromptSource(data.splits.train, data.splits, ds.cache, ds.builder, titles=ds.titles,
                            ground_truth=gt, future_horizon=rl.future_horizon, seed=cfg.seed,
                            image_loader=ds.image_loader, vision_features=ds.vision_features)
    eval_batch = None
    if rl.eval_prompts:
        held_out = data.splits.valid or data.splits.train
        eval_batch = RLPromptSource(held_out, data.splits, ds.cache, ds.builder, titles=ds.titles, ground_truth=gt,
                                    seed=cfg.seed, image_loader=ds.image_loader,
                                    vision_features=ds.vision_features).fixed_batch(rl.eval_prompts, dist.rank, dist.world_size)
    t = cfg.train
    trainer = RLTrainer(engine, rl, reward_env, reference, micro_batch_size=t.micro_batch_size,
                        minibatch_size=t.global_batch_size // dist.world_size, world_size=dist.world_size,
                        zero3_engine=engine if zero3 else None, pad_id=data.special.pad)
    logger = MetricsLogger(out, is_main=dist.is_main, total_steps=t.max_steps, start_step=start_step,
                           progress=cfg.logging.progress, tensorboard=cfg.logging.tensorboard)
    ckpt_root = out / CHECKPOINTS
    last_saved: Path | None = ckpt
    eval_before = client.get("eval_before")
    eval_after = None
    row: dict[str, Any] = {}
    try:
        if eval_batch is not None and start_step == 0:
            eval_before = trainer.evaluate(eval_batch)
            logger.log({"step": 0, **eval_before})
        for step in range(start_step, t.max_steps):
            done = step + 1
            batch = source.batch(step, rl.prompts_per_step, dist.rank, dist.world_size)
            row = reduce_row(trainer.step(done, batch), dist.world_size)
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
                if not math.isfinite(row["grad_norm"]):
                    raise NonFiniteError(f"step {done}: gradient norm is not finite ({grad_norm}) — stopping; "
                                         f"last good checkpoint: {last_saved or 'none'} (left untouched)")
            if eval_batch is not None and (done == t.max_steps or (rl.eval_every and done % rl.eval_every == 0)):
                ev = trainer.evaluate(eval_batch)
                row.update(ev)
                if done == t.max_steps:
                    eval_after = ev
            if done % t.log_every == 0 or done == t.max_steps or "eval/reward" in row:
                logger.log(row)
            logger.advance()
            if t.save_every and done % t.save_every == 0 and done < t.max_steps:
                last_saved = save_resumable(engine, ckpt_root, done, {"eval_before": eval_before}, dist,
                                            keep=t.keep_checkpoints, extra_meta={"stage": "rl"})
        if start_step < t.max_steps or last_saved is None:
            last_saved = save_resumable(engine, ckpt_root, t.max_steps, {"eval_before": eval_before}, dist,
                                        keep=t.keep_checkpoints, extra_meta={"stage": "rl"})
        export_hf(model, out / "final", dist)
    finally:
        logger.close()
    summary = {"stage": "rl", "steps": t.max_steps, "resumed_from": start_step, "world_size": dist.world_size,
               "algorithm": rl.algorithm, "optimizer_steps_per_rl_step": k, "grad_accum": te.grad_accum,
               "precision": te.precision, "trainable_params": te.trainable_params,
               "final_reward": row.get("reward"), "final_kl": row.get("kl"),
               "eval_before": eval_before, "eval_after": eval_after,
               "init_checkpoint": str(data.model_dir), "checkpoint": str(last_saved), "final": str(out / "final")}
    if dist.is_main:
        atomic_write_json(out / "summary.json", summary)
    return summary
