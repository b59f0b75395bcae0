"""Torch references of the attention ops (``*_ref``): naive masks built from the spec, computed in
q's dtype. Ground truth for the kernel tests, and the ``backend="torch"`` path (native autograd,
fusable by ``torch.compile``)."""
from __future__ import annotations

import torch

from pgen_engine.ops.attention._validate import check_decode, check_kv_write, check_prefill, default_scale


def _allowed_mask(
    n_seq: int, seq: int, causal: bool, spans: torch.Tensor | None, kpm: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """bool ``[n_seq, seq, seq]``: may query i attend to key j (built naively from the spec)."""
    pos = torch.arange(seq, device=device)
    if causal:
        allowed = (pos[None, :] <= pos[:, None]).expand(n_seq, seq, seq)
        if spans is not None and spans.shape[1] > 0:
            st = spans[..., 0].long()
            en = spans[..., 1].long()
            real = (st >= 0) & (en > st)
            inside = (pos >= st[..., None]) & (pos < en[..., None]) & real[..., None]  # [B,N,S]
            both = (inside[:, :, :, None] & inside[:, :, None, :]).any(1)
            allowed = allowed | both
    else:
        allowed = torch.ones(n_seq, seq, seq, dtype=torch.bool, device=device)
    if kpm is not None:
        allowed = allowed & kpm[:, None, :]
    return allowed


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float):
    """Masked softmax attention in the inputs' dtype. q ``[B,S,Hq,D]``, k/v ``[B,S,Hkv,D]``,
    allowed ``[B,S,S]``. Returns (out ``[B,S,Hq,D]``, lse float32 ``[B,Hq,S]``)."""
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    allowed = allowed[:, None]
    row_any = allowed.any(-1, keepdim=True)
    s = s.masked_fill(~allowed, float("-inf"))
    # Rows with no allowed key: softmax over zeros (finite, so backward stays NaN-free), then zeroed.
    s = torch.where(row_any, s, torch.zeros((), dtype=s.dtype, device=s.device))
    p = torch.softmax(s, dim=-1)
    p = torch.where(row_any, p, torch.zeros((), dtype=p.dtype, device=p.device))
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    lse = torch.logsumexp(s.float(), dim=-1).masked_fill(~row_any[..., 0], float("inf"))
    return out, lse


def prefill_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
    cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None, scale: float | None = None,
    bidirectional_spans: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of :func:`prefill_attention` (same arguments, computed in q's dtype).

    Builds the full ``[S, S]`` mask per sequence, so it is for tests and small CPU runs.
    """
    check_prefill(q, k, v, causal, cu_seqlens, max_seqlen, bidirectional_spans, key_padding_mask)
    scale = default_scale(scale, q.shape[-1])
    if cu_seqlens is None:
        allowed = _allowed_mask(q.shape[0], q.shape[1], causal, bidirectional_spans, key_padding_mask, q.device)
        return _attend(q, k, v, allowed, scale)[0]
    cu = cu_seqlens.tolist()
    outs = []
    for b, (lo, hi) in enumerate(zip(cu, cu[1:])):
        spans = None if bidirectional_spans is None else bidirectional_spans[b : b + 1]
        allowed = _allowed_mask(1, hi - lo, causal, spans, None, q.device)
        outs.append(_attend(q[None, lo:hi], k[None, lo:hi], v[None, lo:hi], allowed, scale)[0][0])
    return torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape)


def packed_ref(q, k, v, cu_seqlens, q_hi, kpm, causal, scale):
    """Reference in the registered op's packed form (q_hi/kpm instead of spans/mask).

    Returns (out ``[T,Hq,D]``, lse float32 ``[Hq,T]``)."""
    cu = cu_seqlens.tolist()
    outs, lses = [], []
    for lo, hi in zip(cu, cu[1:]):
        n = hi - lo
        pos = torch.arange(n, device=q.device)
        if causal:
            limit = q_hi[lo:hi].long() if q_hi is not None else pos + 1
            allowed = pos[None, :] < limit[:, None]
        else:
            allowed = torch.ones(n, n, dtype=torch.bool, device=q.device)
        if kpm is not None:
            allowed = allowed & (kpm[lo:hi] != 0)[None, :]
        out, lse = _attend(q[None, lo:hi], k[None, lo:hi], v[None, lo:hi], allowed[None], scale)
        outs.append(out[0])
        lses.append(lse[0])
    out = torch.cat(outs, 0) if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses, 1) if lses else q.new_zeros((q.shape[1], 0), dtype=torch.float32)
    return out, lse


def decode_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, *,
    block_table: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:
    """Torch reference of :func:`decode_attention` (same arguments, computed in q's dtype)."""
    check_decode(q, k_cache, v_cache, cache_seqlens, block_table)
    scale = default_scale(scale, q.shape[-1])
    batch, n_heads_q, _ = q.shape
    if block_table is None:
        k, v = k_cache, v_cache
    else:
        idx = block_table.long().clamp(0, k_cache.shape[0] - 1)
        k = k_cache[idx].flatten(1, 2)  # [B, max_blocks*block_size, Hkv, D]
        v = v_cache[idx].flatten(1, 2)
    length = k.shape[1]
    valid = torch.arange(length, device=q.device)[None, :] < cache_seqlens[:, None].long()  # [B, L]
    # Unwritten cache slots may hold anything (NaN); zero them so 0 * garbage cannot leak.
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    k = torch.where(valid[:, :, None, None], k, zero)
    v = torch.where(valid[:, :, None, None], v, zero)
    group = n_heads_q // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    s = torch.einsum("bhd,blhd->bhl", q, k) * scale
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    row_any = valid.any(-1)[:, None, None]
    s = torch.where(row_any, s, torch.zeros((), dtype=s.dtype, device=s.device))
    p = torch.where(row_any, torch.softmax(s, dim=-1), torch.zeros((), dtype=s.dtype, device=s.device))
    return torch.einsum("bhl,blhd->bhd", p, v)


def paged_kv_write_ref(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Torch reference of :func:`paged_kv_write` (in place; slots outside ``[0, capacity)`` skipped).

    Uses boolean indexing, which syncs with the device; for tests and CPU runs.
    """
    check_kv_write(k_cache, v_cache, k_new, v_new, slot_mapping)
    block_size = k_cache.shape[1]
    capacity = k_cache.shape[0] * block_size
    keep = (slot_mapping >= 0) & (slot_mapping < capacity)
    slots = slot_mapping[keep]
    page, off = slots // block_size, slots % block_size
    k_cache[page, off] = k_new[keep]
    v_cache[page, off] = v_new[keep]
