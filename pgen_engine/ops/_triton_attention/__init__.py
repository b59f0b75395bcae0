"""Triton kernels for attention, one module per kernel family, launchers re-exported here.

* :mod:`.common` - log2 constants, ``mma`` (fp32-accumulating ``tl.dot``), output allocation
  (``POISON_OUTPUTS`` test hook), interpreter detection;
* :mod:`.prefill_fwd` - prefill forward (:func:`prefill_fwd`);
* :mod:`.prefill_bwd` - prefill backward (:func:`prefill_bwd`);
* :mod:`.decode` - split-K paged decode (:func:`decode`, :func:`decode_num_splits`);
* :mod:`.kv_write` - paged KV-cache write (:func:`kv_write`).

Layer 1 of the three-layer op design: raw kernels plus thin launchers that allocate
outputs and pick block sizes. Input validation lives in :mod:`pgen_engine.ops.attention`;
launchers here assume validated, last-dim-contiguous tensors.

Conventions shared by all prefill kernels (packed "varlen" layout, like flash-attn):
  * ``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` with ``cu_seqlens`` int32 ``[B+1]``; a padded
    batch ``[B, S, ...]`` is passed as ``T = B*S`` with ``cu_seqlens = arange(B+1)*S``.
  * ``q_hi`` int32 ``[T]`` (only when spans are present): exclusive key end, in
    sequence-local positions, that query ``i`` may attend to under causal masking
    (``max(i+1, end of any bidirectional span containing i)``). ``k_lo`` int32 ``[T]``:
    first query that may attend to key ``j``. Both are monotone within a sequence, which
    is what lets the kernels bound their loops.
  * ``kpm`` int8 ``[T]`` (optional): 1 = real key, 0 = padding.
  * ``lse`` float32 ``[Hq, T]``: natural-log log-sum-exp of scaled scores, ``+inf`` for a
    query row with no allowed key (so the backward's ``exp(s - lse)`` is 0 there).
Scores are computed in base 2 (``qk * scale * log2(e)``) so the softmax uses ``exp2``.
"""
from __future__ import annotations

from pgen_engine.ops._triton_attention.decode import decode, decode_num_splits
from pgen_engine.ops._triton_attention.kv_write import kv_write
from pgen_engine.ops._triton_attention.prefill_bwd import prefill_bwd
from pgen_engine.ops._triton_attention.prefill_fwd import prefill_fwd

__all__ = ["prefill_fwd", "prefill_bwd", "decode", "decode_num_splits", "kv_write"]
