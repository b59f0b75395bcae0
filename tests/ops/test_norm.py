import os

if os.environ.get("PGEN_TEST_DEVICE", "cpu") == "cpu":  # before triton imports: CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pgen_engine.ops._backend import triton_available  # noqa: E402
from pgen_engine.ops.norm import rms_norm  # noqa: E402
from tests.ops._device import CPU, DEV  # noqa: E402

BACKENDS = ["torch"] + (["triton"] if triton_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_llama_rmsnorm(backend, dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    D = 40
    ref = LlamaRMSNorm(D, eps=1e-5).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(D))
    ref = ref.to(DEV)
    x = torch.randn(3, 7, D).to(dtype).to(DEV)
    y = rms_norm(x, ref.weight.detach(), 1e-5, backend=backend)
    expect = ref(x).detach()
    assert y.dtype == expect.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(y, expect, rtol=2e-6, atol=2e-6)
    else:  # bf16: a couple of bf16 ulps (the CPU interpreter truncates on fp32->bf16 casts)
        assert not torch.isnan(y).any()
        assert bool(((y.float() - expect.float()).abs() <= expect.float().abs() * 2 ** -6 + 1e-6).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_residual_forward_backward(backend):
    D = 80
    x64, r64, w64 = torch.randn(5, 3, D, dtype=torch.float64), torch.randn(5, 3, D, dtype=torch.float64), \
        torch.randn(D, dtype=torch.float64)
    gy, gh = torch.randn(5, 3, D, dtype=torch.float64), torch.randn(5, 3, D, dtype=torch.float64)

    def run(dtype, be, dev=CPU):
        x, r, w = (t.to(device=dev, dtype=dtype).clone().requires_grad_() for t in (x64, r64, w64))
        y, h = rms_norm(x, w, 1e-6, residual=r, backend=be)
        ((y.double() * gy.to(dev)).sum() + (h.double() * gh.to(dev)).sum()).backward()
        return [t.cpu() for t in (y.double(), h.double(), x.grad.double(), r.grad.double(), w.grad.double())]

    ref64, ref32 = run(torch.float64, "torch"), run(torch.float32, "torch")
    got = run(torch.float32, backend, DEV)
    for name, a, b, g in zip(("y", "h", "dx", "dr", "dw"), ref64, ref32, got):
        assert not torch.isnan(g).any()
        err, ref_err = (g - a).abs().max().item(), (b - a).abs().max().item()
        assert err <= 2 * ref_err + 1e-6 * max(1.0, a.abs().max().item()), (name, err, ref_err)


def test_bad_inputs():
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.randn(2, 8), torch.randn(7))
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm(torch.randn(2, 8), torch.randn(8), residual=torch.randn(2, 9))


@pytest.mark.skipif(not triton_available(), reason="Triton not importable")
def test_opcheck():
    x, r, w = torch.randn(3, 24).to(DEV), torch.randn(3, 24).to(DEV), torch.randn(24).to(DEV)
    x.requires_grad_(True)
    w.requires_grad_(True)
    torch.library.opcheck(torch.ops.pgen.rms_norm_triton, (x, r, w, 1e-6),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
