"""pgen_engine._C.sample_cpu against an independent numpy implementation of the sampling
semantics (token for token), plus distribution checks (chi-square) and input validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pgen_engine.ops._backend import extension

_C = extension()
pytestmark = pytest.mark.skipif(_C is None, reason="pgen_engine._C not built (run `make build`)")

MASK64 = (1 << 64) - 1


def py_uniform(seed: int) -> float:
    z = (seed + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z = z ^ (z >> 31)
    return float(np.float32(z >> 40) * np.float32(2.0**-24))


def kept_probs(c, u, s, T, top_k, top_p):
    """Steps 1-5: (p float32 [V], kept bool [V])."""
    c = np.asarray(c, np.float32)
    if u is not None and s != 1.0:
        u = np.asarray(u, np.float32)
        x = u + np.float32(s) * (c - u)
    else:
        x = c.copy()
    x = (x / np.float32(T)).astype(np.float32)
    e = np.exp(x - x.max()).astype(np.float32)
    p = (e / np.float32(e.astype(np.float64).sum())).astype(np.float32)
    V = x.shape[0]
    kept = np.ones(V, bool)
    if 0 < top_k < V:
        kth = np.sort(x)[::-1][top_k - 1]
        kept &= x >= kth
    if top_p < 1.0:
        vals = np.sort(p[kept].astype(np.float64))[::-1]
        cs = np.cumsum(vals)
        hit = np.nonzero(cs >= np.float32(top_p) * vals.sum())[0]
        t = vals[hit[0]] if hit.size else vals[-1]
        kept &= p >= np.float32(t)
    return p, kept


def ref_sample(c, u, s, T, top_k, top_p, seed) -> int:
    p, kept = kept_probs(c, u, s, T, top_k, top_p)
    idx = np.nonzero(kept)[0]
    pk = p[idx].astype(np.float64)
    target = py_uniform(seed) * pk.sum()
    above = np.nonzero(np.cumsum(pk) > target)[0]
    return int(idx[above[0]]) if above.size else int(idx[-1])


def test_uniform_from_seed_matches_python():
    rng = np.random.default_rng()
    seeds = [0, 1, -1, 2**63 - 1, -(2**63)] + [int(v) for v in rng.integers(-(2**63), 2**63 - 1, 50)]
    got = [_C.uniform_from_seed(s) for s in seeds]
    assert got == [py_uniform(s) for s in seeds]
    assert all(0.0 <= g < 1.0 for g in got)
    assert len(set(got)) > 40


@pytest.mark.parametrize(
    "cfg,s,T,top_k,top_p",
    [
        (False, 1.0, 1.0, 0, 1.0),
        (True, 5.0, 1.0, 0, 1.0),
        (True, 1.0, 0.7, 13, 1.0),  # s == 1: uncond ignored
        (False, 1.0, 1.3, 0, 0.8),
        (True, 3.5, 0.9, 50, 0.6),
        (True, 0.0, 1.0, 1, 1.0),  # s == 0: pure uncond; k == 1: greedy
        (False, 1.0, 2.0, 500, 0.05),
    ],
)
def test_matches_numpy_reference(cfg, s, T, top_k, top_p):
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence().entropy % (2**31)))
    B, V = 29, 457
    c = torch.randn(B, V, generator=gen) * 3
    u = torch.randn(B, V, generator=gen) * 3 if cfg else None
    seeds = torch.randint(-(2**62), 2**62, (B,), generator=gen, dtype=torch.int64)
    got = _C.sample_cpu(c, u, s, T, top_k, top_p, seeds)
    assert got.dtype == torch.int64 and got.shape == (B,)
    want = [
        ref_sample(c[b].numpy(), None if u is None else u[b].numpy(), s, T, top_k, top_p, int(seeds[b]))
        for b in range(B)
    ]
    assert got.tolist() == want
    # Every drawn token survived the filters.
    for b in range(B):
        _, kept = kept_probs(c[b].numpy(), None if u is None else u[b].numpy(), s, T, top_k, top_p)
        assert kept[got[b]]


def test_deterministic_and_seed_sensitive():
    B, V = 64, 301
    c = torch.randn(1, V).expand(B, V).contiguous()
    seeds = torch.arange(B, dtype=torch.int64) * 7919 + 3
    a = _C.sample_cpu(c, None, 1.0, 1.0, 0, 1.0, seeds)
    b = _C.sample_cpu(c, None, 1.0, 1.0, 0, 1.0, seeds.clone())
    assert torch.equal(a, b)
    assert len(set(a.tolist())) > 10  # same logits, different seeds -> different tokens
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(_C.sample_cpu(c, None, 1.0, 1.0, 0, 1.0, seeds), a)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (4, 1.0), (0, 0.7), (5, 0.75)])
def test_chi_square_small_vocab(top_k, top_p):
    scipy_stats = pytest.importorskip("scipy.stats")
    V, N = 7, 20000
    logits = torch.randn(V) * 1.5
    c = logits.expand(N, V).contiguous()
    seeds = torch.randint(-(2**62), 2**62, (N,), dtype=torch.int64)
    got = _C.sample_cpu(c, None, 1.0, 1.0, top_k, top_p, seeds)
    p, kept = kept_probs(logits.numpy(), None, 1.0, 1.0, top_k, top_p)
    counts = np.bincount(got.numpy(), minlength=V)
    assert counts[~kept].sum() == 0, "a filtered-out token was sampled"
    expected = p[kept].astype(np.float64)
    expected = expected / expected.sum() * N
    if kept.sum() == 1:
        assert counts[kept][0] == N
        return
    res = scipy_stats.chisquare(counts[kept], expected)
    assert res.pvalue > 1e-4, (counts, expected)


def test_rejects_bad_inputs():
    c = torch.randn(3, 11)
    seeds = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="temperature"):
        _C.sample_cpu(c, None, 1.0, 0.0, 0, 1.0, seeds)
    with pytest.raises(ValueError, match="top_p"):
        _C.sample_cpu(c, None, 1.0, 1.0, 0, 0.0, seeds)
    with pytest.raises(ValueError, match="top_k"):
        _C.sample_cpu(c, None, 1.0, 1.0, -2, 1.0, seeds)
    with pytest.raises(RuntimeError, match="floating"):
        _C.sample_cpu(c.to(torch.int32), None, 1.0, 1.0, 0, 1.0, seeds)
    with pytest.raises(RuntimeError, match=r"2-D \[B, V\]"):
        _C.sample_cpu(c[0], None, 1.0, 1.0, 0, 1.0, seeds)
    with pytest.raises(RuntimeError, match="uncond_logits shape"):
        _C.sample_cpu(c, torch.randn(3, 10), 2.0, 1.0, 0, 1.0, seeds)
    with pytest.raises(RuntimeError, match="seeds"):
        _C.sample_cpu(c, None, 1.0, 1.0, 0, 1.0, torch.zeros(4, dtype=torch.int64))


def test_converts_dtype_and_layout():
    """bf16 / strided logits are sampled as their float32 contiguous copy."""
    B, V = 9, 203
    seeds = torch.randint(-(2**62), 2**62, (B,), dtype=torch.int64)
    c = torch.randn(V, B).t()  # non-contiguous
    u = torch.randn(B, V).to(torch.bfloat16)
    want = _C.sample_cpu(c.contiguous(), u.float(), 2.5, 0.9, 17, 0.8, seeds)
    assert torch.equal(_C.sample_cpu(c, u, 2.5, 0.9, 17, 0.8, seeds), want)


def test_matches_ops_sampling_torch_reference():
    """Token for token against the in-package torch reference (pgen_engine.ops.sampling)."""
    sampling = pytest.importorskip("pgen_engine.ops.sampling")
    B, V = 41, 389
    for cfg, s, T, k, p in [(True, 5.0, 1.0, 0, 1.0), (False, 1.0, 0.8, 31, 0.85), (True, 2.0, 1.1, 0, 0.5)]:
        c = torch.randn(B, V) * 2
        u = torch.randn(B, V) * 2 if cfg else None
        seeds = torch.randint(-(2**62), 2**62, (B,), dtype=torch.int64)
        kw = dict(uncond_logits=u, guidance_scale=s, temperature=T, top_k=k, top_p=p, seed=seeds)
        ref = sampling.sample(c, backend="torch", **kw)
        got = _C.sample_cpu(c, u, s, T, k, p, seeds)
        assert got.tolist() == ref.tolist(), (cfg, s, T, k, p)
