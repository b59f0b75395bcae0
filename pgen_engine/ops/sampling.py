"""Token sampling with classifier-free guidance, temperature, top-k and top-p.

Exact semantics, shared by every backend (torch reference here, Triton kernel in
:mod:`pgen_engine.ops._triton_sampling`, C++/CUDA in ``pgen_engine._C``), all in float32:

1. CFG: ``x = u + s * (c - u)`` when ``uncond_logits`` is given and ``s != 1``, else ``x = c``.
2. temperature: ``x = x / T`` (``T > 0``).
3. ``p = softmax(x)`` over the vocabulary.
4. top-k (``0 < k < V``): keep ``{i : x_i >= k-th largest x}`` (ties may keep more than k).
5. top-p (``p < 1``): with kept mass ``M``, ``t`` = the largest value such that
   ``sum{kept j, p_j >= t} p_j >= top_p * M``; keep ``{kept i : p_i >= t}``.
6. draw: ``u = uniform_from_seed(row_seed)``, ``target = u * sum(kept p)``; the token is the
   smallest kept index whose inclusive prefix sum over kept tokens (vocab order) exceeds
   ``target``, or the largest kept index if rounding leaves none.

A row whose ``x`` (after CFG and temperature) holds a NaN or an infinity gets token ``-1``
on every backend: no distribution can be drawn from it (a diverged model, or logits / T past
float32), and callers check for ``-1`` instead of indexing with an arbitrary token.

Each row depends only on its own logits and seed, never on the rest of the batch.
"""
from __future__ import annotations

import torch

from pgen_engine.ops._backend import extension, resolve_backend, triton_available
from pgen_engine.ops.rng import row_seeds, uniform_from_seed

SUPPORTED = ("torch", "triton", "cpp", "cuda")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _sample_torch(
    logits: torch.Tensor,
    uncond_logits: torch.Tensor | None,
    guidance_scale: float,
    temperature: float,
    top_k: int,
    top_p: float,
    seeds: torch.Tensor,
) -> torch.Tensor:
    """Reference implementation (sort-based thresholds). Returns int64 ``[B]``."""
    x = logits.float()
    if uncond_logits is not None:
        u = uncond_logits.float()
        x = u + guidance_scale * (x - u)
    x = x / temperature
    p = torch.softmax(x, dim=-1)
    V = x.shape[-1]
    keep = torch.ones_like(x, dtype=torch.bool)
    if 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        keep = x >= kth
    if top_p < 1.0:
        pk = torch.where(keep, p, torch.zeros_like(p))
        mass = pk.sum(-1, keepdim=True)
        sp, _ = torch.sort(pk, dim=-1, descending=True)
        # mass above each candidate threshold, counting every element tied with it
        above = torch.cumsum(sp, dim=-1)
        first = (above >= top_p * mass).to(torch.int8).argmax(dim=-1, keepdim=True)
        t = torch.gather(sp, -1, first)
        keep = keep & (p >= t)
    pk = torch.where(keep, p, torch.zeros_like(p))
    target = uniform_from_seed(seeds).to(p.device).unsqueeze(-1) * pk.sum(-1, keepdim=True)
    csum = torch.cumsum(pk, dim=-1)
    idx = torch.arange(V, device=x.device).expand_as(x)
    hit = keep & (csum > target)
    big = torch.full_like(idx, V)
    tok = torch.where(hit, idx, big).min(-1).values
    last = torch.where(keep, idx, torch.full_like(idx, -1)).max(-1).values
    tok = torch.where(tok == V, last, tok)
    return torch.where(torch.isfinite(x).all(-1), tok, torch.full_like(tok, -1))


@torch.library.custom_op("pgen::sample_triton", mutates_args=())
def _sample_triton_op(
    logits: torch.Tensor,
    uncond_logits: torch.Tensor | None,
    guidance_scale: float,
    temperature: float,
    top_k: int,
    top_p: float,
    seeds: torch.Tensor,
) -> torch.Tensor:
    from pgen_engine.ops._triton_sampling import sample_triton  # late import: triton is optional

    return sample_triton(logits, uncond_logits, guidance_scale, temperature, top_k, top_p, seeds)


@_sample_triton_op.register_fake
def _(logits, uncond_logits, guidance_scale, temperature, top_k, top_p, seeds):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


def clamp_to_float32(top_p: float, temperature: float) -> tuple[float, float]:
    """``top_p`` and ``temperature`` (validated: both > 0) moved into float32's normal range, as the
    float32 samplers (C++ / CUDA / Triton / the C++ decode loop) need them: a top_p of 1e-50 keeps the
    most probable codes as float32's smallest normal does (not 0: refused); a temperature of 1e300 is
    float32's largest (near-uniform, not inf: refused), one of 1e-50 its smallest normal (near-greedy,
    or logits / temperature past float32: the documented non-finite row)."""
    f = torch.finfo(torch.float32)
    return max(float(top_p), f.tiny), min(max(float(temperature), f.tiny), f.max)


def _validate(logits, uncond_logits, temperature, top_k, top_p) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"sample: logits must be a [B, V] tensor, got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype not in _FLOATS:
        raise TypeError(f"sample: logits dtype must be one of {_FLOATS}, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("sample: logits has an empty vocabulary (V == 0)")
    if uncond_logits is not None:
        if uncond_logits.shape != logits.shape:
            raise ValueError(
                f"sample: uncond_logits shape {tuple(uncond_logits.shape)} != logits shape {tuple(logits.shape)}")
        if uncond_logits.dtype not in _FLOATS or uncond_logits.device != logits.device:
            raise TypeError("sample: uncond_logits must be a float tensor on the same device as logits")
    if not temperature > 0:
        raise ValueError(f"sample: temperature must be > 0, got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"sample: top_k must be an int >= 0 (0 disables), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"sample: top_p must be in (0, 1], got {top_p}")


def sample(
    logits: torch.Tensor,
    *,
    uncond_logits: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: torch.Tensor | int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Draw one token per row (see the module docstring for the exact semantics).

    Args:
        logits: ``[B, V]`` float32/bfloat16/float16 conditional logits.
        uncond_logits: optional ``[B, V]`` unconditional logits for CFG (same device).
        guidance_scale: CFG scale ``s``; ignored when 1 or without ``uncond_logits``.
        temperature: ``T > 0``.
        top_k: keep the ``k`` largest logits (0 or ``>= V`` disables).
        top_p: nucleus mass in ``(0, 1]`` (1 disables).
        seed: int (row seeds ``mix_seed(seed, row)``), int64 tensor ``[B]`` of row seeds, or
            None (one int drawn from torch's global RNG).
        backend: "auto", "torch", "triton", "cpp" or "cuda".
    Returns:
        int64 ``[B]`` token indices on ``logits.device``; ``-1`` for a row whose scaled
        logits are not all finite.
    """
    _validate(logits, uncond_logits, temperature, top_k, top_p)
    if uncond_logits is not None and float(guidance_scale) == 1.0:
        uncond_logits = None
    B, V = logits.shape
    seeds = row_seeds(seed, B, logits.device)
    top_k = 0 if top_k >= V else top_k
    # every backend works in float32, where a top_p below its smallest normal is 0 and a temperature
    # past its range 0 or inf (refused by the C++ / CUDA checks): any such top_p keeps exactly the most
    # probable codes, as the smallest normal does; a temperature is clamped into the normal range
    top_p, temperature = clamp_to_float32(top_p, temperature)
    be = resolve_backend(backend, logits.device, SUPPORTED, "sample")
    args = (logits, uncond_logits, float(guidance_scale), float(temperature), int(top_k), float(top_p), seeds)
    if be == "torch":
        return _sample_torch(*args)
    if be == "triton":
        return _sample_triton_op(*args)
    ext = extension()
    fn = ext.sample_cuda if be == "cuda" else ext.sample_cpu
    return fn(*args)


__all__ = ["clamp_to_float32", "sample", "triton_available"]
