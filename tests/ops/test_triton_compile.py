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


@pytest.mark.skipif(os.environ.get("PGEN_TEST_DEVICE", "cpu") != "cpu", reason="a GPU run compiles for real")
@pytest.mark.parametrize("flags", [pytest.param(("--quick",), id="quick"),
                                   pytest.param(("--fp16",), id="all", marks=pytest.mark.slow)])
def test_every_kernel_compiles_for_sm90(flags):
    out = _compile(*flags)
    assert out.returncode == 0, out.stderr[-4000:]
    kernels = out.stdout.strip().splitlines()[-1]
    for name in ("_prefill_fwd_kernel", "_prefill_bwd_dq_kernel", "_decode_split_kernel", "_kv_write_kernel",
                 "_sample_kernel", "_rms_fwd_kernel", "_rotary_kernel", "_lp_fwd_kernel"):
        assert name in kernels, kernels
