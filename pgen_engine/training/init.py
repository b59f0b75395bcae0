"""Initial models for runs that do not start from a released checkpoint.

The CPU demo trains a tiny random Janus whose image vocabulary *is* the data tokenizer's:
the generation embedding/head have ``tokenizer.codebook_size`` entries and the image grid
gives ``tokenizer.num_tokens`` codes per image, so cached codes are valid model targets.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from pgen_engine.config import ModelInitConfig
from pgen_engine.io_utils import atomic_dir
from pgen_engine.models.image_tokenizer import ImageTokenizer
from pgen_engine.models.tiny import make_tiny_checkpoint
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

    geometry = {k: v for k, v in dataclasses.asdict(init).items() if k != "seed"}
    if isinstance(tokenizer, JanusVQTokenizer):
        # Janus sizes the generation embedding by vq_config.embed_dim, the VQ codebook's width
        geometry["vq_embed_dim"] = int(tokenizer.config["embed_dim"])
    with atomic_dir(out) as tmp:
        make_tiny_checkpoint(tmp, seed=init.seed, **geometry, **tokenizer_geometry(tokenizer))
        if isinstance(tokenizer, JanusVQTokenizer):
            # a trained Janus VQ becomes the checkpoint's own vqmodel.*: decode_images = tokenizer.decode
            install_into_checkpoint(tokenizer, tmp)
        (tmp / INIT_MARKER).write_text(json.dumps(spec, indent=2) + "\n")
    return out
