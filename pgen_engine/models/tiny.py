"""Tiny random Janus checkpoints, written with ``transformers`` itself.

Tests, benchmarks and the CPU demo build their models here, so the engine is always
checked against checkpoints in the exact format ``transformers`` writes.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from .special_tokens import SpecialTokens


def tiny_janus_config(
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 96,
    vocab_size: int = 300,
    image_size: int = 32,
    patch_size: int = 8,
    codebook_size: int = 64,
    vq_embed_dim: int = 8,
    vision_hidden_size: int = 32,
    vision_layers: int = 1,
    vision_heads: int = 2,
    max_position_embeddings: int = 1024,
    rope_theta: float = 10000.0,
):
    """A ``transformers.JanusConfig`` for a tiny model.

    The VQ model downsamples ``image_size`` by ``patch_size`` (a power of two), so
    image tokens per image = ``(image_size // patch_size) ** 2`` for both the vision
    placeholders and the generated codes, as in Janus-Pro (384 / 16 -> 576).
    """
    # late import: transformers takes seconds to import and `pgen` imports this module at start-up
    from transformers import JanusConfig

    if vocab_size < SpecialTokens.BUILTIN_VOCAB_MIN:
        raise ValueError(f"vocab_size must be >= {SpecialTokens.BUILTIN_VOCAB_MIN} for the built-in tokenizer")
    if image_size % patch_size or patch_size & (patch_size - 1):
        raise ValueError("patch_size must be a power of two dividing image_size")
    grid = image_size // patch_size
    n_down = int(math.log2(patch_size))
    special = SpecialTokens.builtin()
    text = dict(
        model_type="llama", hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
        bos_token_id=special.bos, eos_token_id=special.eos, pad_token_id=special.pad,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )
    if head_dim is not None:
        text["head_dim"] = head_dim
    return JanusConfig(
        text_config=text,
        vision_config=dict(
            hidden_size=vision_hidden_size, num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
            image_size=image_size, patch_size=patch_size, projection_dim=hidden_size,
            intermediate_size=2 * vision_hidden_size, num_image_tokens=grid * grid,
        ),
        vq_config=dict(
            embed_dim=vq_embed_dim, num_embeddings=codebook_size, base_channels=32,
            channel_multiplier=[1] * (n_down + 1), num_res_blocks=1, latent_channels=32,
            projection_dim=hidden_size, image_token_embed_dim=hidden_size,
        ),
        image_token_id=special.image,
        tie_word_embeddings=False,
    )


def make_tiny_checkpoint(path: str | Path, *, seed: int = 0, init_std: float | None = None,
                         code_rows: Callable[[int, int, float], tuple[torch.Tensor, torch.Tensor]] | None = None,
                         **config_kwargs) -> Path:
    """Build a random ``JanusForConditionalGeneration`` and ``save_pretrained`` it to ``path``.

    Args:
        path: output directory (created).
        seed: torch seed for the random weights.
        init_std: if set, re-draw every weight matrix from N(0, init_std) (larger values
            make logits peaky, so greedy decoding has no near-ties).
        code_rows: optional ``(embed_dim, hidden_size, std) -> (embedding [K, embed_dim],
            head [K, hidden_size])``: the image-code embedding and image-head rows to start from
            instead of noise (``std``: ``init_std``, else the config's ``initializer_range``).
        **config_kwargs: forwarded to :func:`tiny_janus_config`.
    Returns:
        ``path`` as a Path.
    """
    # late import: transformers takes seconds to import and `pgen` imports this module at start-up
    from transformers import JanusForConditionalGeneration

    cfg = tiny_janus_config(**config_kwargs)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(cfg).eval()
    if init_std is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim >= 2 and "vqmodel" not in name:
                    p.normal_(0.0, init_std)
    if code_rows is not None:
        emb, head = model.model.generation_embeddings.weight, model.model.generation_head.vision_head.weight
        new_emb, new_head = code_rows(emb.shape[1], head.shape[1],
                                      init_std if init_std is not None else cfg.text_config.initializer_range)
        if new_emb.shape != emb.shape or new_head.shape != head.shape:
            raise ValueError(f"code_rows gave {tuple(new_emb.shape)} / {tuple(new_head.shape)}, expected "
                             f"{tuple(emb.shape)} / {tuple(head.shape)}")
        with torch.no_grad():
            emb.copy_(new_emb)
            head.copy_(new_head)
    special = SpecialTokens.builtin()
    for k, v in special.generation_config_dict().items():
        setattr(model.generation_config, k, v)
    path = Path(path)
    model.save_pretrained(path)
    return path
