"""Host-side cost per generation step of the C++ CPU sampler (CFG + top-k / top-p).

Run: python -m pytest benchmarks/test_bench_sampler.py --benchmark-only
Shapes follow Janus-Pro image generation: image vocab 16384, CFG, batch 32.
"""
from __future__ import annotations

import pytest
import torch

from pgen_engine.ops._backend import extension

pytestmark = pytest.mark.skipif(extension() is None, reason="pgen_engine._C not built (run `make build`)")


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (2000, 0.9)])
def test_bench_sample_cpu(benchmark, top_k, top_p):
    B, V = 32, 16384
    c, u = torch.randn(B, V), torch.randn(B, V)
    seeds = torch.randint(0, 2**62, (B,), dtype=torch.int64)
    C = extension()
    out = benchmark(C.sample_cpu, c, u, 5.0, 1.0, top_k, top_p, seeds)
    assert out.shape == (B,)
