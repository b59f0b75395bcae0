"""float8 (e4m3) KV cache: per-head scales, quantise on write, dequantise on read.

A cache kept as ``torch.float8_e4m3fn`` holds ``x / scale`` rounded to e4m3 (3 mantissa
bits, saturating at :data:`FP8_MAX`); ``scale`` is float32 per (cache row, KV head) and lives
beside the cache. Halving the bytes of a bf16 cache halves what each decode step reads,
which bounds the step on a GPU.

Where the scales come from (all on the device, no host synchronisation, so a captured CUDA
graph can write the cache):

* a write that **calibrates** (the prefill: a row's whole prompt arrives in one call) sets
  each touched row's scale from the amax of what it writes to that row and head;
* a decode write (one token per row) keeps a row's scale once it is set, and otherwise sets
  it from this token (the first image token of a wave's own row), never below ``floor``
  (the scale of the row's shared prompt, so a row's own tokens start no finer than its prompt).

:data:`HEADROOM` leaves room above the calibrating amax for later tokens of the row:
values beyond ``FP8_MAX * scale`` saturate. e4m3 is floating point, so the headroom costs
relative precision only for values ``2^-6 * FP8_MAX / HEADROOM`` times below the amax,
which enter attention as near-zeros anyway.
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# Room above the calibrating amax for later decode tokens of a row (see the module docstring).
HEADROOM = 4.0


def is_fp8(dtype: torch.dtype) -> bool:
    """True for the float8 cache dtype this module handles."""
    return dtype == FP8_DTYPE


def _expand(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    return scale.reshape(*scale.shape, *([1] * (ndim - scale.dim())))


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` as float8 e4m3, saturated at +-:data:`FP8_MAX`.

    ``scale`` has ``x``'s leading dims (e.g. ``[N, Hkv]`` for ``x [N, Hkv, D]``); a zero scale
    (a row that only ever saw zeros) stores zeros."""
    s = _expand(scale.float(), x.dim())
    safe = torch.where(s > 0, s, torch.ones((), dtype=s.dtype, device=s.device))
    return (x.float() / safe).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float8 ``x`` times its ``scale`` (``x``'s leading dims, e.g. ``[rows, Hkv]`` for
    ``[rows, Hkv, L, D]``), in ``dtype`` (the product is taken in float32, or float64 when asked)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return (x.to(work) * _expand(scale.to(work), x.dim())).to(dtype)


def row_head_scales(x: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Scale each (row, head) would get from the tokens written to it now.

    Args:
        x: ``[N, Hkv, D]`` the tokens being written.
        rows: int64 ``[N]`` destination row of each token.
        num_rows: rows of the cache.
    Returns:
        float32 ``[num_rows, Hkv]``: ``amax * HEADROOM / FP8_MAX`` over the row's tokens, 0 for
        rows no token goes to.
    """
    amax = x.detach().abs().amax(-1).float()  # [N, Hkv]
    out = torch.zeros(num_rows, x.shape[1], dtype=torch.float32, device=x.device)
    out.scatter_reduce_(0, rows[:, None].expand_as(amax), amax, reduce="amax", include_self=True)
    return out * (HEADROOM / FP8_MAX)


def write_head_major(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     slot_mapping: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor, *,
                     calibrate: bool, floor_k: torch.Tensor | None = None,
                     floor_v: torch.Tensor | None = None) -> None:
    """Quantise ``k, v [N, Hkv, D]`` into head-major float8 caches ``[rows, Hkv, L, D]`` at
    ``slot = row * L + position`` (every slot valid), updating the scales ``[rows, Hkv]`` in place.

    Args:
        calibrate: set each touched row's scale from this write (the prefill); else keep the
            scales already set and set the unset (zero) ones from this write (decode).
        floor_k, floor_v: float32 ``[rows, Hkv]`` lower bounds for K / V scales set by a decode
            write (e.g. the scales of each row's shared prompt), or None.
    """
    L = k_cache.shape[2]
    row, pos = slot_mapping // L, slot_mapping % L
    for cache, x, scale, floor in ((k_cache, k, k_scale, floor_k), (v_cache, v, v_scale, floor_v)):
        fresh = row_head_scales(x, row, scale.shape[0])
        if calibrate:
            touched = torch.zeros(scale.shape[0], dtype=torch.bool, device=scale.device)
            touched.index_fill_(0, row, True)
            scale.copy_(torch.where(touched[:, None], fresh, scale))
        else:
            if floor is not None:
                fresh = torch.maximum(fresh, floor)
            scale.copy_(torch.where(scale > 0, scale, fresh))
        cache[row, :, pos] = quantize(x, scale.index_select(0, row))




class ScaleStore:
    """Per-layer float32 scale tables ``[capacity, Hkv]`` for K and V, allocated once so their
    addresses stay fixed (a captured decode graph reads and writes them); callers take views."""

    def __init__(self, num_layers: int, capacity: int, num_kv_heads: int, device: torch.device | str):
        self.k = [torch.zeros(capacity, num_kv_heads, dtype=torch.float32, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(capacity, num_kv_heads, dtype=torch.float32, device=device) for _ in range(num_layers)]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[0]

    def views(self, start: int, count: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Rows ``[start, start + count)`` of every layer's K and V table, zeroed (unset)."""
        if start < 0 or start + count > self.capacity:
            raise ValueError(f"ScaleStore.views: rows [{start}, {start + count}) exceed the capacity {self.capacity}")
        ks, vs = [t[start:start + count] for t in self.k], [t[start:start + count] for t in self.v]
        for t in (*ks, *vs):
            t.zero_()
        return ks, vs

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


__all__ = ["FP8_DTYPE", "FP8_MAX", "HEADROOM", "ScaleStore", "is_fp8", "quantize", "dequantize", "row_head_scales",
           "write_head_major"]
