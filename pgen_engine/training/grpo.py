"""GRPO / critic-free PPO objective: pure functions on per-token log-probs.

Shapes used throughout: ``N`` sampled sequences (images), ``T`` image tokens each.
``mask`` (bool ``[N,T]``) marks the tokens that count; for fixed-length images it is all
True, but the functions never assume it.

Which distribution the ratio uses (``rl.policy_distribution``):

* ``"guided"`` (the default whenever ``guidance_scale != 1``): the distribution the rollout
  actually samples, ``softmax((u + s (c - u)) / T)`` with ``c`` / ``u`` the policy's logits on
  the conditional prompt and on the unconditional prompt the rollout used
  (:func:`guided_logprobs`). Both branches are forwards of the same policy, so the gradient
  reaches the weights through both. The ratio is then a true importance ratio of the
  sampling policy (1 before the first update of a rollout, to rounding), and the k3 KL
  compares the guided policy with the guided reference. Why not the conditional branch:
  with CFG the samples come from the guided mix, so ``exp(logp_c - logp_c_old)`` and the k3
  estimate on ``log_softmax(c / T)`` are evaluated at tokens the conditional distribution
  did not draw. Measured on the demo (seed-0 SFT, CFG 2 / T 0.7): k3 spiked to 4.3e6 on
  single steps, the training reward stayed flat and RL lowered attr_acc_future.
* ``"conditional"``: ``log_softmax(c / T)`` only (the LlamaGen-style choice: optimise the
  conditional branch, the CFG mix being a fixed transformation of it). On-policy only at
  ``guidance_scale == 1``; kept for configs that set it.

Either way ``logp_old`` is recomputed with the training numerics right after the rollout,
and compared with the rollout's own log-probs (``logprob_gap``) of the same distribution.

Objective per token (DeepSeekMath GRPO, PPO-clip):

    ratio  = exp(logp - logp_old)
    pg     = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    kl_k3  = exp(ref - logp) - (ref - logp) - 1          (Schulman's k3, >= 0, unbiased for KL(pi||ref))
    loss   = pg + beta * kl_k3

aggregated either per token (mean over all valid tokens of the batch) or per sequence
(mean over tokens of each sequence, then mean over sequences).
"""
from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["token", "sequence"]
AGGREGATIONS = ("token", "sequence")
ALGORITHMS = ("grpo", "ppo")
POLICY_DISTRIBUTIONS = ("guided", "conditional")


# Rollout-vs-trainer log-prob gap (``logprob_gap_max``) tolerances. The rollout's log-probs
# come from the Generator's logits in the model dtype; the trainer recomputes them with fp32
# accumulation. In fp32 both agree to rounding (tested <= 1e-5). In bf16 the logits carry 8
# mantissa bits (~0.4 % relative error each), so a token's log-prob differs by ~1e-2: measured
# up to 1.2e-2 per token on the tiny test model (tests/training/test_rollout.py). A gap above
# the tolerance points to a real mismatch (other weights, prompt or temperature), not rounding.
FP32_LOGPROB_GAP_TOL = 1e-5
BF16_LOGPROB_GAP_TOL = 5e-2


def guided_log_softmax(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: float,
                       temperature: float) -> torch.Tensor:
    """Log-probabilities of the CFG-guided distribution, ``log_softmax((u + s (c - u)) / T)``.

    Args:
        cond_logits: float ``[..., K]`` logits on the conditional prompt (``c``).
        uncond_logits: float ``[..., K]`` logits on the unconditional prompt (``u``), same shape.
        scale: guidance scale ``s`` (1 gives ``log_softmax(c / T)``).
        temperature: ``T`` > 0.
    Returns:
        float32 ``[..., K]``; differentiable in both logits. Written as the Generator's rollout
        writes it (``u + s * (c - u)``), so the two agree to fp32 rounding.
    """
    if cond_logits.shape != uncond_logits.shape:
        raise ValueError(f"guided_log_softmax: cond {tuple(cond_logits.shape)} and uncond "
                         f"{tuple(uncond_logits.shape)} logits differ in shape")
    if not temperature > 0:
        raise ValueError(f"guided_log_softmax: temperature={temperature} must be > 0")
    c, u = cond_logits.float(), uncond_logits.float()
    return torch.log_softmax((u + scale * (c - u)) / temperature, dim=-1)


def guided_logprobs(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, tokens: torch.Tensor, scale: float,
                    temperature: float) -> torch.Tensor:
    """Per-token log-prob of ``tokens`` under the guided distribution (see :func:`guided_log_softmax`).

    Args:
        cond_logits, uncond_logits: float ``[N, T, K]`` (teacher-forced logits of both prompts
            at the ``T`` positions predicting the image tokens).
        tokens: int64 ``[N, T]`` sampled codes in ``[0, K)``.
        scale, temperature: the rollout's guidance scale and sampling temperature.
    Returns:
        float32 ``[N, T]``.
    """
    if tokens.shape != cond_logits.shape[:-1]:
        raise ValueError(f"guided_logprobs: tokens {tuple(tokens.shape)} vs logits {tuple(cond_logits.shape)}")
    lsm = guided_log_softmax(cond_logits, uncond_logits, scale, temperature)
    return lsm.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0).

    Args: ``logp``, ``ref_logp``: float ``[...]`` log-probs of the sampled tokens under the
    policy and the frozen reference. Returns the same shape, float32.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(f"k3_kl: logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ in shape")
    d = ref_logp.float() - logp.float()
    return torch.exp(d) - d - 1.0


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *,
                        clip_eps: float = 0.2, clip_eps_high: float | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clip surrogate per token.

    Args:
        logp: float ``[N,T]`` current policy log-probs (carries the gradient).
        old_logp: float ``[N,T]`` log-probs of the policy that sampled (no gradient).
        advantages: float ``[N]`` (broadcast over tokens) or ``[N,T]``.
        clip_eps: lower clip ``1 - clip_eps``; also the upper one unless ``clip_eps_high``.
        clip_eps_high: upper clip ``1 + clip_eps_high`` ("clip-higher"); None = ``clip_eps``.
    Returns:
        (loss ``[N,T]`` = ``-min(r A, clip(r) A)``, ratio ``[N,T]``, clipped bool ``[N,T]``
        where the clipped branch was the active minimum and differs from the unclipped one).
    """
    if logp.shape != old_logp.shape or logp.ndim != 2:
        raise ValueError(f"clipped_policy_loss: logp {tuple(logp.shape)} and old_logp {tuple(old_logp.shape)} "
                         f"must both be [N,T]")
    if not clip_eps > 0 or (clip_eps_high is not None and not clip_eps_high > 0):
        raise ValueError(f"clipped_policy_loss: clip_eps={clip_eps}, clip_eps_high={clip_eps_high} must be > 0")
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    adv = advantages.float()
    if adv.ndim == 1:
        if adv.shape[0] != logp.shape[0]:
            raise ValueError(f"clipped_policy_loss: advantages [{adv.shape[0]}] vs logp rows {logp.shape[0]}")
        adv = adv[:, None]
    elif adv.shape != logp.shape:
        raise ValueError(f"clipped_policy_loss: advantages {tuple(adv.shape)} must be [N] or {tuple(logp.shape)}")
    ratio = torch.exp(logp.float() - old_logp.float().detach())
    unclipped = ratio * adv
    clipped_val = ratio.clamp(1.0 - clip_eps, 1.0 + hi) * adv
    loss = -torch.minimum(unclipped, clipped_val)
    was_clipped = clipped_val < unclipped
    return loss, ratio, was_clipped


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: Aggregation = "token") -> torch.Tensor:
    """Reduce a per-token quantity ``[N,T]`` to a scalar over the ``mask`` ed tokens.

    ``"token"``: sum over all valid tokens / number of valid tokens (long sequences weigh
    more). ``"sequence"``: each sequence's token mean, then the mean over sequences that
    have at least one valid token.
    """
    if per_token.shape != mask.shape:
        raise ValueError(f"aggregate: values {tuple(per_token.shape)} and mask {tuple(mask.shape)} differ")
    m = mask.to(per_token.dtype)
    if mode == "token":
        return (per_token * m).sum() / m.sum().clamp(min=1.0)
    if mode == "sequence":
        n_tok = m.sum(dim=1)
        seq = (per_token * m).sum(dim=1) / n_tok.clamp(min=1.0)
        has = (n_tok > 0).to(per_token.dtype)
        return (seq * has).sum() / has.sum().clamp(min=1.0)
    raise ValueError(f"aggregate: mode must be one of {AGGREGATIONS}, got {mode!r}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                ref_logp: torch.Tensor | None = None, beta: float = 0.0, clip_eps: float = 0.2,
                clip_eps_high: float | None = None, aggregation: Aggregation = "token"
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The full GRPO/PPO loss (scalar) and detached statistics.

    Args:
        logp, old_logp, mask: ``[N,T]`` (see :func:`clipped_policy_loss`, :func:`aggregate`).
        advantages: ``[N]`` or ``[N,T]``.
        ref_logp: ``[N,T]`` reference log-probs; required when ``beta > 0``.
        beta: KL coefficient (k3 estimator). ``beta == 0`` skips the KL term entirely.
    Returns:
        (loss, stats) with stats ``pg_loss``, ``kl`` (k3 mean; 0 without ``ref_logp``),
        ``clip_frac``, ``ratio_mean``, ``ratio_max`` as 0-d detached tensors.
    """
    if beta < 0:
        raise ValueError(f"policy_loss: beta={beta} must be >= 0")
    if beta > 0 and ref_logp is None:
        raise ValueError("policy_loss: beta > 0 needs ref_logp")
    pg, ratio, clipped = clipped_policy_loss(logp, old_logp, advantages, clip_eps=clip_eps,
                                             clip_eps_high=clip_eps_high)
    pg_loss = aggregate(pg, mask, aggregation)
    loss = pg_loss
    if ref_logp is not None:
        kl_tok = k3_kl(logp, ref_logp.detach())
        kl = aggregate(kl_tok, mask, aggregation)
        if beta > 0:
            loss = loss + beta * kl
    else:
        kl = pg_loss.new_zeros(())
    valid = mask.bool()
    n = valid.sum().clamp(min=1)
    # statistics off the graph: an un-backwarded graph (ratio -> max) would stay alive in a
    # reference cycle under saved-tensor hooks (the memory ledger's meter), one per micro-batch
    ratio = ratio.detach()
    stats = {
        "pg_loss": pg_loss.detach(),
        "kl": kl.detach(),
        "clip_frac": (clipped & valid).sum().float().div(n).detach(),
        "ratio_mean": (ratio * valid).sum().div(n).detach(),
        "ratio_max": ratio.masked_fill(~valid, 0.0).max().detach() if valid.any() else ratio.new_zeros(()),
    }
    return loss, stats


def logprob_gap(rollout_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[float, float]:
    """(max, mean) of ``|rollout - trainer|`` log-prob over valid tokens (floats; host sync)."""
    if rollout_logp.shape != trainer_logp.shape:
        raise ValueError(f"logprob_gap: shapes {tuple(rollout_logp.shape)} vs {tuple(trainer_logp.shape)}")
    d = (rollout_logp.double() - trainer_logp.double()).abs()
    if mask is not None:
        d = d[mask.bool()]
    if d.numel() == 0:
        return 0.0, 0.0
    return float(d.max()), float(d.mean())
