"""Triton kernels for attention: prefill (fwd + bwd), split-K paged decode, paged KV write.

Layer 1 of the three-layer op design: raw kernels plus thin launchers that allocate
outputs and pick block sizes. Input validation lives in :mod:`pgen_engine.ops.attention`;
launchers here assume validated, last-dim-contiguous tensors.

Conventions shared by all prefill kernels (packed "varlen" layout, like flash-attn):
  * ``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` with ``cu_seqlens`` int32 ``[B+1]``; a padded
    batch ``[B, S, ...]`` is passed as ``T = B*S`` with ``cu_seqlens = arange(B+1)*S``.
  * ``q_hi`` int32 ``[T]`` (only when spans are present): exclusive key end, in
    sequence-local positions, that query ``i`` may attend to under causal masking
    (``max(i+1, end of any bidirectional span containing i)``). ``k_lo`` int32 ``[T]``:
    first query that may attend to key ``j``. Both are monotone within a sequence, which
    is what lets the kernels bound their loops.
  * ``kpm`` int8 ``[T]`` (optional): 1 = real key, 0 = padding.
  * ``lse`` float32 ``[Hq, T]``: natural-log log-sum-exp of scaled scores, ``+inf`` for a
    query row with no allowed key (so the backward's ``exp(s - lse)`` is 0 there).
Scores are computed in base 2 (``qk * scale * log2(e)``) so the softmax uses ``exp2``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pgen_engine.ops import _triton_config as _config

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Compiled kernels may only read module globals that are constexpr (the interpreter is laxer).
LOG2E_K = tl.constexpr(LOG2E)
LN2_K = tl.constexpr(LN2)

# Test hook: when True every buffer the launchers allocate is pre-filled with NaN, so a
# test fails if any element a kernel should write is left unwritten.
POISON_OUTPUTS = False


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32, or the kernel loses to the fp32 reference.
    return "ieee" if dtype == torch.float32 else "tf32"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _upcast_dot(dtype: torch.dtype) -> bool:
    # Triton's CPU interpreter multiplies bf16 operands as their raw uint16 bits. bf16*bf16
    # products are exact in fp32, so upcasting first matches the GPU's bf16 MMA (fp32 acc).
    return _interpreting() and dtype == torch.bfloat16


@triton.jit
def _mma(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot(a, b)`` with fp32 accumulation (see :func:`_upcast_dot` for UPCAST)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


# ---------------------------------------------------------------------------------------
# Prefill forward
# ---------------------------------------------------------------------------------------
@triton.jit
def _prefill_fwd_kernel(
    Q, K, V, O, LSE, CU, QHI, KPM,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    total_tokens, n_heads_q, group, head_dim, qk_scale_log2,
    CAUSAL: tl.constexpr, HAS_SPANS: tl.constexpr, HAS_KPM: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads_q
    h = pid_bh % n_heads_q
    hk = h // group
    start = tl.load(CU + b).to(tl.int64)
    seqlen = (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32)
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
            s = _mma(q, kt, DOT_PREC, UPCAST) * qk_scale_log2
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
            acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PREC, UPCAST)
            m_i = m_new

        empty_row = l_i == 0.0
        out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
        o_ptrs = O + (start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
        lse = tl.where(empty_row, float("inf"), (m_i + tl.log2(tl.where(empty_row, 1.0, l_i))) * LN2_K)
        tl.store(LSE + h * total_tokens + start + offs_m, lse, mask=m_valid)


def _dummy(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


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
    out = _empty(q.shape, q.dtype, q.device)
    lse = _empty((n_heads_q, total), torch.float32, q.device)
    block_m, block_n, warps, stages = _config.prefill_blocks(_config.device_arch(q.device), q.dtype, head_dim)
    block_d = max(16, triton.next_power_of_2(head_dim))
    dummy = _dummy(q.device)
    grid = (triton.cdiv(max(max_seqlen, 1), block_m), n_seq * n_heads_q)
    _prefill_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens,
        q_hi if q_hi is not None else dummy, kpm if kpm is not None else dummy,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        total, n_heads_q, group, head_dim, scale * LOG2E,
        CAUSAL=causal, HAS_SPANS=q_hi is not None, HAS_KPM=kpm is not None,
        DOT_PREC=_dot_precision(q.dtype), UPCAST=_upcast_dot(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=warps, num_stages=stages,
    )
    return out, lse


# ---------------------------------------------------------------------------------------
# Prefill backward (FA2 style: recompute P from lse; one kernel for dK/dV, one for dQ)
# ---------------------------------------------------------------------------------------
@triton.jit
def _prefill_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU, QHI, KLO, KPM,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    total_tokens, n_heads_kv, group, head_dim, qk_scale_log2, sm_scale,
    CAUSAL: tl.constexpr, HAS_SPANS: tl.constexpr, HAS_KPM: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads_kv
    hk = pid_bh % n_heads_kv
    start = tl.load(CU + b).to(tl.int64)
    seqlen = (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32)
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
                s = _mma(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale_log2
                allowed = m_valid[:, None] & key_ok[None, :]
                if CAUSAL:
                    if HAS_SPANS:
                        q_hi = tl.load(QHI + start + qm, mask=m_valid, other=0)
                    else:
                        q_hi = qm + 1
                    allowed = allowed & (offs_n[None, :] < q_hi[:, None])
                p = tl.where(allowed, tl.exp2(s - (lse * LOG2E_K)[:, None]), 0.0)
                dv += _mma(tl.trans(p.to(do.dtype)), do, DOT_PREC, UPCAST)
                dp = _mma(do, tl.trans(v), DOT_PREC, UPCAST)
                ds = p * (dp - delta[:, None])
                dk += _mma(tl.trans(ds.to(q.dtype)), q, DOT_PREC, UPCAST)
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
    total_tokens, n_heads_q, group, head_dim, qk_scale_log2, sm_scale,
    CAUSAL: tl.constexpr, HAS_SPANS: tl.constexpr, HAS_KPM: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads_q
    h = pid_bh % n_heads_q
    hk = h // group
    start = tl.load(CU + b).to(tl.int64)
    seqlen = (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32)
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
            s = _mma(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale_log2
            allowed = m_valid[:, None] & n_valid[None, :]
            if CAUSAL:
                allowed = allowed & (kn[None, :] < q_hi[:, None])
            if HAS_KPM:
                kp = tl.load(KPM + start + kn, mask=n_valid, other=0)
                allowed = allowed & (kp != 0)[None, :]
            p = tl.where(allowed, tl.exp2(s - (lse * LOG2E_K)[:, None]), 0.0)
            dp = _mma(do, tl.trans(v), DOT_PREC, UPCAST)
            ds = p * (dp - delta[:, None])
            dq += _mma(ds.to(k.dtype), k, DOT_PREC, UPCAST)
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
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    # delta_i = rowsum(dO_i * O_i): the softmax-Jacobian correction term, fp32 [Hq, T].
    delta = (dout.float() * out.float()).sum(-1).transpose(0, 1).contiguous()
    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    block_m, block_n, warps, stages = _config.prefill_blocks(_config.device_arch(q.device), q.dtype, head_dim,
                                                             backward=True)
    block_d = max(16, triton.next_power_of_2(head_dim))
    dummy = _dummy(q.device)
    common = dict(
        CAUSAL=causal, HAS_SPANS=q_hi is not None, HAS_KPM=kpm is not None,
        DOT_PREC=_dot_precision(q.dtype), UPCAST=_upcast_dot(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=warps, num_stages=stages,
    )
    qhi_arg = q_hi if q_hi is not None else dummy
    klo_arg = k_lo if k_lo is not None else dummy
    kpm_arg = kpm if kpm is not None else dummy
    grid_kv = (triton.cdiv(max(max_seqlen, 1), block_n), n_seq * n_heads_kv)
    _prefill_bwd_dkdv_kernel[grid_kv](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens, qhi_arg, klo_arg, kpm_arg,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        total, n_heads_kv, group, head_dim, scale * LOG2E, scale, **common,
    )
    grid_q = (triton.cdiv(max(max_seqlen, 1), block_m), n_seq * n_heads_q)
    _prefill_bwd_dq_kernel[grid_q](
        q, k, v, dout, lse, delta, dq, cu_seqlens, qhi_arg, kpm_arg,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
        total, n_heads_q, group, head_dim, scale * LOG2E, scale, **common,
    )
    return dq, dk, dv


# ---------------------------------------------------------------------------------------
# Decode: split-K over the cached context, then a reduce kernel
# ---------------------------------------------------------------------------------------
@triton.jit
def _decode_split_kernel(
    Q, K, V, SEQLENS, BT, M_PART, L_PART, ACC_PART,
    stride_qb, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
    stride_btb, n_heads_q, group, head_dim, block_size, capacity, chunk, num_splits,
    qk_scale_log2,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    seqlen = tl.minimum(tl.load(SEQLENS + b), capacity)
    t_begin = split * chunk
    t_end = tl.minimum(t_begin + chunk, seqlen)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_valid = offs_g < group
    d_valid = offs_d < head_dim
    heads = hk * group + offs_g
    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_valid[:, None] & d_valid[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_N):
        t = t0 + offs_n
        t_valid = t < t_end
        page = tl.load(BT + b.to(tl.int64) * stride_btb + t // block_size, mask=t_valid, other=0)
        page = page.to(tl.int64)
        off = (t % block_size).to(tl.int64)
        kt = tl.load(K + (page * stride_kp + off * stride_kt + hk * stride_kh)[None, :] + offs_d[:, None],
                     mask=d_valid[:, None] & t_valid[None, :], other=0.0)
        s = _mma(q, kt, DOT_PREC, UPCAST) * qk_scale_log2
        s = tl.where(t_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + (page * stride_vp + off * stride_vt + hk * stride_vh)[:, None] + offs_d[None, :],
                    mask=t_valid[:, None] & d_valid[None, :], other=0.0)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PREC, UPCAST)
        m_i = m_new

    # Partial buffers are [B, Hq, num_splits] (+ [.., D]); empty splits store (-inf, 0, 0).
    row = (b * n_heads_q + heads).to(tl.int64) * num_splits + split
    tl.store(M_PART + row, m_i, mask=g_valid)
    tl.store(L_PART + row, l_i, mask=g_valid)
    tl.store(ACC_PART + row[:, None] * head_dim + offs_d[None, :], acc,
             mask=g_valid[:, None] & d_valid[None, :])


@triton.jit
def _decode_reduce_kernel(
    M_PART, L_PART, ACC_PART, O, stride_ob, stride_oh, n_heads_q, head_dim, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_valid = offs_s < num_splits
    d_valid = offs_d < head_dim
    row = (b * n_heads_q + h).to(tl.int64) * num_splits + offs_s
    m = tl.load(M_PART + row, mask=s_valid, other=float("-inf"))
    l = tl.load(L_PART + row, mask=s_valid, other=0.0)
    acc = tl.load(ACC_PART + row[:, None] * head_dim + offs_d[None, :],
                  mask=s_valid[:, None] & d_valid[None, :], other=0.0)
    m_max = tl.max(m, axis=0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_safe)
    l_tot = tl.sum(w * l, axis=0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(l_tot == 0.0, 1.0, l_tot)
    tl.store(O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty),
             mask=d_valid)


def decode_num_splits(batch: int, n_heads_kv: int, capacity: int, device: torch.device) -> int:
    """Split count for split-K decode: enough programs to fill the device, >= 256 tokens each."""
    max_by_len = max(1, triton.cdiv(capacity, 256))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(2 * sms, max(1, batch * n_heads_kv))
    else:
        # Interpreter: keep a few splits so the split/reduce path is exercised on CPU too.
        want = 4
        max_by_len = max(1, triton.cdiv(capacity, 32))
    return int(max(1, min(want, max_by_len, 64)))


def decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    block_table: torch.Tensor, scale: float, num_splits: int | None = None,
) -> torch.Tensor:
    """Launch split-K decode over a paged cache view.

    Args:
        q: ``[B, Hq, D]``.
        k_cache, v_cache: ``[P, block_size, Hkv, D]`` (a contiguous ``[B, Smax, Hkv, D]`` cache
            is passed as ``P = B``, ``block_size = Smax`` with ``block_table[b] = [b]``).
        cache_seqlens: int32 ``[B]``.
        block_table: int32 ``[B, max_blocks]``.
        num_splits: override of :func:`decode_num_splits` (tests).
    Returns:
        ``[B, Hq, D]`` in q's dtype.
    """
    batch, n_heads_q, head_dim = q.shape
    _, block_size, n_heads_kv, _ = k_cache.shape
    group = n_heads_q // n_heads_kv
    capacity = block_table.shape[1] * block_size
    if num_splits is None:
        num_splits = decode_num_splits(batch, n_heads_kv, capacity, q.device)
    block_n = 32 if _interpreting() else 64
    chunk = triton.cdiv(triton.cdiv(max(capacity, 1), num_splits), block_n) * block_n
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_g = max(16, triton.next_power_of_2(group))
    m_part = _empty((batch, n_heads_q, num_splits), torch.float32, q.device)
    l_part = _empty((batch, n_heads_q, num_splits), torch.float32, q.device)
    acc_part = _empty((batch, n_heads_q, num_splits, head_dim), torch.float32, q.device)
    out = _empty(q.shape, q.dtype, q.device)
    _decode_split_kernel[(batch, n_heads_kv, num_splits)](
        q, k_cache, v_cache, cache_seqlens, block_table, m_part, l_part, acc_part,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0),
        n_heads_q, group, head_dim, block_size, capacity, chunk, num_splits, scale * LOG2E,
        DOT_PREC=_dot_precision(q.dtype), UPCAST=_upcast_dot(q.dtype),
        BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=4, num_stages=2,
    )
    _decode_reduce_kernel[(batch, n_heads_q)](
        m_part, l_part, acc_part, out, out.stride(0), out.stride(1), n_heads_q, head_dim,
        num_splits, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d,
        num_warps=4,
    )
    return out


# ---------------------------------------------------------------------------------------
# Paged KV write
# ---------------------------------------------------------------------------------------
@triton.jit
def _kv_write_kernel(
    KC, VC, KN, VN, SLOTS,
    stride_kcp, stride_kct, stride_kch, stride_vcp, stride_vct, stride_vch,
    stride_knt, stride_knh, stride_vnt, stride_vnh,
    n_heads_kv, head_dim, block_size, capacity,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + i).to(tl.int64)
    # Negative slots are "skip"; out-of-range slots are dropped rather than written out of
    # bounds (no host sync to raise on them).
    ok = (slot >= 0) & (slot < capacity)
    slot = tl.where(ok, slot, 0)
    page = slot // block_size
    off = slot % block_size
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads_to_write = tl.where(ok, n_heads_kv, 0)
    mask = (offs_h[:, None] < heads_to_write) & (offs_d[None, :] < head_dim)
    kn = tl.load(KN + i * stride_knt + offs_h[:, None] * stride_knh + offs_d[None, :], mask=mask)
    vn = tl.load(VN + i * stride_vnt + offs_h[:, None] * stride_vnh + offs_d[None, :], mask=mask)
    tl.store(KC + page * stride_kcp + off * stride_kct + offs_h[:, None] * stride_kch + offs_d[None, :],
             kn, mask=mask)
    tl.store(VC + page * stride_vcp + off * stride_vct + offs_h[:, None] * stride_vch + offs_d[None, :],
             vn, mask=mask)


def kv_write(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Launch the KV write: caches ``[P, block_size, Hkv, D]``, new ``[N, Hkv, D]``, slots int64 ``[N]``."""
    n = k_new.shape[0]
    if n == 0:
        return
    pages, block_size, n_heads_kv, head_dim = k_cache.shape
    _kv_write_kernel[(n,)](
        k_cache, v_cache, k_new, v_new, slot_mapping,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        n_heads_kv, head_dim, block_size, pages * block_size,
        BLOCK_H=triton.next_power_of_2(n_heads_kv), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4 if n_heads_kv * head_dim >= 2048 else 1,
    )


__all__ = [
    "POISON_OUTPUTS", "prefill_fwd", "prefill_bwd", "decode", "decode_num_splits", "kv_write",
]
