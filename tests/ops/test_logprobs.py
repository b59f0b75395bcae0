import os

if os.environ.get("PGEN_TEST_DEVICE", "cpu") == "cpu":  # before triton imports: CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pgen_engine.ops._backend import triton_available  # noqa: E402
from pgen_engine.ops.logprobs import _reference_naive, token_logprobs  # noqa: E402
from tests.ops._device import CPU, DEV  # noqa: E402

BACKENDS = ["torch"] + (["triton"] if triton_available() else [])


def _inputs(N, H, V, dtype):
    h = torch.randn(N, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64) / H ** 0.5 * 3
    b = torch.randn(V, dtype=torch.float64)
    t = torch.randint(0, V, (N,))
    return h, w, b, t


def _grads(fn, h, w, b, t, dtype, dev=CPU, **kw):
    """Runs ``fn`` on ``dev`` (inputs drawn on the CPU are moved there); results come back on the CPU."""
    hh, ww, bb = (x.detach().to(device=dev, dtype=dtype).requires_grad_() for x in (h, w, b))
    lp, ent = fn(hh, ww, t.to(dev), bb, **kw)
    gl = torch.linspace(-1, 1, len(t), dtype=torch.float64).to(dev)
    ge = torch.cos(torch.arange(len(t), dtype=torch.float64) * 1.7).to(dev)  # same upstream grads for every call
    ((lp.double() * gl).sum() + (ent.double() * ge).sum()).backward()
    return [x.cpu() for x in (lp.double(), ent.double(), hh.grad.double(), ww.grad.double(), bb.grad.double())]


def test_chunked_torch_matches_autograd_fp64():
    h, w, b, t = _inputs(11, 40, 37, torch.float64)
    ref = _grads(lambda *a, **k: _reference_naive(*a, temperature=0.7), h, w, b, t, torch.float64)
    got = _grads(lambda hh, ww, tt, bb: token_logprobs(hh, ww, tt, bias=bb, temperature=0.7, chunk_size=8,
                                                       backend="torch"), h, w, b, t, torch.float64, dev=DEV)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,H,V,chunk", [(13, 40, 37, 16), (5, 80, 1000, None)])
def test_fp32_tolerance_vs_fp64(backend, N, H, V, chunk):
    h, w, b, t = _inputs(N, H, V, torch.float32)
    ref64 = _grads(lambda *a, **k: _reference_naive(*a, temperature=1.3), h, w, b, t, torch.float64)
    ref32 = _grads(lambda *a, **k: _reference_naive(*a, temperature=1.3), h, w, b, t, torch.float32)
    got = _grads(lambda hh, ww, tt, bb: token_logprobs(hh, ww, tt, bias=bb, temperature=1.3, chunk_size=chunk,
                                                       backend=backend), h, w, b, t, torch.float32, dev=DEV)
    for name, r64, r32, g in zip(("lp", "ent", "dh", "dw", "db"), ref64, ref32, got):
        assert not torch.isnan(g).any(), name
        err, ref_err = (g - r64).abs().max().item(), (r32 - r64).abs().max().item()
        floor = 2e-6 * max(1.0, r64.abs().max().item())
        assert err <= 2 * ref_err + floor, (name, err, ref_err)


def test_chunked_peak_memory_far_below_naive():
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    class LiveBytes(TorchDispatchMode):
        """Tracks bytes of tensors created by ops that are still alive (their peak)."""

        def __init__(self):
            super().__init__()
            self.live = self.peak = 0

        def _release(self, n):
            self.live -= n

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor) and o._base is None:
                    n = o.untyped_storage().nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(o, self._release, n)
            return out

    N, H, V = 256, 32, 8192
    h, w = torch.randn(N, H).to(DEV), torch.randn(V, H).to(DEV)
    t = torch.randint(0, V, (N,)).to(DEV)

    def peak(fn):
        with LiveBytes() as m:
            fn()
        return m.peak

    naive = peak(lambda: _reference_naive(h, w, t))
    chunked = peak(lambda: token_logprobs(h, w, t, chunk_size=512, backend="torch"))
    assert naive >= N * V * 4 and chunked * 8 <= naive, (chunked, naive)


def test_bad_inputs():
    h, w = torch.randn(3, 4), torch.randn(7, 4)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 7\)"):
        token_logprobs(h, w, torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match="int64"):
        token_logprobs(h, w, torch.tensor([0, 1, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="weight"):
        token_logprobs(h, torch.randn(7, 5), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(h, w, torch.tensor([0, 1, 1]), temperature=0)


@pytest.mark.skipif(not triton_available(), reason="Triton not importable")
def test_opcheck_forward_op():
    h, w, t = torch.randn(5, 16).to(DEV), torch.randn(33, 16).to(DEV), torch.randint(0, 33, (5,)).to(DEV)
    torch.library.opcheck(torch.ops.pgen.token_logprobs_fwd_triton, (h, w, None, t, 1.0),
                          test_utils=("test_schema", "test_faketensor"))
