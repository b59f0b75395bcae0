"""Reconstruction quality and codebook-usage numbers for image tokenizers.

Both tokenizer kinds (learned VQ and PatchKMeans) are scored by the same functions so
their numbers compare at the same code budget.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .image_tokenizer import ImageTokenizer


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB, peak 255) of uint8 ``[N, H, W, 3]`` pairs -> float64 ``[N]``.

    An exact reconstruction gives ``inf``.
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"psnr needs two [N,H,W,C] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(255.0 ** 2 / mse)


def _gauss(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of uint8 ``[N, H, W, 3]`` pairs -> float64 ``[N]``.

    The standard form (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01,
    K2 = 0.03, peak 255, valid positions only, averaged over positions and RGB channels.
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs two [N,H,W,C] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if min(a.shape[1], a.shape[2]) < 11:
        raise ValueError(f"ssim needs images of at least 11x11 pixels, got {a.shape[1]}x{a.shape[2]}")
    c = a.shape[3]
    x = a.permute(0, 3, 1, 2).double()
    y = b.permute(0, 3, 1, 2).double()
    g = _gauss()
    w = (g[:, None] * g[None, :]).expand(c, 1, 11, 11).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return m.flatten(1).mean(1)


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Usage of a codebook by integer ``codes`` (any shape).

    Returns ``used`` (distinct codes), ``dead`` (``codebook_size - used``), ``usage``
    (``used / codebook_size``) and ``perplexity`` (``exp`` of the code histogram's entropy;
    ``codebook_size`` when every code is equally frequent).
    """
    flat = codes.reshape(-1).long()
    if flat.numel() == 0:
        raise ValueError("codebook_usage needs at least one code")
    counts = torch.bincount(flat, minlength=codebook_size).double()
    p = counts[counts > 0] / counts.sum()
    used = int((counts > 0).sum())
    return {"used": used, "dead": codebook_size - used, "usage": used / codebook_size,
            "perplexity": float(math.exp(float(-(p * p.log()).sum())))}


def evaluate_tokenizer(tokenizer: ImageTokenizer, images: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """Round-trip uint8 ``images [N, S, S, 3]`` through ``tokenizer``; mean PSNR / SSIM + codebook usage.

    Returns ``{"psnr", "ssim", "n", "used", "dead", "usage", "perplexity"}``.
    """
    if images.shape[0] == 0:
        raise ValueError("evaluate_tokenizer needs at least one image")
    ps, ss, cs = [], [], []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size]
        codes = tokenizer.encode(x)
        y = tokenizer.decode(codes)
        ps.append(psnr(x, y))
        ss.append(ssim(x, y))
        cs.append(codes)
    return {"psnr": float(torch.cat(ps).mean()), "ssim": float(torch.cat(ss).mean()), "n": int(images.shape[0]),
            **codebook_usage(torch.cat(cs), tokenizer.codebook_size)}


def quality_line(q: dict) -> str:
    """The line ``pgen data tokenize`` ends with."""
    return f"reconstruction PSNR: {q['psnr']:.2f} dB, SSIM: {q['ssim']:.3f} (held-out {q['n']} images)"
