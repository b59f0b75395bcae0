"""CPU pytest-benchmark of the torch reference attention ops
(``pytest benchmarks/test_bench_attention.py``)."""
import torch

from pgen_engine.ops.attention import decode_attention, paged_kv_write, prefill_attention


def test_bench_prefill_attention_ref(benchmark):
    q = torch.randn(2, 256, 8, 64)
    k, v = torch.randn(2, 256, 2, 64), torch.randn(2, 256, 2, 64)
    spans = torch.tensor([[[10, 90]], [[-1, -1]]], dtype=torch.int32)
    out = benchmark(lambda: prefill_attention(q, k, v, bidirectional_spans=spans, backend="torch"))
    assert out.shape == q.shape and not torch.isnan(out).any()


def test_bench_prefill_attention_ref_backward(benchmark):
    q = torch.randn(1, 192, 8, 64, requires_grad=True)
    k, v = torch.randn(1, 192, 2, 64, requires_grad=True), torch.randn(1, 192, 2, 64, requires_grad=True)

    def step():
        out = prefill_attention(q, k, v, backend="torch")
        return torch.autograd.grad(out.sum(), (q, k, v))

    dq, dk, dv = benchmark(step)
    assert dq.shape == q.shape and dk.shape == k.shape


def test_bench_decode_attention_paged_ref(benchmark):
    k_cache, v_cache = torch.randn(64, 16, 2, 64), torch.randn(64, 16, 2, 64)
    table = torch.randperm(64).to(torch.int32).view(8, 8)
    seqlens = torch.randint(1, 129, (8,), dtype=torch.int32)
    q = torch.randn(8, 8, 64)
    out = benchmark(lambda: decode_attention(q, k_cache, v_cache, seqlens, block_table=table, backend="torch"))
    assert out.shape == q.shape and not torch.isnan(out).any()


def test_bench_paged_kv_write_ref(benchmark):
    k_cache, v_cache = torch.zeros(64, 16, 2, 64), torch.zeros(64, 16, 2, 64)
    k_new, v_new = torch.randn(32, 2, 64), torch.randn(32, 2, 64)
    slots = torch.randperm(64 * 16)[:32]
    benchmark(lambda: paged_kv_write(k_cache, v_cache, k_new, v_new, slots, backend="torch"))
    assert torch.equal(k_cache.view(-1, 2, 64)[slots], k_new)
