"""RL advantages: GRPO group normalisation and critic-free PPO whitening over all ranks.

Rows follow the Generator's order: row ``i*G + j`` is sample ``j`` of prompt ``i``, so a
GRPO group is ``G`` consecutive rows and never spans ranks (prompts are split over ranks
whole). PPO's whitening uses the statistics of the *global* batch: the per-rank sums are
combined with one all-reduce (:func:`pgen_engine.training.distributed.all_reduce`, which
puts the tensor on the communication device: CUDA under NCCL).
"""
from __future__ import annotations

from typing import Literal

import torch

from .distributed import all_reduce, world_size


def _check_1d(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 1 or not x.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor [N], got "
                         f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale_by_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: rewards normalised within each group of ``group_size`` samples.

    Args:
        rewards: float ``[N]``, ``N = num_prompts * group_size``; rows ``i*G .. i*G+G-1``
            are the G samples of prompt ``i`` (the Generator's row order).
        group_size: G >= 1.
        scale_by_std: divide by the group's population std (+ ``eps``); False gives the
            "Dr. GRPO" mean-centred variant.
        eps: keeps all-equal groups (std 0) finite: their advantages are exactly 0.
    Returns:
        float32 ``[N]`` ``(r - mean_g) / (std_g + eps)``, computed in float64: a float32 group
        mean of equal rewards can miss them by an ulp, which ``eps`` does not hide once the
        rewards are large (reward 100: advantages ~0.9 instead of 0).
    """
    _check_1d(rewards, "group_advantages: rewards")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"group_advantages: {rewards.shape[0]} rewards are not a whole number of groups of "
                         f"group_size={group_size}")
    r = rewards.double().reshape(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centred.reshape(-1).float()


def batch_advantages(rewards: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """Critic-free PPO advantages: rewards whitened over the whole batch, float32 ``[N]``.

    The batch mean is the baseline (no value network); with one sample per prompt this
    is the usual REINFORCE-with-baseline estimator that PPO-clip then optimises. In float64,
    as :func:`group_advantages` (equal rewards give exactly 0).
    """
    _check_1d(rewards, "batch_advantages: rewards")
    r = rewards.double()
    return ((r - r.mean()) / (r.std(unbiased=False) + eps)).float()


def global_batch_advantages(rewards: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """:func:`batch_advantages` over the rewards of every rank (float32 ``[N]``, this rank's rows).

    Sum, sum of squares and count are all-reduced in float64; with one rank (or no process
    group) this is exactly :func:`batch_advantages`.
    """
    _check_1d(rewards, "global_batch_advantages: rewards")
    if world_size() == 1:
        return batch_advantages(rewards, eps=eps)
    r = rewards.double()
    # the count on the rewards' device: torch.stack refuses a CPU tensor beside CUDA ones
    n = torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device)
    s = all_reduce(torch.stack([r.sum(), (r ** 2).sum(), n]))
    mean = s[0] / s[2]
    std = (s[1] / s[2] - mean ** 2).clamp(min=0).sqrt()
    return ((r - mean) / (std + eps)).float()


def compute_advantages(rewards: torch.Tensor, algorithm: Literal["grpo", "ppo"], group_size: int, *,
                       scale_by_std: bool = True) -> torch.Tensor:
    """Advantages float32 ``[N]`` of this rank's rewards ``[N]`` for ``rl.algorithm``."""
    if algorithm == "grpo":
        return group_advantages(rewards, group_size, scale_by_std=scale_by_std)
    if algorithm == "ppo":
        return global_batch_advantages(rewards)
    raise ValueError(f"compute_advantages: algorithm must be 'grpo' or 'ppo', got {algorithm!r}")
