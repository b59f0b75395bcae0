"""Triton kernels for shared-prefix (cascade) decode attention over the wave cache.

Layer 1 of :mod:`pgen_engine.ops.decode_shared`: raw kernels and a launcher that assumes
validated, last-dim-contiguous tensors. The layout (head-major, as the Generator's wave
cache, see :class:`pgen_engine.models.decoder.KVCache`):

* ``q [B, Hq, D]``: one query token per row;
* pool ``PK, PV [P, Hkv, Lp, D]``: each distinct prompt once; row ``b`` reads positions
  ``[0, plen_b)`` of pool row ``prefix_row[b]``, ``plen_b = min(prefix_len[b], seqlens[b])``;
* own rows ``K, V [rows >= B, Hkv, Lo, D]``: row ``b``'s positions ``p >= plen_b`` at index
  ``p - plen_b`` (``seqlens[b] - plen_b`` of them, capped at ``Lo``);
* groups (CSR): the rows reading pool row ``p`` are ``GROUP_ROWS[GROUP_PTR[p]:GROUP_PTR[p+1]]``.

Two kernels, so that a shared prefix crosses the memory bus once per group, not once per row:

1. ``_prefix_partial_kernel``, grid ``(P, Hkv, splits)``: one program loads a chunk of one
   pool row's keys / values for one KV head once and scores it against the queries of every
   row of the group (``rows x Hq/Hkv`` query vectors as the M side of ``tl.dot``), leaving
   split-softmax partials ``(m, l, acc)`` per (row, query head, split);
2. ``_own_merge_kernel``, grid ``(B, Hkv)``: each row's own tokens (not shared), then the merge
   with that row's prefix partials into the output.

fp8 (``FP8=True``): the caches hold float8 e4m3 bit patterns (passed as uint8) with float32
scales per (row, KV head): ``K_SCALE, V_SCALE [rows, Hkv]`` for own rows and ``PK_SCALE,
PV_SCALE [P, Hkv]`` for the pool. A scale is a scalar per program, so it multiplies the
scores (K) and the accumulated output (V) instead of every element. The e4m3 -> float
conversion is done on the bits (see :func:`_e4m3_to_f16`), so one kernel runs on every
architecture (native fp8 conversion needs sm_89+) and in the interpreter.
Scores are in base 2 (``qk * scale * log2(e)``) so the softmax uses ``exp2``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pgen_engine.ops import _triton_config as _config

LOG2E = 1.4426950408889634

# Test hook: when True the launcher's buffers start as NaN, so an element a kernel should
# write and does not fails the test.
POISON_OUTPUTS = False


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` with float32 accumulation. UPCAST: the CPU interpreter multiplies bf16
    operands as raw bits; bf16 products are exact in float32, so upcasting matches the MMA."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _e4m3_to_f16(x):
    """float8 e4m3 (fn) bit patterns (uint8) -> their float16 values, exactly.

    Sign to bit 15, exponent and mantissa shifted into float16's fields: that reads the
    number as ``2^(e-15) (1 + m/8)`` (or the subnormal ``m 2^-17``) instead of e4m3's
    ``2^(e-7) (1 + m/8)`` (``m 2^-9``), a factor of ``2^-8`` for every code. e4m3's NaN codes
    (``0x7F`` / ``0xFF``: quantisation saturates finite values at 448, but a NaN activation is
    stored as NaN) read as NaN, as the torch reference's dequantisation does (the shift alone made
    them +-480, hiding a NaN from the non-finite-logits check)."""
    b = x.to(tl.int32)
    h = (((b & 0x7F) << 7) | ((b & 0x80) << 8)).to(tl.uint16)
    return tl.where((b & 0x7F) == 0x7F, float("nan"), h.to(tl.float16, bitcast=True) * 256.0)


@triton.jit
def _load_kv(ptr, mask, FP8: tl.constexpr, DT: tl.constexpr):
    if FP8:
        return _e4m3_to_f16(tl.load(ptr, mask=mask, other=0)).to(DT)
    else:
        return tl.load(ptr, mask=mask, other=0.0).to(DT)


@triton.jit
def _prefix_partial_kernel(
    Q, PK, PV, PK_SCALE, PV_SCALE, SEQLENS, PLEN, GROUP_PTR, GROUP_ROWS, M_PART, L_PART, ACC_PART,
    stride_qb, stride_qh, stride_kp, stride_kh, stride_kt, stride_vp, stride_vh, stride_vt,
    n_heads_q, n_heads_kv, group, head_dim, pool_len, chunk, num_splits, qk_scale_log2,
    FP8: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    p = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    first = tl.load(GROUP_PTR + p)
    count = (tl.load(GROUP_PTR + p + 1) - first) * group  # query vectors of this group and KV head
    t_begin = split * chunk
    t_stop = tl.minimum(t_begin + chunk, pool_len)
    DT = Q.dtype.element_ty

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    k_base = PK + p.to(tl.int64) * stride_kp + hk * stride_kh
    v_base = PV + p.to(tl.int64) * stride_vp + hk * stride_vh
    sk = qk_scale_log2
    sv = 1.0
    if FP8:
        sk = sk * tl.load(PK_SCALE + p * n_heads_kv + hk)
        sv = tl.load(PV_SCALE + p * n_heads_kv + hk)
    for m0 in range(0, count, BLOCK_M):
        idx = m0 + offs_m
        m_valid = idx < count
        row = tl.load(GROUP_ROWS + first + idx // group, mask=m_valid, other=0)
        head = hk * group + idx % group
        plen = tl.minimum(tl.load(PLEN + row, mask=m_valid, other=0), tl.load(SEQLENS + row, mask=m_valid, other=0))
        plen = tl.where(m_valid, tl.minimum(plen, pool_len), 0)
        q = tl.load(Q + row.to(tl.int64)[:, None] * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                    mask=m_valid[:, None] & d_valid[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        t_end = tl.minimum(t_stop, tl.max(plen, axis=0))  # no row of this tile reads further
        for t0 in range(t_begin, t_end, BLOCK_N):
            t = t0 + offs_n
            t_valid = t < t_end
            kt = _load_kv(k_base + t[None, :] * stride_kt + offs_d[:, None], d_valid[:, None] & t_valid[None, :],
                          FP8, DT)
            s = _dot(q, kt, DOT_PREC, UPCAST) * sk
            s = tl.where(t[None, :] < plen[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            pr = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(pr, axis=1)
            v = _load_kv(v_base + t[:, None] * stride_vt + offs_d[None, :], t_valid[:, None] & d_valid[None, :],
                         FP8, DT)
            acc = acc * alpha[:, None] + _dot(pr.to(DT), v, DOT_PREC, UPCAST)
            m_i = m_new
        # partials are [B, Hq, splits] (+ [.., D]); a split past a row's prefix stores (-inf, 0, 0)
        slot = (row.to(tl.int64) * n_heads_q + head) * num_splits + split
        tl.store(M_PART + slot, m_i, mask=m_valid)
        tl.store(L_PART + slot, l_i, mask=m_valid)
        tl.store(ACC_PART + slot[:, None] * head_dim + offs_d[None, :], acc * sv,
                 mask=m_valid[:, None] & d_valid[None, :])


@triton.jit
def _own_merge_kernel(
    Q, K, V, K_SCALE, V_SCALE, SEQLENS, PLEN, M_PART, L_PART, ACC_PART, O,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, stride_ob, stride_oh,
    n_heads_q, n_heads_kv, group, head_dim, own_len, pool_len, num_splits, qk_scale_log2,
    FP8: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    hk = tl.program_id(1)
    DT = Q.dtype.element_ty
    n = tl.load(SEQLENS + b)
    plen = tl.minimum(tl.minimum(tl.load(PLEN + b), n), pool_len)
    n_own = tl.minimum(n - plen, own_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_valid = offs_g < group
    d_valid = offs_d < head_dim
    heads = hk * group + offs_g
    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_valid[:, None] & d_valid[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh
    sk = qk_scale_log2
    sv = 1.0
    if FP8:
        sk = sk * tl.load(K_SCALE + b * n_heads_kv + hk)
        sv = tl.load(V_SCALE + b * n_heads_kv + hk)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for t0 in range(0, n_own, BLOCK_N):
        t = t0 + offs_n
        t_valid = t < n_own
        kt = _load_kv(k_base + t[None, :] * stride_kt + offs_d[:, None], d_valid[:, None] & t_valid[None, :], FP8, DT)
        s = _dot(q, kt, DOT_PREC, UPCAST) * sk
        s = tl.where(t_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        pr = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        v = _load_kv(v_base + t[:, None] * stride_vt + offs_d[None, :], t_valid[:, None] & d_valid[None, :], FP8, DT)
        acc = acc * alpha[:, None] + _dot(pr.to(DT), v, DOT_PREC, UPCAST)
        m_i = m_new
    acc = acc * sv

    # merge the prefix partials (one per split) into the running (m, l, acc)
    part = (b.to(tl.int64) * n_heads_q + heads) * num_splits
    for s_idx in range(0, num_splits):
        m_s = tl.load(M_PART + part + s_idx, mask=g_valid, other=float("-inf"))
        l_s = tl.load(L_PART + part + s_idx, mask=g_valid, other=0.0)
        a_s = tl.load(ACC_PART + (part + s_idx)[:, None] * head_dim + offs_d[None, :],
                      mask=g_valid[:, None] & d_valid[None, :], other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_old = tl.exp2(m_i - m_safe)
        w_new = tl.exp2(m_s - m_safe)
        l_i = l_i * w_old + l_s * w_new
        acc = acc * w_old[:, None] + a_s * w_new[:, None]
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no key at all (seqlens 0): zeros
    tl.store(O + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :], out.to(DT),
             mask=g_valid[:, None] & d_valid[None, :])


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32, or the kernel loses to the fp32 reference
    return "ieee" if dtype == torch.float32 else "tf32"


def _bits(x: torch.Tensor) -> torch.Tensor:
    """float8 tensors go to the kernels as their uint8 bits (see :func:`_e4m3_to_f16`)."""
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


def decode_shared(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor, prefix_k: torch.Tensor,
    prefix_v: torch.Tensor, prefix_len: torch.Tensor, group_ptr: torch.Tensor, group_rows: torch.Tensor,
    scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    prefix_k_scale: torch.Tensor | None = None, prefix_v_scale: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Launch the two kernels (module docstring). Scales are given iff the caches are float8.

    Args:
        q: ``[B, Hq, D]``; k / v ``[rows >= B, Hkv, Lo, D]``; prefix_k / prefix_v ``[P, Hkv, Lp, D]``.
        seqlens, prefix_len: int32 ``[>= B]``; group_ptr int32 ``[P + 1]``; group_rows int32 ``[B]``.
        num_splits: prefix chunks per pool row (default :func:`~pgen_engine.ops._triton_config.shared_decode_blocks`).
    Returns:
        ``[B, Hq, D]`` in q's dtype.
    """
    B, n_heads_q, head_dim = q.shape
    P, n_heads_kv, pool_len, _ = prefix_k.shape
    # the kernels index these as dense arrays (SEQLENS + row, K_SCALE + row * Hkv + head): a
    # strided view would read other rows' lengths / scales (.contiguous() is a no-op when dense)
    seqlens, prefix_len, group_ptr, group_rows = (t.contiguous() for t in (seqlens, prefix_len, group_ptr, group_rows))
    k_scale, v_scale, prefix_k_scale, prefix_v_scale = (
        None if t is None else t.contiguous() for t in (k_scale, v_scale, prefix_k_scale, prefix_v_scale))
    own_len = k.shape[2]
    group = n_heads_q // n_heads_kv
    fp8 = k_scale is not None
    cfg = _config.shared_decode_blocks(_config.device_arch(q.device), q.dtype, head_dim)
    if num_splits is None:
        num_splits = max(1, min(cfg.max_splits, triton.cdiv(max(pool_len, 1), cfg.split_len)))
    chunk = triton.cdiv(triton.cdiv(max(pool_len, 1), num_splits), cfg.block_n) * cfg.block_n
    block_d = max(16, triton.next_power_of_2(head_dim))
    dev = q.device
    m_part = _empty((B, n_heads_q, num_splits), torch.float32, dev)
    l_part = _empty((B, n_heads_q, num_splits), torch.float32, dev)
    acc_part = _empty((B, n_heads_q, num_splits, head_dim), torch.float32, dev)
    out = _empty(q.shape, q.dtype, dev)
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    prec, upcast = _dot_precision(q.dtype), _interpreting() and q.dtype == torch.bfloat16
    if P > 0 and B > 0:
        _prefix_partial_kernel[(P, n_heads_kv, num_splits)](
            q, _bits(prefix_k), _bits(prefix_v),
            prefix_k_scale if fp8 else dummy, prefix_v_scale if fp8 else dummy,
            seqlens, prefix_len, group_ptr, group_rows, m_part, l_part, acc_part,
            q.stride(0), q.stride(1), prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
            prefix_v.stride(0), prefix_v.stride(1), prefix_v.stride(2),
            n_heads_q, n_heads_kv, group, head_dim, pool_len, chunk, num_splits, scale * LOG2E,
            FP8=fp8, DOT_PREC=prec, UPCAST=upcast, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if B > 0:
        _own_merge_kernel[(B, n_heads_kv)](
            q, _bits(k), _bits(v), k_scale if fp8 else dummy, v_scale if fp8 else dummy, seqlens, prefix_len,
            m_part, l_part, acc_part, out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1),
            n_heads_q, n_heads_kv, group, head_dim, own_len, pool_len, num_splits, scale * LOG2E,
            FP8=fp8, DOT_PREC=prec, UPCAST=upcast, BLOCK_G=max(16, triton.next_power_of_2(group)),
            BLOCK_N=cfg.block_n, BLOCK_D=block_d, num_warps=4, num_stages=cfg.num_stages,
        )
    return out
