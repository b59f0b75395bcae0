"""RMSNorm, optionally fused with the residual add, matching transformers' LlamaRMSNorm bit for bit.

``h = x + residual``; ``y = weight * (h_fp32 * rsqrt(mean(h_fp32^2) + eps)).to(h.dtype)``.
"""
from __future__ import annotations

import torch

from pgen_engine.ops._backend import resolve_backend

SUPPORTED = ("torch", "triton")


def _rms_torch(x, weight, eps, residual):
    h = x + residual if residual is not None else x
    hf = h.to(torch.float32)
    var = hf.pow(2).mean(-1, keepdim=True)
    y = weight * (hf * torch.rsqrt(var + eps)).to(h.dtype)
    return y, h


@torch.library.custom_op("pgen::rms_norm_triton", mutates_args=())
def _rms_fwd_op(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from pgen_engine.ops._triton_norm import rms_fwd_triton  # late import: triton is optional

    D = x.shape[-1]
    r2 = residual.reshape(-1, D).contiguous() if residual is not None else None
    y, h, rstd = rms_fwd_triton(x.reshape(-1, D).contiguous(), r2, weight.contiguous(), eps)
    # h aliases x when there is no residual; outputs of a custom op must not alias inputs
    h = h.clone() if residual is None else h
    return y.reshape(x.shape), h.reshape(x.shape), rstd


@_rms_fwd_op.register_fake
def _(x, residual, weight, eps):
    rows = x.numel() // x.shape[-1]
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    return y, torch.empty_like(x), x.new_empty((rows,), dtype=torch.float32)


@torch.library.custom_op("pgen::rms_norm_bwd_triton", mutates_args=())
def _rms_bwd_op(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from pgen_engine.ops._triton_norm import rms_bwd_triton  # late import: triton is optional

    D = h.shape[-1]
    dx, dw = rms_bwd_triton(dy.reshape(-1, D), h.reshape(-1, D).contiguous(), weight.contiguous(), rstd)
    return dx.reshape(h.shape), dw


@_rms_bwd_op.register_fake
def _(dy, h, weight, rstd):
    return torch.empty_like(h), torch.empty_like(weight)


def _rms_setup(ctx, inputs, output):
    x, residual, weight, eps = inputs
    _, h, rstd = output
    ctx.save_for_backward(h, weight, rstd)
    ctx.has_res = residual is not None


def _rms_backward(ctx, dy, dh, drstd):
    h, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_bwd_op(dy, h, weight, rstd)
    if dh is not None:  # gradient flowing into new_residual adds to the input gradient
        dx = dx + dh
    return dx, (dx if ctx.has_res else None), dw, None


_rms_fwd_op.register_autograd(_rms_backward, setup_context=_rms_setup)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, computed in float32 and cast back.

    Args:
        x: ``[..., D]`` float tensor.
        weight: ``[D]`` scale.
        eps: variance epsilon.
        residual: optional ``[..., D]`` tensor added to ``x`` first (same shape/dtype).
        backend: "auto", "torch" or "triton".
    Returns:
        ``y`` (dtype ``promote(x.dtype, weight.dtype)``), or ``(y, new_residual)`` where
        ``new_residual = x + residual`` in ``x.dtype`` when ``residual`` is given.
    """
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight must be [D] with D = x.shape[-1]; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"rms_norm: residual must match x ({tuple(x.shape)}, {x.dtype}); got "
                         f"{tuple(residual.shape)}, {residual.dtype}")
    if not eps >= 0:
        raise ValueError(f"rms_norm: eps must be >= 0, got {eps}")
    be = resolve_backend(backend, x.device, SUPPORTED, "rms_norm")
    if be == "triton" and x.dtype == torch.float64:
        raise TypeError("rms_norm: backend 'triton' does not support float64")
    if be == "torch":
        y, h = _rms_torch(x, weight, eps, residual)
    else:
        y, h, _ = _rms_fwd_op(x, residual, weight, float(eps))
    return (y, h) if residual is not None else y


__all__ = ["rms_norm"]
