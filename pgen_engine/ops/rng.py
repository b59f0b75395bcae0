"""Counter-based RNG shared by every sampling backend.

Sampling must give the same token for the same seed on the torch, Triton, C++ and CUDA
paths, so no backend uses a stateful generator: each row's uniform number is a pure
function (splitmix64) of a 64-bit seed. The same function is written as

* torch ops on int64 tensors here (:func:`splitmix64`, :func:`uniform_from_seed`,
  :func:`mix_seed`),
* ``@triton.jit`` device functions :func:`triton_splitmix64` / :func:`triton_uniform`
  below (defined only when Triton imports), used by the Triton sampling kernel, and
* a C++/CUDA helper under ``kernels/`` (owned by the CUDA helper).

splitmix64, for the unsigned 64-bit value of ``seed``::

    z = seed + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    u = float(z >> 40) * 2**-24          # in [0, 1), exact in float32
"""
from __future__ import annotations

import torch

_M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MUL1 = 0xBF58476D1CE4E5B9
MUL2 = 0x94D049BB133111EB
STREAM_MUL = 0xD1B54A32D192ED03


def _signed(c: int) -> int:
    """The int64 two's-complement value of the unsigned 64-bit constant ``c``."""
    c &= _M64
    return c - (1 << 64) if c >= (1 << 63) else c


def _lsr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 ``z`` by ``s`` (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _check_int64(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name}: expected an int64 tensor, got {got}")


def splitmix64(seeds: torch.Tensor) -> torch.Tensor:
    """splitmix64 output ``z`` of each seed.

    Args:
        seeds: int64 tensor of any shape (read as unsigned 64-bit values).
    Returns:
        int64 tensor, same shape: the unsigned 64-bit ``z`` reinterpreted as int64.
    """
    _check_int64(seeds, "splitmix64(seeds)")
    # int64 add/mul wrap modulo 2^64 in torch, which is exactly unsigned arithmetic.
    z = seeds + _signed(GOLDEN)
    z = (z ^ _lsr(z, 30)) * _signed(MUL1)
    z = (z ^ _lsr(z, 27)) * _signed(MUL2)
    return z ^ _lsr(z, 31)


def uniform_from_seed(seeds: torch.Tensor) -> torch.Tensor:
    """One uniform number in [0, 1) per seed: ``float(splitmix64(seed) >> 40) * 2**-24``.

    Args:
        seeds: int64 tensor ``[B]`` (any shape works).
    Returns:
        float32 tensor of the same shape, values in ``{k * 2**-24 : 0 <= k < 2**24}``.
    """
    z = splitmix64(seeds)
    return _lsr(z, 40).to(torch.float32) * (2.0 ** -24)


def mix_seed(seed: torch.Tensor | int, stream: torch.Tensor | int) -> torch.Tensor:
    """Derive an independent seed for ``stream`` (a row, a step, a sample) from ``seed``.

    ``mix_seed = splitmix64(seed ^ (stream * 0xD1B54A32D192ED03))`` as int64.

    Args:
        seed: int64 tensor or Python int (any value representable in 64 bits).
        stream: int64 tensor or Python int, broadcastable with ``seed``.
    Returns:
        int64 tensor of the broadcast shape.
    """
    if isinstance(seed, int):
        seed = torch.tensor(_signed(seed), dtype=torch.int64)
    if isinstance(stream, int):
        stream = torch.tensor(_signed(stream), dtype=torch.int64, device=seed.device)
    _check_int64(seed, "mix_seed(seed)")
    _check_int64(stream, "mix_seed(stream)")
    return splitmix64(seed ^ (stream * _signed(STREAM_MUL)))


def row_seeds(seed: torch.Tensor | int | None, batch: int, device: torch.device) -> torch.Tensor:
    """Per-row int64 seeds ``[batch]`` for the sampling ops.

    ``int`` -> ``mix_seed(seed, arange(batch))``; an int64 tensor ``[batch]`` is used as is;
    ``None`` draws one int from torch's global RNG first (not reproducible unless the global
    RNG is seeded).
    """
    if seed is None:
        seed = int(torch.randint(-(2 ** 63), 2 ** 63 - 1, (), dtype=torch.int64))
    if isinstance(seed, bool) or not isinstance(seed, (int, torch.Tensor)):
        raise TypeError(f"seed: expected int, int64 tensor [B] or None, got {type(seed).__name__}")
    if isinstance(seed, int):
        s = torch.tensor(_signed(seed), dtype=torch.int64, device=device)
        return mix_seed(s, torch.arange(batch, dtype=torch.int64, device=device))
    _check_int64(seed, "seed")
    if seed.shape != (batch,):
        raise ValueError(f"seed: expected an int64 tensor of shape [{batch}], got {tuple(seed.shape)}")
    return seed.to(device)


try:  # the Triton device functions exist only where Triton imports
    import triton
    import triton.language as tl

    @triton.jit
    def triton_splitmix64(seed):
        """splitmix64 of an int64/uint64 scalar or block; returns uint64."""
        z = seed.to(tl.uint64, bitcast=True) + 0x9E3779B97F4A7C15
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)

    @triton.jit
    def triton_uniform(seed):
        """Uniform float32 in [0, 1) from an int64 seed; equals :func:`uniform_from_seed`."""
        z = triton_splitmix64(seed)
        return (z >> 40).to(tl.float32) * 5.9604644775390625e-08

    TRITON_RNG = True
except Exception:  # pragma: no cover - Triton missing
    TRITON_RNG = False
