"""Per-architecture launch geometry of the Triton attention kernels.

A kernel whose compiled shared memory exceeds the GPU's per-block limit fails at launch
(``OutOfResources``), so block sizes and pipeline depth depend on the architecture, not just
on the head dim: the fp32 prefill at head dim 128 with (128, 64, 3 stages) needs 229,888 B,
under an H100's limit but over an A100's and an L40S's. ``tools/triton_compile_check.py``
compiles every configuration :func:`prefill_blocks` returns for sm_80, sm_89 and sm_90 and
fails when one exceeds :func:`smem_limit`.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

# Max shared memory per block with opt-in (cudaDevAttrMaxSharedMemoryPerBlockOptin, which
# Triton checks at launch), bytes, by compute capability x10 (CUDA C Programming Guide,
# "Technical Specifications per Compute Capability").
SMEM_LIMIT = {
    75: 65_536,     # T4 / RTX 20xx: 64 KiB
    80: 166_912,    # A100: 163 KiB
    86: 101_376,    # RTX 30xx / A10 / A40: 99 KiB
    87: 166_912,    # Jetson Orin: 163 KiB
    89: 101_376,    # L40S / L4 / RTX 40xx: 99 KiB
    90: 232_448,    # H100 / H200: 227 KiB
    100: 232_448,   # B200: 227 KiB
    120: 101_376,   # RTX 50xx: 99 KiB
}
# The architecture the interpreter (CPU tensors) stands for; its geometry is separate anyway.
INTERPRETER_ARCH = 0


class PrefillBlocks(NamedTuple):
    """Launch geometry of the prefill kernels: tile rows (queries), tile columns (keys)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def smem_limit(arch: int) -> int:
    """Per-block shared memory (bytes) on compute capability ``arch`` (x10, e.g. 90).

    An architecture not in :data:`SMEM_LIMIT` gets the smallest limit of its major version
    family we know, else the 99 KiB of consumer parts: smaller tiles are slower, never wrong."""
    if arch in SMEM_LIMIT:
        return SMEM_LIMIT[arch]
    same_major = [v for k, v in SMEM_LIMIT.items() if k // 10 == arch // 10]
    return min(same_major) if same_major else SMEM_LIMIT[89]


def device_arch(device: torch.device) -> int:
    """Compute capability x10 of a CUDA device; :data:`INTERPRETER_ARCH` for anything else."""
    if device.type != "cuda":
        return INTERPRETER_ARCH
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def on_gpu(device: torch.device) -> bool:
    """True when kernels for ``device`` should get GPU geometry (interpreter: small tiles)."""
    return device_arch(device) != INTERPRETER_ARCH


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def prefill_blocks(arch: int, dtype: torch.dtype, head_dim: int, backward: bool = False) -> PrefillBlocks:
    """Block sizes / warps / stages for the prefill forward or backward kernels.

    Args:
        arch: compute capability x10 (:func:`device_arch`); :data:`INTERPRETER_ARCH` for the
            CPU interpreter, which gets small tiles (it is slow, and shared memory is moot).
        dtype: q/k/v dtype; float32 tiles take twice the shared memory of 16-bit ones.
        head_dim: D; the kernels pad it to a power of two >= 16.
        backward: the dK/dV and dQ kernels (they keep two more tiles live than the forward).
    Raises:
        ValueError: a dtype the kernels do not take, or a non-positive head dim.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"prefill_blocks: dtype must be float32/bfloat16/float16, got {dtype}")
    if head_dim < 1:
        raise ValueError(f"prefill_blocks: head_dim must be >= 1, got {head_dim}")
    if arch == INTERPRETER_ARCH or _interpreting():
        return PrefillBlocks(32, 32, 4, 1)
    limit = smem_limit(arch)
    big = limit >= SMEM_LIMIT[90]          # H100 / B200 class: 227 KiB
    mid = limit >= SMEM_LIMIT[80]          # A100 class: 163 KiB (else the 99 KiB parts)
    fp32 = dtype == torch.float32          # twice the bytes per tile of bf16 / fp16
    d = max(16, 1 << (head_dim - 1).bit_length())  # the kernels' padded BLOCK_D
    # 16-bit tiles fit every supported architecture up to D = 128; fp32 tiles shrink where
    # the H100 geometry overflows. Each configuration is compiled and its shared memory
    # checked per architecture by tools/triton_compile_check.py (D = 64, 80, 128).
    if not backward:
        if d <= 64:
            return PrefillBlocks(128, 64, 4, 3) if not fp32 or mid else PrefillBlocks(64, 64, 4, 2)
        if d <= 128:
            if not fp32 or big:
                return PrefillBlocks(128, 64, 8, 3)   # fp32: 229,888 B, only sm_90-class parts
            return PrefillBlocks(128, 32, 8, 3) if mid else PrefillBlocks(64, 32, 4, 2)
        if not fp32:
            return PrefillBlocks(64, 32, 8, 2) if mid else PrefillBlocks(64, 32, 4, 1)
        return PrefillBlocks(64, 32, 8, 2) if big else PrefillBlocks(32, 32, 4, 1)
    if d <= 64:
        return PrefillBlocks(64, 64, 4, 2) if not fp32 or mid else PrefillBlocks(32, 64, 4, 2)
    if d <= 128:   # fp32: 147,968 B on sm_90 / sm_80; the 99 KiB parts take single-stage 32x32
        return PrefillBlocks(64, 64, 8, 2) if not fp32 or mid else PrefillBlocks(32, 32, 4, 1)
    return PrefillBlocks(32, 32, 8, 1) if not fp32 or mid else PrefillBlocks(16, 32, 4, 1)


class SharedDecodeBlocks(NamedTuple):
    """Launch geometry of the shared-prefix decode kernels (:mod:`pgen_engine.ops._triton_decode_shared`):
    query vectors per tile of a group (``block_m``), keys per tile (``block_n``), warps and
    stages, and the prefix positions one program covers (``split_len``, at most ``max_splits``
    programs per pool row and KV head)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    split_len: int
    max_splits: int


def shared_decode_blocks(arch: int, dtype: torch.dtype, head_dim: int) -> SharedDecodeBlocks:
    """Block sizes for the shared-prefix decode kernels on compute capability ``arch``.

    Decode reads every cached byte once and does little math per byte, so tiles only need to
    be large enough for ``tl.dot`` (16) and to keep a few loads in flight. A program holds a
    ``[block_m, D]`` query tile and ``[block_n, D]`` key / value tiles per stage. Checked per architecture by
    ``tools/triton_compile_check.py`` (op ``decode_shared``)."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"shared_decode_blocks: dtype must be float32/bfloat16/float16, got {dtype}")
    if head_dim < 1:
        raise ValueError(f"shared_decode_blocks: head_dim must be >= 1, got {head_dim}")
    if arch == INTERPRETER_ARCH or _interpreting():
        # small tiles: several tiles, splits and member tiles are exercised at test sizes
        return SharedDecodeBlocks(16, 16, 4, 1, 32, 8)
    d = max(16, 1 << (head_dim - 1).bit_length())
    fp32 = dtype == torch.float32
    small = smem_limit(arch) < SMEM_LIMIT[80]  # the 99 KiB parts
    # compiled sizes (tools/triton_compile_check.py, sm_89): 16-bit D=128 with 2 stages 28,672 B,
    # fp32 D=64 with 64-key tiles 49,152 B; the 163 / 227 KiB parts take a third stage.
    # fp32 D=256 with 2 stages needs 102,528 B (over 99 KiB): one stage there (69,760 B)
    stages = 2 if fp32 or small else 3
    if fp32 and d > 128 and small:
        stages = 1
    return SharedDecodeBlocks(32, 32 if fp32 and d > 64 else 64, 4, stages, 128, 16)


class DecodeBlocks(NamedTuple):
    """Launch geometry of the split-K paged decode kernel (:mod:`pgen_engine.ops._triton_attention.decode`):
    keys per tile (``block_n``, also the split granularity), warps and stages."""

    block_n: int
    num_warps: int
    num_stages: int


def decode_blocks(arch: int, dtype: torch.dtype, head_dim: int) -> DecodeBlocks:
    """Block sizes for the split-K paged decode kernel on compute capability ``arch``.

    A program keeps ``[D, block_n]`` key and ``[block_n, D]`` value tiles in flight per stage:
    compiled (tools/triton_compile_check.py) fp32 D=128 with 64-key tiles and 2 stages takes
    77,888 B, fp32 D=256 151,616 B, over the 99 KiB of sm_86 / sm_89 / sm_120 parts (launch
    fails with ``OutOfResources``); there fp32 D > 128 takes 32-key tiles (84,032 B)."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"decode_blocks: dtype must be float32/bfloat16/float16, got {dtype}")
    if head_dim < 1:
        raise ValueError(f"decode_blocks: head_dim must be >= 1, got {head_dim}")
    if arch == INTERPRETER_ARCH or _interpreting():
        return DecodeBlocks(32, 4, 2)
    d = max(16, 1 << (head_dim - 1).bit_length())
    if dtype == torch.float32 and d > 128 and smem_limit(arch) < SMEM_LIMIT[80]:
        return DecodeBlocks(32, 4, 2)
    return DecodeBlocks(64, 4, 2)
