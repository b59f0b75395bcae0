"""Initial models for runs that do not start from a released checkpoint.

The CPU demo trains a tiny random Janus whose image vocabulary *is* the data tokenizer's:
the generation embedding/head have ``tokenizer.codebook_size`` entries and the image grid
gives ``tokenizer.num_tokens`` codes per image, so cached codes are valid model targets.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import torch

from pgen_engine.config import ConfigError, ModelInitConfig
from pgen_engine.errors import one_line
from pgen_engine.io_utils import atomic_dir
from pgen_engine.models.image_tokenizer import ImageTokenizer
from pgen_engine.models.tiny import make_tiny_checkpoint, tiny_janus_config
from pgen_engine.models.vq_tokenizer import JanusVQTokenizer, install_into_checkpoint

INIT_MARKER = "pgen_init.json"


def tokenizer_geometry(tokenizer: ImageTokenizer) -> dict[str, int]:
    """image_size / patch_size / codebook_size of a Janus model whose codes are ``tokenizer``'s.

    Raises ValueError when the tokenizer's grid is not square or its patch side is not a
    power of two (the VQ model downsamples by powers of two).
    """
    grid = math.isqrt(tokenizer.num_tokens)
    if grid * grid != tokenizer.num_tokens or tokenizer.image_size % grid:
        raise ValueError(f"tokenizer has {tokenizer.num_tokens} codes for {tokenizer.image_size}px images: "
                         "expected a square grid dividing the image side")
    patch = tokenizer.image_size // grid
    if patch & (patch - 1):
        raise ValueError(f"tokenizer patch side {patch} is not a power of two; a Janus VQ cannot match it")
    return {"image_size": tokenizer.image_size, "patch_size": patch, "codebook_size": tokenizer.codebook_size}


def init_model_for_tokenizer(out_dir: str | Path, tokenizer: ImageTokenizer, init: ModelInitConfig) -> Path:
    """Create (or reuse) a tiny random Janus checkpoint at ``out_dir`` matching ``tokenizer``.

    The folder is reused when its ``pgen_init.json`` records the same geometry and
    tokenizer fingerprint, else rebuilt; it is written atomically either way.

    Returns:
        ``out_dir`` as a Path (a Hugging Face Janus directory).
    """
    out = Path(out_dir)
    spec = {"init": dataclasses.asdict(init), "tokenizer": tokenizer.fingerprint(), **tokenizer_geometry(tokenizer)}
    marker = out / INIT_MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == spec:
                return out
        except json.JSONDecodeError:
            pass

    geometry = {**init.geometry(), "init_std": init.init_std}
    if isinstance(tokenizer, JanusVQTokenizer):
        # Janus sizes the generation embedding by vq_config.embed_dim, the VQ codebook's width
        geometry["vq_embed_dim"] = int(tokenizer.config["embed_dim"])
    code_rows = None  # (embed_dim, hidden_size, std) -> rows, see make_tiny_checkpoint
    if init.code_init == "tokenizer":
        code_rows = functools.partial(code_init_weights, code_pixel_features(tokenizer), seed=init.seed)
    with atomic_dir(out) as tmp:
        _make_init_checkpoint(tmp, init, code_rows, geometry, tokenizer_geometry(tokenizer))
        if isinstance(tokenizer, JanusVQTokenizer):
            # a trained Janus VQ becomes the checkpoint's own vqmodel.*: decode_images = tokenizer.decode
            install_into_checkpoint(tokenizer, tmp)
        (tmp / INIT_MARKER).write_text(json.dumps(spec, indent=2) + "\n")
    return out


def check_init_geometry(init: ModelInitConfig) -> None:
    """Refuse, before any data is prepared, a ``model.init`` geometry ``transformers`` cannot build
    (one ConfigError line): an odd head size ``hidden_size / num_heads`` (its config's rotary check),
    ``vision_hidden_size`` not a multiple of ``vision_heads`` (its attention's). The image geometry,
    known only after data preparation, is checked again when the model is built."""
    if init.vision_hidden_size % init.vision_heads:
        raise ConfigError(f"model.init: vision_hidden_size={init.vision_hidden_size} must be a multiple of "
                          f"vision_heads={init.vision_heads} (transformers cannot build that vision tower)")
    # late import: huggingface_hub comes with transformers, which tiny_janus_config imports anyway
    from huggingface_hub.errors import StrictDataclassError

    try:
        tiny_janus_config(**init.geometry())
    except (ValueError, StrictDataclassError) as e:
        cause = e.__cause__ if isinstance(e, StrictDataclassError) and e.__cause__ is not None else e
        raise ConfigError(f"model.init: transformers cannot build a Janus model of this geometry "
                          f"({one_line(cause)})") from None


def _make_init_checkpoint(path: Path, init: ModelInitConfig, code_rows, geometry: dict, image: dict) -> None:
    """make_tiny_checkpoint, with a geometry transformers refuses (an odd head size hidden_size /
    num_heads, vision_hidden_size not a multiple of vision_heads) as one ConfigError line naming
    model.init instead of transformers' traceback."""
    # late import: huggingface_hub comes with transformers, which make_tiny_checkpoint imports anyway
    from huggingface_hub.errors import StrictDataclassError

    try:
        make_tiny_checkpoint(path, seed=init.seed, code_rows=code_rows, **geometry, **image)
    except (ValueError, StrictDataclassError) as e:
        cause = e.__cause__ if isinstance(e, StrictDataclassError) and e.__cause__ is not None else e
        raise ConfigError(f"model.init: transformers cannot build a Janus model of this geometry "
                          f"({one_line(cause)})") from None


def code_pixel_features(tokenizer: ImageTokenizer, chunk: int = 128) -> torch.Tensor:
    """What each code looks like: the tokenizer's decode of an image whose every token is that code.

    Returns:
        float32 ``[K, image_size * image_size * 3]`` in [0, 1], row ``c`` for code ``c``.
    """
    rows = []
    for start in range(0, tokenizer.codebook_size, chunk):
        codes = torch.arange(start, min(start + chunk, tokenizer.codebook_size))
        images = tokenizer.decode(codes[:, None].expand(-1, tokenizer.num_tokens).contiguous())
        rows.append(images.reshape(len(codes), -1).float() / 255.0)
    return torch.cat(rows)


def code_init_weights(features: torch.Tensor, embed_dim: int, hidden_size: int, std: float,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Code embedding and image-head rows that put similar-looking codes close together.

    The embedding is the codes' top ``embed_dim`` principal components, whitened (unit
    variance per component) and scaled to ``std``, the spread of a random init; the head's
    row for code ``c`` is that vector through a fixed random map to ``hidden_size``, so a
    hidden state that scores one code high also scores the codes that look like it high.
    Components past the features' rank are filled with noise of the same scale.

    Args:
        features: ``[K, D]`` per-code features (:func:`code_pixel_features`).
    Returns:
        (embedding ``[K, embed_dim]``, head ``[K, hidden_size]``), float32.
    """
    if features.ndim != 2 or not torch.isfinite(features).all():
        raise ValueError(f"code features must be a finite [K, D] matrix, got shape {tuple(features.shape)}")
    k = features.shape[0]
    centred = features.double() - features.double().mean(0)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    rank = int((s > s[0] * 1e-6).sum()) if s.numel() and s[0] > 0 else 0
    g = torch.Generator().manual_seed(seed)
    comps = u[:, :min(rank, embed_dim)] * math.sqrt(k)
    if comps.shape[1] < embed_dim:
        comps = torch.cat([comps, torch.randn(k, embed_dim - comps.shape[1], generator=g, dtype=comps.dtype)], 1)
    proj = torch.randn(embed_dim, hidden_size, generator=g, dtype=comps.dtype) / math.sqrt(embed_dim)
    return (comps * std).float().contiguous(), (comps @ proj * std).float().contiguous()
