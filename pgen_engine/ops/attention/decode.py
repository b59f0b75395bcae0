"""Decode attention: one new query token per row against its (paged or contiguous) KV cache;
the registered op ``pgen::decode_attention`` and the public :func:`decode_attention`."""
from __future__ import annotations

import torch

from pgen_engine.ops.attention._dispatch import resolve, triton_kernels
from pgen_engine.ops.attention._validate import check_decode, check_kernel_input, default_scale
from pgen_engine.ops.attention.reference import decode_attention_ref


DECODE_BACKENDS = ("torch", "triton")


@torch.library.custom_op("pgen::decode_attention", mutates_args=())
def _decode_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    block_table: torch.Tensor, scale: float, backend: str,
) -> torch.Tensor:
    """Paged decode: q ``[B,Hq,D]``, caches ``[P,block_size,Hkv,D]``, block_table int32 ``[B,nb]``."""
    if backend == "triton":
        return triton_kernels().decode(q, k_cache, v_cache, cache_seqlens, block_table, scale)
    if backend == "torch":
        return decode_attention_ref(q, k_cache, v_cache, cache_seqlens, block_table=block_table, scale=scale)
    raise ValueError(f"pgen::decode_attention: unsupported backend {backend!r}")


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, scale, backend):
    return torch.empty_like(q)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, *,
    block_table: torch.Tensor | None = None, scale: float | None = None, backend: str = "auto",
) -> torch.Tensor:
    """One new query token per row attending to its KV cache (no host sync).

    Args:
        q: ``[B, Hq, D]`` float32 / bfloat16 / float16.
        k_cache, v_cache: contiguous ``[B, Smax, Hkv, D]``, or paged
            ``[num_blocks, block_size, Hkv, D]`` with ``block_table``; q's dtype.
        cache_seqlens: int32 ``[B]``, valid cached tokens per row (the new token's K/V already
            written); values above the cache capacity are clamped; 0 gives a zero output.
        block_table: int32 ``[B, max_blocks]`` physical block ids; rows may share blocks.
        scale: softmax scale, default ``D ** -0.5``.
        backend: "auto" | "torch" | "triton".
    Returns:
        ``[B, Hq, D]`` in q's dtype.
    """
    check_decode(q, k_cache, v_cache, cache_seqlens, block_table)
    impl = resolve(backend, q.device, DECODE_BACKENDS, "decode_attention")
    if impl == "torch":
        return decode_attention_ref(q, k_cache, v_cache, cache_seqlens, block_table=block_table, scale=scale)
    check_kernel_input("decode_attention", q)
    if block_table is None:
        # A contiguous cache is a paged cache with one block of Smax tokens per row.
        block_table = torch.arange(q.shape[0], dtype=torch.int32, device=q.device)[:, None]
    q = q if q.stride(-1) == 1 else q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention: caches must be contiguous in the head dim (stride(-1) == 1)")
    return _decode_op(q, k_cache, v_cache, cache_seqlens, block_table, default_scale(scale, q.shape[-1]), impl)
