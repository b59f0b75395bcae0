"""Split-K decode over a paged KV cache: one kernel attends each split of the cached context,
a second one merges the splits' partial softmax states."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pgen_engine.ops import _triton_config as _config
from pgen_engine.ops._triton_attention.common import LOG2E, dot_precision, empty, mma, upcast_dot


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
        s = mma(q, kt, DOT_PREC, UPCAST) * qk_scale_log2
        s = tl.where(t_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + (page * stride_vp + off * stride_vt + hk * stride_vh)[:, None] + offs_d[None, :],
                    mask=t_valid[:, None] & d_valid[None, :], other=0.0)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PREC, UPCAST)
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
    # the kernel indexes both as dense (``SEQLENS + b``, ``BT + b * stride + j``): a strided
    # view (``lens[:, 0]``, ``table.t()``) would read other rows' entries (no-op when dense)
    cache_seqlens, block_table = cache_seqlens.contiguous(), block_table.contiguous()
    group = n_heads_q // n_heads_kv
    capacity = block_table.shape[1] * block_size
    if num_splits is None:
        num_splits = decode_num_splits(batch, n_heads_kv, capacity, q.device)
    block_n, warps, stages = _config.decode_blocks(_config.device_arch(q.device), q.dtype, head_dim)
    chunk = triton.cdiv(triton.cdiv(max(capacity, 1), num_splits), block_n) * block_n
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_g = max(16, triton.next_power_of_2(group))
    m_part = empty((batch, n_heads_q, num_splits), torch.float32, q.device)
    l_part = empty((batch, n_heads_q, num_splits), torch.float32, q.device)
    acc_part = empty((batch, n_heads_q, num_splits, head_dim), torch.float32, q.device)
    out = empty(q.shape, q.dtype, q.device)
    _decode_split_kernel[(batch, n_heads_kv, num_splits)](
        q, k_cache, v_cache, cache_seqlens, block_table, m_part, l_part, acc_part,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0),
        n_heads_q, group, head_dim, block_size, capacity, chunk, num_splits, scale * LOG2E,
        DOT_PREC=dot_precision(q.dtype), UPCAST=upcast_dot(q.dtype),
        BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=warps, num_stages=stages,
    )
    _decode_reduce_kernel[(batch, n_heads_q)](
        m_part, l_part, acc_part, out, out.stride(0), out.stride(1), n_heads_q, head_dim,
        num_splits, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d,
        num_warps=4,
    )
    return out
