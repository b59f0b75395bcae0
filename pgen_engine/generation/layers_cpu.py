"""The float32 CPU layer stack in C++: a whole prefill, or one decode step, per call.

A float32 decode step on CPU through the eager layers costs about 40 dispatched ops per layer;
``pgen_engine._C.decode_layers_cpu`` runs every layer (projections through the BLAS, norms,
rotary, cache write and attention in one pass each) in one call, and
``_C.prefill_layers_cpu`` does the same for whole prompts. Both read and write the wave cache
of :class:`~pgen_engine.models.decoder.KVCache` (head-major ``bhsd`` rows, optionally behind a
shared-prefix pool). Same math as the eager layers (float32; sums may round in another order).

Only the C++ decode backend (:class:`pgen_engine.generation.backends.CppBackend`) calls these:
the model itself knows nothing of them. ``PGEN_CPU_DECODE=0`` (read at import) turns the C++
backend off.
"""
from __future__ import annotations

import torch

from pgen_engine import envs
from pgen_engine.models.decoder import positions_from_mask
from pgen_engine.ops._backend import extension as _extension

_CPU_DECODE = envs.get("PGEN_CPU_DECODE")

# an extension built from older sources reads shared prefixes from its own cache: checked once,
# at import (pybind signatures name their arguments); tests may wrap the ops later
_EXT_TAKES_PREFIX_POOL = "prefix_k" in (getattr(_extension(), "decode_layers_cpu", None).__doc__ or "")
# ... and whether its prefill can return the last hidden states only (older builds: full pass + slice)
_PREFILL_TAKES_LAST_ONLY = "last_only" in (getattr(_extension(), "prefill_layers_cpu", None).__doc__ or "")


def cascade_extension():
    """``pgen_engine._C`` when its CPU decode ops take the shared-prefix pool (``prefix_k`` /
    ``prefix_v``), else None: an extension built from older sources is not used at all rather
    than misreading the cache."""
    ext = _extension()
    return ext if _EXT_TAKES_PREFIX_POOL and hasattr(ext, "decode_layers_cpu") else None


def supports(lm, dtype: torch.dtype, device: torch.device, cache_dtype: torch.dtype) -> bool:
    """True when the C++ stack can run ``lm`` (a ``LanguageModel``) with activations of ``dtype``
    on ``device`` over a cache of ``cache_dtype``: float32 CPU, Llama layers without biases, an
    even head dim <= 1024, the extension built and ``PGEN_CPU_DECODE`` on."""
    if not _CPU_DECODE or device.type != "cpu" or dtype != torch.float32 or cache_dtype != torch.float32:
        return False
    cfg = lm.cfg
    if cfg.attention_bias or cfg.mlp_bias or cfg.head_dim % 2 or cfg.head_dim > 1024:
        return False
    return cascade_extension() is not None


def cpu_decode_applies(lm, h: torch.Tensor, cache) -> bool:
    """True when :func:`decode_layers_cpu` can run this step of ``lm``: :func:`supports` for
    ``h`` and the cache, a head-major cache, and no gradients to record."""
    if cache.layout != "bhsd" or not supports(lm, h.dtype, h.device, cache.k[0].dtype):
        return False
    if cache.prefix_k is not None and cache.prefix_k[0].dtype != torch.float32:
        return False
    return not (torch.is_grad_enabled() and any(p.requires_grad for p in lm.parameters()))


def cpu_prefill_applies(lm, h: torch.Tensor, cache) -> bool:
    """True when :func:`prefill_layers_cpu` can run this prefill (the conditions of
    :func:`cpu_decode_applies`, and an extension built with the prefill)."""
    return cpu_decode_applies(lm, h, cache) and hasattr(_extension(), "prefill_layers_cpu")


def stack_weights(lm) -> list[torch.Tensor]:
    """The 9 per-layer weights the C++ layer stack takes, in its order (ln1, q, k, v, o, ln2, gate, up, down)."""
    weights = []
    for layer in lm.layers:
        a, m = layer.self_attn, layer.mlp
        weights += [layer.input_layernorm.weight, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight,
                    a.o_proj.weight, layer.post_attention_layernorm.weight, m.gate_proj.weight, m.up_proj.weight,
                    m.down_proj.weight]
    return [w.detach() for w in weights]


def is_left_padded(key_mask: torch.Tensor) -> bool:
    """key_mask bool ``[B,S]``: every row is 0..0 then 1..1 with at least one 1 (host sync)."""
    return bool(key_mask[:, -1].all()) and not bool((key_mask[:, 1:] < key_mask[:, :-1]).any())


def prefill_layers_cpu(lm, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor | None,
                       cache, slot_mapping: torch.Tensor, last_only: bool = False,
                       chunk_rows: int | None = None) -> torch.Tensor:
    """Every layer of ``lm`` plus its final norm over whole prompts, in C++ (the prefill).

    h ``[B,S,H]``, cos/sin ``[B,S,D]``, key_mask bool ``[B,S]`` (left padding: see
    :func:`is_left_padded`) or None (nothing padded), slot_mapping int64 ``[B,S]`` (-1 = not
    stored) -> final-normed hidden ``[B,S,H]``; writes every layer's K/V into the head-major
    cache. The attention is masked as ``op_dispatch.prompt_attention`` masks it.
    ``last_only``: return ``[B,1,H]``, the last position only (the same values); the last layer
    then skips its queries, o_proj and MLP for the other positions where the packed kernels run.
    ``chunk_rows``: where the packed kernels run, each thread takes its prompts through the layers
    in chunks of at most this many rows (whole prompts; <= 0: all at once; None: the extension's
    default, 256); the values do not depend on it.
    """
    pad = None
    if key_mask is not None:
        if not is_left_padded(key_mask):
            raise ValueError("prefill_layers_cpu: key_mask must be left padding (each row 0..0 then 1..1)")
        pad = (~key_mask).sum(1).to(torch.int64).contiguous()
    cfg = lm.cfg
    args = (h.contiguous(), cos.contiguous(), sin.contiguous(), pad, stack_weights(lm), lm.norm.weight.detach(),
            cache.k, cache.v, slot_mapping.contiguous(), cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps,
            cfg.head_dim ** -0.5)
    if not _PREFILL_TAKES_LAST_ONLY:
        out = _extension().prefill_layers_cpu(*args)
        return out[:, -1:] if last_only else out
    if chunk_rows is None:
        return _extension().prefill_layers_cpu(*args, last_only=last_only)
    return _extension().prefill_layers_cpu(*args, last_only=last_only, chunk_rows=chunk_rows)


def decode_layers_cpu(lm, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, slot_mapping: torch.Tensor,
                      cache_seqlens: torch.Tensor) -> torch.Tensor:
    """Every layer of ``lm`` plus its final norm for one token per row, in C++.

    h ``[B,H]``, cos/sin ``[B,D]``, slot_mapping int64 ``[B]``, cache_seqlens int32 ``[B]`` ->
    final-normed hidden ``[B,H]``; writes each layer's K/V at ``slot_mapping``.
    """
    B = h.shape[0]
    prow = plen = None
    if cache.prefix_row is not None:
        prow, plen = cache.prefix_row[:B].contiguous(), cache.prefix_len[:B].contiguous()
    cfg = lm.cfg
    return _extension().decode_layers_cpu(
        h.contiguous(), cos.contiguous(), sin.contiguous(), stack_weights(lm), lm.norm.weight.detach(), cache.k,
        cache.v, slot_mapping.contiguous(), cache_seqlens.int().contiguous(), cache.prefix_k or [],
        cache.prefix_v or [], prow, plen, cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps, cfg.head_dim ** -0.5)


def prefill(lm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache,
            slot_mapping: torch.Tensor, last_only: bool = False) -> torch.Tensor | None:
    """``lm.prefill`` in C++ (positions from the left-padded mask, as the model derives them) ->
    final-normed hidden ``[B,S,H]`` (``last_only``: ``[B,1,H]``, see :func:`prefill_layers_cpu`),
    or None when the C++ prefill does not apply here."""
    key_mask = None if attention_mask is None else attention_mask.bool()
    if not cpu_prefill_applies(lm, inputs_embeds, cache) or (key_mask is not None and not is_left_padded(key_mask)):
        return None
    B, S = inputs_embeds.shape[:2]
    pos = torch.arange(S, device=inputs_embeds.device).expand(B, S) if attention_mask is None else \
        positions_from_mask(attention_mask)
    cos, sin = lm.rotary(pos, inputs_embeds.dtype)
    return prefill_layers_cpu(lm, inputs_embeds, cos, sin, key_mask, cache, slot_mapping, last_only)


def decode_step(lm, inputs_embeds: torch.Tensor, positions: torch.Tensor, cache, slot_mapping: torch.Tensor,
                cache_seqlens: torch.Tensor) -> torch.Tensor | None:
    """``lm.decode_step`` in C++ (same arguments, contiguous cache) -> final-normed hidden
    ``[B,H]``, or None when the C++ step does not apply here."""
    if not cpu_decode_applies(lm, inputs_embeds, cache):
        return None
    cos, sin = lm.rotary(positions, inputs_embeds.dtype)
    return decode_layers_cpu(lm, inputs_embeds, cos, sin, cache, slot_mapping, cache_seqlens)
