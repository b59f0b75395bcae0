"""Build of the ``pgen_engine`` package and its host extension ``pgen_engine._C``.

``pgen_engine._C`` is built from ``csrc/*.cpp`` as a C++ torch extension; when torch has
CUDA (``torch.version.cuda``), ``nvcc`` is found and ``PGEN_NO_CUDA`` is unset, the CUDA
kernels in ``kernels/*.cu`` are compiled in as well (``PGEN_WITH_CUDA`` defined), for
``TORCH_CUDA_ARCH_LIST``, else the visible GPUs, else sm_80/sm_89/sm_90. Sources and flags live
in ``tools/extension_build.py``, which ``tests/test_build.py`` compiles the CUDA variant from.

Use it without build isolation so pip never resolves another torch:
    pip install --no-build-isolation -e .
    python setup.py build_ext --inplace      # development: puts pgen_engine/_C*.so in place
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))
import extension_build  # noqa: E402  (tools/extension_build.py: sources and flags, shared with the build test)


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension
    except ImportError as e:  # pragma: no cover - the build needs torch installed first
        raise RuntimeError(
            "pgen_engine's extension is built against the installed torch: install torch first, "
            "then run `pip install --no-build-isolation -e .`"
        ) from e

    with_cuda = extension_build.want_cuda(torch)
    if with_cuda:
        extension_build.ensure_cuda_arch_list(torch)
    ext = extension_build.make_extension(ROOT, with_cuda)
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
