"""Fused per-token log-probabilities and entropy of a linear head, without ``[N, V]`` logits.

``token_logprobs(hidden, weight, targets)`` returns ``log_softmax((hidden @ weight.T + bias) / T)``
gathered at ``targets`` plus the entropy of the same distribution. The vocabulary is walked
in chunks with an online logsumexp, so the peak extra memory is one ``[N, chunk]`` tile
instead of the full logits; the backward recomputes each tile. Used by the RL trainer for
policy log-probs, and by rollouts (principle 7: both must share these numerics).
"""
from __future__ import annotations

import math

import torch

from pgen_engine.ops._backend import resolve_backend

SUPPORTED = ("torch", "triton")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _reference_naive(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialising reference (tests only): full logits -> log_softmax -> gather, autograd-able."""
    cd = _compute_dtype(hidden)
    logits = hidden.to(cd) @ weight.to(cd).T
    if bias is not None:
        logits = logits + bias.to(cd)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    lp = logp.gather(1, targets[:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def _chunk_logits(hidden, weight, bias, v0, v1, cd):
    z = hidden.to(cd) @ weight[v0:v1].to(cd).T
    if bias is not None:
        z = z + bias[v0:v1].to(cd)
    return z


def _fwd_torch(hidden, weight, bias, targets, temperature, chunk):
    cd = _compute_dtype(hidden)
    N, V = hidden.shape[0], weight.shape[0]
    m = torch.full((N,), -math.inf, dtype=cd, device=hidden.device)
    s = torch.zeros(N, dtype=cd, device=hidden.device)
    t = torch.zeros_like(s)
    zt = torch.zeros_like(s)
    for v0 in range(0, V, chunk):
        v1 = min(V, v0 + chunk)
        z = _chunk_logits(hidden, weight, bias, v0, v1, cd) / temperature
        m_new = torch.maximum(m, z.max(1).values)
        alpha = torch.exp(m - m_new)
        e = torch.exp(z - m_new[:, None])
        s = s * alpha + e.sum(1)
        t = t * alpha + (e * z).sum(1)
        m = m_new
        inside = (targets >= v0) & (targets < v1)
        got = z.gather(1, (targets - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
        zt = zt + torch.where(inside, got, torch.zeros_like(got))
    lse = m + torch.log(s)
    return zt - lse, lse - t / s, lse


def _dz_torch(z, v0, lse, ent, targets, g_lp, g_ent, temperature):
    """Raw logits tile ``[N, C]`` -> ``dL/dlogits`` (same math as the Triton kernel)."""
    logp = z / temperature - lse[:, None]
    p = torch.exp(logp)
    cols = torch.arange(v0, v0 + z.shape[1], device=z.device)
    onehot = (cols[None, :] == targets[:, None]).to(z.dtype)
    dz = g_lp.to(z.dtype)[:, None] * (onehot - p) - g_ent.to(z.dtype)[:, None] * p * (logp + ent[:, None])
    return dz / temperature


@torch.library.custom_op("pgen::token_logprobs_fwd_triton", mutates_args=())
def _fwd_triton_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from pgen_engine.ops._triton_logprobs import lp_fwd_triton  # late import: triton is optional

    return lp_fwd_triton(hidden, weight, bias, targets, temperature)


@_fwd_triton_op.register_fake
def _(hidden, weight, bias, targets, temperature):
    n = hidden.shape[0]
    return tuple(hidden.new_empty((n,), dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("pgen::token_logprobs_dz_triton", mutates_args=("z",))
def _dz_triton_op(
    z: torch.Tensor, v0: int, lse: torch.Tensor, ent: torch.Tensor, targets: torch.Tensor,
    g_lp: torch.Tensor, g_ent: torch.Tensor, temperature: float,
) -> None:
    from pgen_engine.ops._triton_logprobs import lp_dz_triton  # late import: triton is optional

    lp_dz_triton(z, v0, lse, ent, targets, g_lp, g_ent, temperature)


@_dz_triton_op.register_fake
def _(z, v0, lse, ent, targets, g_lp, g_ent, temperature):
    return None


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, use_triton):
        if use_triton:
            lp, ent, lse = _fwd_triton_op(hidden, weight, bias, targets, temperature)
        else:
            lp, ent, lse = _fwd_torch(hidden, weight, bias, targets, temperature, chunk)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.temperature, ctx.chunk, ctx.use_triton = temperature, chunk, use_triton
        ctx.mark_non_differentiable(lse)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        cd = lse.dtype
        V = weight.shape[0]
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.to(cd).contiguous()
        g_ent = torch.zeros_like(lse) if g_ent is None else g_ent.to(cd).contiguous()
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.zeros(hidden.shape, dtype=cd, device=hidden.device) if need_h else None
        gw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
        gb = torch.empty(V, dtype=bias.dtype, device=bias.device) if need_b else None
        hc = hidden.to(cd)
        for v0 in range(0, V, chunk):
            v1 = min(V, v0 + chunk)
            z = _chunk_logits(hidden, weight, bias, v0, v1, cd).contiguous()
            if ctx.use_triton:
                _dz_triton_op(z, v0, lse, ent, targets, g_lp, g_ent, T)
                dz = z
            else:
                dz = _dz_torch(z, v0, lse, ent, targets, g_lp, g_ent, T)
            if need_h:
                gh.addmm_(dz, weight[v0:v1].to(cd))
            if need_w:
                gw[v0:v1] = (dz.T @ hc).to(weight.dtype)
            if need_b:
                gb[v0:v1] = dz.sum(0).to(bias.dtype)
        gh = gh.to(hidden.dtype) if need_h else None
        return gh, gw, gb, None, None, None, None


def _default_chunk(n: int, v: int) -> int:
    # at most ~2^26 tile elements and at most V/8 columns, so the tile stays far below [N, V]
    return max(1, min(v, max(64, (1 << 26) // max(n, 1)), max(64, -(-v // 8))))


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target token and the entropy of its distribution, chunked over V.

    Args:
        hidden: ``[N, H]`` float (fp32/bf16/fp16/fp64) final hidden states.
        weight: ``[V, H]`` head weight, same dtype and device as ``hidden``.
        targets: int64 ``[N]`` token ids in ``[0, V)`` (range checked on CPU only, to avoid a
            device sync on GPU).
        bias: optional ``[V]`` head bias.
        temperature: ``T > 0``; the distribution is ``softmax(logits / T)``.
        chunk_size: vocabulary columns per tile (default: at most ``2^26 / N`` and ``V / 8``).
        backend: "auto", "torch" or "triton" (Triton forward kernel + Triton gradient kernel;
            float64 is not supported there).
    Returns:
        ``(logprobs [N], entropy [N])`` in float32 (float64 for float64 inputs),
        differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"token_logprobs: expected hidden [N, H] and weight [V, H], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if not hidden.is_floating_point() or weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise TypeError(f"token_logprobs: hidden/weight must be float tensors of one dtype and device, got "
                        f"{hidden.dtype}@{hidden.device} and {weight.dtype}@{weight.device}")
    N, V = hidden.shape[0], weight.shape[0]
    if targets.dtype != torch.int64 or targets.shape != (N,):
        raise ValueError(f"token_logprobs: targets must be int64 [{N}], got {targets.dtype} {tuple(targets.shape)}")
    if targets.device.type == "cpu" and N and (int(targets.min()) < 0 or int(targets.max()) >= V):
        raise ValueError(f"token_logprobs: targets must lie in [0, {V}), got range "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    if bias is not None and (bias.shape != (V,) or bias.device != hidden.device):
        raise ValueError(f"token_logprobs: bias must be [{V}] on {hidden.device}, got {tuple(bias.shape)}")
    if not temperature > 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"token_logprobs: chunk_size must be > 0, got {chunk_size}")
    chunk = chunk_size or _default_chunk(N, V)
    be = resolve_backend(backend, hidden.device, SUPPORTED, "token_logprobs")
    if be == "triton" and hidden.dtype == torch.float64:
        raise TypeError("token_logprobs: backend 'triton' does not support float64; use backend='torch'")
    return _TokenLogprobs.apply(hidden, weight, bias, targets, float(temperature), int(chunk), be == "triton")


__all__ = ["token_logprobs"]
