"""Prefill attention (whole sequences: prompt processing and training), differentiable: the
registered forward op ``pgen::prefill_attention_fwd`` with its autograd, and the public
:func:`prefill_attention`. The backward lives in :mod:`pgen_engine.ops.attention.prefill_backward`."""
from __future__ import annotations

import torch

from pgen_engine.ops.attention import prefill_backward
from pgen_engine.ops.attention._dispatch import resolve, triton_kernels
from pgen_engine.ops.attention._validate import check_kernel_input, check_prefill, default_scale
from pgen_engine.ops.attention.reference import packed_ref, prefill_attention_ref


PREFILL_BACKENDS = ("torch", "triton")


@torch.library.custom_op("pgen::prefill_attention_fwd", mutates_args=())
def _prefill_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    q_hi: torch.Tensor | None, k_lo: torch.Tensor | None, kpm: torch.Tensor | None,
    max_seqlen: int, causal: bool, scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed prefill forward: q ``[T,Hq,D]``, k/v ``[T,Hkv,D]`` -> (out ``[T,Hq,D]``, lse f32 ``[Hq,T]``)."""
    if backend == "triton":
        return triton_kernels().prefill_fwd(q, k, v, cu_seqlens, q_hi, kpm, max_seqlen, causal, scale)
    if backend == "torch":
        return packed_ref(q, k, v, cu_seqlens, q_hi, kpm, causal, scale)
    raise ValueError(f"pgen::prefill_attention_fwd: unsupported backend {backend!r}")


@_prefill_fwd_op.register_fake
def _(q, k, v, cu_seqlens, q_hi, k_lo, kpm, max_seqlen, causal, scale, backend):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


torch.library.register_autograd(
    "pgen::prefill_attention_fwd", prefill_backward.backward, setup_context=prefill_backward.setup_context
)


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
    check_prefill(q, k, v, causal, cu_seqlens, max_seqlen, bidirectional_spans, key_padding_mask)
    impl = resolve(backend, q.device, PREFILL_BACKENDS, "prefill_attention")
    if impl == "torch":
        return prefill_attention_ref(
            q, k, v, causal=causal, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale,
            bidirectional_spans=bidirectional_spans, key_padding_mask=key_padding_mask,
        )
    check_kernel_input("prefill_attention", q)
    scale = default_scale(scale, q.shape[-1])
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
