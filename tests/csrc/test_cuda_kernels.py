"""CUDA kernels of pgen_engine._C (sample_cuda, paged_kv_write_cuda) against the CPU sampler
and a torch reference. Runs only where the extension was built with CUDA and a GPU exists."""
from __future__ import annotations

import pytest
import torch

from pgen_engine.ops._backend import extension

_C = extension()
pytestmark = pytest.mark.skipif(
    _C is None or not getattr(_C, "with_cuda", False) or not torch.cuda.is_available(),
    reason="needs pgen_engine._C built with CUDA and a CUDA device",
)


@pytest.mark.parametrize(
    "cfg,s,T,top_k,top_p,V",
    [
        (False, 1.0, 1.0, 0, 1.0, 1001),
        (True, 5.0, 1.0, 0, 1.0, 16384),
        (True, 3.0, 0.8, 57, 0.9, 4099),
        (False, 1.0, 1.2, 0, 0.5, 777),
        (True, 1.0, 1.0, 1, 1.0, 513),
    ],
)
def test_sample_cuda_matches_cpu(cfg, s, T, top_k, top_p, V):
    B = 37
    c = torch.randn(B, V) * 3
    u = torch.randn(B, V) * 3 if cfg else None
    seeds = torch.randint(-(2**62), 2**62, (B,), dtype=torch.int64)
    want = _C.sample_cpu(c, u, s, T, top_k, top_p, seeds)
    got = _C.sample_cuda(c.cuda(), None if u is None else u.cuda(), s, T, top_k, top_p, seeds.cuda())
    assert got.device.type == "cuda" and got.dtype == torch.int64
    # expf / reduction order may differ by an ulp: allow a rare boundary flip, no more.
    mismatches = (got.cpu() != want).sum().item()
    assert mismatches <= 1, (got.cpu(), want)


def test_sample_cuda_non_finite_rows_draw_minus_one():
    B, V = 8, 3000
    c = torch.randn(B, V) * 3
    c[2, 5], c[5, V - 1] = float("nan"), float("-inf")
    seeds = torch.arange(B, dtype=torch.int64) * 31
    want = _C.sample_cpu(c, None, 1.0, 1.0, 0, 0.9, seeds)
    got = _C.sample_cuda(c.cuda(), None, 1.0, 1.0, 0, 0.9, seeds.cuda()).cpu()
    assert want[2] == want[5] == got[2] == got[5] == -1
    assert ((got >= 0) == (want >= 0)).all() and (got[want >= 0] != want[want >= 0]).sum() <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hkv,d", [(2, 64), (3, 5)])
def test_paged_kv_write_cuda(dtype, hkv, d):
    nb, bs, n = 11, 7, 23
    k_cache = torch.randn(nb, bs, hkv, d, device="cuda").to(dtype)
    v_cache = torch.randn(nb, bs, hkv, d, device="cuda").to(dtype)
    k_new = torch.randn(n, hkv, d, device="cuda").to(dtype)
    v_new = torch.randn(n, hkv, d, device="cuda").to(dtype)
    slots = torch.randperm(nb * bs, device="cuda")[:n].to(torch.int64)
    slots[::5] = -1
    k_ref, v_ref = k_cache.clone().view(-1, hkv, d), v_cache.clone().view(-1, hkv, d)
    keep = slots >= 0
    k_ref[slots[keep]] = k_new[keep]
    v_ref[slots[keep]] = v_new[keep]
    _C.paged_kv_write_cuda(k_cache, v_cache, k_new, v_new, slots)
    assert torch.equal(k_cache.view(-1, hkv, d), k_ref) and torch.equal(v_cache.view(-1, hkv, d), v_ref)
