"""Typed view of a Hugging Face Janus ``config.json``.

The engine keeps the original config dict (so ``save_pretrained`` writes back exactly what
``transformers`` expects) and validates the fields its own decoder needs up front, so an
incompatible checkpoint fails at load time with the offending field named.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from pgen_engine.errors import PgenUserError


class CheckpointError(PgenUserError, ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file/key."""


SUPPORTED_ROPE_TYPES = ("default", "linear")
# transformers' JanusVQVAEConfig default (a config.json may leave it out): 4 downsamplings, /16
VQ_DEFAULT_CHANNEL_MULTIPLIER = (1, 1, 2, 2, 4)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Llama-style language model's geometry."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling_factor: float
    max_position_embeddings: int
    attention_bias: bool
    mlp_bias: bool
    hidden_act: str


@dataclasses.dataclass(frozen=True)
class JanusModelConfig:
    """Everything the engine needs from a Janus config, plus the raw dict.

    Attributes:
        text: language-model geometry.
        image_token_id: the understanding placeholder id in prompts.
        image_size: pixel side of images (vision input and VQ output).
        num_image_tokens: T, codes per generated image (= VQ grid size squared).
        codebook_size: K, VQ codebook entries (= generation head outputs).
        tie_word_embeddings: lm_head shares the text embedding matrix (``transformers``' default,
            True, when config.json leaves it out).
        raw: the config.json dict as read (written back by save_pretrained).
    """

    text: TextConfig
    image_token_id: int
    image_size: int
    num_image_tokens: int
    codebook_size: int
    vq_embed_dim: int
    tie_word_embeddings: bool
    raw: dict

    @property
    def vision_config_dict(self) -> dict:
        return dict(self.raw["vision_config"])

    @property
    def vq_config_dict(self) -> dict:
        """``vq_config`` with ``num_patches`` (the VQ code grid side, which its decoder reshapes
        to) derived from the vision grid as ``transformers``' JanusConfig derives it, whatever
        the file says: a config.json without it got transformers' default 32, and the model
        generated its T codes only to fail in ``decode_images`` (expected 1024 codes)."""
        return {**self.raw["vq_config"], "num_patches": math.isqrt(self.num_image_tokens)}

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> "JanusModelConfig":
        """Validate a Janus config dict. Raises CheckpointError naming the bad field."""
        try:
            out = cls._parse(cfg, source)
        except CheckpointError:
            raise
        except (TypeError, ValueError, AttributeError, ArithmeticError, KeyError, IndexError) as e:
            # a field of the wrong JSON type (a list where an object goes, "x" for an int, ...)
            raise CheckpointError(f"{source}: invalid Janus config ({type(e).__name__}: {e})") from None
        t = out.text
        sizes = {f"text_config.{k}": getattr(t, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "max_position_embeddings")}
        sizes.update({"vision_config.image_size": out.image_size, "num_image_tokens": out.num_image_tokens,
                      "vq_config.num_embeddings": out.codebook_size, "vq_config.embed_dim": out.vq_embed_dim})
        for name, v in sizes.items():
            if v < 1:
                raise CheckpointError(f"{source}: {name}={v!r} must be a positive integer")
        return out

    @classmethod
    def _parse(cls, cfg: dict, source: str) -> "JanusModelConfig":
        if cfg.get("model_type") != "janus":
            hint = ("; this is DeepSeek's original Janus format (deepseek-ai/Janus-Pro-*): use the transformers "
                    "snapshot (deepseek-community/Janus-Pro-1B or -7B), or convert it with transformers' "
                    "models/janus/convert_janus_weights_to_hf.py") if cfg.get("model_type") == "multi_modality" else ""
            raise CheckpointError(f"{source}: model_type is {cfg.get('model_type')!r}, expected 'janus' "
                                  f"(a Janus / Janus-Pro checkpoint in the transformers format){hint}")
        for sub in ("text_config", "vision_config", "vq_config"):
            if not isinstance(cfg.get(sub), dict):
                raise CheckpointError(f"{source}: missing or invalid '{sub}' section")
        t = cfg["text_config"]
        if t.get("model_type", "llama") != "llama":
            raise CheckpointError(f"{source}: text_config.model_type is {t.get('model_type')!r}, expected 'llama'")

        def req(d: dict, key: str, section: str, typ=int) -> Any:
            if key not in d or d[key] is None:
                raise CheckpointError(f"{source}: missing {section}.{key}")
            return opt(d, key, section, None, typ)

        def opt(d: dict, key: str, section: str, default: Any, typ=int) -> Any:
            """``d[key]`` as ``typ`` (``default`` when absent or null); a bool, a fractional
            number where an int goes or an unparsable value is an error naming the field."""
            v = d.get(key)
            if v is None:
                return default
            bad = isinstance(v, bool) or (typ is int and isinstance(v, float) and not v.is_integer())
            try:
                if not bad:
                    return typ(v)
            except (TypeError, ValueError, OverflowError):
                pass
            raise CheckpointError(f"{source}: {section}.{key}={v!r} is not a valid {typ.__name__}")

        hidden = req(t, "hidden_size", "text_config")
        heads = req(t, "num_attention_heads", "text_config")
        kv_heads = opt(t, "num_key_value_heads", "text_config", heads)
        for key, v in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
            if v < 1:
                raise CheckpointError(f"{source}: text_config.{key}={v!r} must be a positive integer")
        head_dim = opt(t, "head_dim", "text_config", None) or hidden // heads
        if head_dim % 2:  # else it loads and the first forward fails inside apply_rotary, naming no field
            raise CheckpointError(f"{source}: text_config.head_dim={head_dim} must be even (rotary embeddings rotate "
                                  "pairs of dimensions)" + ("" if "head_dim" in t else
                                                           f"; it is hidden_size/num_attention_heads={hidden}/{heads}"))
        if heads % kv_heads:
            raise CheckpointError(
                f"{source}: text_config.num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise CheckpointError(f"{source}: text_config.rope_parameters={rope!r} must be an object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise CheckpointError(
                f"{source}: text_config rope_type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})"
            )
        theta = opt(rope, "rope_theta", "text_config.rope_parameters", None, float) \
            or opt(t, "rope_theta", "text_config", 10000.0, float)
        factor = opt(rope, "factor", "text_config.rope_parameters", 1.0, float) if rope_type == "linear" else 1.0
        eps = opt(t, "rms_norm_eps", "text_config", 1e-6, float)
        # out of range, each turns every activation into NaN, reported only at generation as an
        # "activation overflow" of finite weights
        for key, value in (("text_config.rms_norm_eps", eps), ("text_config.rope_theta", theta),
                           ("text_config.rope_parameters.factor", factor)):
            if not (math.isfinite(value) and value > 0):
                raise CheckpointError(f"{source}: {key}={value!r} must be a finite number > 0")
        act = t.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{source}: text_config.hidden_act={act!r} is not supported (expected 'silu')")
        text = TextConfig(
            vocab_size=req(t, "vocab_size", "text_config"),
            hidden_size=hidden,
            intermediate_size=req(t, "intermediate_size", "text_config"),
            num_layers=req(t, "num_hidden_layers", "text_config"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=eps,
            rope_theta=theta,
            rope_scaling_factor=factor,
            max_position_embeddings=opt(t, "max_position_embeddings", "text_config", 4096),
            attention_bias=bool(t.get("attention_bias", False)),
            mlp_bias=bool(t.get("mlp_bias", False)),
            hidden_act=act,
        )
        v, q = cfg["vision_config"], cfg["vq_config"]
        image_size = req(v, "image_size", "vision_config")
        patch = req(v, "patch_size", "vision_config")
        if patch < 1:
            raise CheckpointError(f"{source}: vision_config.patch_size={patch!r} must be a positive integer")
        grid = image_size // patch
        n_img = opt(v, "num_image_tokens", "vision_config", grid * grid)
        if n_img != grid * grid:
            raise CheckpointError(
                f"{source}: vision_config.num_image_tokens={n_img} but (image_size/patch_size)^2={grid * grid}"
            )
        # the VQ halves the image side once per channel_multiplier level after the first (each
        # downsampling conv floors); its code grid must be the vision grid, or the generated T
        # codes are not what the VQ encodes history images to nor what it decodes an image from
        mult = q.get("channel_multiplier", VQ_DEFAULT_CHANNEL_MULTIPLIER)
        if not isinstance(mult, (list, tuple)) or not mult:
            raise CheckpointError(f"{source}: vq_config.channel_multiplier={mult!r} must be a non-empty list")
        vq_grid = image_size >> (len(mult) - 1)
        if vq_grid != grid:
            raise CheckpointError(
                f"{source}: the VQ model's code grid is {vq_grid}x{vq_grid} (vision_config.image_size={image_size} "
                f"halved {len(mult) - 1} times, one per vq_config.channel_multiplier level after the first) but "
                f"vision_config gives {grid}x{grid} image tokens (image_size/patch_size={image_size}/{patch}); "
                "generated images and the VQ must have the same grid")
        if int(q.get("image_token_embed_dim", hidden)) != hidden:
            raise CheckpointError(
                f"{source}: vq_config.image_token_embed_dim={q.get('image_token_embed_dim')} != text hidden_size={hidden}"
            )
        # both aligners feed the language model: their output width is its hidden size
        for section, sub in (("vision_config", v), ("vq_config", q)):
            if int(sub.get("projection_dim", hidden)) != hidden:
                raise CheckpointError(
                    f"{source}: {section}.projection_dim={sub.get('projection_dim')} != text hidden_size={hidden}"
                )
        # transformers' JanusConfig default is True: a config.json without the field ties lm_head
        # to embed_tokens (and such a checkpoint has no lm_head.weight)
        tie = cfg.get("tie_word_embeddings", True)
        if not isinstance(tie, bool):
            raise CheckpointError(f"{source}: tie_word_embeddings={tie!r} must be true or false")
        return cls(
            text=text,
            image_token_id=req(cfg, "image_token_id", "config"),
            image_size=image_size,
            num_image_tokens=n_img,
            codebook_size=req(q, "num_embeddings", "vq_config"),
            vq_embed_dim=req(q, "embed_dim", "vq_config"),
            tie_word_embeddings=tie,
            raw=cfg,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "JanusModelConfig":
        """Read and validate ``path/config.json``."""
        path = Path(path)
        f = path / "config.json"
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a directory (expected a Hugging Face checkpoint directory)")
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (expected a Hugging Face checkpoint directory with config.json)")
        try:
            cfg = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{f}: invalid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{f}: expected a JSON object")
        return cls.from_dict(cfg, source=str(f))
