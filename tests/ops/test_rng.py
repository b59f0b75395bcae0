import os

if os.environ.get("PGEN_TEST_DEVICE", "cpu") == "cpu":  # before triton imports: CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from pgen_engine.ops._backend import triton_available  # noqa: E402

from pgen_engine.ops.rng import mix_seed, row_seeds, splitmix64, uniform_from_seed  # noqa: E402
from tests.ops._device import DEV  # noqa: E402

M = (1 << 64) - 1


def _py_splitmix(s: int) -> int:
    """Independent big-int splitmix64."""
    z = (s + 0x9E3779B97F4A7C15) & M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    return z ^ (z >> 31)


def _signed(z: int) -> int:
    return z - (1 << 64) if z >= 1 << 63 else z


# exported test vectors for the C++/CUDA implementation: seed -> (z as unsigned, u)
SEEDS = [0, 1, -1, 42, 2 ** 63 - 1, -(2 ** 63), 0x0123456789ABCDEF, -987654321]


def test_vectors_match_bigint():
    got = splitmix64(torch.tensor(SEEDS, dtype=torch.int64))
    u = uniform_from_seed(torch.tensor(SEEDS, dtype=torch.int64))
    for i, s in enumerate(SEEDS):
        z = _py_splitmix(s & M)
        assert int(got[i]) & M == z
        assert float(u[i]) == (z >> 40) * 2.0 ** -24
    # known first output of splitmix64 from state 0 (widely published)
    assert _py_splitmix(0) == 0xE220A8397B1DCDAF


def test_random_seeds_and_mix_seed():
    rnd = random.Random()
    seeds = [rnd.randrange(-(2 ** 63), 2 ** 63) for _ in range(257)]
    streams = [rnd.randrange(0, 2 ** 40) for _ in range(257)]
    t = torch.tensor(seeds, dtype=torch.int64)
    u = uniform_from_seed(t)
    assert u.dtype == torch.float32 and bool(((u >= 0) & (u < 1)).all())
    mixed = mix_seed(t, torch.tensor(streams, dtype=torch.int64))
    for s, k, m in zip(seeds, streams, mixed.tolist()):
        assert m == _signed(_py_splitmix((s ^ (k * 0xD1B54A32D192ED03)) & M))


def test_row_seeds_forms():
    a = row_seeds(7, 5, torch.device("cpu"))
    assert a.shape == (5,) and len(set(a.tolist())) == 5
    assert torch.equal(a, mix_seed(7, torch.arange(5)))
    t = torch.randint(-100, 100, (3,))
    assert torch.equal(row_seeds(t, 3, torch.device("cpu")), t)
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        row_seeds(t, 4, torch.device("cpu"))
    with pytest.raises(TypeError):
        uniform_from_seed(torch.zeros(3))


if triton_available():
    import triton
    import triton.language as tl

    from pgen_engine.ops.rng import triton_uniform

    @triton.jit
    def _uniform_kernel(s_ptr, o_ptr, N: tl.constexpr):
        o = tl.arange(0, N)
        tl.store(o_ptr + o, triton_uniform(tl.load(s_ptr + o)))


@pytest.mark.skipif(not triton_available(), reason="Triton not importable")
def test_triton_uniform_matches():
    s = torch.randint(-(2 ** 63), 2 ** 63 - 1, (16,), dtype=torch.int64)
    out = torch.full((16,), float("nan"), device=DEV)
    _uniform_kernel[(1,)](s.to(DEV), out, N=16)
    assert torch.equal(out.cpu(), uniform_from_seed(s))
