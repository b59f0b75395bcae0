"""Host-side overhead per generation step: scheduler bookkeeping and the CPU sampler.

Run: python -m pytest benchmarks/test_bench_scheduler.py --benchmark-only
Shapes follow Janus-Pro image generation: 576 image tokens, image vocab 16384, CFG.
"""
from __future__ import annotations

import pytest
import torch

from pgen_engine.ops._backend import extension

pytestmark = pytest.mark.skipif(extension() is None, reason="pgen_engine._C not built (run `make build`)")

from pgen_engine.generation.scheduler import BatchScheduler  # noqa: E402


@pytest.mark.parametrize("rows", [16, 128])
def test_bench_decode_step(benchmark, rows):
    """One decode step (schedule + step_done) with `rows` cfg sample rows in flight."""
    prompt, samples, max_new = 600, 4, 4096
    # cfg doubles every sequence: reserve 2 x rows x (prompt + max_new) tokens of blocks.
    s = BatchScheduler(num_blocks=2 * rows * (prompt + max_new) // 16 + 64, block_size=16,
                       max_batch_rows=2 * rows, cfg=True)
    for rid in range(rows // samples):
        s.add_request(rid, prompt, samples, max_new)
    plan = s.schedule()
    s.step_done(list(plan.sample_ids), [False] * len(plan.sample_ids))

    def step():
        p = s.schedule()
        s.step_done(p.decode_sample_ids, [False] * len(p.decode_sample_ids))
        return p

    p = benchmark.pedantic(step, rounds=300, iterations=1, warmup_rounds=5)
    assert len(p.decode_seq_ids) == 2 * rows


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (2000, 0.9)])
def test_bench_sample_cpu(benchmark, top_k, top_p):
    B, V = 32, 16384
    c, u = torch.randn(B, V), torch.randn(B, V)
    seeds = torch.randint(0, 2**62, (B,), dtype=torch.int64)
    C = extension()
    out = benchmark(C.sample_cpu, c, u, 5.0, 1.0, top_k, top_p, seeds)
    assert out.shape == (B,)
