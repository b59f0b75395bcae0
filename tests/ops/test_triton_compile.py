"""Every Triton kernel compiles for a real GPU (sm_90), checked without one.

The rest of tests/ops runs the kernels in Triton's CPU interpreter, which accepts code the
compiler rejects (a plain module global read inside a kernel reached the first H200 run that
way); ``tools/triton_compile_check.py`` compiles each op's kernel specialisations for sm_90.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _compile(*flags: str) -> subprocess.CompletedProcess:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    return subprocess.run([sys.executable, "tools/triton_compile_check.py", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)


CPU_ONLY = pytest.mark.skipif(os.environ.get("PGEN_TEST_DEVICE", "cpu") != "cpu", reason="a GPU run compiles for real")
KERNELS = ("_prefill_fwd_kernel", "_prefill_bwd_dkdv_kernel", "_prefill_bwd_dq_kernel", "_decode_split_kernel",
           "_decode_reduce_kernel", "_kv_write_kernel", "_sample_kernel", "_rms_fwd_kernel", "_rotary_kernel",
           "_lp_fwd_kernel")
# The shared-prefix decode kernels are compiled in their own, cheaper test (below); the
# slow all-heads run compiles them with everything else.
PER_ARCH_OPS = "norm,rotary,prefill,decode,kv_write,sample,logprobs"


@CPU_ONLY
@pytest.mark.parametrize("arch", [80, 89, 90])
def test_every_kernel_compiles_and_fits(arch):
    """fp32 / bf16, head dims 64, 80, 128, grouped-query heads: the GPU path's geometry.

    fp16 is left to the slow all-heads run: tiles are keyed on element size, so fp16 gets bf16's
    block sizes and shared memory, and dropping it keeps CI's compile time about a third lower."""
    out = _compile("--arch", str(arch), "--dtypes", "fp32,bf16", "--head-dims", "64,80,128", "--ops", PER_ARCH_OPS)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2].startswith(f"sm_{arch}: largest shared memory"), lines
    for name in KERNELS:
        assert name in lines[-1], lines[-1]


@CPU_ONLY
def test_shared_prefix_decode_compiles_and_fits():
    """Shared-prefix decode (float, and float8 caches with bf16 activations) at head dim 128 on
    sm_89: the largest tiles on the part with the least shared memory (99 KiB)."""
    out = _compile("--arch", "89", "--dtypes", "fp32,bf16", "--head-dims", "128", "--ops", "decode_shared")
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.strip().splitlines()
    assert "_prefix_partial_kernel" in lines[-1] and "_own_merge_kernel" in lines[-1], lines[-1]
    assert "compiled 6 specialisations" in lines[-1], lines[-1]  # fp32, bf16, bf16 + fp8 caches


@CPU_ONLY
@pytest.mark.slow
def test_every_kernel_compiles_and_fits_all_heads():
    out = _compile("--all-heads")
    assert out.returncode == 0, out.stderr[-4000:]


@CPU_ONLY
def test_overflow_is_reported():
    """H100 tiles compiled for an L40S overflow its 99 KiB: the check must say so."""
    out = _compile("--arch", "89", "--geometry-arch", "90", "--dtypes", "fp32", "--head-dims", "128", "--ops", "prefill")
    assert out.returncode == 1, out.stdout + out.stderr[-4000:]
    assert "FAILED _prefill_fwd_kernel" in out.stderr and "sm_89 allows 101376 B" in out.stderr, out.stderr[-4000:]
