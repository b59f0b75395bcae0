"""Prefill backward, FA2 style: P is recomputed from the forward's lse; one kernel writes
dK/dV (a program per key block), one writes dQ (a program per query block)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pgen_engine.ops import _triton_config as _config
from pgen_engine.ops._triton_attention import common
from pgen_engine.ops._triton_attention.common import (
    LOG2E, LOG2E_K, bh_index, dot_precision, dummy_index, empty, mma, upcast_dot,
)


@triton.jit
def _prefill_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU, QHI, KLO, KPM,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    total_tokens, n_heads_kv, group, head_dim, qk_scale_log2, sm_scale, n_bh, grid_y,
    CAUSAL: tl.constexpr, HAS_SPANS: tl.constexpr, HAS_KPM: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh, bh_valid = bh_index(n_bh, grid_y)
    b = pid_bh // n_heads_kv
    hk = pid_bh % n_heads_kv
    start = tl.load(CU + b).to(tl.int64)
    seqlen = tl.where(bh_valid, (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32), 0)
    n0 = pid_n * BLOCK_N
    if n0 < seqlen:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        n_valid = offs_n < seqlen
        d_valid = offs_d < head_dim
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(K + (start + offs_n)[:, None] * stride_kt + hk * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + (start + offs_n)[:, None] * stride_vt + hk * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        key_ok = n_valid
        if HAS_KPM:
            kp = tl.load(KPM + start + offs_n, mask=n_valid, other=0)
            key_ok = key_ok & (kp != 0)
        if CAUSAL:
            if HAS_SPANS:
                k_lo = tl.load(KLO + start + offs_n, mask=n_valid, other=2147483647)
                q_begin = tl.min(k_lo, axis=0)
            else:
                q_begin = n0
            q_begin = (q_begin // BLOCK_M) * BLOCK_M
        else:
            q_begin = 0

        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(0, group):
            h = hk * group + g
            for m0 in range(q_begin, seqlen, BLOCK_M):
                qm = m0 + offs_m
                m_valid = qm < seqlen
                q_mask = m_valid[:, None] & d_valid[None, :]
                q = tl.load(Q + (start + qm)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                            mask=q_mask, other=0.0)
                do = tl.load(DO + (start + qm)[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                             mask=q_mask, other=0.0)
                lse = tl.load(LSE + h * total_tokens + start + qm, mask=m_valid, other=float("inf"))
                delta = tl.load(DELTA + h * total_tokens + start + qm, mask=m_valid, other=0.0)
                s = mma(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale_log2
                allowed = m_valid[:, None] & key_ok[None, :]
                if CAUSAL:
                    if HAS_SPANS:
                        q_hi = tl.load(QHI + start + qm, mask=m_valid, other=0)
                    else:
                        q_hi = qm + 1
                    allowed = allowed & (offs_n[None, :] < q_hi[:, None])
                p = tl.where(allowed, tl.exp2(s - (lse * LOG2E_K)[:, None]), 0.0)
                dv += mma(tl.trans(p.to(do.dtype)), do, DOT_PREC, UPCAST)
                dp = mma(do, tl.trans(v), DOT_PREC, UPCAST)
                ds = p * (dp - delta[:, None])
                dk += mma(tl.trans(ds.to(q.dtype)), q, DOT_PREC, UPCAST)
        dk = dk * sm_scale
        tl.store(DK + (start + offs_n)[:, None] * stride_dkt + hk * stride_dkh + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + (start + offs_n)[:, None] * stride_dvt + hk * stride_dvh + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _prefill_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU, QHI, KPM,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dqt, stride_dqh,
    total_tokens, n_heads_q, group, head_dim, qk_scale_log2, sm_scale, n_bh, grid_y,
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
        q_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(Q + (start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=q_mask, other=0.0)
        do = tl.load(DO + (start + offs_m)[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                     mask=q_mask, other=0.0)
        lse = tl.load(LSE + h * total_tokens + start + offs_m, mask=m_valid, other=float("inf"))
        delta = tl.load(DELTA + h * total_tokens + start + offs_m, mask=m_valid, other=0.0)
        if CAUSAL:
            if HAS_SPANS:
                q_hi = tl.load(QHI + start + offs_m, mask=m_valid, other=0)
            else:
                q_hi = offs_m + 1
            kv_end = tl.minimum(tl.max(q_hi, axis=0), seqlen)
        else:
            kv_end = seqlen
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, kv_end, BLOCK_N):
            kn = n0 + offs_n
            n_valid = kn < seqlen
            kv_mask = n_valid[:, None] & d_valid[None, :]
            k = tl.load(K + (start + kn)[:, None] * stride_kt + hk * stride_kh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            v = tl.load(V + (start + kn)[:, None] * stride_vt + hk * stride_vh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            s = mma(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale_log2
            allowed = m_valid[:, None] & n_valid[None, :]
            if CAUSAL:
                allowed = allowed & (kn[None, :] < q_hi[:, None])
            if HAS_KPM:
                kp = tl.load(KPM + start + kn, mask=n_valid, other=0)
                allowed = allowed & (kp != 0)[None, :]
            p = tl.where(allowed, tl.exp2(s - (lse * LOG2E_K)[:, None]), 0.0)
            dp = mma(do, tl.trans(v), DOT_PREC, UPCAST)
            ds = p * (dp - delta[:, None])
            dq += mma(ds.to(k.dtype), k, DOT_PREC, UPCAST)
        dq = dq * sm_scale
        tl.store(DQ + (start + offs_m)[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=q_mask)


def prefill_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu_seqlens: torch.Tensor, q_hi: torch.Tensor | None,
    k_lo: torch.Tensor | None, kpm: torch.Tensor | None, max_seqlen: int, causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the prefill backward. Packed inputs; returns ``dq [T,Hq,D]``, ``dk, dv [T,Hkv,D]``."""
    total, n_heads_q, head_dim = q.shape
    n_heads_kv = k.shape[1]
    group = n_heads_q // n_heads_kv
    n_seq = cu_seqlens.numel() - 1
    cu_seqlens = cu_seqlens.contiguous()  # read as CU + b (a strided view would mix sequences)
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    # delta_i = rowsum(dO_i * O_i): the softmax-Jacobian correction term, fp32 [Hq, T].
    delta = (dout.float() * out.float()).sum(-1).transpose(0, 1).contiguous()
    dq = empty(q.shape, q.dtype, q.device)
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    block_m, block_n, warps, stages = _config.prefill_blocks(_config.device_arch(q.device), q.dtype, head_dim,
                                                             backward=True)
    block_d = max(16, triton.next_power_of_2(head_dim))
    dummy = dummy_index(q.device)
    launch = dict(
        CAUSAL=causal, HAS_SPANS=q_hi is not None, HAS_KPM=kpm is not None,
        DOT_PREC=dot_precision(q.dtype), UPCAST=upcast_dot(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=warps, num_stages=stages,
    )
    qhi_arg = q_hi if q_hi is not None else dummy
    klo_arg = k_lo if k_lo is not None else dummy
    kpm_arg = kpm if kpm is not None else dummy
    grid_kv = common.bh_grid(triton.cdiv(max(max_seqlen, 1), block_n), n_seq * n_heads_kv)
    _prefill_bwd_dkdv_kernel[grid_kv](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens, qhi_arg, klo_arg, kpm_arg,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        total, n_heads_kv, group, head_dim, scale * LOG2E, scale, n_seq * n_heads_kv, grid_kv[1], **launch,
    )
    grid_q = common.bh_grid(triton.cdiv(max(max_seqlen, 1), block_m), n_seq * n_heads_q)
    _prefill_bwd_dq_kernel[grid_q](
        q, k, v, dout, lse, delta, dq, cu_seqlens, qhi_arg, kpm_arg,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
        total, n_heads_q, group, head_dim, scale * LOG2E, scale, n_seq * n_heads_q, grid_q[1], **launch,
    )
    return dq, dk, dv
