"""Prefill forward kernel (flash-attention style online softmax) and its launcher; packed
inputs as described in :mod:`pgen_engine.ops._triton_attention`."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pgen_engine.ops import _triton_config as _config
from pgen_engine.ops._triton_attention import common
from pgen_engine.ops._triton_attention.common import (
    LN2_K, LOG2E, bh_index, dot_precision, dummy_index, empty, mma, upcast_dot,
)


@triton.jit
def _prefill_fwd_kernel(
    Q, K, V, O, LSE, CU, QHI, KPM,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    total_tokens, n_heads_q, group, head_dim, qk_scale_log2, n_bh, grid_y,
    CAUSAL: tl.constexpr, HAS_SPANS: tl.constexpr, HAS_KPM: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh, bh_valid = bh_index(n_bh, grid_y)
    b = pid_bh // n_heads_q
    h = pid_bh % n_heads_q
    hk = h // group
    start = tl.load(CU + b).to(tl.int64)
    seqlen = tl.where(bh_valid, (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32), 0)
    m0 = pid_m * BLOCK_M
    if m0 < seqlen:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < seqlen
        d_valid = offs_d < head_dim
        q_ptrs = Q + (start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)

        if CAUSAL:
            if HAS_SPANS:
                q_hi = tl.load(QHI + start + offs_m, mask=m_valid, other=0)
            else:
                q_hi = offs_m + 1
            kv_end = tl.minimum(tl.max(q_hi, axis=0), seqlen)
        else:
            kv_end = seqlen

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, kv_end, BLOCK_N):
            kn = n0 + offs_n
            n_valid = kn < seqlen
            kt_ptrs = K + (start + kn)[None, :] * stride_kt + hk * stride_kh + offs_d[:, None]
            kt = tl.load(kt_ptrs, mask=d_valid[:, None] & n_valid[None, :], other=0.0)
            s = mma(q, kt, DOT_PREC, UPCAST) * qk_scale_log2
            allowed = n_valid[None, :] & m_valid[:, None]
            if CAUSAL:
                allowed = allowed & (kn[None, :] < q_hi[:, None])
            if HAS_KPM:
                kp = tl.load(KPM + start + kn, mask=n_valid, other=0)
                allowed = allowed & (kp != 0)[None, :]
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row with no allowed key so far keeps m = -inf; shifting by 0 keeps exp2 finite.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_ptrs = V + (start + kn)[:, None] * stride_vt + hk * stride_vh + offs_d[None, :]
            v = tl.load(v_ptrs, mask=n_valid[:, None] & d_valid[None, :], other=0.0)
            acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PREC, UPCAST)
            m_i = m_new

        empty_row = l_i == 0.0
        out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
        o_ptrs = O + (start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
        lse = tl.where(empty_row, float("inf"), (m_i + tl.log2(tl.where(empty_row, 1.0, l_i))) * LN2_K)
        tl.store(LSE + h * total_tokens + start + offs_m, lse, mask=m_valid)


def prefill_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    q_hi: torch.Tensor | None, kpm: torch.Tensor | None, max_seqlen: int, causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the prefill forward. Packed inputs (see module doc).

    Returns:
        out ``[T, Hq, D]`` in q's dtype, lse float32 ``[Hq, T]``.
    """
    total, n_heads_q, head_dim = q.shape
    group = n_heads_q // k.shape[1]
    n_seq = cu_seqlens.numel() - 1
    cu_seqlens = cu_seqlens.contiguous()  # read as CU + b (a strided view would mix sequences)
    out = empty(q.shape, q.dtype, q.device)
    lse = empty((n_heads_q, total), torch.float32, q.device)
    block_m, block_n, warps, stages = _config.prefill_blocks(_config.device_arch(q.device), q.dtype, head_dim)
    block_d = max(16, triton.next_power_of_2(head_dim))
    dummy = dummy_index(q.device)
    grid = common.bh_grid(triton.cdiv(max(max_seqlen, 1), block_m), n_seq * n_heads_q)
    _prefill_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens,
        q_hi if q_hi is not None else dummy, kpm if kpm is not None else dummy,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        total, n_heads_q, group, head_dim, scale * LOG2E, n_seq * n_heads_q, grid[1],
        CAUSAL=causal, HAS_SPANS=q_hi is not None, HAS_KPM=kpm is not None,
        DOT_PREC=dot_precision(q.dtype), UPCAST=upcast_dot(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=warps, num_stages=stages,
    )
    return out, lse
