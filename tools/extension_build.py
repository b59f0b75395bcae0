"""How ``pgen_engine._C`` is built: sources, flags and the torch extension object, in one place.

``setup.py`` builds the extension from :func:`make_extension`; ``tests/test_build.py`` asks
torch's own ``BuildExtension`` for the compiler command lines of the CUDA variant of the same
extension and runs them on a machine without a GPU, so the flags a CUDA machine gets cannot
drift from what CI compiles.

Only the standard library is imported at module level: ``setup.py`` imports this file before
it knows whether torch is installed.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

EXT_NAME = "pgen_engine._C"
# -ffp-contract=off: no fused multiply-adds, so results do not depend on the ISA clone.
# -fno-trapping-math (torch builds with it too): values are unchanged, but GCC may then
# vectorise float->int conversions, e.g. the softmax's polynomial exp (4-5x faster).
# No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++20 for
# torch >= 2.10, C++17 before); our own sources are valid C++17 and C++20.
# -g0: Python's own CFLAGS add -g, which makes each heavy translation unit ~30 % slower to
# build and the library several times larger; nobody steps through a release build.
CXX_FLAGS = ["-O3", "-g0", "-ffp-contract=off", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3", "-lineinfo"]
CUDA_MACROS = [("PGEN_WITH_CUDA", "1")]
# Used when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (a build container, CI):
# torch would otherwise fail on an empty architecture list. A100, L40S/RTX 40xx, H100/H200,
# plus PTX for newer GPUs.
DEFAULT_CUDA_ARCH_LIST = "8.0;8.9;9.0+PTX"


def openmp_flags() -> list[str]:
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


def cuda_home_of(nvcc: str) -> str | None:
    """The toolkit root ``nvcc`` really runs from (follows wrapper scripts such as a
    ``/usr/local/bin/nvcc`` that execs ``/usr/local/cuda-13.0/bin/nvcc``); None when unknown."""
    try:
        r = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^#\$ _HERE_=(.+)$", r.stdout + r.stderr, re.MULTILINE)
    here = Path(m.group(1).strip()) if m else Path(os.path.realpath(nvcc)).parent
    home = here.parent
    return str(home) if (home / "include" / "cuda_runtime.h").exists() else None


def nvcc_release(nvcc: str) -> str | None:
    """``"13.0"`` from ``nvcc --version`` (None when it cannot be run or read)."""
    try:
        r = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"release (\d+)\.(\d+)", r.stdout)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def cuda_version_clash(torch) -> str | None:
    """Why torch's extension build would refuse this toolkit, or None: ``BuildExtension`` raises
    when the major version of ``CUDA_HOME``'s nvcc differs from ``torch.version.cuda`` (e.g. an
    image's CUDA 13 toolkit beside a cu12x torch wheel), which failed the whole ``_C`` build."""
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = str(Path(CUDA_HOME, "bin", "nvcc")) if CUDA_HOME else shutil.which("nvcc")
    release = nvcc_release(nvcc) if nvcc else None
    if release and torch.version.cuda and release.split(".")[0] != str(torch.version.cuda).split(".")[0]:
        return f"nvcc {release} ({nvcc}) and torch's CUDA {torch.version.cuda} differ in the major version"
    return None


def want_cuda(torch) -> bool:
    """Build the CUDA kernels only when torch, the toolkit and the user all allow it. A toolkit
    torch refuses (:func:`cuda_version_clash`) builds the CPU extension alone, with a warning: the
    ops then use their Triton kernels on the GPU instead of failing the build."""
    if os.environ.get("PGEN_NO_CUDA"):
        return False
    if not torch.version.cuda:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc") or (CUDA_HOME and Path(CUDA_HOME, "bin", "nvcc").exists())
    if not nvcc:
        return False
    clash = cuda_version_clash(torch)
    if clash:
        print(f"pgen_engine: building without the CUDA kernels: {clash}, which torch's extension build "
              "refuses; the ops use their Triton kernels instead (a toolkit of torch's CUDA major version "
              "builds them)", file=sys.stderr)
        return False
    return True


def ensure_cuda_arch_list(torch) -> str:
    """The architectures nvcc compiles for: ``TORCH_CUDA_ARCH_LIST`` when set, else the visible
    GPUs' (torch's default), else :data:`DEFAULT_CUDA_ARCH_LIST`, which is then exported."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return "native"
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    return DEFAULT_CUDA_ARCH_LIST


def sources(root: Path, with_cuda: bool) -> list[str]:
    """``csrc/*.cpp`` (+ ``kernels/*.cu`` with CUDA), relative to ``root``, sorted."""
    srcs = sorted(str(p.relative_to(root)) for p in (root / "csrc").glob("*.cpp"))
    if with_cuda:
        srcs += sorted(str(p.relative_to(root)) for p in (root / "kernels").glob("*.cu"))
    return srcs


def make_extension(root: Path, with_cuda: bool, omp: list[str] | None = None):
    """The ``pgen_engine._C`` extension: a ``CUDAExtension`` (``PGEN_WITH_CUDA`` defined,
    kernels compiled in) when ``with_cuda``, else a ``CppExtension``. ``omp`` defaults to
    :func:`openmp_flags`."""
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    omp = openmp_flags() if omp is None else omp
    common = dict(include_dirs=[str(root / "csrc"), str(root / "kernels")], extra_link_args=list(omp))
    if with_cuda:
        return CUDAExtension(EXT_NAME, sources(root, True), define_macros=list(CUDA_MACROS),
                             extra_compile_args={"cxx": [*CXX_FLAGS, *omp], "nvcc": list(NVCC_FLAGS)}, **common)
    return CppExtension(EXT_NAME, sources(root, False), extra_compile_args={"cxx": [*CXX_FLAGS, *omp]}, **common)
