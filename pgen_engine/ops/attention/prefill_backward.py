"""Backward of the prefill op: the registered ``pgen::prefill_attention_bwd`` and the autograd
glue that :mod:`pgen_engine.ops.attention.prefill` attaches to ``pgen::prefill_attention_fwd``."""
from __future__ import annotations

import torch

from pgen_engine.ops.attention._dispatch import triton_kernels
from pgen_engine.ops.attention.reference import packed_ref


@torch.library.custom_op("pgen::prefill_attention_bwd", mutates_args=())
def _prefill_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu_seqlens: torch.Tensor, q_hi: torch.Tensor | None, k_lo: torch.Tensor | None,
    kpm: torch.Tensor | None, max_seqlen: int, causal: bool, scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed prefill backward -> (dq ``[T,Hq,D]``, dk ``[T,Hkv,D]``, dv ``[T,Hkv,D]``)."""
    if backend == "triton":
        return triton_kernels().prefill_bwd(
            dout, q, k, v, out, lse, cu_seqlens, q_hi, k_lo, kpm, max_seqlen, causal, scale
        )
    if backend == "torch":
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            o, _ = packed_ref(qq, kk, vv, cu_seqlens, q_hi, kpm, causal, scale)
            dq, dk, dv = torch.autograd.grad(o, (qq, kk, vv), dout)
        return dq, dk, dv
    raise ValueError(f"pgen::prefill_attention_bwd: unsupported backend {backend!r}")


@_prefill_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, q_hi, k_lo, kpm, max_seqlen, causal, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, q_hi, k_lo, kpm, max_seqlen, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, q_hi, k_lo, kpm)
    ctx.max_seqlen, ctx.causal, ctx.scale, ctx.backend = max_seqlen, causal, scale, backend


def backward(ctx, dout, dlse):
    # lse is an auxiliary output (used by the backward only); its gradient is ignored.
    q, k, v, out, lse, cu_seqlens, q_hi, k_lo, kpm = ctx.saved_tensors
    dq, dk, dv = _prefill_bwd_op(
        dout, q, k, v, out, lse, cu_seqlens, q_hi, k_lo, kpm,
        ctx.max_seqlen, ctx.causal, ctx.scale, ctx.backend,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None
