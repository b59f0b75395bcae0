"""Triton kernels for fused token log-probs + entropy.

Forward (:func:`_lp_fwd_kernel`): one program per ``BLOCK_N`` rows loops over the vocabulary
in ``BLOCK_V`` chunks, computes each logits tile with ``tl.dot`` over H and folds it into an
online logsumexp (running max ``m``, ``s = sum exp(z - m)``, ``t = sum exp(z - m) * z``), so
``[N, V]`` never exists. Backward (:func:`_lp_dz_kernel`): the GEMMs of the backward are
left to cuBLAS on a ``[N, chunk]`` logits tile (a fused grad-hidden accumulator over all of H
would not fit in registers); this kernel turns that tile into ``dL/dlogits`` in place.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pgen_engine.ops import _triton_config as _config


@triton.jit
def _lp_fwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, lp_ptr, ent_ptr, lse_ptr,
    N, V, H, inv_t,
    HAS_BIAS: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=0)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    zt = tl.zeros([BLOCK_N], tl.float32)
    hk = tl.arange(0, BLOCK_H)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k0 in range(0, H, BLOCK_H):
            kk = k0 + hk
            kmask = kk < H
            a = tl.load(h_ptr + rows[:, None].to(tl.int64) * H + kk[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(w_ptr + cols[None, :].to(tl.int64) * H + kk[:, None],
                        mask=cmask[None, :] & kmask[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        z = acc * inv_t
        z = tl.where(cmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        zs = tl.where(cmask[None, :], z, 0.0)
        s = s * alpha + tl.sum(e, 1)
        t = t * alpha + tl.sum(e * zs, 1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], zs, 0.0), 1)
    lse = m + tl.log(s)
    tl.store(lp_ptr + rows, zt - lse, mask=rmask)
    tl.store(ent_ptr + rows, lse - t / s, mask=rmask)
    tl.store(lse_ptr + rows, lse, mask=rmask)


@triton.jit
def _lp_dz_kernel(
    z_ptr, lse_ptr, ent_ptr, tgt_ptr, glp_ptr, gent_ptr,
    C, v0, stride_z, inv_t, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    blk = tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < C
    ptr = z_ptr + row.to(tl.int64) * stride_z + cols
    # the tile holds raw logits (pre-temperature); overwrite it with dL/dlogits
    z = tl.load(ptr, mask=cmask, other=0.0).to(tl.float32) * inv_t
    lse = tl.load(lse_ptr + row)
    ent = tl.load(ent_ptr + row)
    tgt = tl.load(tgt_ptr + row)
    glp = tl.load(glp_ptr + row)
    gent = tl.load(gent_ptr + row)
    logp = z - lse
    p = tl.exp(logp)
    onehot = tl.where(cols + v0 == tgt, 1.0, 0.0)
    dz = glp * (onehot - p) - gent * p * (logp + ent)
    tl.store(ptr, (dz * inv_t).to(z_ptr.dtype.element_ty), mask=cmask)


def lp_fwd_triton(hidden, weight, bias, targets, temperature):
    """Returns fp32 ``(logprobs [N], entropy [N], lse [N])`` of ``(hidden @ weight.T + bias) / T``."""
    N, H = hidden.shape
    V = weight.shape[0]
    hidden, weight = hidden.contiguous(), weight.contiguous()
    lp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    ent, lse = torch.empty_like(lp), torch.empty_like(lp)
    gpu = _config.on_gpu(hidden.device)
    BLOCK_N = 64 if gpu else 16
    BLOCK_V = 128 if gpu else 32
    BLOCK_H = 64 if gpu else 32
    b = bias.contiguous() if bias is not None else lp  # read as b_ptr + col
    _lp_fwd_kernel[(triton.cdiv(N, BLOCK_N),)](
        hidden, weight, b, targets.contiguous(), lp, ent, lse, N, V, H, 1.0 / temperature,
        HAS_BIAS=bias is not None, PREC="ieee" if hidden.dtype == torch.float32 else "tf32", BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_H=BLOCK_H,
        num_warps=8 if gpu else 4,
    )
    return lp, ent, lse


def lp_dz_triton(z, v0, lse, ent, targets, g_lp, g_ent, temperature) -> torch.Tensor:
    """In place: raw logits tile ``z [N, C]`` (columns ``v0..v0+C``) -> ``dL/dlogits``."""
    N, C = z.shape
    BLOCK = min(1024, triton.next_power_of_2(C))
    _lp_dz_kernel[(N, triton.cdiv(C, BLOCK))](
        z, lse, ent, targets.contiguous(), g_lp.float().contiguous(), g_ent.float().contiguous(),
        C, v0, z.stride(0), 1.0 / temperature, BLOCK=BLOCK,
    )
    return z
