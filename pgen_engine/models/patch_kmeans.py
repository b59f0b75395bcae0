"""PatchKMeansTokenizer: a k-means codebook over image patches.

Images are cut into a row-major grid of ``p x p`` patches; each patch is replaced by the
index of its nearest codeword (squared L2 over the ``p*p*3`` uint8 values). Decoding
pastes the codewords back. Codewords are stored as *distinct* uint8 patches, so decoding
a code gives exactly that codeword and re-encoding it gives the same code back
(``encode(decode(c)) == c``). It fits in seconds on CPU and stands in for a VQ model in
tests, demos and the synthetic known-answer experiments.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..io_utils import atomic_path
from .image_tokenizer import ImageTokenizer

FORMAT = "pgen-patch-kmeans"
VERSION = "1"


def _to_patches(images: torch.Tensor, p: int) -> torch.Tensor:
    """uint8 ``[N,H,W,3]`` -> ``[N, (H/p)*(W/p), p*p*3]`` (same dtype), row-major grid."""
    n, h, w, c = images.shape
    x = images.reshape(n, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def _nearest(x: torch.Tensor, centers: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``x [P,D]``, ``centers [K,D]`` -> (index int64 [P], squared distance float32 [P])."""
    cn = (centers * centers).sum(1)
    idx = torch.empty(x.shape[0], dtype=torch.long)
    dist = torch.empty(x.shape[0], dtype=torch.float32)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        d = (xs * xs).sum(1, keepdim=True) - 2.0 * xs @ centers.T + cn
        m, i = d.min(1)
        idx[s:s + chunk], dist[s:s + chunk] = i, m.clamp_min_(0)
    return idx, dist


def kmeans(x: torch.Tensor, k: int, *, iters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means (k-means++ init, Lloyd iterations) on float32 ``x [P, D]`` -> centres ``[k, D]``.

    Empty clusters are re-seeded with the points currently farthest from their centre.
    """
    p = x.shape[0]
    centers = torch.empty(k, x.shape[1], dtype=torch.float32)
    centers[0] = x[torch.randint(p, (1,), generator=generator)]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for j in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than k: duplicates are fixed up by the caller
            i = torch.randint(p, (1,), generator=generator)
        else:
            i = torch.multinomial(d2 / total, 1, generator=generator)
        centers[j] = x[i]
        d2 = torch.minimum(d2, ((x - centers[j]) ** 2).sum(1))
    for _ in range(iters):
        assign, dist = _nearest(x, centers)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(torch.float32)
        new = sums / counts.clamp_min(1).unsqueeze(1)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            far = dist.topk(min(empty.numel(), p)).indices
            new[empty[: far.numel()]] = x[far]
        if torch.equal(new, centers):
            break
        centers = new
    return centers


class PatchKMeansTokenizer(ImageTokenizer):
    """Nearest-codeword patch tokenizer.

    Args:
        codebook: uint8 ``[K, p, p, 3]``, pairwise distinct codewords.
        image_size: side of the square images it accepts (a multiple of ``p``).
    """

    def __init__(self, codebook: torch.Tensor, image_size: int):
        if not isinstance(codebook, torch.Tensor) or codebook.dtype != torch.uint8 or codebook.ndim != 4 \
                or codebook.shape[3] != 3 or codebook.shape[1] != codebook.shape[2] or codebook.shape[0] < 1:
            raise ValueError(f"codebook must be a uint8 tensor [K,p,p,3], got "
                             f"{getattr(codebook, 'dtype', type(codebook))} {tuple(getattr(codebook, 'shape', ()))}")
        p = int(codebook.shape[1])
        if image_size < p or image_size % p:
            raise ValueError(f"image_size {image_size} must be a positive multiple of patch_size {p}")
        flat = codebook.reshape(codebook.shape[0], -1)
        if torch.unique(flat, dim=0).shape[0] != flat.shape[0]:
            raise ValueError("codebook rows must be pairwise distinct (else encode(decode(c)) != c)")
        self.codebook = codebook.contiguous()
        self.patch_size = p
        self.image_size = int(image_size)
        self.grid = self.image_size // p
        self.num_tokens = self.grid * self.grid
        self.codebook_size = int(codebook.shape[0])
        self._centers = flat.to(torch.float32)
        self._fp: str | None = None
        self.meta: dict = {}  # free-form JSON-able facts kept by save/load (fit key, held-out scores)

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        images: torch.Tensor,
        *,
        patch_size: int,
        codebook_size: int,
        iters: int = 20,
        seed: int = 0,
        max_patches: int = 200_000,
    ) -> "PatchKMeansTokenizer":
        """Fit a codebook on uint8 images ``[N, H, W, 3]`` (H = W, divisible by ``patch_size``).

        Uses at most ``max_patches`` randomly chosen patches. Deterministic given ``seed``.
        """
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
                or images.shape[3] != 3 or images.shape[1] != images.shape[2] or images.shape[0] == 0:
            raise ValueError(f"images must be a non-empty uint8 tensor [N,S,S,3], got "
                             f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")
        size = int(images.shape[1])
        if patch_size < 1 or size % patch_size:
            raise ValueError(f"patch_size {patch_size} must be >= 1 and divide the image size {size}")
        if codebook_size < 1 or iters < 0:
            raise ValueError(f"codebook_size must be >= 1 and iters >= 0, got {codebook_size}, {iters}")
        g = torch.Generator().manual_seed(seed)
        x = _to_patches(images, patch_size).reshape(-1, patch_size * patch_size * 3)
        if x.shape[0] > max_patches:
            x = x[torch.randperm(x.shape[0], generator=g)[:max_patches]]
        xf = x.to(torch.float32)
        centers = kmeans(xf, codebook_size, iters=iters, generator=g)
        book = centers.round().clamp_(0, 255).to(torch.uint8)
        book = cls._make_distinct(book, x, g)
        return cls(book.reshape(codebook_size, patch_size, patch_size, 3), size)

    @staticmethod
    def _make_distinct(book: torch.Tensor, data: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Replace duplicate uint8 rows by unused data patches, else by random patches."""
        seen: set[bytes] = set()
        dup = []
        for i in range(book.shape[0]):
            key = book[i].numpy().tobytes()
            if key in seen:
                dup.append(i)
            seen.add(key)
        if not dup:
            return book
        book = book.clone()
        pool = data[torch.randperm(data.shape[0], generator=g)]
        j = 0
        for i in dup:
            while True:
                if j < pool.shape[0]:
                    cand = pool[j]
                    j += 1
                else:
                    cand = torch.randint(0, 256, (book.shape[1],), generator=g, dtype=torch.uint8)
                key = cand.numpy().tobytes()
                if key not in seen:
                    break
            book[i] = cand
            seen.add(key)
        return book

    # ------------------------------------------------------------------ ImageTokenizer
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, S, S, 3]`` -> int64 codes ``[N, (S/p)^2]`` (row-major patch grid)."""
        self._check_images(images)
        n = images.shape[0]
        x = _to_patches(images.cpu(), self.patch_size).reshape(n * self.num_tokens, -1).to(torch.float32)
        idx, _ = _nearest(x, self._centers)
        return idx.reshape(n, self.num_tokens)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 codes ``[N, T]`` -> uint8 images ``[N, S, S, 3]``."""
        if not isinstance(codes, torch.Tensor) or codes.dtype not in (torch.int64, torch.int32, torch.int16):
            raise TypeError(f"codes must be an integer tensor [N,{self.num_tokens}], got "
                            f"{getattr(codes, 'dtype', type(codes))}")
        self._check_codes(codes)
        n, p, g = codes.shape[0], self.patch_size, self.grid
        patches = self.codebook[codes.cpu().long()]  # [N, T, p, p, 3]
        return patches.reshape(n, g, g, p, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(n, g * p, g * p, 3).contiguous()

    def fingerprint(self) -> str:
        """sha256 of the codebook bytes and geometry, first 16 hex digits."""
        if self._fp is None:
            h = hashlib.sha256(f"{FORMAT}:{VERSION}:{self.image_size}:{self.patch_size}:{self.codebook_size}:".encode())
            h.update(self.codebook.numpy().tobytes())
            self._fp = h.hexdigest()[:16]
        return self._fp

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the codebook and geometry to a safetensors file, atomically."""
        meta = {"format": FORMAT, "version": VERSION, "image_size": str(self.image_size),
                "patch_size": str(self.patch_size), "codebook_size": str(self.codebook_size),
                "fingerprint": self.fingerprint(), "meta": json.dumps(self.meta)}
        with atomic_path(path) as tmp:
            save_file({"codebook": self.codebook}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PatchKMeansTokenizer":
        """Read a file written by :meth:`save`; raises ValueError naming the file when it is not one."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: PatchKMeans tokenizer file does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{path}: not a PatchKMeans tokenizer (metadata format={meta.get('format')!r})")
                if meta.get("version") != VERSION:
                    raise ValueError(f"{path}: unsupported PatchKMeans version {meta.get('version')!r}")
                book = f.get_tensor("codebook")
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error types for broken headers
            raise ValueError(f"{path}: unreadable safetensors file ({e})") from None
        try:
            extra = json.loads(meta.get("meta", "{}"))
            tok = cls(book, int(meta["image_size"]))
        except (KeyError, ValueError, TypeError) as e:  # a hand-edited or foreign file: name it
            what = f"missing metadata {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{path}: invalid PatchKMeans tokenizer ({what})") from None
        tok.meta = extra if isinstance(extra, dict) else {}
        if "fingerprint" in meta and meta["fingerprint"] != tok.fingerprint():
            raise ValueError(f"{path}: stored fingerprint {meta['fingerprint']} does not match the codebook "
                             f"({tok.fingerprint()}); the file is corrupt")
        return tok
