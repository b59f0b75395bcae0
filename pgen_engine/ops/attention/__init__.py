"""Attention ops: prefill (fwd + bwd), paged/contiguous decode, paged KV-cache write.

Three layers per op:
  1. Triton kernels in :mod:`pgen_engine.ops._triton_attention` (CUDA ``paged_kv_write_cuda``
     from ``pgen_engine._C`` for the KV write when built);
  2. registered ops ``pgen::prefill_attention_fwd`` / ``pgen::prefill_attention_bwd``
     (wired together with ``register_autograd``), ``pgen::decode_attention`` and
     ``pgen::paged_kv_write`` (``mutates_args``), each with a fake impl so ``torch.compile``
     traces them;
  3. the documented functions :func:`prefill_attention`, :func:`decode_attention`,
     :func:`paged_kv_write`, plus in-package torch references ``*_ref``.

One module per op, re-exported here:
  * :mod:`.prefill` - :func:`prefill_attention`, :func:`span_limits`, the forward op;
  * :mod:`.prefill_backward` - the backward op and its autograd glue;
  * :mod:`.decode` - :func:`decode_attention`;
  * :mod:`.kv_write` - :func:`paged_kv_write`;
  * :mod:`.reference` - the torch references;
  * :mod:`._validate` - shared argument checks; :mod:`._dispatch` - backend choice.

Layouts follow flash-attn: tokens before heads, ``[..., S, H, D]``. Grouped-query attention:
query head ``h`` reads KV head ``h // (Hq // Hkv)``.

``backend="torch"`` calls the references directly (native autograd, fusable by
``torch.compile``); ``"triton"``/``"cuda"`` go through the registered ops.
"""
from __future__ import annotations

from pgen_engine.ops.attention.decode import DECODE_BACKENDS, decode_attention
from pgen_engine.ops.attention.kv_write import KV_WRITE_BACKENDS, paged_kv_write
from pgen_engine.ops.attention.prefill import PREFILL_BACKENDS, prefill_attention, span_limits
from pgen_engine.ops.attention.reference import decode_attention_ref, paged_kv_write_ref, prefill_attention_ref

__all__ = [
    "prefill_attention", "decode_attention", "paged_kv_write",
    "prefill_attention_ref", "decode_attention_ref", "paged_kv_write_ref", "span_limits",
    "PREFILL_BACKENDS", "DECODE_BACKENDS", "KV_WRITE_BACKENDS",
]
