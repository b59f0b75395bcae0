"""Op families: each a torch reference + Triton kernel (+ C++/CUDA via ``_C``) behind one function.

Attention ops live in :mod:`pgen_engine.ops.attention` (a package: one module per op) and are
re-exported here.
"""
from __future__ import annotations

from pgen_engine.ops.attention import decode_attention, paged_kv_write, prefill_attention
from pgen_engine.ops.logprobs import token_logprobs
from pgen_engine.ops.norm import rms_norm
from pgen_engine.ops.rng import mix_seed, splitmix64, uniform_from_seed
from pgen_engine.ops.rotary import apply_rotary, rotate_half
from pgen_engine.ops.sampling import sample

__all__ = ["sample", "token_logprobs", "rms_norm", "apply_rotary", "rotate_half", "uniform_from_seed",
           "mix_seed", "splitmix64", "prefill_attention", "decode_attention", "paged_kv_write"]
