"""The engine's own Llama-style decoder (the Janus language model).

RMSNorm, rotary positions, SwiGLU MLP and grouped-query attention, with three separate
entry points instead of one ``forward`` whose meaning changes with its arguments:

* :meth:`LanguageModel.forward_train` — full sequence, no cache (SFT / RL log-probs);
* :meth:`LanguageModel.prefill` — full prompt, writes its K/V into a paged cache;
* :meth:`LanguageModel.decode_step` — one new token per row against the cache.

Parameter names mirror ``transformers``' ``LlamaModel`` so checkpoints map 1:1.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .janus_config import TextConfig
from . import op_dispatch as K


@dataclasses.dataclass
class KVCache:
    """Per-layer K/V storage.

    ``k[l]`` and ``v[l]`` are ``[num_blocks, block_size, Hkv, D]`` (``layout="bshd"``, the
    flash-attn / paged-kernel layout). A contiguous cache is the special case
    ``num_blocks = rows, block_size = max_len`` used with ``block_table=None`` (row ``b`` owns
    block ``b``); slots are ``block * block_size + offset``. ``layout="bhsd"`` stores rows
    head-major, ``[rows, Hkv, max_len, D]`` (same slots): one-query attention then reads each
    head's keys contiguously (about 3x faster on CPU).

    Shared prefixes (cascade layout, ``bhsd`` only): ``prefix_k`` / ``prefix_v`` (per layer
    ``[prefix rows, Hkv, Lp, D]``) hold each distinct prompt once; with ``prefix_row`` /
    ``prefix_len`` (int32 ``[rows]``) row ``b`` reads positions ``[0, prefix_len[b])`` from pool
    row ``prefix_row[b]`` and stores its own positions ``p >= prefix_len[b]`` at index
    ``p - prefix_len[b]`` of its own row (slot ``b * max_len + p - prefix_len[b]``). A GRPO
    group's samples and identical unconditional prompts therefore keep one copy of their prompt.

    float8 caches (:mod:`pgen_engine.ops.kv_quant`, ``bhsd`` only) carry float32 per-(row, KV
    head) scales beside them: ``k_scale`` / ``v_scale`` (per layer ``[rows, Hkv]``) and, with
    shared prefixes, ``prefix_k_scale`` / ``prefix_v_scale`` (``[prefix rows, Hkv]``).
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    layout: str = "bshd"
    prefix_row: torch.Tensor | None = None
    prefix_len: torch.Tensor | None = None
    # optional CSR of the rows reading each prefix row (ops.decode_shared.prefix_groups of all
    # prefix_row), precomputed per wave so the cascade kernel does not rebuild it per layer and step
    prefix_groups: tuple[torch.Tensor, torch.Tensor] | None = None
    prefix_k: list[torch.Tensor] | None = None
    prefix_v: list[torch.Tensor] | None = None
    k_scale: list[torch.Tensor] | None = None
    v_scale: list[torch.Tensor] | None = None
    prefix_k_scale: list[torch.Tensor] | None = None
    prefix_v_scale: list[torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.layout not in ("bshd", "bhsd"):
            raise ValueError(f"KVCache.layout must be 'bshd' or 'bhsd', got {self.layout!r}")
        if len({self.prefix_row is None, self.prefix_len is None, self.prefix_k is None, self.prefix_v is None}) != 1:
            raise ValueError("KVCache: prefix_row, prefix_len, prefix_k and prefix_v go together")
        if self.prefix_groups is not None and self.prefix_row is None:
            raise ValueError("KVCache: prefix_groups describe prefix_row; give both")
        if self.prefix_row is not None and self.layout != "bhsd":
            raise ValueError("KVCache: shared prefixes need layout='bhsd'")
        if self.k and self.k[0].dtype == torch.float8_e4m3fn:
            if self.layout != "bhsd" or self.k_scale is None or self.v_scale is None:
                raise ValueError("KVCache: a float8 cache needs layout='bhsd' and k_scale / v_scale")
            if self.prefix_k is not None and (self.prefix_k_scale is None or self.prefix_v_scale is None):
                raise ValueError("KVCache: a float8 cache with shared prefixes needs prefix_k_scale / prefix_v_scale")

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[2 if self.layout == "bhsd" else 1]

    def nbytes(self) -> int:
        """Bytes of K/V this cache views (own rows plus the shared-prefix pool)."""
        pool = (*self.prefix_k, *self.prefix_v) if self.prefix_k is not None else ()
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v, *pool))

    @classmethod
    def allocate(cls, cfg: TextConfig, num_blocks: int, block_size: int, *, dtype: torch.dtype,
                 device: torch.device | str) -> "KVCache":
        """Zero-filled cache for every layer of ``cfg``."""
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
        )


class RMSNorm(nn.Module):
    """Llama RMSNorm: ``weight * (x * rsqrt(mean(x^2) + eps))`` computed in fp32."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary positions (HF "rotate_half" convention)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        d = cfg.head_dim
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        self.register_buffer("inv_freq", inv / cfg.rope_scaling_factor, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions int64 ``[...]`` -> cos, sin ``[..., D]`` in ``dtype``."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, hq * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(hq * d, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = d ** -0.5

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        # x [..., H] -> q [..., Hq, D], k/v [..., Hkv, D] with rotary applied to q and k.
        c = self.cfg
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, c.num_heads, c.head_dim)
        k = self.k_proj(x).view(*lead, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).view(*lead, c.num_kv_heads, c.head_dim)
        return K.apply_rotary(q, cos, sin), K.apply_rotary(k, cos, sin), v

    def forward_full(self, x, cos, sin, key_mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x ``[B,S,H]``, key_mask bool ``[B,S]`` or None -> (out ``[B,S,H]``, k, v ``[B,S,Hkv,D]``)."""
        q, k, v = self._qkv(x, cos, sin)
        o = K.prompt_attention(q, k, v, key_mask, self.scale)
        return self.o_proj(o.flatten(-2)), k, v

    def forward_cached(self, x, cos, sin, cache: "KVCache", layer: int, slot_mapping, cache_seqlens, block_table):
        """x ``[B,H]`` (one token per row) -> out ``[B,H]``; writes this token's K/V first."""
        q, k, v = self._qkv(x, cos, sin)
        K.cache_write(cache, layer, k, v, slot_mapping, decode=True)
        o = K.cache_attention(q, cache, layer, cache_seqlens, block_table, self.scale)
        return self.o_proj(o.flatten(-2))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward_full(self, h, cos, sin, key_mask):
        a, k, v = self.self_attn.forward_full(self.input_layernorm(h), cos, sin, key_mask)
        h = h + a
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, k, v

    def forward_cached(self, h, cos, sin, cache: "KVCache", layer: int, slot_mapping, cache_seqlens, block_table):
        h = h + self.self_attn.forward_cached(self.input_layernorm(h), cos, sin, cache, layer,
                                              slot_mapping, cache_seqlens, block_table)
        return h + self.mlp(self.post_attention_layernorm(h))


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left-padded mask ``[B,S]`` -> position ids ``[B,S]`` counting attended tokens only.

    Matches ``transformers``' generate: ``cumsum(mask) - 1`` with padded slots set to 1.
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


class LanguageModel(nn.Module):
    """Llama decoder stack: ``embed_tokens``, ``layers``, ``norm``."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)
        self.gradient_checkpointing = False

    def _positions(self, inputs_embeds, attention_mask, position_ids):
        if position_ids is not None:
            return position_ids
        B, S = inputs_embeds.shape[:2]
        if attention_mask is None:
            return torch.arange(S, device=inputs_embeds.device).expand(B, S)
        return positions_from_mask(attention_mask)

    def forward_train(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Causal forward over full sequences, no cache.

        Args:
            inputs_embeds: ``[B,S,H]``.
            attention_mask: ``[B,S]`` (1 = token, 0 = left padding) or None.
            position_ids: ``[B,S]`` int64; default derived from the mask.
        Returns:
            final-normed hidden states ``[B,S,H]``.
        """
        pos = self._positions(inputs_embeds, attention_mask, position_ids)
        cos, sin = self.rotary(pos, inputs_embeds.dtype)
        key_mask = None if attention_mask is None else attention_mask.bool()
        h = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h, _, _ = torch.utils.checkpoint.checkpoint(layer.forward_full, h, cos, sin, key_mask,
                                                            use_reentrant=False)
            else:
                h, _, _ = layer.forward_full(h, cos, sin, key_mask)
        return self.norm(h)

    def prefill(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache,
                slot_mapping: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run full prompts and write their K/V into ``cache``.

        Args:
            inputs_embeds: ``[B,S,H]`` left-padded prompts.
            attention_mask: ``[B,S]`` or None.
            cache: the paged cache.
            slot_mapping: int64 ``[B,S]`` cache slot of each token, -1 for padding (not stored).
            position_ids: ``[B,S]``; default derived from the mask.
        Returns:
            final-normed hidden states ``[B,S,H]``.
        """
        pos = self._positions(inputs_embeds, attention_mask, position_ids)
        cos, sin = self.rotary(pos, inputs_embeds.dtype)
        key_mask = None if attention_mask is None else attention_mask.bool()
        flat_slots = slot_mapping.reshape(-1)
        h = inputs_embeds
        for i, layer in enumerate(self.layers):
            h, k, v = layer.forward_full(h, cos, sin, key_mask)
            K.cache_write(cache, i, k.flatten(0, 1), v.flatten(0, 1), flat_slots, decode=False)
        return self.norm(h)

    def decode_step(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                    slot_mapping: torch.Tensor, cache_seqlens: torch.Tensor,
                    block_table: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row against the cache. No host synchronisation.

        Args:
            inputs_embeds: ``[B,H]`` embeddings of the new tokens.
            positions: int64 ``[B]`` rotary positions of the new tokens.
            cache: the paged cache (this step's K/V are written at ``slot_mapping``).
            slot_mapping: int64 ``[B]`` slot of each new token.
            cache_seqlens: int32 ``[B]`` valid cached tokens per row *including* the new one.
            block_table: int32 ``[B, max_blocks]``, or None for a contiguous cache (row b = block b).
        Returns:
            final-normed hidden states ``[B,H]``.
        """
        cos, sin = self.rotary(positions, inputs_embeds.dtype)
        h = inputs_embeds
        for i, layer in enumerate(self.layers):
            h = layer.forward_cached(h, cos, sin, cache, i, slot_mapping, cache_seqlens, block_table)
        return self.norm(h)
