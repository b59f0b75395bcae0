"""Attention ops: prefill (fwd + bwd), paged/contiguous decode, paged KV-cache write.

Three layers per op:
  1. Triton kernels in :mod:`pgen_engine.ops._triton_attention` (CUDA ``paged_kv_write_cuda``
     from ``pgen_engine._C`` for the KV write when built);
  2. registered ops ``pgen::prefill_attention_fwd`` / ``pgen::prefill_attention_bwd``
     (wired together with ``register_autograd``), ``pgen::decode_attention`` and
     ``pgen::paged_kv_write`` (``mutates_args``), each with a fake impl so ``torch.compile``
     traces them;
  3. the documented functions :func:`prefill_attention`, :func:`decode_attention`,
     :func:`paged_kv_write`, plus in-package torch references ``*_ref``.

Layouts follow flash-attn: tokens before heads, ``[..., S, H, D]``. Grouped-query attention:
query head ``h`` reads KV head ``h // (Hq // Hkv)``.

``backend="torch"`` calls the references directly (native autograd, fusable by
``torch.compile``); ``"triton"``/``"cuda"`` go through the registered ops.
"""
from __future__ import annotations

import torch

from pgen_engine.ops._backend import extension, resolve_backend

# float64 is accepted by the torch references only (tests use it as ground truth).
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_TRITON_HEAD_DIM = 256

PREFILL_BACKENDS = ("torch", "triton")
DECODE_BACKENDS = ("torch", "triton")
KV_WRITE_BACKENDS = ("torch", "triton", "cuda")


@torch.compiler.assume_constant_result
def _resolve(backend: str, device: torch.device, supported: tuple[str, ...], op: str) -> str:
    # resolve_backend imports modules (a Dynamo graph break); under torch.compile its
    # result is a per-graph constant, so evaluate it eagerly at trace time.
    return resolve_backend(backend, device, supported, op)


def _triton_module():
    # Imported lazily: importing triton must not be a requirement of importing the package.
    from pgen_engine.ops import _triton_attention

    return _triton_attention


# =======================================================================================
# Validation
# =======================================================================================
def _need_tensor(x, name: str, op: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_float(op: str, **tensors: torch.Tensor) -> None:
    dtypes = set()
    devices = set()
    for name, t in tensors.items():
        _need_tensor(t, name, op)
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected one of {_FLOAT_DTYPES}")
        dtypes.add(t.dtype)
        devices.add(t.device)
    if len(dtypes) > 1:
        got = {n: t.dtype for n, t in tensors.items()}
        raise TypeError(f"{op}: {', '.join(tensors)} must share one dtype, got {got}")
    if len(devices) > 1:
        got = {n: str(t.device) for n, t in tensors.items()}
        raise ValueError(f"{op}: {', '.join(tensors)} must be on one device, got {got}")


def _check_index(op: str, name: str, t, dtype: torch.dtype, ndim: int, device: torch.device) -> None:
    _need_tensor(t, name, op)
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device} (same device as q)")


def _check_heads(op: str, n_heads_q: int, n_heads_kv: int) -> int:
    if n_heads_kv <= 0 or n_heads_q % n_heads_kv != 0:
        raise ValueError(
            f"{op}: query heads Hq={n_heads_q} must be a positive multiple of KV heads Hkv={n_heads_kv}"
        )
    return n_heads_q // n_heads_kv


def _check_prefill(q, k, v, causal, cu_seqlens, max_seqlen, bidirectional_spans, key_padding_mask) -> None:
    op = "prefill_attention"
    _check_float(op, q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if cu_seqlens is None:
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(
                f"{op}: padded layout expects q [B,S,Hq,D] and k,v [B,S,Hkv,D]; got q {tuple(q.shape)}, "
                f"k {tuple(k.shape)} (pass cu_seqlens for the packed [total,H,D] layout)"
            )
        if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
            raise ValueError(f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B, S or D")
        n_seq, seq = q.shape[0], q.shape[1]
        if key_padding_mask is not None:
            _check_index(op, "key_padding_mask", key_padding_mask, torch.bool, 2, q.device)
            if tuple(key_padding_mask.shape) != (n_seq, seq):
                raise ValueError(
                    f"{op}: key_padding_mask must be [B,S]=({n_seq},{seq}), got {tuple(key_padding_mask.shape)}"
                )
    else:
        if q.dim() != 3 or k.dim() != 3:
            raise ValueError(
                f"{op}: packed layout (cu_seqlens given) expects q [total,Hq,D] and k,v [total,Hkv,D]; "
                f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
            raise ValueError(f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on total or D")
        _check_index(op, "cu_seqlens", cu_seqlens, torch.int32, 1, q.device)
        if cu_seqlens.numel() < 2:
            raise ValueError(f"{op}: cu_seqlens must have B+1 >= 2 entries, got {cu_seqlens.numel()}")
        if key_padding_mask is not None:
            raise ValueError(f"{op}: key_padding_mask is only for the padded layout; packed sequences have no padding")
        if max_seqlen is not None and (not isinstance(max_seqlen, int) or max_seqlen < 0):
            raise ValueError(f"{op}: max_seqlen must be a non-negative int, got {max_seqlen!r}")
        # Free to check on CPU; on a GPU (or while tracing) it would be a host sync.
        if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
            cu = cu_seqlens.tolist()
            if cu[0] != 0 or cu[-1] != q.shape[0] or any(b < a for a, b in zip(cu, cu[1:])):
                raise ValueError(
                    f"{op}: cu_seqlens must start at 0, be non-decreasing and end at total={q.shape[0]}; got {cu}"
                )
            if max_seqlen is not None and max(b - a for a, b in zip(cu, cu[1:])) > max_seqlen:
                raise ValueError(f"{op}: a sequence is longer than max_seqlen={max_seqlen}")
        n_seq = cu_seqlens.numel() - 1
    _check_heads(op, q.shape[-2], k.shape[-2])
    if bidirectional_spans is not None:
        _check_index(op, "bidirectional_spans", bidirectional_spans, torch.int32, 3, q.device)
        if bidirectional_spans.shape[0] != n_seq or bidirectional_spans.shape[2] != 2:
            raise ValueError(
                f"{op}: bidirectional_spans must be [B,N,2] with B={n_seq}, got {tuple(bidirectional_spans.shape)}"
            )


def _check_kernel_input(op: str, x: torch.Tensor) -> None:
    """Limits of the Triton/CUDA kernels beyond the op's own shape rules."""
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{op}: kernels take {_KERNEL_DTYPES}, got {x.dtype} (use backend='torch')")
    if x.shape[-1] > _MAX_TRITON_HEAD_DIM:
        raise ValueError(f"{op}: kernels support head dim <= {_MAX_TRITON_HEAD_DIM}, got {x.shape[-1]}")


def _default_scale(scale: float | None, head_dim: int) -> float:
    return float(head_dim) ** -0.5 if scale is None else float(scale)


# =======================================================================================
# Torch references
# =======================================================================================
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
    _check_prefill(q, k, v, causal, cu_seqlens, max_seqlen, bidirectional_spans, key_padding_mask)
    scale = _default_scale(scale, q.shape[-1])
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


def _packed_ref(q, k, v, cu_seqlens, q_hi, kpm, causal, scale):
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
    _check_decode(q, k_cache, v_cache, cache_seqlens, block_table)
    scale = _default_scale(scale, q.shape[-1])
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
    _check_kv_write(k_cache, v_cache, k_new, v_new, slot_mapping)
    block_size = k_cache.shape[1]
    capacity = k_cache.shape[0] * block_size
    keep = (slot_mapping >= 0) & (slot_mapping < capacity)
    slots = slot_mapping[keep]
    page, off = slots // block_size, slots % block_size
    k_cache[page, off] = k_new[keep]
    v_cache[page, off] = v_new[keep]


# =======================================================================================
# Registered ops (layer 2)
# =======================================================================================
@torch.library.custom_op("pgen::prefill_attention_fwd", mutates_args=())
def _prefill_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    q_hi: torch.Tensor | None, k_lo: torch.Tensor | None, kpm: torch.Tensor | None,
    max_seqlen: int, causal: bool, scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed prefill forward: q ``[T,Hq,D]``, k/v ``[T,Hkv,D]`` -> (out ``[T,Hq,D]``, lse f32 ``[Hq,T]``)."""
    if backend == "triton":
        return _triton_module().prefill_fwd(q, k, v, cu_seqlens, q_hi, kpm, max_seqlen, causal, scale)
    if backend == "torch":
        return _packed_ref(q, k, v, cu_seqlens, q_hi, kpm, causal, scale)
    raise ValueError(f"pgen::prefill_attention_fwd: unsupported backend {backend!r}")


@_prefill_fwd_op.register_fake
def _(q, k, v, cu_seqlens, q_hi, k_lo, kpm, max_seqlen, causal, scale, backend):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("pgen::prefill_attention_bwd", mutates_args=())
def _prefill_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu_seqlens: torch.Tensor, q_hi: torch.Tensor | None, k_lo: torch.Tensor | None,
    kpm: torch.Tensor | None, max_seqlen: int, causal: bool, scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed prefill backward -> (dq ``[T,Hq,D]``, dk ``[T,Hkv,D]``, dv ``[T,Hkv,D]``)."""
    if backend == "triton":
        return _triton_module().prefill_bwd(
            dout, q, k, v, out, lse, cu_seqlens, q_hi, k_lo, kpm, max_seqlen, causal, scale
        )
    if backend == "torch":
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            o, _ = _packed_ref(qq, kk, vv, cu_seqlens, q_hi, kpm, causal, scale)
            dq, dk, dv = torch.autograd.grad(o, (qq, kk, vv), dout)
        return dq, dk, dv
    raise ValueError(f"pgen::prefill_attention_bwd: unsupported backend {backend!r}")


@_prefill_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, q_hi, k_lo, kpm, max_seqlen, causal, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _prefill_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, q_hi, k_lo, kpm, max_seqlen, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, q_hi, k_lo, kpm)
    ctx.max_seqlen, ctx.causal, ctx.scale, ctx.backend = max_seqlen, causal, scale, backend


def _prefill_backward(ctx, dout, dlse):
    # lse is an auxiliary output (used by the backward only); its gradient is ignored.
    q, k, v, out, lse, cu_seqlens, q_hi, k_lo, kpm = ctx.saved_tensors
    dq, dk, dv = _prefill_bwd_op(
        dout, q, k, v, out, lse, cu_seqlens, q_hi, k_lo, kpm,
        ctx.max_seqlen, ctx.causal, ctx.scale, ctx.backend,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd(
    "pgen::prefill_attention_fwd", _prefill_backward, setup_context=_prefill_setup_context
)


@torch.library.custom_op("pgen::decode_attention", mutates_args=())
def _decode_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    block_table: torch.Tensor, scale: float, backend: str,
) -> torch.Tensor:
    """Paged decode: q ``[B,Hq,D]``, caches ``[P,block_size,Hkv,D]``, block_table int32 ``[B,nb]``."""
    if backend == "triton":
        return _triton_module().decode(q, k_cache, v_cache, cache_seqlens, block_table, scale)
    if backend == "torch":
        return decode_attention_ref(q, k_cache, v_cache, cache_seqlens, block_table=block_table, scale=scale)
    raise ValueError(f"pgen::decode_attention: unsupported backend {backend!r}")


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, scale, backend):
    return torch.empty_like(q)


@torch.library.custom_op("pgen::paged_kv_write", mutates_args=("k_cache", "v_cache"))
def _kv_write_op(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    slot_mapping: torch.Tensor, backend: str,
) -> None:
    """In-place write of ``k_new/v_new [N,Hkv,D]`` into ``[P,block_size,Hkv,D]`` caches at flat slots."""
    if backend == "triton":
        _triton_module().kv_write(k_cache, v_cache, k_new, v_new, slot_mapping)
    elif backend == "cuda":
        extension().paged_kv_write_cuda(k_cache, v_cache, k_new, v_new, slot_mapping)
    elif backend == "torch":
        paged_kv_write_ref(k_cache, v_cache, k_new, v_new, slot_mapping)
    else:
        raise ValueError(f"pgen::paged_kv_write: unsupported backend {backend!r}")


@_kv_write_op.register_fake
def _(k_cache, v_cache, k_new, v_new, slot_mapping, backend):
    return None


# =======================================================================================
# Public API (layer 3)
# =======================================================================================
def span_limits(
    cu_seqlens: torch.Tensor, total: int, bidirectional_spans: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token causal limits implied by bidirectional spans (no host sync).

    Under causal masking with spans, query ``i`` may see key ``j`` iff ``j < q_hi[i]`` iff
    ``i >= k_lo[j]``, where ``q_hi[p] = max(p+1, end of any span containing p)`` and
    ``k_lo[p] = min(p, start of any span containing p)`` (positions local to the sequence).

    Args:
        cu_seqlens: int32 ``[B+1]``.
        total: number of packed tokens ``T``.
        bidirectional_spans: int32 ``[B, N, 2]`` of ``[start, end)``, ``-1`` padded.
    Returns:
        (q_hi, k_lo): int32 ``[T]`` each.
    """
    device = cu_seqlens.device
    tok = torch.arange(total, device=device)
    seq_id = torch.searchsorted(cu_seqlens[1:].long(), tok, right=True).clamp_max(cu_seqlens.numel() - 2)
    pos = tok - cu_seqlens.long()[seq_id]
    spans = bidirectional_spans.long()[seq_id]  # [T, N, 2]
    st, en = spans[..., 0], spans[..., 1]
    inside = (st >= 0) & (en > st) & (st <= pos[:, None]) & (pos[:, None] < en)
    if st.shape[1] == 0:
        return (pos + 1).to(torch.int32), pos.to(torch.int32)
    q_hi = torch.maximum(pos + 1, torch.where(inside, en, 0).amax(-1))
    k_lo = torch.minimum(pos, torch.where(inside, st, total).amin(-1))
    return q_hi.to(torch.int32), k_lo.to(torch.int32)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
    cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None, scale: float | None = None,
    bidirectional_spans: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Self-attention over whole sequences (prefill / training), differentiable.

    Args:
        q: padded ``[B, S, Hq, D]`` or packed ``[total, Hq, D]`` (with ``cu_seqlens``);
            float32 / bfloat16 / float16. Softmax and accumulation run in float32.
        k, v: ``[B, S, Hkv, D]`` or ``[total, Hkv, D]``, q's dtype; ``Hq % Hkv == 0`` (GQA).
        causal: key ``j`` visible to query ``i`` only when ``j <= i`` (plus spans, below).
        cu_seqlens: int32 ``[B+1]`` sequence offsets into the packed layout.
        max_seqlen: longest packed sequence; computed (one host sync) when None.
        scale: softmax scale, default ``D ** -0.5``.
        bidirectional_spans: int32 ``[B, N, 2]`` ``[start, end)`` sequence-local ranges, ``-1``
            padded; inside a span attention is bidirectional even when causal (image tokens).
        key_padding_mask: padded layout only, bool ``[B, S]``, True = real token. A query row
            with no visible key outputs zeros.
        backend: "auto" | "torch" | "triton" (see :mod:`pgen_engine.ops._backend`).
    Returns:
        ``[B, S, Hq, D]`` or ``[total, Hq, D]`` in q's dtype.
    """
    _check_prefill(q, k, v, causal, cu_seqlens, max_seqlen, bidirectional_spans, key_padding_mask)
    impl = _resolve(backend, q.device, PREFILL_BACKENDS, "prefill_attention")
    if impl == "torch":
        return prefill_attention_ref(
            q, k, v, causal=causal, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale,
            bidirectional_spans=bidirectional_spans, key_padding_mask=key_padding_mask,
        )
    _check_kernel_input("prefill_attention", q)
    scale = _default_scale(scale, q.shape[-1])
    padded = cu_seqlens is None
    if padded:
        n_seq, seq = q.shape[:2]
        cu_seqlens = torch.arange(0, (n_seq + 1) * seq, seq, dtype=torch.int32, device=q.device)
        max_seqlen = seq
        q2, k2, v2 = (t.reshape(n_seq * seq, t.shape[2], t.shape[3]) for t in (q, k, v))
        kpm = None if key_padding_mask is None else key_padding_mask.reshape(-1).to(torch.int8)
    else:
        q2, k2, v2 = q, k, v
        kpm = None
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    q2, k2, v2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (q2, k2, v2))
    q_hi = k_lo = None
    if causal and bidirectional_spans is not None and bidirectional_spans.shape[1] > 0:
        q_hi, k_lo = span_limits(cu_seqlens, q2.shape[0], bidirectional_spans)
    out, _ = _prefill_fwd_op(q2, k2, v2, cu_seqlens, q_hi, k_lo, kpm, int(max_seqlen), bool(causal), scale, impl)
    return out.reshape(q.shape) if padded else out


def _check_decode(q, k_cache, v_cache, cache_seqlens, block_table) -> None:
    op = "decode_attention"
    _check_float(op, q=q, k_cache=k_cache, v_cache=v_cache)
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be [B,Hq,D], got {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"{op}: k_cache and v_cache must be 4-D and equal in shape, got {tuple(k_cache.shape)} and "
            f"{tuple(v_cache.shape)}"
        )
    batch = q.shape[0]
    if k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"{op}: head dim of q ({q.shape[2]}) != cache head dim ({k_cache.shape[3]})")
    _check_heads(op, q.shape[1], k_cache.shape[2])
    _check_index(op, "cache_seqlens", cache_seqlens, torch.int32, 1, q.device)
    if cache_seqlens.shape[0] != batch:
        raise ValueError(f"{op}: cache_seqlens must be [B]={batch}, got {tuple(cache_seqlens.shape)}")
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(
                f"{op}: contiguous cache must be [B,Smax,Hkv,D] with B={batch}, got {tuple(k_cache.shape)} "
                "(pass block_table for a paged cache)"
            )
    else:
        _check_index(op, "block_table", block_table, torch.int32, 2, q.device)
        if block_table.shape[0] != batch:
            raise ValueError(f"{op}: block_table must be [B,max_blocks] with B={batch}, got {tuple(block_table.shape)}")


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, *,
    block_table: torch.Tensor | None = None, scale: float | None = None, backend: str = "auto",
) -> torch.Tensor:
    """One new query token per row attending to its KV cache (no host sync).

    Args:
        q: ``[B, Hq, D]`` float32 / bfloat16 / float16.
        k_cache, v_cache: contiguous ``[B, Smax, Hkv, D]``, or paged
            ``[num_blocks, block_size, Hkv, D]`` with ``block_table``; q's dtype.
        cache_seqlens: int32 ``[B]``, valid cached tokens per row (the new token's K/V already
            written); values above the cache capacity are clamped; 0 gives a zero output.
        block_table: int32 ``[B, max_blocks]`` physical block ids; rows may share blocks.
        scale: softmax scale, default ``D ** -0.5``.
        backend: "auto" | "torch" | "triton".
    Returns:
        ``[B, Hq, D]`` in q's dtype.
    """
    _check_decode(q, k_cache, v_cache, cache_seqlens, block_table)
    impl = _resolve(backend, q.device, DECODE_BACKENDS, "decode_attention")
    if impl == "torch":
        return decode_attention_ref(q, k_cache, v_cache, cache_seqlens, block_table=block_table, scale=scale)
    _check_kernel_input("decode_attention", q)
    if block_table is None:
        # A contiguous cache is a paged cache with one block of Smax tokens per row.
        block_table = torch.arange(q.shape[0], dtype=torch.int32, device=q.device)[:, None]
    q = q if q.stride(-1) == 1 else q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention: caches must be contiguous in the head dim (stride(-1) == 1)")
    return _decode_op(q, k_cache, v_cache, cache_seqlens, block_table, _default_scale(scale, q.shape[-1]), impl)


def _check_kv_write(k_cache, v_cache, k_new, v_new, slot_mapping) -> None:
    op = "paged_kv_write"
    _check_float(op, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"{op}: caches must be 4-D [num_blocks,block_size,Hkv,D] (or [B,Smax,Hkv,D]) and equal in shape, "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_new.dim() != 3 or k_new.shape != v_new.shape or tuple(k_new.shape[1:]) != tuple(k_cache.shape[2:]):
        raise ValueError(
            f"{op}: k_new/v_new must both be [N,Hkv,D]=[N,{k_cache.shape[2]},{k_cache.shape[3]}], got "
            f"{tuple(k_new.shape)} and {tuple(v_new.shape)}"
        )
    _check_index(op, "slot_mapping", slot_mapping, torch.int64, 1, k_cache.device)
    if slot_mapping.shape[0] != k_new.shape[0]:
        raise ValueError(f"{op}: slot_mapping must be [N]={k_new.shape[0]}, got {tuple(slot_mapping.shape)}")


def paged_kv_write(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    slot_mapping: torch.Tensor, *, backend: str = "auto",
) -> None:
    """Scatter new keys/values into a KV cache, in place (no host sync on the GPU paths).

    Args:
        k_cache, v_cache: paged ``[num_blocks, block_size, Hkv, D]`` or contiguous
            ``[B, Smax, Hkv, D]`` (the same thing with ``block_size = Smax``).
        k_new, v_new: ``[N, Hkv, D]``, the caches' dtype.
        slot_mapping: int64 ``[N]``; ``slot = block * block_size + offset`` (contiguous:
            ``b * Smax + pos``). Negative slots (``-1``) are skipped, and so are slots
            ``>= num_blocks * block_size`` (dropped on the device instead of raising).
        backend: "auto" | "torch" | "triton" | "cuda" (``pgen_engine._C.paged_kv_write_cuda``).
    """
    _check_kv_write(k_cache, v_cache, k_new, v_new, slot_mapping)
    impl = _resolve(backend, k_cache.device, KV_WRITE_BACKENDS, "paged_kv_write")
    if impl == "torch":
        paged_kv_write_ref(k_cache, v_cache, k_new, v_new, slot_mapping)
        return
    if k_cache.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"paged_kv_write: kernels take {_KERNEL_DTYPES}, got {k_cache.dtype} (use backend='torch')")
    if k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged_kv_write: caches must be contiguous in the head dim (stride(-1) == 1)")
    _kv_write_op(k_cache, v_cache, k_new, v_new, slot_mapping, impl)


__all__ = [
    "prefill_attention", "decode_attention", "paged_kv_write",
    "prefill_attention_ref", "decode_attention_ref", "paged_kv_write_ref", "span_limits",
]
