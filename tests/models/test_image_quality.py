"""PSNR / SSIM / codebook usage: known values."""
import math

import pytest
import torch

from pgen_engine.models.image_quality import codebook_usage, psnr, quality_line, ssim


def test_psnr_known_value():
    a = torch.zeros(2, 16, 16, 3, dtype=torch.uint8)
    b = a.clone()
    b[0] += 10  # mse 100 -> 10*log10(255^2/100)
    out = psnr(a, b)
    assert out[0].item() == pytest.approx(10 * math.log10(255 ** 2 / 100))
    assert math.isinf(out[1].item())


def test_ssim_identity_and_noise():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (3, 32, 32, 3), generator=g, dtype=torch.uint8)
    assert torch.allclose(ssim(a, a), torch.ones(3, dtype=torch.float64))
    noisy = (a.int() + torch.randint(-60, 61, a.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    s = ssim(a, noisy)
    assert (s < 0.95).all() and (s > 0).all()
    with pytest.raises(ValueError, match="11x11"):
        ssim(a[:, :8, :8], a[:, :8, :8])


def test_codebook_usage():
    u = codebook_usage(torch.tensor([[0, 0, 1, 1]]), 4)
    assert u["used"] == 2 and u["dead"] == 2 and u["usage"] == 0.5
    assert u["perplexity"] == pytest.approx(2.0)
    assert codebook_usage(torch.arange(8), 8)["perplexity"] == pytest.approx(8.0)


def test_quality_line_format():
    line = quality_line({"psnr": 21.234, "ssim": 0.61234, "n": 7})
    assert line == "reconstruction PSNR: 21.23 dB, SSIM: 0.612 (held-out 7 images)"
