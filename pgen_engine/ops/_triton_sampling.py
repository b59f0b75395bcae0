"""Triton sampling kernel: CFG + temperature + top-k + top-p + inverse-CDF draw, one row per program.

No sort: the top-k value threshold and the top-p probability threshold are each found by
bisection over the order-preserving integer key of float32 values (exact: the search ends
when no element key lies strictly inside the bracket), then the draw scans the row in vocab
order with a running prefix sum. Every pass streams the row from global memory (L2 resident
for image vocabularies), so the kernel never needs ``[V]`` scratch space.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pgen_engine.ops import _triton_config as _config
from pgen_engine.ops.rng import triton_uniform


@triton.jit
def _key(x):
    """Order-preserving int32 key of a float32 block (float order == signed int order)."""
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _load_x(c_ptr, u_ptr, offs, mask, s, temp, HAS_U: tl.constexpr):
    c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_U:
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c = u + s * (c - u)
    return c / temp


@triton.jit
def _sample_kernel(
    c_ptr, u_ptr, seed_ptr, out_ptr,
    V, stride_c, stride_u, s, temp, top_k, top_p,
    HAS_U: tl.constexpr, DO_TOPK: tl.constexpr, DO_TOPP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    c_row = c_ptr + row.to(tl.int64) * stride_c
    u_row = u_ptr + row.to(tl.int64) * stride_u
    ar = tl.arange(0, BLOCK)
    NEG = float("-inf")

    # pass 1: max and min of x (softmax shift and top-k bracket)
    mx = tl.full([BLOCK], NEG, tl.float32)
    mn = tl.full([BLOCK], float("inf"), tl.float32)
    n_bad = tl.zeros([BLOCK], tl.int32)  # NaN / Inf entries: the row gets -1
    for start in range(0, V, BLOCK):
        offs = start + ar
        m = offs < V
        x = _load_x(c_row, u_row, offs, m, s, temp, HAS_U)
        mx = tl.maximum(mx, tl.where(m, x, NEG))
        mn = tl.minimum(mn, tl.where(m, x, float("inf")))
        n_bad += (m & ~(tl.abs(x) < float("inf"))).to(tl.int32)
    x_max = tl.max(mx, 0)
    x_min = tl.min(mn, 0)
    # pass 2: softmax normaliser
    zacc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + ar
        m = offs < V
        x = _load_x(c_row, u_row, offs, m, s, temp, HAS_U)
        zacc += tl.where(m, tl.exp(x - x_max), 0.0)
    inv_z = 1.0 / tl.sum(zacc, 0)

    # top-k: largest key t with #{x : key(x) >= t} >= k
    k_thr = _key(x_min).to(tl.int64)
    if DO_TOPK:
        lo = _key(x_min).to(tl.int64)
        hi = _key(x_max).to(tl.int64) + 1
        done = hi - lo <= 1
        while not done:
            mid = lo + (hi - lo) // 2
            cnt = tl.zeros([BLOCK], tl.int32)
            n_lo = tl.zeros([BLOCK], tl.int32)
            n_hi = tl.zeros([BLOCK], tl.int32)
            for start in range(0, V, BLOCK):
                offs = start + ar
                m = offs < V
                kx = _key(_load_x(c_row, u_row, offs, m, s, temp, HAS_U)).to(tl.int64)
                cnt += (m & (kx >= mid)).to(tl.int32)
                n_lo += (m & (kx > lo) & (kx < mid)).to(tl.int32)
                n_hi += (m & (kx > mid) & (kx < hi)).to(tl.int32)
            ok = tl.sum(cnt, 0) >= top_k
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
            left = tl.where(ok, tl.sum(n_hi, 0), tl.sum(n_lo, 0))
            done = (left == 0) | (hi - lo <= 1)
        k_thr = lo

    # top-p: largest key t with sum{kept p : key(p) >= t} >= top_p * M
    p_thr = tl.zeros([], tl.int64)
    if DO_TOPP:
        macc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + ar
            m = offs < V
            x = _load_x(c_row, u_row, offs, m, s, temp, HAS_U)
            kept = m & (_key(x).to(tl.int64) >= k_thr)
            macc += tl.where(kept, tl.exp(x - x_max) * inv_z, 0.0)
        target = top_p * tl.sum(macc, 0)
        lo = tl.zeros([], tl.int64)
        hi = _key(inv_z).to(tl.int64) + 1  # max p = exp(0) / Z
        done = hi - lo <= 1
        while not done:
            mid = lo + (hi - lo) // 2
            acc = tl.zeros([BLOCK], tl.float32)
            n_lo = tl.zeros([BLOCK], tl.int32)
            n_hi = tl.zeros([BLOCK], tl.int32)
            for start in range(0, V, BLOCK):
                offs = start + ar
                m = offs < V
                x = _load_x(c_row, u_row, offs, m, s, temp, HAS_U)
                kept = m & (_key(x).to(tl.int64) >= k_thr)
                p = tl.exp(x - x_max) * inv_z
                kp = _key(p).to(tl.int64)
                acc += tl.where(kept & (kp >= mid), p, 0.0)
                n_lo += (kept & (kp > lo) & (kp < mid)).to(tl.int32)
                n_hi += (kept & (kp > mid) & (kp < hi)).to(tl.int32)
            ok = tl.sum(acc, 0) >= target
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
            left = tl.where(ok, tl.sum(n_hi, 0), tl.sum(n_lo, 0))
            done = (left == 0) | (hi - lo <= 1)
        p_thr = lo

    # total kept mass, then the inverse-CDF draw in vocab order
    tacc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + ar
        m = offs < V
        x = _load_x(c_row, u_row, offs, m, s, temp, HAS_U)
        p = tl.exp(x - x_max) * inv_z
        kept = m & (_key(x).to(tl.int64) >= k_thr) & (_key(p).to(tl.int64) >= p_thr)
        tacc += tl.where(kept, p, 0.0)
    seed = tl.load(seed_ptr + row)
    target = triton_uniform(seed) * tl.sum(tacc, 0)
    carry = tl.zeros([], tl.float32)
    best = tl.full([], 2147483647, tl.int32)
    last = tl.full([], -1, tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + ar
        m = offs < V
        x = _load_x(c_row, u_row, offs, m, s, temp, HAS_U)
        p = tl.exp(x - x_max) * inv_z
        kept = m & (_key(x).to(tl.int64) >= k_thr) & (_key(p).to(tl.int64) >= p_thr)
        pk = tl.where(kept, p, 0.0)
        cs = carry + tl.cumsum(pk, 0)
        hit = kept & (cs > target)
        best = tl.minimum(best, tl.min(tl.where(hit, offs, 2147483647), 0))
        last = tl.maximum(last, tl.max(tl.where(kept, offs, -1), 0))
        carry += tl.sum(pk, 0)
    tok = tl.where(best == 2147483647, last, best)
    tok = tl.where(tl.sum(n_bad, 0) > 0, -1, tok)
    tl.store(out_ptr + row, tok.to(tl.int64))


def sample_triton(
    logits: torch.Tensor,
    uncond_logits: torch.Tensor | None,
    guidance_scale: float,
    temperature: float,
    top_k: int,
    top_p: float,
    seeds: torch.Tensor,
) -> torch.Tensor:
    """Launch :func:`_sample_kernel`; inputs already validated. Returns int64 ``[B]``."""
    B, V = logits.shape
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    has_u = uncond_logits is not None
    if has_u:
        uncond_logits = uncond_logits if uncond_logits.stride(1) == 1 else uncond_logits.contiguous()
    u = uncond_logits if has_u else logits
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    block = min(triton.next_power_of_2(V), 4096 if _config.on_gpu(logits.device) else 1024)
    _sample_kernel[(B,)](
        logits, u, seeds.contiguous(), out,
        V, logits.stride(0), u.stride(0), float(guidance_scale), float(temperature),
        int(top_k), float(top_p),
        HAS_U=has_u, DO_TOPK=0 < top_k < V, DO_TOPP=top_p < 1.0, BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return out
