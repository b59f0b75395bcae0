"""The engine's Janus / Janus-Pro model.

Parts (parameter names = the Hugging Face checkpoint's, minus the leading ``model.``):

* ``language_model`` — the engine's own Llama decoder (:mod:`.decoder`);
* ``lm_head`` — text head;
* ``vision_model`` + ``aligner`` — understanding path: history images -> features that
  replace image-placeholder tokens (SigLIP-style tower from ``transformers``);
* ``generation_embeddings`` + ``generation_aligner`` — VQ code -> LM input embedding;
* ``generation_head`` — LM hidden -> logits over the VQ codebook;
* ``vqmodel`` — the VQ image tokenizer (``transformers``' ``JanusVQVAE``).

Entry points (separate, never one overloaded ``forward``): :meth:`embed_inputs`,
:meth:`forward_train`, :meth:`prefill`, :meth:`decode_step`, :meth:`image_token_logprobs`,
and the public API :meth:`text_logits`, :meth:`image_logits`, :meth:`decode_images`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pgen_engine.ops.logprobs import token_logprobs

from .checkpoint_writer import save_checkpoint
from .decoder import KVCache, LanguageModel
from .janus_config import JanusModelConfig
from .special_tokens import SpecialTokens


def _act(name: str):
    # late import: transformers takes seconds to import and `pgen` imports this module at start-up
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _sub_config(cls, d: dict, section: str):
    """``cls(**d)`` (transformers' vision / VQ config) with an unknown activation or a field of
    the wrong type refused as a ValueError naming ``section.field``: transformers raises a bare
    KeyError ('bogus') for the one, huggingface_hub's own error type for the other."""
    # late import: transformers takes seconds to import and `pgen` imports this module at start-up
    from transformers.activations import ACT2FN
    from huggingface_hub.errors import StrictDataclassError  # late import: comes in with transformers, as above

    try:
        out = cls(**d)
    except StrictDataclassError as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        raise ValueError(f"{section}: {' '.join(str(cause).split())}") from None
    act = out.hidden_act
    if act not in ACT2FN:
        raise ValueError(f"{section}.hidden_act={act!r} is not an activation transformers knows "
                         f"(one of {', '.join(sorted(ACT2FN))})")
    return out


class AlignerMLP(nn.Module):
    """``fc1`` then (act, linear) x (depth-1): maps encoder features to LM width."""

    def __init__(self, in_dim: int, out_dim: int, depth: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.hidden_layers = nn.ModuleList(nn.Linear(out_dim, out_dim) for _ in range(1, depth))
        self.act_name = act  # the config's name (the C++ CPU decode loop applies it by name)
        self.activation_fn = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        for layer in self.hidden_layers:
            x = layer(self.activation_fn(x))
        return x


class GenerationHead(nn.Module):
    """LM hidden ``[..., H]`` -> codebook logits ``[..., K]`` via ``proj_out``, act, ``vision_head``."""

    def __init__(self, hidden: int, proj: int, codebook: int, act: str):
        super().__init__()
        self.proj_out = nn.Linear(hidden, proj)
        self.act_name = act  # the config's name (the C++ CPU decode loop applies it by name)
        self.activation_fn = _act(act)
        self.vision_head = nn.Linear(proj, codebook)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """The input of the final linear layer (what fused log-prob kernels consume)."""
        return self.activation_fn(self.proj_out(h))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.vision_head(self.features(h))


class JanusModel(nn.Module):
    """A Janus checkpoint as the engine runs it. Build with :func:`pgen_engine.load_model`."""

    def __init__(self, config: JanusModelConfig, special_tokens: SpecialTokens | None = None):
        super().__init__()
        # late import: transformers takes seconds to import and `pgen` imports this module at start-up
        from transformers import JanusVisionConfig, JanusVisionModel, JanusVQVAE, JanusVQVAEConfig

        self.config = config
        self.special_tokens = special_tokens or SpecialTokens.builtin()
        t = config.text
        vcfg = _sub_config(JanusVisionConfig, config.vision_config_dict, "vision_config")
        qcfg = _sub_config(JanusVQVAEConfig, config.vq_config_dict, "vq_config")
        self.vision_model = JanusVisionModel(vcfg)
        self.aligner = AlignerMLP(vcfg.hidden_size, vcfg.projection_dim, vcfg.depth, vcfg.hidden_act)
        self.vqmodel = JanusVQVAE(qcfg)
        self.generation_embeddings = nn.Embedding(qcfg.num_embeddings, qcfg.embed_dim)
        self.generation_aligner = AlignerMLP(qcfg.embed_dim, qcfg.projection_dim, qcfg.num_hidden_layers,
                                             qcfg.hidden_act)
        self.generation_head = GenerationHead(qcfg.image_token_embed_dim, qcfg.projection_dim, qcfg.num_embeddings,
                                              qcfg.hidden_act)
        self.language_model = LanguageModel(t)
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def num_image_tokens(self) -> int:
        """T: codes per generated image."""
        return self.config.num_image_tokens

    @property
    def codebook_size(self) -> int:
        """K: size of the VQ codebook (generation head width)."""
        return self.config.codebook_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def num_parameters(self) -> int:
        """Unique parameters (tied matrices counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    # ------------------------------------------------------------------ embeddings
    def embed_image_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ codes int64 ``[...]`` -> LM input embeddings ``[..., H]`` (generation path)."""
        return self.generation_aligner(self.generation_embeddings(codes))

    def vision_hidden(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values ``[N,3,S,S]`` (normalised to [-1,1]) -> vision-tower output ``[N, T_img, D_vision]``
        (before the aligner: what :mod:`pgen_engine.data.vision_cache` stores for frozen towers)."""
        return self.vision_model(pixel_values.to(self.dtype)).last_hidden_state

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values ``[N,3,S,S]`` (normalised to [-1,1]) -> features ``[N, T_img, H]``."""
        return self.aligner(self.vision_hidden(pixel_values))

    def embed_inputs(self, input_ids: torch.Tensor, gen_code_mask: torch.Tensor | None = None,
                     pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                     image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt ids -> LM input embeddings ``[B,S,H]``.

        Args:
            input_ids: int64 ``[B,S]``: text ids; at ``gen_code_mask`` positions, VQ codes.
            gen_code_mask: bool ``[B,S]`` or None; True where ``input_ids`` holds a VQ code that
                enters through the generation embedding (history images as codes, or the
                image being generated, teacher-forced).
            pixel_values: ``[N_img,3,S,S]`` or None; their vision features replace the
                ``image_token_id`` placeholders in reading order (``transformers`` convention:
                exactly ``num_image_tokens`` placeholders per image).
            image_features: instead of ``pixel_values``: their precomputed vision-tower
                outputs ``[N_img, T_img, D_vision]`` (:meth:`vision_hidden`; the aligner is
                still applied here, so it trains).
            image_embeds: instead of either: the aligned features ``[N_img, T_img, H]``
                (:meth:`vision_features`, i.e. tower + aligner already applied; what
                :meth:`pgen_engine.generation.Generator.generate` takes as ``image_embeds``).
        """
        if sum(x is not None for x in (pixel_values, image_features, image_embeds)) > 1:
            raise ValueError("give one of pixel_values, image_features or image_embeds, not several")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B,S], got shape {tuple(input_ids.shape)}")
        emb_layer = self.language_model.embed_tokens
        if gen_code_mask is None:
            x = emb_layer(input_ids)
        else:
            text_ids = input_ids.masked_fill(gen_code_mask, 0)
            code_ids = input_ids.masked_fill(~gen_code_mask, 0)
            x = torch.where(gen_code_mask[..., None], self.embed_image_codes(code_ids), emb_layer(text_ids))
        if pixel_values is not None or image_features is not None or image_embeds is not None:
            if image_embeds is not None:
                feats = image_embeds.reshape(-1, x.shape[-1]).to(x.dtype)
                n_img = image_embeds.shape[0]
            elif image_features is not None:
                feats = self.aligner(image_features.to(self.dtype)).reshape(-1, x.shape[-1]).to(x.dtype)
                n_img = image_features.shape[0]
            else:
                feats = self.vision_features(pixel_values).reshape(-1, x.shape[-1]).to(x.dtype)
                n_img = pixel_values.shape[0]
            slots = input_ids == self.config.image_token_id
            if gen_code_mask is not None:
                slots = slots & ~gen_code_mask
            n_slots = int(slots.sum())
            if n_slots != feats.shape[0]:
                raise ValueError(
                    f"the history images give {n_img} image(s) = {feats.shape[0]} features, but input_ids "
                    f"hold {n_slots} image placeholder tokens (id {self.config.image_token_id}); expected "
                    f"{self.num_image_tokens} placeholders per image"
                )
            x = x.masked_scatter(slots[..., None], feats)
        return x

    # ------------------------------------------------------------------ decoder entry points
    def forward_train(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Full-sequence causal forward (training, log-probs): -> hidden ``[B,S,H]``."""
        return self.language_model.forward_train(inputs_embeds, attention_mask, position_ids)

    def prefill(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache,
                slot_mapping: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt forward writing K/V into ``cache`` -> hidden ``[B,S,H]``. See ``LanguageModel.prefill``."""
        return self.language_model.prefill(inputs_embeds, attention_mask, cache, slot_mapping, position_ids)

    def decode_step(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                    slot_mapping: torch.Tensor, cache_seqlens: torch.Tensor,
                    block_table: torch.Tensor | None = None) -> torch.Tensor:
        """One cached step -> hidden ``[B,H]``. See ``LanguageModel.decode_step``."""
        return self.language_model.decode_step(inputs_embeds, positions, cache, slot_mapping, cache_seqlens,
                                                block_table)

    def allocate_cache(self, num_blocks: int, block_size: int, *, dtype: torch.dtype | None = None) -> KVCache:
        """A zeroed paged KV cache for this model on its device."""
        return KVCache.allocate(self.config.text, num_blocks, block_size, dtype=dtype or self.dtype,
                                device=self.device)

    def image_head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``[..., H]`` -> codebook logits ``[..., K]``."""
        return self.generation_head(hidden)

    def image_token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-prob and entropy of VQ targets under the generation head.

        Args:
            hidden: ``[N,H]`` LM hidden states at the positions that predict ``targets``.
            targets: int64 ``[N]`` codes.
            temperature: logits are divided by it (RL uses the sampling temperature).
        Returns:
            (logprobs ``[N]``, entropy ``[N]``), fp32; the ``[N,K]`` logits are not materialised
            on the fused path.
        """
        head = self.generation_head
        return token_logprobs(head.features(hidden), head.vision_head.weight, targets,
                              bias=head.vision_head.bias, temperature=temperature)

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def text_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Text-head logits ``[B,S,V_text]`` for (left-padded) prompts, with optional history images."""
        self._check_public_inputs(input_ids, attention_mask)
        x = self.embed_inputs(input_ids, None, pixel_values)
        return self.lm_head(self.forward_train(x, attention_mask)).float()

    @torch.no_grad()
    def image_logits(self, input_ids: torch.Tensor, image_tokens: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Teacher-forced generation-head logits ``[B,T,K]``.

        ``input_ids`` ``[B,S]`` is a prompt ending with begin-of-image; row t predicts
        ``image_tokens[:, t]`` from the prompt and ``image_tokens[:, :t]``.
        """
        self._check_public_inputs(input_ids, attention_mask, image_tokens)
        hidden = self._image_hidden(input_ids, image_tokens, attention_mask, pixel_values)
        return self.image_head_logits(hidden).float()

    def _check_public_inputs(self, input_ids, attention_mask, image_tokens=None) -> None:
        """text_logits / image_logits arguments, named (they failed inside torch: "'str' object has no
        attribute 'ndim'", "index out of range in self", "Sizes of tensors must match ...")."""
        checks = [("input_ids", input_ids, self.config.text.vocab_size)]
        if image_tokens is not None:
            checks.append(("image_tokens", image_tokens, self.codebook_size))
        for name, t, high in checks:
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.is_floating_point() or t.is_complex() \
                    or t.dtype == torch.bool or t.shape[1] == 0:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"{name} must be a non-empty integer [B,S] tensor, got {got}")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= high):
                raise ValueError(f"{name} must lie in [0,{high}), got values in [{int(t.min())},{int(t.max())}]")
        if image_tokens is not None and image_tokens.shape[0] != input_ids.shape[0]:
            raise ValueError(f"image_tokens has {image_tokens.shape[0]} rows, input_ids {input_ids.shape[0]}")
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                           or tuple(attention_mask.shape) != tuple(input_ids.shape)):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}, got {got}")

    def _image_hidden(self, input_ids, image_tokens, attention_mask, pixel_values) -> torch.Tensor:
        # hidden states [B,T,H] at the positions predicting each image token
        B, S = input_ids.shape
        T = image_tokens.shape[1]
        prompt = self.embed_inputs(input_ids, None, pixel_values)
        codes = self.embed_image_codes(image_tokens[:, : T - 1])
        x = torch.cat([prompt, codes], dim=1)
        mask = None
        if attention_mask is not None:
            mask = torch.cat([attention_mask, attention_mask.new_ones(B, T - 1)], dim=1)
        h = self.forward_train(x, mask)
        return h[:, S - 1:]

    @torch.no_grad()
    def decode_images(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """VQ codes int64 ``[N,T]`` -> uint8 RGB images ``[N,H,W,3]``."""
        if not isinstance(image_tokens, torch.Tensor):
            raise TypeError(f"image_tokens must be an integer [N,{self.num_image_tokens}] tensor, got "
                            f"{type(image_tokens).__name__}")
        if image_tokens.is_floating_point() or image_tokens.is_complex() or image_tokens.dtype == torch.bool:
            # the VQ embedding lookup would fail deep in torch ("Expected tensor for argument #1 'indices'")
            raise TypeError(f"image_tokens must be an integer tensor of VQ codes, got {image_tokens.dtype}")
        if image_tokens.ndim != 2 or image_tokens.shape[1] != self.num_image_tokens:
            raise ValueError(f"image_tokens must be [N,{self.num_image_tokens}], got {tuple(image_tokens.shape)}")
        if image_tokens.numel() and (int(image_tokens.min()) < 0 or int(image_tokens.max()) >= self.codebook_size):
            raise ValueError(f"image_tokens must lie in [0,{self.codebook_size})")
        side = math.isqrt(self.num_image_tokens)
        pix = vq_call(self.vqmodel.decode, image_tokens.to(self.device, torch.long), side)
        return pixels_to_uint8(pix.permute(0, 2, 3, 1))

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str | Path, *, max_shard_bytes: int = 4 << 30) -> None:
        """Write a Hugging Face Janus checkpoint (``transformers`` loads it) atomically."""
        save_checkpoint(self, path, max_shard_bytes=max_shard_bytes)


def vq_call(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grid: int) -> torch.Tensor:
    """``fn(x)`` for a VQ encoder or decoder pass over a batch ``x`` ``[N, ...]`` -> ``[N, ...]``.

    The Janus VQ blocks use ``GroupNorm(32, C)``; at a 1 x 1 code grid with 32 channels each
    group holds one value per image, and torch's ``group_norm`` refuses a batch of one there
    ("Expected more than 1 value per channel") although the result is defined (the value
    normalises to 0, leaving the bias) and torch computes it for two images. Every VQ layer
    works per image, so a lone image runs as a pair and the copy is dropped.
    """
    if grid == 1 and x.shape[0] == 1:
        return fn(torch.cat([x, x]))[:1]
    return fn(x)


def pixels_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any float dtype) -> uint8 in [0, 255], rounded."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def uint8_to_pixels(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``[N,H,W,3]`` -> ``[N,3,H,W]`` in [-1, 1] (Janus normalisation, mean = std = 0.5)."""
    return (images.permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0)
