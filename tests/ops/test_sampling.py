import os

if os.environ.get("PGEN_TEST_DEVICE", "cpu") == "cpu":  # before triton imports: CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pgen_engine.ops._backend import has_ext_function, triton_available  # noqa: E402
from pgen_engine.ops.sampling import sample  # noqa: E402
from tests.ops._device import CPU, DEV  # noqa: E402

BACKENDS = ["torch"] + (["triton"] if triton_available() else []) + (
    ["cpp"] if has_ext_function("sample_cpu") else [])


def _filtered_probs(x: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Exact filtered distribution in float64, written independently of the code under test."""
    p = np.exp(x - x.max())
    p /= p.sum()
    keep = np.ones_like(p, dtype=bool)
    if 0 < top_k < len(x):
        keep = x >= np.sort(x)[::-1][top_k - 1]
    if top_p < 1:
        mass = p[keep].sum()
        best = 0.0
        for t in np.unique(p[keep]):
            if p[keep & (p >= t)].sum() >= top_p * mass:
                best = max(best, t)
        keep &= p >= best
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (9, 1.0), (0, 0.7), (12, 0.85)])
def test_chi_square_against_exact_distribution(top_k, top_p):
    # scipy is a test-only dependency a bare GPU machine may lack; only this test needs it
    stats = pytest.importorskip("scipy.stats")
    V, n = 37, 6000
    x = torch.randn(V, dtype=torch.float64)
    s, T = 1.5, 1.3
    u = torch.randn(V, dtype=torch.float64)
    mixed = (u.float() + s * (x.float() - u.float())) / T
    q = _filtered_probs(mixed.double().numpy(), top_k, top_p)
    seeds = torch.randint(-(2 ** 62), 2 ** 62, (n,), dtype=torch.int64)
    tok = sample(x.float().to(DEV).expand(n, V), uncond_logits=u.float().to(DEV).expand(n, V), guidance_scale=s,
                 temperature=T, top_k=top_k, top_p=top_p, seed=seeds.to(DEV), backend="torch")
    counts = np.bincount(tok.cpu().numpy(), minlength=V)
    assert counts[q == 0].sum() == 0, "sampled a filtered-out token"
    # pool bins with expected count < 5 so the chi-square approximation holds
    big = q * n >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(q[big] * n, q[~big].sum() * n)
    obs, exp = obs[exp > 0], exp[exp > 0]
    if len(exp) > 1:
        pval = stats.chisquare(obs, exp).pvalue
        assert pval > 1e-4, (pval, obs, exp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_argmax_and_row_independence(backend):
    B, V = 5, 1000
    dev = CPU if backend == "cpp" else DEV  # the C++ backend is the CPU path
    x = (torch.randn(B, V) * 2).to(dev)  # drawn on the CPU, as in a CPU run
    a = sample(x, top_p=0.9, seed=123, backend=backend)
    b = sample(x, top_p=0.9, seed=123, backend=backend)
    assert torch.equal(a, b) and a.dtype == torch.int64 and a.shape == (B,)
    assert torch.equal(sample(x, top_k=1, seed=9, backend=backend), x.argmax(-1))
    seeds = torch.randint(-(2 ** 62), 2 ** 62, (B,), dtype=torch.int64).to(dev)
    full = sample(x, temperature=1.3, seed=seeds, backend=backend)
    for i in (0, 3):
        one = sample(x[i:i + 1], temperature=1.3, seed=seeds[i:i + 1], backend=backend)
        assert one.item() == full[i].item()
    # a different batch around row 3 must not change its token
    other = torch.cat([torch.randn(2, V).to(dev), x[3:4]])
    got = sample(other, temperature=1.3, seed=torch.stack([seeds[0], seeds[1], seeds[3]]), backend=backend)
    assert got[2].item() == full[3].item()


@pytest.mark.skipif(not triton_available(), reason="Triton not importable")
@pytest.mark.parametrize("V,dtype", [(37, torch.float32), (1000, torch.bfloat16), (1537, torch.float16)])
def test_triton_equals_torch(V, dtype):
    B = 6
    # distinct values (a permutation) so no exact float ties decide a threshold
    x = (torch.stack([torch.randperm(V) for _ in range(B)]).float() / V * 12 - 6).to(dtype)
    u = (torch.stack([torch.randperm(V) for _ in range(B)]).float() / V * 4 - 2).to(dtype)
    seeds = torch.randint(-(2 ** 62), 2 ** 62, (B,), dtype=torch.int64)
    for kw in (dict(), dict(top_k=5), dict(top_p=0.6), dict(top_k=V // 3, top_p=0.9, temperature=0.7),
               dict(uncond_logits=u, guidance_scale=3.0, top_p=0.8)):
        ref = sample(x, seed=seeds, backend="torch", **kw)
        tri = sample(x.to(DEV), seed=seeds.to(DEV), backend="triton",
                     **{k: (v.to(DEV) if torch.is_tensor(v) else v) for k, v in kw.items()})
        assert torch.equal(ref, tri.cpu()), kw


@pytest.mark.skipif(not has_ext_function("sample_cpu"), reason="pgen_engine._C.sample_cpu not built")
def test_cpp_equals_torch():
    B, V = 9, 1001
    x = torch.randn(B, V) * 3
    u = torch.randn(B, V)
    seeds = torch.randint(-(2 ** 62), 2 ** 62, (B,), dtype=torch.int64)
    for kw in (dict(), dict(top_k=11), dict(top_p=0.75), dict(uncond_logits=u, guidance_scale=5.0, top_p=0.9)):
        assert torch.equal(sample(x, seed=seeds, backend="torch", **kw), sample(x, seed=seeds, backend="cpp", **kw))


def test_bad_inputs():
    x = torch.randn(2, 7)
    with pytest.raises(ValueError, match="temperature"):
        sample(x, temperature=0.0, seed=1)
    with pytest.raises(ValueError, match="top_p"):
        sample(x, top_p=0.0, seed=1)
    with pytest.raises(ValueError, match="top_k"):
        sample(x, top_k=-1, seed=1)
    with pytest.raises(ValueError, match="uncond_logits shape"):
        sample(x, uncond_logits=torch.randn(2, 8), guidance_scale=2.0, seed=1)
    with pytest.raises(TypeError, match="dtype"):
        sample(x.long(), seed=1)
    with pytest.raises(ValueError, match="unknown backend"):
        sample(x, backend="nope")


def test_compile_traces_registered_op():
    if not triton_available():
        pytest.skip("Triton not importable")
    x = torch.randn(3, 40)
    seeds = torch.arange(3, dtype=torch.int64)
    # the registered op itself (backend resolution happens outside compiled regions)
    fn = torch.compile(lambda t, s: torch.ops.pgen.sample_triton(t, None, 1.0, 1.0, 0, 0.9, s),
                       fullgraph=True, backend="eager")
    assert torch.equal(fn(x.to(DEV), seeds.to(DEV)).cpu(), sample(x, top_p=0.9, seed=seeds, backend="torch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows_draw_minus_one(backend):
    """A row with a NaN / Inf (after CFG and temperature) gets -1 on every backend; others are untouched."""
    dev = CPU if backend == "cpp" else DEV
    B, V = 6, 50
    x = torch.randn(B, V) * 2
    u = torch.randn(B, V)
    x[1, 7] = float("nan")
    x[2, 0] = float("inf")
    u[3, 49] = float("-inf")  # only matters with CFG
    x[4] = 3e38  # finite logits whose quotient by a tiny temperature overflows
    seeds = torch.arange(B, dtype=torch.int64) * 977 - 5
    for kw, bad in ((dict(), {1, 2}), (dict(uncond_logits=u, guidance_scale=3.0, top_k=5), {1, 2, 3, 4}),
                    (dict(top_p=0.8, temperature=1e-3), {1, 2, 4})):
        kw_dev = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in kw.items()}
        got = sample(x.to(dev), seed=seeds.to(dev), backend=backend, **kw_dev).cpu()
        ref = sample(torch.nan_to_num(x).clamp(-10, 10), seed=seeds, backend="torch",
                     **{k: (v.clamp(-10, 10) if torch.is_tensor(v) else v) for k, v in kw.items()})
        for i in range(B):
            if i in bad:
                assert got[i].item() == -1, (kw, i)
            else:
                assert got[i].item() == ref[i].item() and 0 <= got[i].item() < V, (kw, i)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_below_float32_keeps_the_argmax(backend):
    """top_p = 1e-50 is in (0, 1] (SamplingParams and sample accept it) but rounds to 0 in float32:
    sample_cpu refused it mid-generation ('top_p must be in (0, 1], got 0.000000'). Every top_p at
    or below float32's smallest normal keeps exactly the most probable codes, so it is clamped there."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 37, generator=gen)
    want = x.argmax(-1)
    for top_p in (1e-50, 5e-324, torch.finfo(torch.float32).tiny):
        got = sample(x.to(DEV), top_p=top_p, seed=torch.arange(4).to(DEV), backend=backend).cpu()
        assert torch.equal(got, want), (top_p, got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_past_float32_range_is_clamped(backend):
    """temperature 1e39 is finite and > 0 but inf in float32 (sample_cpu refused it, 'got inf'); it is
    clamped to float32's largest, which samples as the torch reference does at that temperature."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 37, generator=gen)
    seeds = torch.arange(6) * 3 + 1
    want = sample(x, temperature=torch.finfo(torch.float32).max, seed=seeds, backend="torch")
    for t in (1e39, 1e300):
        assert torch.equal(sample(x.to(DEV), temperature=t, seed=seeds.to(DEV), backend=backend).cpu(), want), t
