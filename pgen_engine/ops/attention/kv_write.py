"""Paged KV-cache write: the registered in-place op ``pgen::paged_kv_write`` and the public
:func:`paged_kv_write`."""
from __future__ import annotations

import torch

from pgen_engine.ops._backend import extension, triton_runs_on
from pgen_engine.ops.attention._dispatch import resolve, triton_kernels
from pgen_engine.ops.attention._validate import KERNEL_DTYPES, check_kv_write
from pgen_engine.ops.attention.reference import paged_kv_write_ref


KV_WRITE_BACKENDS = ("torch", "triton", "cuda")


@torch.library.custom_op("pgen::paged_kv_write", mutates_args=("k_cache", "v_cache"))
def _kv_write_op(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    slot_mapping: torch.Tensor, backend: str,
) -> None:
    """In-place write of ``k_new/v_new [N,Hkv,D]`` into ``[P,block_size,Hkv,D]`` caches at flat slots."""
    if backend == "triton":
        triton_kernels().kv_write(k_cache, v_cache, k_new, v_new, slot_mapping)
    elif backend == "cuda":
        extension().paged_kv_write_cuda(k_cache, v_cache, k_new, v_new, slot_mapping)
    elif backend == "torch":
        paged_kv_write_ref(k_cache, v_cache, k_new, v_new, slot_mapping)
    else:
        raise ValueError(f"pgen::paged_kv_write: unsupported backend {backend!r}")


@_kv_write_op.register_fake
def _(k_cache, v_cache, k_new, v_new, slot_mapping, backend):
    return None


def paged_kv_write(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    slot_mapping: torch.Tensor, *, backend: str = "auto",
) -> None:
    """Scatter new keys/values into a KV cache, in place (no host sync on the GPU paths).

    Args:
        k_cache, v_cache: paged ``[num_blocks, block_size, Hkv, D]`` or contiguous
            ``[B, Smax, Hkv, D]`` (the same thing with ``block_size = Smax``).
        k_new, v_new: ``[N, Hkv, D]``, the caches' dtype.
        slot_mapping: int64 ``[N]``; ``slot = block * block_size + offset`` (contiguous:
            ``b * Smax + pos``). Negative slots (``-1``) are skipped, and so are slots
            ``>= num_blocks * block_size`` (dropped on the device instead of raising).
        backend: "auto" | "torch" | "triton" | "cuda" (``pgen_engine._C.paged_kv_write_cuda``).
    """
    check_kv_write(k_cache, v_cache, k_new, v_new, slot_mapping)
    impl = resolve(backend, k_cache.device, KV_WRITE_BACKENDS, "paged_kv_write")
    if impl == "torch":
        paged_kv_write_ref(k_cache, v_cache, k_new, v_new, slot_mapping)
        return
    if k_cache.dtype not in KERNEL_DTYPES:
        raise TypeError(f"paged_kv_write: kernels take {KERNEL_DTYPES}, got {k_cache.dtype} (use backend='torch')")
    if k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged_kv_write: caches must be contiguous in the head dim (stride(-1) == 1)")
    if impl == "cuda" and not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        # the CUDA kernel addresses a slot as slot * Hkv * D (TORCH_CHECK: contiguous caches); the
        # Triton kernel takes any strides, as this op promises
        if backend != "auto":
            raise ValueError("paged_kv_write: backend 'cuda' needs contiguous caches; use 'triton' for strided ones")
        impl = "triton" if triton_runs_on(k_cache.device) else "torch"
        if impl == "torch":
            paged_kv_write_ref(k_cache, v_cache, k_new, v_new, slot_mapping)
            return
    _kv_write_op(k_cache, v_cache, k_new, v_new, slot_mapping, impl)
