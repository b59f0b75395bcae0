"""The ``ImageTokenizer`` interface: images <-> discrete codes.

Two implementations exist: :class:`pgen_engine.models.image_tokenizer.VQImageTokenizer`
(the checkpoint's own VQ model) and
:class:`pgen_engine.models.patch_kmeans.PatchKMeansTokenizer` (a k-means codebook over
image patches, fit in seconds on CPU). Everything downstream (data cache, prompts,
generation, rewards) talks to this interface only.
"""
from __future__ import annotations

import abc
import hashlib
import math

import torch

from .janus import uint8_to_pixels, vq_call


class ImageTokenizer(abc.ABC):
    """Maps uint8 RGB images ``[N, H, W, 3]`` to codes ``[N, T]`` and back.

    Attributes:
        image_size: side of the square images it accepts and produces (pixels).
        num_tokens: T, the number of codes per image (a square grid, row-major).
        codebook_size: K, codes are in ``[0, K)``.
    """

    image_size: int
    num_tokens: int
    codebook_size: int

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` (H = W = image_size) -> int64 codes ``[N, T]``."""

    @abc.abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 codes ``[N, T]`` -> uint8 images ``[N, image_size, image_size, 3]``."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A short string that changes whenever ``encode`` would give other codes.

        Caches key their contents by it, so a cache built with another tokenizer is
        detected and refused.
        """

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise TypeError(f"images must be a uint8 tensor [N,H,W,3], got {getattr(images, 'dtype', type(images))}")
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != self.image_size or images.shape[2] != self.image_size:
            raise ValueError(
                f"images must have shape [N,{self.image_size},{self.image_size},3], got {tuple(images.shape)}"
            )

    def _check_codes(self, codes: torch.Tensor) -> None:
        if codes.ndim != 2 or codes.shape[1] != self.num_tokens:
            raise ValueError(f"codes must have shape [N,{self.num_tokens}], got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0,{self.codebook_size}), got range "
                             f"[{int(codes.min())},{int(codes.max())}]")


class VQImageTokenizer(ImageTokenizer):
    """The checkpoint's own VQ model (``JanusModel.vqmodel``) as an :class:`ImageTokenizer`.

    Args:
        model: a loaded :class:`pgen_engine.models.janus.JanusModel`.
        batch_size: images per VQ forward in :meth:`encode` and :meth:`decode`.
    """

    def __init__(self, model, batch_size: int = 16):
        self.model = model
        self.image_size = model.image_size
        self.num_tokens = model.num_image_tokens
        self.codebook_size = model.codebook_size
        self.batch_size = batch_size
        self._fingerprint: str | None = None

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        out = []
        vq = self.model.vqmodel
        for i in range(0, images.shape[0], self.batch_size):
            pix = uint8_to_pixels(images[i:i + self.batch_size], vq.quant_conv.weight.dtype).to(self.model.device)
            codes = vq_call(lambda p: vq.encode(p).image_tokens.view(p.shape[0], -1), pix,
                            math.isqrt(self.num_tokens))
            out.append(codes.cpu())
        return torch.cat(out) if out else torch.empty(0, self.num_tokens, dtype=torch.long)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        self._check_codes(codes)
        # in chunks of batch_size: one VQ decoder pass over thousands of codes holds every
        # image's full-resolution activations at once (the MovieLens demo's 5,030 images: ~10 GB)
        out = [self.model.decode_images(codes[i:i + self.batch_size]).cpu()
               for i in range(0, codes.shape[0], self.batch_size)]
        if not out:
            return self.model.decode_images(codes).cpu()
        return torch.cat(out)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256(f"vq:{self.image_size}:{self.num_tokens}:{self.codebook_size}".encode())
            for name, t in sorted(self.model.vqmodel.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().float().cpu().numpy().tobytes())
            self._fingerprint = "vq-" + h.hexdigest()[:16]
        return self._fingerprint
