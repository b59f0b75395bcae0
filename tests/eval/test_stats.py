"""Paired bootstrap CIs and verdicts."""
from __future__ import annotations

import math

import torch

from pgen_engine.eval.stats import bootstrap_indices, mean_ci, paired_ci, verdict


def test_mean_ci_contains_mean_and_shrinks_with_users():
    g = torch.Generator().manual_seed(0)
    small = torch.randn(30, generator=g, dtype=torch.float64)
    big = torch.randn(3000, generator=g, dtype=torch.float64)
    a = mean_ci(small, bootstrap_indices(30, 500, 0))
    b = mean_ci(big, bootstrap_indices(3000, 500, 0))
    assert a["ci95"][0] <= a["mean"] <= a["ci95"][1]
    assert (b["ci95"][1] - b["ci95"][0]) < (a["ci95"][1] - a["ci95"][0]) / 5


def test_paired_ci_sees_a_small_consistent_gain_that_unpaired_noise_hides():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(200, generator=g, dtype=torch.float64)  # large between-user spread
    better = base + 0.05 + 0.01 * torch.randn(200, generator=g, dtype=torch.float64)
    idx = bootstrap_indices(200, 1000, 0)
    d = paired_ci(better, base, idx)
    assert d["ci95"][0] > 0 and verdict("future_sim", d) == "better"
    # the marginal CIs overlap heavily, yet the paired difference is clear
    assert mean_ci(better, idx)["ci95"][0] < mean_ci(base, idx)["ci95"][1]
    assert verdict("future_sim", paired_ci(base, base + 0.0, idx)) == "no difference"
    # lower-is-better metric: a positive difference is worse
    assert verdict("user_id_mean_rank", d) == "worse"


def test_nan_users_skipped_and_all_nan():
    v = torch.tensor([1.0, float("nan"), 3.0], dtype=torch.float64)
    r = mean_ci(v, bootstrap_indices(3, 200, 0))
    assert r["mean"] == 2.0 and 1.0 <= r["ci95"][0] <= r["ci95"][1] <= 3.0
    assert math.isnan(mean_ci(torch.full((3,), float("nan")), bootstrap_indices(3, 10, 0))["mean"])


def test_paired_ci_coverage_is_near_nominal():
    """Over many simulated studies the 95 % paired CI covers the true mean difference ~95 % of the time."""
    g = torch.Generator().manual_seed(3)
    idx = bootstrap_indices(80, 400, 0)
    covered = 0
    trials = 300
    for _ in range(trials):
        base = torch.rand(80, generator=g, dtype=torch.float64)
        other = base + 0.03 + 0.1 * torch.randn(80, generator=g, dtype=torch.float64)
        lo, hi = paired_ci(other, base, idx)["ci95"]
        covered += lo <= 0.03 <= hi
    assert 0.88 <= covered / trials <= 0.99, covered / trials
