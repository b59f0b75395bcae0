"""Triton rotary embedding (HF rotate_half convention), forward and backward in one kernel.

``y = x * cos + rotate_half(x) * sin``; the backward is the same rotation with ``-sin``, so one
kernel with a sign flag serves both.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, NH, D, sign,
                   BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)  # one (batch, position) per program, all heads
    hb = tl.program_id(1)
    half = D // 2
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    hm = heads < NH
    dm = d < half
    m = hm[:, None] & dm[None, :]
    c1 = tl.load(cos_ptr + tok * D + d, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + tok * D + half + d, mask=dm, other=0.0).to(tl.float32)
    s1 = sign * tl.load(sin_ptr + tok * D + d, mask=dm, other=0.0).to(tl.float32)
    s2 = sign * tl.load(sin_ptr + tok * D + half + d, mask=dm, other=0.0).to(tl.float32)
    base = tok * NH * D + heads[:, None].to(tl.int64) * D + d[None, :]
    x1 = tl.load(x_ptr + base, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + half, mask=m, other=0.0).to(tl.float32)
    if sign > 0:
        y1 = x1 * c1[None, :] - x2 * s1[None, :]
        y2 = x2 * c2[None, :] + x1 * s2[None, :]
    else:
        # transpose of the forward rotation: dx1 = dy1*c1 + dy2*s2, dx2 = dy2*c2 - dy1*s1
        y1 = x1 * c1[None, :] - x2 * s2[None, :]
        y2 = x2 * c2[None, :] + x1 * s1[None, :]
    tl.store(y_ptr + base, y1.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(y_ptr + base + half, y2.to(y_ptr.dtype.element_ty), mask=m)


def rotary_triton(x3, cos2, sin2, backward: bool = False) -> torch.Tensor:
    """x3 ``[T, NH, D]``, cos2/sin2 ``[T, D]`` contiguous -> ``[T, NH, D]``."""
    T, NH, D = x3.shape
    y = torch.empty_like(x3)
    block_h = min(16, triton.next_power_of_2(NH))
    _rotary_kernel[(T, triton.cdiv(NH, block_h))](
        x3, cos2, sin2, y, NH, D, -1.0 if backward else 1.0,
        BLOCK_H=block_h, HALF=triton.next_power_of_2(D // 2))
    return y
