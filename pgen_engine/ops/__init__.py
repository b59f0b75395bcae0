"""Op families: each a torch reference + Triton kernel (+ C++/CUDA via ``_C``) behind one function.

Attention ops live in :mod:`pgen_engine.ops.attention` (another module); they are re-exported
here lazily so this package imports even while that module is absent.
"""
from __future__ import annotations

from pgen_engine.ops.logprobs import token_logprobs
from pgen_engine.ops.norm import rms_norm
from pgen_engine.ops.rng import mix_seed, splitmix64, uniform_from_seed
from pgen_engine.ops.rotary import apply_rotary, rotate_half
from pgen_engine.ops.sampling import sample

_ATTENTION = ("prefill_attention", "decode_attention", "paged_kv_write")


def __getattr__(name: str):
    if name in _ATTENTION:
        try:
            from pgen_engine.ops import attention
        except ImportError as e:
            raise AttributeError(f"pgen_engine.ops.{name} needs pgen_engine.ops.attention, which failed to import: {e}") from e
        return getattr(attention, name)
    raise AttributeError(f"module 'pgen_engine.ops' has no attribute {name!r}")


__all__ = ["sample", "token_logprobs", "rms_norm", "apply_rotary", "rotate_half", "uniform_from_seed",
           "mix_seed", "splitmix64", *_ATTENTION]
