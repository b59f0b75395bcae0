import os

if os.environ.get("PGEN_TEST_DEVICE", "cpu") == "cpu":  # before triton imports: CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pgen_engine.ops._backend import triton_available  # noqa: E402
from pgen_engine.ops.rotary import apply_rotary  # noqa: E402
from tests.ops._device import CPU, DEV  # noqa: E402

BACKENDS = ["torch"] + (["triton"] if triton_available() else [])


def _angles(shape, D):
    pos = torch.rand(shape, dtype=torch.float64) * 100
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = pos[..., None] * inv
    emb = torch.cat([ang, ang], -1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xshape", [(2, 5, 3, 40), (7, 17, 18)])
def test_matches_hf_and_backward(backend, xshape):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    D = xshape[-1]
    cos, sin = _angles(xshape[:-2], D)
    x64 = torch.randn(xshape, dtype=torch.float64)
    gy = torch.randn(xshape, dtype=torch.float64)

    def run(dtype, be, dev=CPU):
        x = x64.to(device=dev, dtype=dtype).clone().requires_grad_()
        y = apply_rotary(x, cos.to(device=dev, dtype=dtype), sin.to(device=dev, dtype=dtype), backend=be)
        (y.double() * gy.to(dev)).sum().backward()
        return y.double().cpu(), x.grad.double().cpu()

    # HF reference: [B, H, S, D] layout with cos/sin unsqueezed on the head dim
    hf, _ = apply_rotary_pos_emb(x64.transpose(-2, -3), x64.transpose(-2, -3), cos, sin, unsqueeze_dim=-3)
    ref64 = run(torch.float64, "torch")
    torch.testing.assert_close(ref64[0], hf.transpose(-2, -3))
    ref32, got = run(torch.float32, "torch"), run(torch.float32, backend, DEV)
    for a, b, g in zip(ref64, ref32, got):
        assert not torch.isnan(g).any()
        assert (g - a).abs().max() <= 2 * (b - a).abs().max() + 1e-6


def test_bad_inputs():
    with pytest.raises(ValueError, match="even D"):
        apply_rotary(torch.randn(2, 3, 5), torch.randn(2, 5), torch.randn(2, 5))
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rotary(torch.randn(2, 3, 4), torch.randn(3, 4), torch.randn(3, 4))


@pytest.mark.skipif(not triton_available(), reason="Triton not importable")
def test_compile_fullgraph():
    x, c, s = torch.randn(4, 2, 8).to(DEV), torch.randn(4, 8).to(DEV), torch.randn(4, 8).to(DEV)
    fn = torch.compile(lambda a: torch.ops.pgen.apply_rotary_triton(a, c, s, False), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x), apply_rotary(x, c, s, backend="torch"))
