"""One command for all GPU checks and benchmarks: ``python -m benchmarks.gpu [--check]``.

Reports whether ``pgen_engine._C`` has CUDA kernels, runs the op correctness tests, runs every
benchmark module's ``run(check_only)``, prints one table and a final JSON line, and (only in a
real GPU run) appends the table with the device name and date to ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from pgen_engine.io_utils import atomic_write_text
from pgen_engine.ops._backend import extension

RESULTS = Path(__file__).with_name("RESULTS.md")
SUITES = ("benchmarks.gpu_ops", "benchmarks.gpu_attention", "benchmarks.gpu_generation")
COLS = ("op", "shape", "backend", "ms", "tflops", "gbps", "pct_of_ref")


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))


def table(rows: list[dict]) -> str:
    """Markdown table of benchmark rows."""
    lines = ["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="tiny CPU shapes, no tests on GPU, no RESULTS.md")
    ap.add_argument("--suites", default=",".join(s.rsplit("_", 1)[1] for s in SUITES),
                    help="comma-separated subset of: ops, attention, generation (default: all)")
    ap.add_argument("--no-tests", action="store_true", help="skip the op tests on the GPU")
    args = ap.parse_args(argv)
    chosen = [f"benchmarks.gpu_{n.strip()}" for n in args.suites.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(SUITES))
    if unknown:
        ap.error(f"--suites: unknown {unknown}; expected a subset of {[s.rsplit('_', 1)[1] for s in SUITES]}")
    gpu = torch.cuda.is_available() and not args.check
    ext = extension()
    cuda_ext = ext is not None and any(n.endswith("_cuda") for n in dir(ext))
    print(f"pgen_engine._C: {'built' if ext is not None else 'not built'}; CUDA kernels: {cuda_ext}")
    tests_rc = None
    if gpu and not args.no_tests:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PGEN_TEST_DEVICE"] = "cuda"  # compiled kernels, not the CPU interpreter
        tests_rc = subprocess.call([sys.executable, "-m", "pytest", "tests/ops", "-q"], env=env)
    rows: list[dict] = []
    for name in chosen:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            print(f"note: skipping {name} ({e})")
            continue
        rows += mod.run(check_only=not gpu)
    text = table(rows)
    print(text)
    device = torch.cuda.get_device_name() if gpu else "cpu (check mode)"
    if gpu:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        old = RESULTS.read_text() if RESULTS.exists() else "# GPU benchmark results\n"
        atomic_write_text(RESULTS, f"{old}\n## {device} — {stamp}\n\n{text}\n")
    print(json.dumps({"device": device, "cuda_ext": cuda_ext, "tests_rc": tests_rc, "rows": rows}))
    checks_ok = all(r.get("ok", True) for r in rows)
    return 0 if tests_rc in (None, 0) and checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
