"""Triton RMSNorm (optionally fused with the residual add): forward and backward, one row per program."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_fwd_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr, D, eps,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=m, other=0.0)
    if HAS_RES:
        # the residual sum is rounded to the input dtype first, exactly like `x + residual`
        x = x + tl.load(r_ptr + row * D + cols, mask=m, other=0.0)
        tl.store(h_ptr + row * D + cols, x, mask=m)
    hf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, 0) / D + eps)
    tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    # Llama: weight * (h_fp32 * rstd).to(dtype); a low-precision product is the fp32 product rounded once
    y = w * (hf * rstd).to(x.dtype).to(tl.float32)
    tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rms_bwd_kernel(dy_ptr, h_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, R, D, ROWS_PER: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    for i in range(ROWS_PER):
        row = pid * ROWS_PER + i
        if row < R:
            off = row.to(tl.int64) * D + cols
            dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + off, mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xhat = h * rstd
            dw += dy * xhat
            g = dy * w
            dx = rstd * (g - xhat * (tl.sum(g * xhat, 0) / D))
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(dw_ptr + pid.to(tl.int64) * D + cols, dw, mask=m)


def rms_fwd_triton(x2, r2, weight, eps):
    """x2/r2 ``[R, D]`` contiguous. Returns ``(y [R, D], h [R, D], rstd fp32 [R])``."""
    R, D = x2.shape
    y = torch.empty_like(x2, dtype=torch.promote_types(x2.dtype, weight.dtype))
    h = torch.empty_like(x2) if r2 is not None else x2
    rstd = torch.empty(R, dtype=torch.float32, device=x2.device)
    _rms_fwd_kernel[(R,)](x2, r2 if r2 is not None else x2, weight, y, h, rstd, D, eps,
                          HAS_RES=r2 is not None, BLOCK=triton.next_power_of_2(D))
    return y, h, rstd


def rms_bwd_triton(dy2, h2, weight, rstd):
    """Returns ``(dx [R, D] in h's dtype, dweight [D] in weight's dtype)``."""
    R, D = h2.shape
    rows_per = 16 if R > 16 else 1
    nprog = triton.cdiv(R, rows_per)
    dx = torch.empty_like(h2)
    dw = torch.empty(nprog, D, dtype=torch.float32, device=h2.device)
    _rms_bwd_kernel[(nprog,)](dy2.contiguous(), h2, weight, rstd, dx, dw, R, D, ROWS_PER=rows_per,
                              BLOCK=triton.next_power_of_2(D))
    return dx, dw.sum(0).to(weight.dtype)
