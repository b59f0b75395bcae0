"""A kernel whose loop bound is loaded at run time, on the device the op tests use (the CPU
interpreter by default). Triton 3.6's interpreter with NumPy >= 2.4 failed on exactly this
(``int()`` of a 1-element array); :mod:`pgen_engine.ops._triton_interpreter` fixes it."""
import os

if os.environ.get("PGEN_TEST_DEVICE", "cpu") == "cpu":  # before triton imports: CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pgen_engine.ops import _triton_interpreter  # noqa: E402
from pgen_engine.ops._backend import triton_available  # noqa: E402
from tests.ops._device import DEV  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton cannot run here")

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _sum_first_n(X, N_PTR, OUT, BLOCK: tl.constexpr):
        n = tl.load(N_PTR)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, n, BLOCK):  # a loop bound loaded from memory
            offs = i + tl.arange(0, BLOCK)
            acc += tl.load(X + offs, mask=offs < n, other=0.0)
        tl.store(OUT, tl.sum(acc, axis=0))


@pytest.mark.parametrize("n", [0, 5, 16, 37])
def test_loop_bound_loaded_at_run_time(n):
    x = torch.arange(1, 41, dtype=torch.float32, device=DEV)
    out = torch.full((1,), -1.0, device=DEV)
    _sum_first_n[(1,)](x, torch.tensor([n], dtype=torch.int32, device=DEV), out, BLOCK=16)
    assert float(out.cpu()) == float(n * (n + 1) // 2)


def test_apply_is_idempotent_and_only_where_numpy_needs_it():
    assert _triton_interpreter.apply() is False  # pgen_engine.ops applied it already (or it is not needed)
    from triton.runtime import interpreter

    if getattr(interpreter._patch_lang_tensor, "_pgen_index_fixed", False):
        assert _triton_interpreter.numpy_refuses_sized_int()  # patched only where NumPy refuses int(array)
