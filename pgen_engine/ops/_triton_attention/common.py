"""Shared pieces of the attention kernels: log2 constants, the fp32-accumulating ``tl.dot``,
output allocation (with the NaN-poison test hook) and interpreter detection."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Compiled kernels may only read module globals that are constexpr (the interpreter is laxer).
LOG2E_K = tl.constexpr(LOG2E)
LN2_K = tl.constexpr(LN2)

# Test hook: when True every buffer the launchers allocate is pre-filled with NaN, so a
# test fails if any element a kernel should write is left unwritten.
POISON_OUTPUTS = False


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32, or the kernel loses to the fp32 reference.
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def upcast_dot(dtype: torch.dtype) -> bool:
    # Triton's CPU interpreter multiplies bf16 operands as their raw uint16 bits. bf16*bf16
    # products are exact in fp32, so upcasting first matches the GPU's bf16 MMA (fp32 acc).
    return interpreting() and dtype == torch.bfloat16


@triton.jit
def mma(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot(a, b)`` with fp32 accumulation (see :func:`upcast_dot` for UPCAST)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


# CUDA limits grid dimensions y and z to 65,535 blocks (x: 2^31 - 1); a launch past it fails
# ("invalid argument") on the GPU only, the interpreter has no such limit. Read at launch time,
# so tests can lower it.
GRID_Y_MAX = 65535


def bh_grid(blocks: int, n_bh: int) -> tuple[int, int, int]:
    """Grid ``(blocks, y, z)`` covering ``n_bh`` (sequence, head) programs with ``y * z >= n_bh``,
    ``y <= GRID_Y_MAX``: the kernel's program is ``program_id(1) + program_id(2) * y`` (see
    :func:`bh_index`), so a packed batch of many sequences times heads still launches."""
    y = max(1, min(n_bh, GRID_Y_MAX))
    return blocks, y, triton.cdiv(max(n_bh, 1), y)


@triton.jit
def bh_index(n_bh, grid_y):
    """This program's (sequence, head) index from :func:`bh_grid`'s axes 1 and 2, and whether it
    is one (the last z slice may overshoot ``n_bh``; such a program does nothing)."""
    pid = tl.program_id(1) + tl.program_id(2) * grid_y
    valid = pid < n_bh
    return tl.where(valid, pid, 0), valid


def dummy_index(device: torch.device) -> torch.Tensor:
    """Placeholder for an absent optional int tensor argument (the kernel never reads it)."""
    return torch.zeros(1, dtype=torch.int32, device=device)
