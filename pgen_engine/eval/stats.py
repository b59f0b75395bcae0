"""Paired bootstrap confidence intervals and the verdicts a report may print.

Every metric is first reduced to one value per evaluated user (averaged over that
user's images and over seeds). Users are the resampling unit: one bootstrap draw picks
``U`` users with replacement, and the *same* draw is used for every system, so a paired
difference ``A - B`` is resampled user by user.
"""
from __future__ import annotations

import math

import torch

# Metrics where lower is better; every other metric is higher-is-better.
LOWER_IS_BETTER = frozenset({"user_id_mean_rank"})


def bootstrap_indices(num_users: int, draws: int = 1000, seed: int = 0) -> torch.Tensor:
    """LongTensor ``[draws, num_users]`` of user indices drawn with replacement."""
    if num_users < 1 or draws < 1:
        raise ValueError(f"bootstrap needs num_users >= 1 and draws >= 1, got {num_users}, {draws}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_users, (draws, num_users), generator=g)


def mean_ci(values: torch.Tensor, idx: torch.Tensor, level: float = 0.95) -> dict:
    """``{"mean": float, "ci95": [lo, hi]}`` of per-user ``values [U]`` (NaN users skipped).

    Percentile bootstrap over the draws ``idx [B, U]``; NaN when no user has a value. With a
    single user with a value the mean stands but the CI is NaN (every draw repeats that user,
    a zero-width interval that would let one user "beat" a baseline).
    """
    v = values.detach().double().flatten()
    if v.shape[0] != idx.shape[1]:
        raise ValueError(f"mean_ci: {v.shape[0]} values but the bootstrap draws cover {idx.shape[1]} users")
    ok = ~torch.isnan(v)
    if not bool(ok.any()):
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")]}
    if int(ok.sum()) < 2:
        return {"mean": float(v[ok].mean()), "ci95": [float("nan"), float("nan")]}
    vz = torch.where(ok, v, torch.zeros_like(v))
    s = vz[idx].sum(1)
    c = ok.double()[idx].sum(1)
    boot = s / c  # a draw with no valid user gives NaN, dropped by nanquantile
    a = (1 - level) / 2
    lo, hi = torch.nanquantile(boot, torch.tensor([a, 1 - a], dtype=torch.float64)).tolist()
    return {"mean": float(v[ok].mean()), "ci95": [float(lo), float(hi)]}


def paired_ci(a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, level: float = 0.95) -> dict:
    """Mean and CI of the per-user difference ``a - b`` (users where either is NaN skipped)."""
    if a.shape != b.shape:
        raise ValueError(f"paired_ci: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    return mean_ci(a.double() - b.double(), idx, level)


def verdict(metric: str, diff: dict) -> str:
    """"better", "worse" or "no difference" for a paired ``A - B`` CI (direction-aware); a CI
    bound that is NaN or null (as report.json writes an undefined one) gives "no difference"."""
    lo, hi = diff["ci95"]
    if any(x is None or math.isnan(x) for x in (lo, hi)):
        return "no difference"
    sign = -1 if metric in LOWER_IS_BETTER else 1
    if sign * lo > 0 and sign * hi > 0:
        return "better"
    if sign * lo < 0 and sign * hi < 0:
        return "worse"
    return "no difference"
