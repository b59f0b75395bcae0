"""Paged KV-cache write kernel: scatter new keys/values into their cache slots."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_write_kernel(
    KC, VC, KN, VN, SLOTS,
    stride_kcp, stride_kct, stride_kch, stride_vcp, stride_vct, stride_vch,
    stride_knt, stride_knh, stride_vnt, stride_vnh,
    n_heads_kv, head_dim, block_size, capacity,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + i).to(tl.int64)
    # Negative slots are "skip"; out-of-range slots are dropped rather than written out of
    # bounds (no host sync to raise on them).
    ok = (slot >= 0) & (slot < capacity)
    slot = tl.where(ok, slot, 0)
    page = slot // block_size
    off = slot % block_size
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads_to_write = tl.where(ok, n_heads_kv, 0)
    mask = (offs_h[:, None] < heads_to_write) & (offs_d[None, :] < head_dim)
    kn = tl.load(KN + i * stride_knt + offs_h[:, None] * stride_knh + offs_d[None, :], mask=mask)
    vn = tl.load(VN + i * stride_vnt + offs_h[:, None] * stride_vnh + offs_d[None, :], mask=mask)
    tl.store(KC + page * stride_kcp + off * stride_kct + offs_h[:, None] * stride_kch + offs_d[None, :],
             kn, mask=mask)
    tl.store(VC + page * stride_vcp + off * stride_vct + offs_h[:, None] * stride_vch + offs_d[None, :],
             vn, mask=mask)


def kv_write(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Launch the KV write: caches ``[P, block_size, Hkv, D]``, new ``[N, Hkv, D]``, slots int64 ``[N]``."""
    n = k_new.shape[0]
    if n == 0:
        return
    pages, block_size, n_heads_kv, head_dim = k_cache.shape
    _kv_write_kernel[(n,)](
        k_cache, v_cache, k_new, v_new, slot_mapping.contiguous(),  # the kernel reads SLOTS + i
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        n_heads_kv, head_dim, block_size, pages * block_size,
        BLOCK_H=triton.next_power_of_2(n_heads_kv), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4 if n_heads_kv * head_dim >= 2048 else 1,
    )
