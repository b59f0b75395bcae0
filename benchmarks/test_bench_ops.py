"""CPU pytest-benchmark of the torch reference ops (``pytest benchmarks/test_bench_ops.py``)."""
import torch

from pgen_engine.ops import apply_rotary, rms_norm, sample, token_logprobs


def test_bench_sample(benchmark):
    x, u = torch.randn(16, 4096), torch.randn(16, 4096)
    out = benchmark(lambda: sample(x, uncond_logits=u, guidance_scale=5.0, top_p=0.9, seed=1, backend="torch"))
    assert out.shape == (16,)


def test_bench_token_logprobs(benchmark):
    h, w, t = torch.randn(256, 64), torch.randn(4096, 64), torch.randint(0, 4096, (256,))
    lp, _ = benchmark(lambda: token_logprobs(h, w, t, backend="torch"))
    assert bool((lp <= 0).all())


def test_bench_rms_norm_rotary(benchmark):
    x, w = torch.randn(64, 8, 64), torch.randn(64)
    c, s = torch.randn(64, 64), torch.randn(64, 64)
    y = benchmark(lambda: apply_rotary(rms_norm(x, w, 1e-6, backend="torch"), c, s, backend="torch"))
    assert y.shape == x.shape
