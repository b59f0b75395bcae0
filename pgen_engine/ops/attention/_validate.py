"""Argument checks shared by the attention ops and their torch references: one-line errors that
name the op, the argument and what was expected."""
from __future__ import annotations

import torch


# float64 is accepted by the torch references only (tests use it as ground truth).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_TRITON_HEAD_DIM = 256


def need_tensor(x, name: str, op: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(op: str, **tensors: torch.Tensor) -> None:
    dtypes = set()
    devices = set()
    for name, t in tensors.items():
        need_tensor(t, name, op)
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected one of {FLOAT_DTYPES}")
        dtypes.add(t.dtype)
        devices.add(t.device)
    if len(dtypes) > 1:
        got = {n: t.dtype for n, t in tensors.items()}
        raise TypeError(f"{op}: {', '.join(tensors)} must share one dtype, got {got}")
    if len(devices) > 1:
        got = {n: str(t.device) for n, t in tensors.items()}
        raise ValueError(f"{op}: {', '.join(tensors)} must be on one device, got {got}")


def check_index(op: str, name: str, t, dtype: torch.dtype, ndim: int, device: torch.device) -> None:
    need_tensor(t, name, op)
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device} (same device as q)")


def check_heads(op: str, n_heads_q: int, n_heads_kv: int) -> int:
    if n_heads_kv <= 0 or n_heads_q % n_heads_kv != 0:
        raise ValueError(
            f"{op}: query heads Hq={n_heads_q} must be a positive multiple of KV heads Hkv={n_heads_kv}"
        )
    return n_heads_q // n_heads_kv


def check_prefill(q, k, v, causal, cu_seqlens, max_seqlen, bidirectional_spans, key_padding_mask) -> None:
    op = "prefill_attention"
    check_float(op, q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if cu_seqlens is None:
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(
                f"{op}: padded layout expects q [B,S,Hq,D] and k,v [B,S,Hkv,D]; got q {tuple(q.shape)}, "
                f"k {tuple(k.shape)} (pass cu_seqlens for the packed [total,H,D] layout)"
            )
        if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
            raise ValueError(f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B, S or D")
        n_seq, seq = q.shape[0], q.shape[1]
        if key_padding_mask is not None:
            check_index(op, "key_padding_mask", key_padding_mask, torch.bool, 2, q.device)
            if tuple(key_padding_mask.shape) != (n_seq, seq):
                raise ValueError(
                    f"{op}: key_padding_mask must be [B,S]=({n_seq},{seq}), got {tuple(key_padding_mask.shape)}"
                )
    else:
        if q.dim() != 3 or k.dim() != 3:
            raise ValueError(
                f"{op}: packed layout (cu_seqlens given) expects q [total,Hq,D] and k,v [total,Hkv,D]; "
                f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
            raise ValueError(f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on total or D")
        check_index(op, "cu_seqlens", cu_seqlens, torch.int32, 1, q.device)
        if cu_seqlens.numel() < 2:
            raise ValueError(f"{op}: cu_seqlens must have B+1 >= 2 entries, got {cu_seqlens.numel()}")
        if key_padding_mask is not None:
            raise ValueError(f"{op}: key_padding_mask is only for the padded layout; packed sequences have no padding")
        if max_seqlen is not None and (not isinstance(max_seqlen, int) or max_seqlen < 0):
            raise ValueError(f"{op}: max_seqlen must be a non-negative int, got {max_seqlen!r}")
        # Free to check on CPU; on a GPU (or while tracing) it would be a host sync.
        if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
            cu = cu_seqlens.tolist()
            if cu[0] != 0 or cu[-1] != q.shape[0] or any(b < a for a, b in zip(cu, cu[1:])):
                raise ValueError(
                    f"{op}: cu_seqlens must start at 0, be non-decreasing and end at total={q.shape[0]}; got {cu}"
                )
            if max_seqlen is not None and max(b - a for a, b in zip(cu, cu[1:])) > max_seqlen:
                raise ValueError(f"{op}: a sequence is longer than max_seqlen={max_seqlen}")
        n_seq = cu_seqlens.numel() - 1
    check_heads(op, q.shape[-2], k.shape[-2])
    if bidirectional_spans is not None:
        check_index(op, "bidirectional_spans", bidirectional_spans, torch.int32, 3, q.device)
        if bidirectional_spans.shape[0] != n_seq or bidirectional_spans.shape[2] != 2:
            raise ValueError(
                f"{op}: bidirectional_spans must be [B,N,2] with B={n_seq}, got {tuple(bidirectional_spans.shape)}"
            )


def check_kernel_input(op: str, x: torch.Tensor) -> None:
    """Limits of the Triton/CUDA kernels beyond the op's own shape rules."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: kernels take {KERNEL_DTYPES}, got {x.dtype} (use backend='torch')")
    if x.shape[-1] > MAX_TRITON_HEAD_DIM:
        raise ValueError(f"{op}: kernels support head dim <= {MAX_TRITON_HEAD_DIM}, got {x.shape[-1]}")


def default_scale(scale: float | None, head_dim: int) -> float:
    return float(head_dim) ** -0.5 if scale is None else float(scale)


def check_decode(q, k_cache, v_cache, cache_seqlens, block_table) -> None:
    op = "decode_attention"
    check_float(op, q=q, k_cache=k_cache, v_cache=v_cache)
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be [B,Hq,D], got {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"{op}: k_cache and v_cache must be 4-D and equal in shape, got {tuple(k_cache.shape)} and "
            f"{tuple(v_cache.shape)}"
        )
    batch = q.shape[0]
    if k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"{op}: head dim of q ({q.shape[2]}) != cache head dim ({k_cache.shape[3]})")
    check_heads(op, q.shape[1], k_cache.shape[2])
    check_index(op, "cache_seqlens", cache_seqlens, torch.int32, 1, q.device)
    if cache_seqlens.shape[0] != batch:
        raise ValueError(f"{op}: cache_seqlens must be [B]={batch}, got {tuple(cache_seqlens.shape)}")
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(
                f"{op}: contiguous cache must be [B,Smax,Hkv,D] with B={batch}, got {tuple(k_cache.shape)} "
                "(pass block_table for a paged cache)"
            )
    else:
        check_index(op, "block_table", block_table, torch.int32, 2, q.device)
        if block_table.shape[0] != batch:
            raise ValueError(f"{op}: block_table must be [B,max_blocks] with B={batch}, got {tuple(block_table.shape)}")


def check_kv_write(k_cache, v_cache, k_new, v_new, slot_mapping) -> None:
    op = "paged_kv_write"
    check_float(op, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"{op}: caches must be 4-D [num_blocks,block_size,Hkv,D] (or [B,Smax,Hkv,D]) and equal in shape, "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_new.dim() != 3 or k_new.shape != v_new.shape or tuple(k_new.shape[1:]) != tuple(k_cache.shape[2:]):
        raise ValueError(
            f"{op}: k_new/v_new must both be [N,Hkv,D]=[N,{k_cache.shape[2]},{k_cache.shape[3]}], got "
            f"{tuple(k_new.shape)} and {tuple(v_new.shape)}"
        )
    check_index(op, "slot_mapping", slot_mapping, torch.int64, 1, k_cache.device)
    if slot_mapping.shape[0] != k_new.shape[0]:
        raise ValueError(f"{op}: slot_mapping must be [N]={k_new.shape[0]}, got {tuple(slot_mapping.shape)}")
