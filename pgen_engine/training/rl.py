"""Online RL stage (``stage: rl``): GRPO / critic-free PPO on generated images.

One RL step (all ranks in lock-step; ``rl.prompts_per_step`` prompts are split over ranks):

1. **rollout** — :class:`HybridEngine` gathers the ZeRO-3 policy once and samples
   ``rl.group_size`` images per prompt through the KV-cached Generator (CFG, prefix
   sharing), returning tokens and their rollout log-probs; the KV cache is freed.
2. **reward** — codes -> images (the data tokenizer's decoder, i.e. the model's image
   space), then :class:`pgen_engine.rewards.CompositeReward` against each user's history /
   train-split future items / the catalogue / (synthetic) ground-truth attributes.
3. **logprobs** — old and reference log-probs with the *training* numerics at the sampling
   temperature, of the distribution ``rl.policy_distribution`` names (:mod:`.grpo`: the CFG mix,
   :func:`.sequences.guided_policy_logprobs`, or the conditional branch), and the
   rollout-vs-trainer gap (``logprob_gap_max/mean``).
4. **update** — ``rl.ppo_epochs`` passes over the rollout in minibatches of
   ``train.global_batch_size`` sequences (micro-batches of ``train.micro_batch_size``),
   loss :func:`pgen_engine.training.grpo.policy_loss`.

Advantages (:mod:`.advantages`): GRPO normalises within each prompt's group; PPO whitens over
the global batch (all-reduced), the batch mean being the critic-free baseline. Modules by role:
:mod:`.rollout` (generation), :mod:`.rl_env` (prompts and rewards), :mod:`.advantages`,
:mod:`.reference` (the frozen KL reference), and this module: the RL step (:class:`RLTrainer`)
and the stage (:class:`RLStage`) that the :class:`~pgen_engine.training.trainer.Trainer` runs.

``metrics.jsonl`` rows: ``step``, ``reward`` (mean total), ``reward_std``, ``reward/<component>`` (mean),
``reward/<component>/{std,min,max}`` (over all ranks' rows), ``kl``, ``pg_loss``, ``clip_frac``, ``entropy``,
``logprob_gap_{max,mean}``, ``lr``, the ledger's ``mem/...`` bytes, timings ``time/{rollout,reward,logprobs,update}_s``.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import torch

from pgen_engine.config import RLConfig, RLConfigError, RunConfig, TrainConfig
from pgen_engine.data.dataset import load_dataset
from pgen_engine.rewards import reward_stats

from . import grpo
from .advantages import compute_advantages
from .distributed import on_main
from .engine import ObjectiveModule, build_deepspeed_config, model_dtype
from .errors import stop_if_not_finite
from .history_features import RLHistoryFeatures, tower_trains
from .memory_ledger import MemoryLedger, SavedTensorMeter, optimizer_state_bytes
from .metrics import reduce_row
from .reference import ReferencePolicy
from .rl_env import (PromptBatch, RewardEnv, RLPromptSource, build_reward_env, check_tokenizer_matches_checkpoint,
                     ensure_reward_embedder, reward_embedder_spec, rl_prompt_windows)
from .rollout import HybridEngine, RolloutParams
from .sequences import (Sequences, build_sequences, guided_policy_logprobs, policy_logprobs, row_pixels,
                        uncond_prompts)
from .sft_data import work_dir, work_dir_lock
from .trainer import Stage, Trainer

__all__ = ["RLConfig", "RLConfigError", "PromptBatch", "Sequences", "build_sequences", "policy_logprobs", "run",
           "guided_policy_logprobs", "sampling_params", "TorchOptimizerEngine", "RLTrainer", "reduce_row", "RLStage",
           "updates_per_step"]


def sampling_params(rl: RLConfig) -> RolloutParams:
    """The rollout sampling settings of an ``rl:`` section: its :attr:`RLConfig.sampling` plus
    the group size and unconditional-prompt mode."""
    return RolloutParams(rl.group_size, rl.sampling, rl.uncond_mode, "guided" if rl.guided_ratio else "conditional")


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


# ----------------------------------------------------------------------------- trainer
def _stop_if_not_finite(value: float, what: str, step: int) -> None:
    stop_if_not_finite(value, what, step, "stopping without a checkpoint")


class RLTrainer:
    """The RL loop over one policy (DeepSpeed engine or :class:`TorchOptimizerEngine`).

    Args:
        engine: has ``module``, ``backward(loss)``, ``step()``, ``optimizer``, ``get_lr()``. When
            ``engine.module`` is an :class:`~pgen_engine.training.engine.ObjectiveModule` (the
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
        pad_id: padding id of the teacher-forcing sequences.
        check_finite: ``(value, what, step)`` -> raises when the loss is not finite on any
            rank (the Trainer's guard, which names the last good checkpoint; default: a
            collective check without checkpoint information).
    """

    def __init__(self, engine, rl: RLConfig, reward_env: RewardEnv, reference: ReferencePolicy | None, *,
                 micro_batch_size: int, minibatch_size: int, world_size: int = 1,
                 ledger: MemoryLedger | None = None, zero3_engine=None, pad_id: int = 0,
                 check_finite: Callable[[float, str, int], None] | None = None):
        if rl.beta > 0 and reference is None:
            raise ValueError("RLTrainer: rl.beta > 0 needs a reference policy")
        if minibatch_size % micro_batch_size:
            raise ValueError(f"RLTrainer: minibatch {minibatch_size} not a multiple of micro-batch {micro_batch_size}")
        self.engine, self.rl, self.reward_env, self.reference = engine, rl, reward_env, reference
        self.micro, self.minibatch, self.world_size = micro_batch_size, minibatch_size, world_size
        wrapped = isinstance(engine.module, ObjectiveModule)
        self.module = engine.module.model if wrapped else engine.module
        self._wrapped = wrapped
        self.ledger = ledger or MemoryLedger(self.module.device, scan_every=rl.ledger_scan_every)
        self.hybrid = HybridEngine(self.module, zero3_engine, max_batch_size=rl.rollout_batch_size,
                                   offload_optimizer_states=rl.offload_optimizer_states, ledger=self.ledger)
        self.pad_id = pad_id
        self.check_finite = check_finite or _stop_if_not_finite
        ref = reference
        self.history_features = RLHistoryFeatures(
            self.module, self.policy_forward, reference_module=None if ref is None else ref.module,
            reference_forward=None if ref is None else ref.forward)

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

    def _logprobs(self, forward, seqs: Sequences, useqs: Sequences | None, sl: slice, dev, tokens: torch.Tensor,
                  hist) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, entropies) ``[n, T]`` of rows ``sl`` through ``forward``: guided when
        ``useqs`` (the unconditional-prompt sequences) is given, else conditional."""
        if useqs is None:
            return forward(policy_logprobs, *seqs.rows(sl, dev), tokens, self.rl.temperature, *hist)
        return forward(guided_policy_logprobs, *seqs.rows(sl, dev), *useqs.rows(sl, dev), tokens,
                       self.rl.temperature, self.rl.guidance_scale, *hist)

    def uncond_sequences(self, batch: PromptBatch, tokens: torch.Tensor) -> Sequences | None:
        """Teacher-forcing rows of ``tokens`` behind each prompt's unconditional prompt (the one
        the rollout used, ``rl.uncond_mode``), or None when the ratio is conditional."""
        if not self.rl.guided_ratio:
            return None
        ups = uncond_prompts(batch.prompts, batch.code_masks, self.module.special_tokens, self.rl.uncond_mode)
        return build_sequences(ups, None, tokens, self.rl.group_size, self.pad_id)

    @torch.no_grad()
    def score_logprobs(self, model, seqs, tokens: torch.Tensor, useqs: Sequences | None = None) -> torch.Tensor:
        """No-grad training-numerics log-probs ``[N,T]`` of ``tokens`` under ``model``, in micro-batches.

        ``model`` is the policy (``self.module``), the reference (``self.reference.module``) or
        any plain JanusModel; the first two run through their engines (ZeRO-3 gathering).
        ``useqs``: :meth:`uncond_sequences` (guided distribution) or None (conditional).
        """
        forward = self._forward_for(model)
        was = model.training
        model.eval()
        dev = model.device
        out = []
        try:
            for lo in range(0, tokens.shape[0], self.micro):
                sl = slice(lo, lo + self.micro)
                lp, _ = self._logprobs(forward, seqs, useqs, sl, dev, tokens[sl].to(dev), seqs.history(sl, dev))
                out.append(lp.cpu())
        finally:
            model.train(was)
        return torch.cat(out)

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """GRPO group-normalised or PPO batch-whitened (over all ranks) advantages ``[N]``."""
        return compute_advantages(rewards, self.rl.algorithm, self.rl.group_size, scale_by_std=self.rl.scale_adv_by_std)

    def update(self, seqs: Sequences, tokens: torch.Tensor, old_lp: torch.Tensor, ref_lp: torch.Tensor | None,
               adv: torch.Tensor, step: int = 0, useqs: Sequences | None = None) -> dict[str, float]:
        """``rl.ppo_epochs`` passes of minibatch updates; -> mean loss statistics.

        Args:
            seqs: :func:`build_sequences` of the rollout; tokens: int64 ``[N, T]``;
            useqs: :meth:`uncond_sequences` (guided ratio: both forwards carry the gradient) or None;
            old_lp / ref_lp: float32 ``[N, T]`` (ref None without reference); adv: float32 ``[N]``;
            step: the 1-based RL step (for the non-finite message).
        """
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
        params = list(m.parameters())
        # a trainable tower needs gradients: each distinct item of a micro-batch is encoded once
        # with grad (not seqs' no-grad features); a frozen tower's features are read as they are
        grad_tower = tower_trains(m)
        try:
            for _ in range(rl.ppo_epochs):
                for lo in range(0, N, self.micro):
                    sl = slice(lo, lo + self.micro)
                    hist = seqs.tower_history(sl, dev) if grad_tower else seqs.history(sl, dev)
                    with SavedTensorMeter(exclude=params) as meter:
                        lp, ent = self._logprobs(self.policy_forward, seqs, useqs, sl, dev, tokens[sl].to(dev),
                                                 hist)
                        loss, st = grpo.policy_loss(
                            lp, old_lp[sl].to(dev), adv[sl].to(dev), mask[sl].to(dev),
                            ref_logp=None if ref_lp is None else ref_lp[sl].to(dev), beta=rl.beta,
                            clip_eps=rl.clip_eps, clip_eps_high=rl.clip_eps_high, aggregation=rl.aggregation)
                    act_bytes = max(act_bytes, meter.bytes)
                    value = float(loss.detach())
                    # collective check: every rank must stop together, before backward's collectives
                    self.check_finite(value, "loss", step)
                    self.engine.backward(loss)
                    self.engine.step()
                    st = {k: float(v) for k, v in st.items()}
                    st["loss"] = value
                    st["entropy"] = float(ent.detach().mean())
                    for k, v in st.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
        finally:
            self.history_features.weights_changed()  # cached tower outputs are stale from here on
        self.ledger.record("update", "activations", act_bytes)
        self.ledger.record("update", "optimizer_states", optimizer_state_bytes(self.engine.optimizer))
        return {k: v / count for k, v in sums.items()}

    @torch.no_grad()
    def evaluate(self, batch: PromptBatch) -> dict[str, float]:
        """Mean rollout reward of the current policy on ``batch`` (no update), averaged over ranks.

        Returns ``{"eval/reward": mean total, "eval/reward/<component>": mean}``; the
        samples use the run's sampling settings and the batch's own seeds.
        """
        ro = self._rollout(batch, self.history_features.for_policy(batch))
        total, comps = self.reward_env(batch, ro.tokens.cpu(), self.rl.group_size)
        row = {"eval/reward": float(total.mean())}
        row.update({f"eval/reward/{k}": float(v.mean()) for k, v in comps.items()})
        return reduce_row(row, self.world_size)

    def _rollout(self, batch: PromptBatch, features: list[torch.Tensor] | None):
        """The hybrid engine's rollout of ``batch``, from the tower outputs ``features`` when
        there are any (pixels history: the Generator then skips the vision tower)."""
        history = {"image_features": features} if features is not None else {"pixel_values": batch.pixel_values}
        return self.hybrid.rollout(batch.prompts, batch.code_masks, sampling_params(self.rl), batch.seeds, **history)

    # -- one step -----------------------------------------------------------------
    def step(self, step: int, batch: PromptBatch) -> dict[str, Any]:
        """Run one RL step on ``batch``; returns this rank's metrics row (not reduced)."""
        rl, led = self.rl, self.ledger
        led.begin_step()
        G = rl.group_size
        times = {}
        t0 = time.perf_counter()
        with led.phase("rollout"):
            # pixels history: each distinct item's tower output once (cached or encoded here),
            # shared by the rollout and the policy's log-prob pass (same weights)
            feats = self.history_features.for_policy(batch)
            ro = self._rollout(batch, feats)
        tokens, rollout_lp = ro.tokens.cpu(), ro.logprobs.detach().cpu().clone()
        del ro
        times["time/rollout_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with led.phase("reward"):
            total, comps = self.reward_env(batch, tokens, G)
        times["time/reward_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with led.phase("logprobs"):
            seqs = build_sequences(batch.prompts, batch.code_masks, tokens, G, self.pad_id, batch.pixel_values,
                                   feats, batch.history if batch.pixel_values is not None else None)
            useqs = self.uncond_sequences(batch, tokens)
            old_lp = self.score_logprobs(self.module, seqs, tokens, useqs)
            ref_lp = None
            if self.reference is not None:
                ref_feats = self.history_features.for_reference(batch, feats)
                ref_seqs = seqs if ref_feats is feats else dataclasses.replace(
                    seqs, image_features=row_pixels(ref_feats, G))
                ref_lp = self.score_logprobs(self.reference.module, ref_seqs, tokens, useqs)
                led.record("logprobs", "reference_weights", self.reference.nbytes())
            gap_max, gap_mean = grpo.logprob_gap(rollout_lp, old_lp)
            adv = self.advantages(total)
        times["time/logprobs_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with led.phase("update"):
            st = self.update(seqs, tokens, old_lp, ref_lp, adv, step, useqs)
        times["time/update_s"] = time.perf_counter() - t0
        st["kl"] = st["kl"] if ref_lp is not None else 0.0
        row: dict[str, Any] = {"step": step, "reward": float(total.mean()), "reward_std": float(total.std(unbiased=False))}
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


# ----------------------------------------------------------------------------- the stage
def updates_per_step(rl: RLConfig, train: TrainConfig) -> int:
    """Optimizer steps one RL step makes: ``ppo_epochs * prompts_per_step * group_size / global_batch``.

    Raises RLConfigError when the rollout is not a whole number of optimizer batches.
    """
    n = rl.prompts_per_step * rl.group_size
    if n % train.global_batch_size:
        raise RLConfigError(f"rl.prompts_per_step={rl.prompts_per_step} x rl.group_size={rl.group_size} = {n} "
                            f"sequences per step is not a multiple of train.global_batch_size={train.global_batch_size}")
    return rl.ppo_epochs * (n // train.global_batch_size)


class RLStage(Stage):
    """The RL stage: each ``train_step`` is one rollout + reward + log-probs + update round.

    The engine's LR schedule counts optimizer steps (``k = updates_per_step`` per RL step);
    the reference model is loaded before the policy is wrapped, so ZeRO-3 never holds two
    full copies at once. Client state: the held-out ``eval_before`` result.
    """

    name = "rl"
    checkpoint_meta = {"stage": "rl"}

    def __init__(self, cfg: RunConfig):
        if cfg.rl is None:
            raise RLConfigError("stage rl needs its rl: section (RLConfig)")
        self.cfg, self.rl = cfg, cfg.rl
        self.k = updates_per_step(cfg.rl, cfg.train)
        self.reference: ReferencePolicy | None = None
        self.eval_batch: PromptBatch | None = None
        self.eval_before: dict[str, float] | None = None
        self.eval_after: dict[str, float] | None = None
        self.row: dict[str, Any] = {}

    def check_world(self, cfg: RunConfig, dist) -> None:
        rl = self.rl
        if rl.prompts_per_step % dist.world_size:
            raise RLConfigError(f"rl.prompts_per_step={rl.prompts_per_step} is not divisible by the {dist.world_size} ranks")
        if 0 < rl.eval_prompts < dist.world_size:  # each rank scores >= 1 held-out prompt (else fixed_batch fails late)
            raise RLConfigError(f"rl.eval_prompts={rl.eval_prompts}: expected 0 (off) or >= the {dist.world_size} ranks")
        cfg.train.grad_accum_steps(dist.world_size)
        if rl.offload_optimizer_states and (dist.device.type != "cuda" or cfg.deepspeed.zero_stage != 3
                                            or cfg.deepspeed.offload_optimizer):
            raise RLConfigError("rl.offload_optimizer_states=true needs a CUDA device, deepspeed.zero_stage=3 and "
                                "deepspeed.offload_optimizer=false (DeepSpeed offload_states moves FusedAdam states)")

    def engine_train_config(self, cfg: RunConfig) -> TrainConfig:
        """``train`` with the LR schedule counted in optimizer steps (``k`` per RL step)."""
        t = cfg.train
        return dataclasses.replace(t, max_steps=t.max_steps * self.k, warmup_steps=t.warmup_steps * self.k)

    def offloads_states(self, cfg: RunConfig) -> bool:
        return self.rl.offload_optimizer_states

    def before_engine(self, trainer: Trainer) -> None:
        cfg, dist = self.cfg, trainer.dist
        check_tokenizer_matches_checkpoint(cfg, trainer.data.tokenizer)
        if self.rl.reference != "none":
            ds_config = build_deepspeed_config(self.engine_train_config(cfg), cfg.deepspeed, dist.world_size,
                                               dist.device.type, offload_states=self.rl.offload_optimizer_states)
            self.reference = ReferencePolicy.from_checkpoint(
                trainer.data.model_dir, self.rl.reference, dtype=model_dtype(cfg.deepspeed, dist.device),
                device=dist.device, ds_config=ds_config)

    def setup(self, trainer: Trainer, client: dict[str, Any]) -> None:
        cfg, rl, dist, data = self.cfg, self.rl, trainer.dist, trainer.data
        self.trainer, self.dist = trainer, dist
        self.eval_before = client.get("eval_before")
        ds = data.dataset  # SFTDataset: its cache / prompt builder / titles are what SFT trained on
        dataset = load_dataset(cfg.data.dataset_dir, check_images=False)
        # a learned reward embedder is trained once, by rank 0; the others reuse it, or stop with its error.
        # Under the work_dir lock (used as a decorator): runs sharing the work_dir fit it once.
        on_main(work_dir_lock(work_dir(cfg))(lambda: ensure_reward_embedder(
            reward_embedder_spec(rl, work_dir(cfg)), data.tokenizer.decode, ds.cache, list(dataset.items),
            data.splits.train_sequences, [it.extra for it in dataset.items.values()])), dist.is_main)
        reward_env, gt = build_reward_env(rl, data.tokenizer, ds.cache, cfg.data.dataset_dir, list(dataset.items),
                                          work=work_dir(cfg))
        windows = rl_prompt_windows(rl.prompt_windows, data.splits.train, dataset, cfg.data, log=dist.rank == 0)
        self.source = RLPromptSource(windows, data.splits, ds.cache, ds.builder, titles=ds.titles, ground_truth=gt,
                                     future_horizon=rl.future_horizon, future_includes_target=rl.future_includes_target,
                                     seed=cfg.seed, image_loader=ds.image_loader, vision_features=ds.vision_features)
        if rl.eval_prompts:
            # held-out monitor: valid examples scored against their own (valid) target; with no
            # valid split, train windows with the training reward's future items
            held_out = data.splits.valid or data.splits.train
            self.eval_batch = RLPromptSource(held_out, data.splits, ds.cache, ds.builder, titles=ds.titles,
                                             ground_truth=gt, seed=cfg.seed, image_loader=ds.image_loader,
                                             vision_features=ds.vision_features,
                                             future_horizon=rl.future_horizon,
                                             future_includes_target=rl.future_includes_target,
                                             held_out_targets=bool(data.splits.valid)
                                             ).fixed_batch(rl.eval_prompts, dist.rank, dist.world_size)
        te = trainer.te
        self.policy = RLTrainer(te.engine, rl, reward_env, self.reference, micro_batch_size=te.micro_batch_size,
                                minibatch_size=cfg.train.global_batch_size // dist.world_size,
                                world_size=dist.world_size, zero3_engine=te.engine if te.zero3 else None,
                                pad_id=data.special.pad, check_finite=trainer.check_finite)

    def before_run(self, trainer: Trainer) -> None:
        if self.eval_batch is not None and trainer.start_step == 0:
            self.eval_before = self.policy.evaluate(self.eval_batch)
            trainer.logger.log({"step": 0, **self.eval_before})

    def train_step(self, step: int) -> dict[str, Any]:
        rl, dist, done = self.rl, self.dist, step + 1
        batch = self.source.batch(step, rl.prompts_per_step, dist.rank, dist.world_size)
        row = reduce_row(self.policy.step(done, batch), dist.world_size)
        last = done == self.cfg.train.max_steps
        if self.eval_batch is not None and (last or (rl.eval_every and done % rl.eval_every == 0)):
            ev = self.policy.evaluate(self.eval_batch)
            row.update(ev)
            if last:
                self.eval_after = ev
        self.row = row
        return row

    def client_state(self) -> dict[str, Any]:
        return {"eval_before": self.eval_before}

    def summary(self) -> dict[str, Any]:
        return {"algorithm": self.rl.algorithm, "optimizer_steps_per_rl_step": self.k,
                "final_reward": self.row.get("reward"), "final_kl": self.row.get("kl"),
                "eval_before": self.eval_before, "eval_after": self.eval_after,
                "init_checkpoint": str(self.trainer.data.model_dir)}


def run(cfg: RunConfig, resume: str | None = None) -> dict[str, Any]:
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
    return Trainer(cfg, RLStage(cfg)).run(resume)
