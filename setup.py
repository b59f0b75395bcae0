"""Build of the ``pgen_engine`` package and its host extension ``pgen_engine._C``.

``pgen_engine._C`` is built from ``csrc/*.cpp`` as a C++ torch extension; when torch has
CUDA (``torch.version.cuda``), ``nvcc`` is found and ``PGEN_NO_CUDA`` is unset, the CUDA
kernels in ``kernels/*.cu`` are compiled in as well (``PGEN_WITH_CUDA`` defined).

Use it without build isolation so pip never resolves another torch:
    pip install --no-build-isolation -e .
    python setup.py build_ext --inplace      # development: puts pgen_engine/_C*.so in place
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _openmp_flags() -> list[str]:
    """``["-fopenmp"]`` when the C++ compiler accepts it, else ``[]`` (e.g. Apple clang)."""
    if sys.platform == "win32":
        return ["/openmp"]
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "omp.cpp")
        src.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            r = subprocess.run([cxx, "-fopenmp", str(src), "-o", str(Path(tmp, "omp"))],
                               capture_output=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return []
    return ["-fopenmp"] if r.returncode == 0 else []


def _want_cuda(torch) -> bool:
    """Build the CUDA kernels only when torch, the toolkit and the user all allow it."""
    if os.environ.get("PGEN_NO_CUDA"):
        return False
    if not torch.version.cuda:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc") or (CUDA_HOME and Path(CUDA_HOME, "bin", "nvcc").exists())
    return bool(nvcc)


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:  # pragma: no cover - the build needs torch installed first
        raise RuntimeError(
            "pgen_engine's extension is built against the installed torch: install torch first, "
            "then run `pip install --no-build-isolation -e .`"
        ) from e

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++20 for
    # torch >= 2.10, C++17 before); our own sources are valid C++17 and C++20.
    omp = _openmp_flags()
    # -ffp-contract=off: no fused multiply-adds, so results do not depend on the ISA clone.
    # -fno-trapping-math (torch builds with it too): values are unchanged, but GCC may then
    # vectorise float->int conversions, e.g. the softmax's polynomial exp (4-5x faster).
    cxx_flags = ["-O3", "-ffp-contract=off", "-fno-trapping-math", *omp]
    include_dirs = [str(ROOT / "csrc"), str(ROOT / "kernels")]
    if _want_cuda(torch):
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "kernels").glob("*.cu"))
        ext = CUDAExtension(
            "pgen_engine._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("PGEN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=omp,
        )
    else:
        ext = CppExtension(
            "pgen_engine._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=omp,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=bool(shutil.which("ninja")))}


ext_modules, cmdclass = _extensions()

setup(
    name="pgen_engine",
    version="0.1.0",
    description="GPU-optimised engine for personalized image generation with any-to-any LMMs",
    python_requires=">=3.10",
    packages=find_packages(include=["pgen_engine", "pgen_engine.*"]),
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "safetensors",
        "numpy",
        "pyyaml",
        "tqdm",
        "pillow",
    ],
    extras_require={
        "train": ["deepspeed"],
        "kernels": ["triton"],
    },
    entry_points={"console_scripts": ["pgen = pgen_engine.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
