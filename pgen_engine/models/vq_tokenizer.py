"""JanusVQTokenizer: a Janus VQ-VAE (``transformers``' ``JanusVQVAE``) on its own.

The same module class Janus-Pro decodes with, holding only the VQ weights. It is built
three ways:

* :func:`pgen_engine.models.vq_train.train_vq` trains one on a dataset's images;
* :meth:`JanusVQTokenizer.load` reads a tokenizer file written by :meth:`save`
  (safetensors, tensors named ``vqmodel.*`` plus the VQ config in the metadata);
* :meth:`JanusVQTokenizer.from_checkpoint` reads only the ``model.vqmodel.*`` tensors and
  ``config.json``'s ``vq_config`` of a Hugging Face Janus checkpoint, never the language
  model, so SFT / RL / eval / generation use a checkpoint's own tokenizer through this one
  class for tiny and real checkpoints alike.

:func:`install_into_checkpoint` writes a tokenizer's weights into a checkpoint's
``vqmodel.*`` (with the config's VQ sizes set to match), so the engine's
``decode_images`` and ``transformers``' ``decode_image_tokens`` decode with it.

Codebook rows are kept unit-norm: ``JanusVQVAE.encode`` picks the nearest row by raw L2
distance while ``decode`` L2-normalises the looked-up row, and the two agree only when
the rows are already unit vectors (then nearest-L2 == highest cosine).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..io_utils import atomic_path, atomic_write_json
from .checkpoint import CheckpointError, _read_tensors, _shard_files, load_checkpoint_config
from .image_tokenizer import ImageTokenizer
from .janus import pixels_to_uint8, uint8_to_pixels, vq_call

FORMAT = "pgen-janus-vq"
VERSION = "1"
PREFIX = "vqmodel."
CKPT_PREFIX = "model.vqmodel."
# vq_config keys that shape the VQ weights; the rest (projection dims) belong to the LM side.
VQ_SHAPE_KEYS = ("embed_dim", "num_embeddings", "double_latent", "latent_channels", "in_channels", "base_channels",
                 "channel_multiplier", "num_res_blocks", "num_patches", "out_channels")


def vq_config(
    *,
    image_size: int = 64,
    codes_per_side: int = 8,
    codebook_size: int = 1024,
    embed_dim: int = 8,
    base_channels: int = 32,
    latent_channels: int = 64,
    num_res_blocks: int = 1,
    wide_levels: int = 2,
) -> dict[str, Any]:
    """The ``vq_config`` dict of a reduced-width Janus VQ-VAE.

    ``image_size / codes_per_side`` must be a power of two (one stride-2 level each);
    channels are multiples of 32 because the Janus blocks use ``GroupNorm(32, C)``. The
    last ``wide_levels`` resolution levels use twice ``base_channels``.
    """
    if codes_per_side < 1 or image_size % codes_per_side:
        raise ValueError(f"codes_per_side {codes_per_side} must divide image_size {image_size}")
    down = image_size // codes_per_side
    if down & (down - 1):
        raise ValueError(f"image_size / codes_per_side = {down} must be a power of two")
    for name, v in (("base_channels", base_channels), ("latent_channels", latent_channels)):
        if v < 32 or v % 32:
            raise ValueError(f"{name} must be a positive multiple of 32 (GroupNorm(32)), got {v}")
    if codebook_size < 2 or embed_dim < 1 or num_res_blocks < 1:
        raise ValueError("codebook_size must be >= 2, embed_dim and num_res_blocks >= 1")
    levels = int(math.log2(down)) + 1
    mult = [1 if i < levels - wide_levels else 2 for i in range(levels)]
    return dict(embed_dim=embed_dim, num_embeddings=codebook_size, double_latent=False,
                latent_channels=latent_channels, in_channels=3, base_channels=base_channels,
                channel_multiplier=mult, num_res_blocks=num_res_blocks, num_patches=codes_per_side, out_channels=3)


def build_vqvae(cfg: dict[str, Any]):
    """A freshly initialised ``transformers.JanusVQVAE`` for ``cfg`` (see :func:`vq_config`)."""
    # late import: transformers takes seconds to import and `pgen` imports this module at start-up
    from transformers import JanusVQVAE, JanusVQVAEConfig

    return JanusVQVAE(JanusVQVAEConfig(**cfg))


def _image_size(cfg: dict[str, Any]) -> int:
    return int(cfg["num_patches"]) * 2 ** (len(cfg["channel_multiplier"]) - 1)


class JanusVQTokenizer(ImageTokenizer):
    """A Janus VQ-VAE as an :class:`ImageTokenizer`.

    Args:
        vqvae: a ``transformers.JanusVQVAE`` (kept in eval mode, float32, CPU unless moved).
        config: its VQ config dict (the :data:`VQ_SHAPE_KEYS` at least).
        meta: free-form JSON-able facts stored with :meth:`save` (fit key, held-out metrics).
        batch_size: images per VQ forward in :meth:`encode` / :meth:`decode`.
    """

    def __init__(self, vqvae, config: dict[str, Any], meta: dict[str, Any] | None = None, batch_size: int = 64):
        self.vqvae = vqvae.eval()
        self.config = {k: config[k] for k in VQ_SHAPE_KEYS if k in config}
        self.meta = dict(meta or {})
        self.grid = int(self.config["num_patches"])
        self.image_size = _image_size(self.config)
        self.num_tokens = self.grid * self.grid
        self.codebook_size = int(self.config["num_embeddings"])
        self.batch_size = int(batch_size)
        self._fp: str | None = None

    # ------------------------------------------------------------------ ImageTokenizer
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, S, S, 3]`` -> int64 codes ``[N, grid*grid]`` (row-major)."""
        self._check_images(images)
        dev = self.vqvae.quant_conv.weight.device
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            # contiguous NCHW: the permuted view would run the encoder channels-last (slower on CPU)
            pix = uint8_to_pixels(images[i:i + self.batch_size], torch.float32).contiguous().to(dev)
            out.append(vq_call(lambda p: self.vqvae.encode(p).image_tokens.view(p.shape[0], -1), pix,
                               self.grid).cpu())
        return torch.cat(out) if out else torch.empty(0, self.num_tokens, dtype=torch.long)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 codes ``[N, grid*grid]`` -> uint8 ``[N, S, S, 3]``."""
        if not isinstance(codes, torch.Tensor) or codes.dtype not in (torch.int64, torch.int32, torch.int16):
            raise TypeError(f"codes must be an integer tensor [N,{self.num_tokens}], got "
                            f"{getattr(codes, 'dtype', type(codes))}")
        self._check_codes(codes)
        dev = self.vqvae.quant_conv.weight.device
        out = []
        for i in range(0, codes.shape[0], self.batch_size):
            pix = vq_call(self.vqvae.decode, codes[i:i + self.batch_size].long().to(dev), self.grid)
            out.append(pixels_to_uint8(pix.permute(0, 2, 3, 1)).cpu())
        if not out:
            return torch.empty(0, self.image_size, self.image_size, 3, dtype=torch.uint8)
        return torch.cat(out)

    def fingerprint(self) -> str:
        """Same digest as :class:`VQImageTokenizer` over the same weights, so token caches are shared."""
        if self._fp is None:
            self._fp = vq_fingerprint(self.vqvae, self.image_size, self.num_tokens, self.codebook_size)
        return self._fp

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The VQ weights as ``vqmodel.<name>`` tensors (float32, contiguous)."""
        return {PREFIX + k: v.detach().float().contiguous().cpu() for k, v in self.vqvae.state_dict().items()}

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write weights + config (+ ``meta``) to one safetensors file, atomically."""
        md = {"format": FORMAT, "version": VERSION, "vq_config": json.dumps(self.config),
              "meta": json.dumps(self.meta), "fingerprint": self.fingerprint()}
        with atomic_path(path) as tmp:
            save_file(self.state_dict(), str(tmp), metadata=md)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "JanusVQTokenizer":
        """Read a tokenizer file (:meth:`save`) or a Janus checkpoint directory (:meth:`from_checkpoint`)."""
        path = Path(path)
        if path.is_dir():
            return cls.from_checkpoint(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: VQ tokenizer file does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                if md.get("format") != FORMAT:
                    raise ValueError(f"{path}: not a Janus VQ tokenizer (metadata format={md.get('format')!r})")
                if md.get("version") != VERSION:
                    raise ValueError(f"{path}: unsupported Janus VQ tokenizer version {md.get('version')!r}")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error types for broken headers
            raise ValueError(f"{path}: unreadable safetensors file ({e})") from None
        try:
            cfg, meta = json.loads(md["vq_config"]), json.loads(md.get("meta", "{}"))
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: invalid vq_config metadata ({e})") from None
        tok = cls._from_tensors(cfg, tensors, PREFIX, str(path), meta)
        if md.get("fingerprint") not in (None, tok.fingerprint()):
            raise ValueError(f"{path}: stored fingerprint {md['fingerprint']} does not match the weights "
                             f"({tok.fingerprint()}); the file is corrupt")
        return tok

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> "JanusVQTokenizer":
        """Only ``vq_config`` and the ``model.vqmodel.*`` tensors of a Janus checkpoint directory."""
        path = Path(path)
        cfg, _ = load_checkpoint_config(path)
        where = _read_tensors(_shard_files(path))
        tensors = {}
        for key, (f, handle) in where.items():
            if key.startswith(CKPT_PREFIX):
                try:
                    tensors[key] = handle.get_tensor(key)
                except Exception as e:
                    raise CheckpointError(f"{f}: cannot read tensor {key!r} ({e}); the file may be truncated")
        vq = cfg.vq_config_dict
        # transformers' JanusConfig derives the code grid from the vision tower; older files may omit it
        vq.setdefault("num_patches", math.isqrt(cfg.num_image_tokens))
        return cls._from_tensors(vq, tensors, CKPT_PREFIX, str(path), {"checkpoint": str(path)})

    @classmethod
    def _from_tensors(cls, cfg: dict, tensors: dict[str, torch.Tensor], prefix: str, source: str,
                      meta: dict) -> "JanusVQTokenizer":
        missing_cfg = [k for k in ("embed_dim", "num_embeddings") if k not in cfg]
        if missing_cfg:
            raise ValueError(f"{source}: vq_config lacks {', '.join(missing_cfg)}")
        # late import: transformers takes seconds to import and `pgen` imports this module at start-up
        from transformers import JanusVQVAEConfig

        defaults = JanusVQVAEConfig().to_dict()  # keys a config may leave out take transformers' defaults
        cfg = {k: cfg.get(k, defaults[k]) for k in VQ_SHAPE_KEYS}
        try:
            vq = build_vqvae({k: cfg[k] for k in VQ_SHAPE_KEYS if k in cfg})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: cannot build the VQ model its vq_config describes ({e})") from None
        want = vq.state_dict()
        got = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        if missing or extra:
            raise ValueError(f"{source}: VQ weights do not match vq_config: missing {[prefix + k for k in missing[:3]]}, "
                             f"unexpected {[prefix + k for k in extra[:3]]}")
        for k, t in got.items():
            if tuple(t.shape) != tuple(want[k].shape):
                raise ValueError(f"{source}: tensor {prefix + k} has shape {tuple(t.shape)}, vq_config implies "
                                 f"{tuple(want[k].shape)}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{source}: tensor {prefix + k} contains NaN or Inf")
        vq.load_state_dict({k: t.float() for k, t in got.items()})
        return cls(vq.float(), cfg, meta)


def vq_fingerprint(vqvae, image_size: int, num_tokens: int, codebook_size: int) -> str:
    """``vq-`` + 16 hex digits of sha256 over the geometry and every VQ tensor (as float32)."""
    h = hashlib.sha256(f"vq:{image_size}:{num_tokens}:{codebook_size}".encode())
    for name, t in sorted(vqvae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return "vq-" + h.hexdigest()[:16]


def install_into_checkpoint(tokenizer: JanusVQTokenizer, ckpt_dir: str | os.PathLike) -> None:
    """Replace a ``transformers``-format Janus checkpoint's VQ with ``tokenizer``'s, in place.

    The checkpoint must already have the tokenizer's code geometry (image size, codes per
    image, codebook size: the LM's generation head depends on them); ``config.json``'s
    ``vq_config`` shape keys are set to the tokenizer's and every ``model.vqmodel.*`` tensor
    is replaced. Files are rewritten atomically.
    """
    ckpt = Path(ckpt_dir)
    mcfg, _ = load_checkpoint_config(ckpt)
    if (mcfg.image_size, mcfg.num_image_tokens, mcfg.codebook_size) != (
            tokenizer.image_size, tokenizer.num_tokens, tokenizer.codebook_size):
        raise ValueError(f"{ckpt}: checkpoint geometry (image {mcfg.image_size}, {mcfg.num_image_tokens} codes, "
                         f"codebook {mcfg.codebook_size}) differs from the tokenizer's ({tokenizer.image_size}, "
                         f"{tokenizer.num_tokens}, {tokenizer.codebook_size})")
    if mcfg.vq_embed_dim != int(tokenizer.config["embed_dim"]):
        raise ValueError(f"{ckpt}: vq_config.embed_dim={mcfg.vq_embed_dim} (also the generation embedding width) "
                         f"differs from the tokenizer's code width {tokenizer.config['embed_dim']}")
    files = _shard_files(ckpt)
    new = {CKPT_PREFIX + k[len(PREFIX):]: v for k, v in tokenizer.state_dict().items()}
    for i, f in enumerate(files):
        with safe_open(str(f), framework="pt") as h:
            md = h.metadata()
            keep = {k: h.get_tensor(k) for k in h.keys() if not k.startswith(CKPT_PREFIX)}
            if not any(k.startswith(CKPT_PREFIX) for k in h.keys()) and i != len(files) - 1:
                continue
        # all new VQ tensors go into the last shard (the index is updated to match)
        if i == len(files) - 1:
            keep.update({k: v.to(next(iter(keep.values())).dtype) if keep else v for k, v in new.items()})
        with atomic_path(f) as tmp:
            save_file(keep, str(tmp), metadata=md)
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        wm = {k: v for k, v in data["weight_map"].items() if not k.startswith(CKPT_PREFIX)}
        wm.update({k: files[-1].name for k in new})
        atomic_write_json(index, {**data, "weight_map": wm})
    raw = json.loads((ckpt / "config.json").read_text())
    raw["vq_config"].update(tokenizer.config)
    atomic_write_json(ckpt / "config.json", raw)
