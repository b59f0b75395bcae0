"""Rotary position embedding in the Hugging Face "rotate_half" convention.

``y = x * cos + rotate_half(x) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]`` over the last
dim split in halves; computed in float32 (float64 for float64) and cast back to ``x.dtype``.
"""
from __future__ import annotations

import torch

from pgen_engine.ops._backend import resolve_backend

SUPPORTED = ("torch", "triton")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotary_torch(x, cos, sin):
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    c, s = cos.unsqueeze(-2).to(cd), sin.unsqueeze(-2).to(cd)
    xf = x.to(cd)
    return (xf * c + rotate_half(xf) * s).to(x.dtype)


def _flat(x, cos, sin):
    D = x.shape[-1]
    return (x.reshape(-1, x.shape[-2], D).contiguous(), cos.reshape(-1, D).contiguous(),
            sin.reshape(-1, D).contiguous())


@torch.library.custom_op("pgen::apply_rotary_triton", mutates_args=())
def _rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    from pgen_engine.ops._triton_rotary import rotary_triton  # late import: triton is optional

    return rotary_triton(*_flat(x, cos, sin), backward=backward).reshape(x.shape)


@_rotary_op.register_fake
def _(x, cos, sin, backward):
    return torch.empty_like(x)


def _rot_setup(ctx, inputs, output):
    _, cos, sin, backward = inputs
    ctx.save_for_backward(cos, sin)
    ctx.backward_flag = backward


def _rot_backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return _rotary_op(dy, cos, sin, not ctx.backward_flag), None, None, None


_rotary_op.register_autograd(_rot_backward, setup_context=_rot_setup)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Rotate ``x`` by the rotary angles.

    Args:
        x: ``[B, S, H, D]`` or ``[N, H, D]`` float tensor, ``D`` even.
        cos, sin: ``[B, S, D]`` or ``[N, D]`` (matching ``x`` without the head dim).
        backend: "auto", "torch" or "triton". The Triton path gives gradients for ``x``
            only (cos/sin are treated as constants, as they are in a model).
    Returns:
        Tensor shaped and typed like ``x``.
    """
    if x.dim() not in (3, 4) or x.shape[-1] % 2:
        raise ValueError(f"apply_rotary: x must be [B,S,H,D] or [N,H,D] with even D, got {tuple(x.shape)}")
    want = x.shape[:-2] + x.shape[-1:]
    if cos.shape != want or sin.shape != want:
        raise ValueError(f"apply_rotary: cos/sin must be {tuple(want)}, got {tuple(cos.shape)} / {tuple(sin.shape)}")
    be = resolve_backend(backend, x.device, SUPPORTED, "apply_rotary")
    if be == "torch":
        return _rotary_torch(x, cos, sin)
    if x.dtype == torch.float64:
        raise TypeError("apply_rotary: backend 'triton' does not support float64")
    return _rotary_op(x, cos, sin, False)


__all__ = ["apply_rotary", "rotate_half"]
