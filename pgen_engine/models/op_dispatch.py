"""The decoder's calls into ``pgen_engine.ops``, in one place.

On CUDA tensors the fused kernels (Triton / CUDA) run; on CPU the ops' torch references
run, except attention and the KV write, which use ``torch.nn.functional.
scaled_dot_product_attention`` and ``index_copy_`` directly: the fastest exact CPU paths
(the ops' own torch references are readable definitions, not fast paths). The C++ float32
CPU layer stack is not dispatched here: it is a decode backend of the Generator
(:mod:`pgen_engine.generation.layers_cpu`), so the model always runs these ops.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from pgen_engine import envs
from pgen_engine.ops import attention as _attn
from pgen_engine.ops import kv_quant as _kvq
from pgen_engine.ops.decode_shared import shared_prefix_decode as _shared_prefix_decode
from pgen_engine.ops.norm import rms_norm as _rms_norm
from pgen_engine.ops.rotary import apply_rotary as _apply_rotary


# Set PGEN_FUSED_OPS=1 to take the fused-op path on CPU too (tests run it there with the
# ops' torch references or, under TRITON_INTERPRET=1, the Triton kernels).
_FORCE_FUSED = envs.get("PGEN_FUSED_OPS")


def _fused(t: torch.Tensor) -> bool:
    return t.is_cuda or _FORCE_FUSED


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm over the last dim; fp32 math, result in ``x.dtype``."""
    return _rms_norm(x, weight, eps)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[B,S,H,D]`` or ``[N,H,D]``, cos/sin ``[B,S,D]`` / ``[N,D]`` -> rotated x (HF rotate_half)."""
    return _apply_rotary(x, cos, sin)


def prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """Causal attention over full sequences.

    q ``[B,S,Hq,D]``, k/v ``[B,S,Hkv,D]``, key_mask bool ``[B,S]`` (True = real token) or
    None -> ``[B,S,Hq,D]``. Padded query rows attend to themselves only, so they stay
    finite (their outputs are never used).
    """
    if _fused(q):
        return _attn.prefill_attention(q, k, v, causal=True, key_padding_mask=key_mask, scale=scale)
    B, S, Hq, D = q.shape
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = Hq != k.shape[2]
    if key_mask is None:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        mask = causal & key_mask[:, None, :]
        mask = mask | torch.eye(S, dtype=torch.bool, device=q.device)
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None], scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2)


def kv_write(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, *, may_skip: bool = True, layout: str = "bshd") -> None:
    """Write k/v ``[N,Hkv,D]`` into flat slots ``[N]`` of caches ``[NB,BS,Hkv,D]``
    (``layout="bhsd"``: contiguous head-major ``[rows,Hkv,L,D]``, slot = row * L + position).

    With ``may_skip`` slots equal to -1 are skipped (prefill: padding); this filters on
    the host, so the decode loop passes ``may_skip=False`` (every slot valid, no sync).
    """
    if layout == "bhsd":
        if may_skip:
            keep = (slot_mapping >= 0).nonzero().squeeze(1)
            slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
        L = k_cache.shape[2]
        row, pos = slot_mapping // L, slot_mapping % L
        k_cache[row, :, pos] = k.to(k_cache.dtype)
        v_cache[row, :, pos] = v.to(v_cache.dtype)
        return
    if _fused(k_cache):  # fused kernel skips -1 slots on the device, no host sync
        _attn.paged_kv_write(k_cache, v_cache, k, v, slot_mapping)
        return
    kf = k_cache.view(-1, *k_cache.shape[2:])
    vf = v_cache.view(-1, *v_cache.shape[2:])
    if may_skip:
        keep = (slot_mapping >= 0).nonzero().squeeze(1)
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    kf.index_copy_(0, slot_mapping, k.to(kf.dtype))
    vf.index_copy_(0, slot_mapping, v.to(vf.dtype))


def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     block_table: torch.Tensor | None, scale: float, *, layout: str = "bshd",
                     prefix_row: torch.Tensor | None = None, prefix_len: torch.Tensor | None = None,
                     prefix_k: torch.Tensor | None = None, prefix_v: torch.Tensor | None = None) -> torch.Tensor:
    """One query per row over its cached keys.

    q ``[B,Hq,D]``; caches ``[NB,BS,Hkv,D]`` (or head-major ``[rows,Hkv,L,D]`` with
    ``layout="bhsd"``, contiguous only); cache_seqlens int32 ``[B]``; block_table int32
    ``[B,max_blocks]`` or None (contiguous: row b = block b) -> ``[B,Hq,D]``.
    Shared prefixes (``bhsd`` only, see :class:`~pgen_engine.models.decoder.KVCache`):
    ``prefix_k`` / ``prefix_v`` ``[P,Hkv,Lp,D]`` and int32 ``prefix_row`` / ``prefix_len``
    ``[>=B]``: row b reads positions ``[0, prefix_len[b])`` from pool row ``prefix_row[b]`` and
    positions ``[prefix_len[b], cache_seqlens[b])`` from index 0 of its own row. The cache may
    be kept in another dtype than ``q`` (it is cast on read).
    """
    if layout == "bhsd":
        if block_table is not None:
            raise ValueError("cached_attention: layout 'bhsd' is a contiguous cache; block_table must be None")
        B = q.shape[0]
        if prefix_row is not None:
            prefix_row, prefix_len = prefix_row[:B], prefix_len[:B]
        return _cached_attention_head_major(q, k_cache, v_cache, cache_seqlens, scale, prefix_row, prefix_len,
                                            prefix_k, prefix_v)
    if prefix_row is not None:
        raise ValueError("cached_attention: shared prefixes need the head-major 'bhsd' layout")
    if _fused(q):
        return _attn.decode_attention(q, k_cache, v_cache, cache_seqlens.int(), block_table=block_table, scale=scale)
    B, Hq, D = q.shape
    if block_table is None:
        k, v = k_cache[:B], v_cache[:B]
    else:
        nb = block_table.shape[1]
        k = k_cache[block_table.long()].reshape(B, nb * k_cache.shape[1], *k_cache.shape[2:])
        v = v_cache[block_table.long()].reshape(B, nb * v_cache.shape[1], *v_cache.shape[2:])
    L = k.shape[1]
    mask = torch.arange(L, device=q.device)[None, :] < cache_seqlens[:, None].to(torch.long)
    # Slots past a row's length hold whatever an earlier call left there (the cache is reused):
    # a masked key still enters its score as NaN + (-inf) and a masked value as 0 * NaN, so a
    # NaN / Inf once written would leak into every later call. Zero them.
    # (Cast to the activations' dtype: the cache may be kept in another, as the head-major path allows.)
    live = mask[:, :, None, None]
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    k = torch.where(live, k.to(q.dtype), zero)
    v = torch.where(live, v.to(q.dtype), zero)
    o = F.scaled_dot_product_attention(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=Hq != k.shape[2])
    return o[:, :, 0, :]


def cache_write(cache, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, *,
                decode: bool) -> None:
    """Write layer ``layer``'s new keys / values ``[N,Hkv,D]`` into ``cache`` (a
    :class:`~pgen_engine.models.decoder.KVCache`) at flat slots ``[N]``.

    ``decode``: one token per row, every slot valid, no host synchronisation. Else a prefill:
    ``-1`` slots (padding) are skipped. A float8 cache quantises with its per-(row, head)
    scales (:mod:`pgen_engine.ops.kv_quant`): a prefill calibrates the scales of the rows it
    writes; a decode write keeps them, setting a row's unset scale from its first token, no
    finer than the scale of the row's shared prompt.
    """
    kc, vc = cache.k[layer], cache.v[layer]
    if not _kvq.is_fp8(kc.dtype):
        kv_write(kc, vc, k, v, slot_mapping, may_skip=not decode, layout=cache.layout)
        return
    if not decode:
        keep = (slot_mapping >= 0).nonzero().squeeze(1)
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    ks, vs = cache.k_scale[layer], cache.v_scale[layer]
    floor_k = floor_v = None
    if decode and cache.prefix_row is not None:
        n = min(ks.shape[0], cache.prefix_row.shape[0])
        rows = cache.prefix_row[:n].long()
        floor_k = torch.zeros_like(ks)
        floor_v = torch.zeros_like(vs)
        floor_k[:n] = cache.prefix_k_scale[layer].index_select(0, rows)
        floor_v[:n] = cache.prefix_v_scale[layer].index_select(0, rows)
    _kvq.write_head_major(kc, vc, k, v, slot_mapping, ks, vs, calibrate=not decode, floor_k=floor_k, floor_v=floor_v)


def cache_attention(q: torch.Tensor, cache, layer: int, cache_seqlens: torch.Tensor,
                    block_table: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q ``[B,Hq,D]`` (one query per row) over layer ``layer`` of ``cache`` -> ``[B,Hq,D]``.

    Shared prefixes go through :func:`pgen_engine.ops.decode_shared.shared_prefix_decode`
    (the Triton cascade kernel, reading each prompt once per group) on CUDA / under
    ``PGEN_FUSED_OPS``, and for float8 caches on every device (its torch reference
    dequantises on CPU); everything else through :func:`cached_attention`.
    """
    kc, vc = cache.k[layer], cache.v[layer]
    fp8 = _kvq.is_fp8(kc.dtype)
    if cache.prefix_k is not None and (fp8 or _fused(q)):
        if block_table is not None:
            raise ValueError("cache_attention: shared prefixes are a contiguous cache; block_table must be None")
        sc = {}
        if fp8:
            sc = dict(k_scale=cache.k_scale[layer], v_scale=cache.v_scale[layer],
                      prefix_k_scale=cache.prefix_k_scale[layer], prefix_v_scale=cache.prefix_v_scale[layer])
        # the wave's groups cover every cache row: usable only when every row queries
        groups = cache.prefix_groups if q.shape[0] == cache.prefix_row.shape[0] else None
        return _shared_prefix_decode(q, kc, vc, cache_seqlens.int(), cache.prefix_k[layer], cache.prefix_v[layer],
                                     cache.prefix_row, cache.prefix_len, scale=scale, groups=groups, **sc)
    if fp8:  # a plain head-major float8 cache (no shared prefixes): dequantise the rows read
        B = q.shape[0]
        kc = _kvq.dequantize(kc[:B], cache.k_scale[layer][:B], q.dtype)
        vc = _kvq.dequantize(vc[:B], cache.v_scale[layer][:B], q.dtype)
    pk = pv = None
    if cache.prefix_k is not None:
        pk, pv = cache.prefix_k[layer], cache.prefix_v[layer]
    return cached_attention(q, kc, vc, cache_seqlens, block_table, scale, layout=cache.layout,
                            prefix_row=cache.prefix_row, prefix_len=cache.prefix_len, prefix_k=pk, prefix_v=pv)


def _cached_attention_head_major(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 cache_seqlens: torch.Tensor, scale: float, prefix_row: torch.Tensor | None = None,
                                 prefix_len: torch.Tensor | None = None, prefix_k: torch.Tensor | None = None,
                                 prefix_v: torch.Tensor | None = None) -> torch.Tensor:
    # Two batched matmuls over contiguous per-head keys: on CPU this beats SDPA's flash kernel,
    # which pays for strided keys and a boolean mask at every one-query step. With shared
    # prefixes (the torch reference of the cascade layout) each row's keys are its pool row's
    # prefix followed by its own positions; no host synchronisation (CUDA-graph safe).
    B, Hq, D = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    k, v = k_cache[:B], v_cache[:B]
    n = cache_seqlens[:B].to(torch.long)
    ar = torch.arange(L, device=q.device)[None, :]
    if prefix_row is None:
        live = ar < n[:, None]
    else:
        rows = prefix_row[:B].long()
        plen = torch.minimum(prefix_len[:B].long(), n)
        Lp = prefix_k.shape[2]
        k = torch.cat([prefix_k.index_select(0, rows).to(q.dtype), k.to(q.dtype)], dim=2)
        v = torch.cat([prefix_v.index_select(0, rows).to(q.dtype), v.to(q.dtype)], dim=2)
        live = torch.cat([torch.arange(Lp, device=q.device)[None, :] < plen[:, None], ar < (n - plen)[:, None]], 1)
    k, v = k.to(q.dtype), v.to(q.dtype)  # a cache kept in another dtype than the activations
    qg = q.view(B, Hkv, Hq // Hkv, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, Hkv, g, keys]
    scores = scores.masked_fill(~live[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    # positions past a row's length hold what earlier calls left (the cache is reused): their
    # weight is 0, but 0 * NaN / Inf is NaN, so a non-finite value once written would leak
    v = v.masked_fill(~live[:, None, :, None], 0)
    return torch.matmul(p, v).view(B, Hq, D)
