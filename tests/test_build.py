"""Build checks: the extension imports; the CUDA build a GPU machine runs (every csrc/*.cpp with
PGEN_WITH_CUDA, every kernels/*.cu with nvcc, flags from torch's BuildExtension and
tools/extension_build.py) compiles here without a GPU; the torch-free host sources are valid
C++17 on their own."""
from __future__ import annotations

import os
import shutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import extension_build  # noqa: E402  (the flags setup.py builds with)

KERNELS = sorted((ROOT / "kernels").glob("*.cu"))
TORCH_FREE_CPP = ["sampler_cpu.cpp"]


def test_extension_imports():
    try:
        import pgen_engine._C as C
    except ImportError as e:
        if os.environ.get("PGEN_REQUIRE_EXT") == "1":
            pytest.fail(f"pgen_engine._C is required (PGEN_REQUIRE_EXT=1) but does not import: {e}")
        pytest.skip(f"pgen_engine._C not built ({e}); run `make build`")
    for name in ("sample_cpu", "uniform_from_seed", "decode_layers_cpu", "prefill_layers_cpu", "decode_loop_cpu"):
        assert hasattr(C, name), name
    if C.with_cuda:
        assert hasattr(C, "sample_cuda") and hasattr(C, "paged_kv_write_cuda")


def test_kernel_sources_exist():
    assert {p.name for p in KERNELS} >= {"sampling.cu", "paged_kv.cu"}


def _cuda_home_or_skip() -> tuple[str, str]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found on PATH: the CUDA build cannot be checked here")
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no host C++ compiler (g++ / $CXX) for the CUDA build")
    home = extension_build.cuda_home_of(nvcc)
    if home is None:
        pytest.fail(f"nvcc at {nvcc} has no toolkit include/cuda_runtime.h next to it")
    return nvcc, home


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory) -> dict[str, list[str]]:
    """Source (relative path) -> the compiler command torch's ``BuildExtension`` runs for it
    when ``setup.py`` builds the CUDA extension (``tools/extension_build.py``), recorded
    instead of run. The toolkit is the local nvcc's; torch is told it has that CUDA version."""
    import torch
    import torch.utils.cpp_extension as cpp_ext
    from setuptools import Distribution

    nvcc, home = _cuda_home_or_skip()
    version = re.search(r"release (\d+\.\d+)", subprocess.run([nvcc, "--version"], capture_output=True,
                                                                 text=True).stdout).group(1)
    tmp = tmp_path_factory.mktemp("cuda_build")
    recorded: list[list[str]] = []

    class Recorder(cpp_ext.BuildExtension):
        def build_extensions(self):
            # distutils runs compilers through `call` (newer) or `spawn` (older): record both
            self.compiler.spawn = self.compiler.call = lambda cmd, *a, **k: recorded.append(list(cmd))
            super().build_extensions()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpp_ext, "CUDA_HOME", home)
        mp.setattr(torch.version, "cuda", version)
        mp.setenv("TORCH_CUDA_ARCH_LIST", extension_build.DEFAULT_CUDA_ARCH_LIST)
        mp.chdir(ROOT)  # setup.py runs from the repository root; sources are relative to it
        ext = extension_build.make_extension(ROOT, with_cuda=True)
        dist = Distribution({"name": "pgen_engine", "ext_modules": [ext]})
        # setup.py uses ninja when present; its command lines carry the same flags
        cmd = Recorder.with_options(use_ninja=False)(dist)
        cmd.build_temp, cmd.build_lib, cmd.force = str(tmp / "temp"), str(tmp / "lib"), True
        cmd.ensure_finalized()
        cmd.run()
    by_src = {}
    for c in recorded:
        if "-c" in c:
            by_src[c[c.index("-c") + 1]] = c
    return by_src


CUDA_SOURCES = extension_build.sources(ROOT, with_cuda=True)


def test_cuda_build_covers_every_source_with_setup_flags(cuda_build):
    assert sorted(cuda_build) == sorted(CUDA_SOURCES)
    for src, cmd in cuda_build.items():
        assert "-DPGEN_WITH_CUDA=1" in cmd, (src, cmd)
        flags = extension_build.NVCC_FLAGS if src.endswith(".cu") else extension_build.CXX_FLAGS
        assert all(f in cmd for f in flags), (src, cmd)
    for src in (s for s in CUDA_SOURCES if s.endswith(".cu")):
        for arch in ("80", "89", "90"):
            assert f"-gencode=arch=compute_{arch},code=sm_{arch}" in cuda_build[src], cuda_build[src]


def _stub_cuda_macros(tmp: Path) -> list[str]:
    """CPU torch wheels ship c10/cuda headers but not the CMake-generated
    ``c10/cuda/impl/cuda_cmake_macros.h``; a CUDA wheel's defines only this."""
    import torch.utils.cpp_extension as cpp_ext

    if any(Path(d, "c10/cuda/impl/cuda_cmake_macros.h").exists() for d in cpp_ext.include_paths()):
        return []
    hdr = tmp / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    hdr.parent.mkdir(parents=True, exist_ok=True)
    hdr.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return [f"-I{tmp}"]


@pytest.mark.parametrize("src", CUDA_SOURCES)
def test_cuda_build_compiles(src: str, cuda_build, tmp_path: Path):
    """Each source compiles with exactly the command a CUDA machine's `make build` runs: the
    .cu kernels fully (sm_80, sm_89, sm_90 + PTX), the C++ glue as a syntax check (no CUDA
    torch libraries to link against here)."""
    cmd = list(cuda_build[src])
    if src.endswith(".cpp"):
        cmd += ["-fsyntax-only", *_stub_cuda_macros(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"


@pytest.mark.parametrize("name", TORCH_FREE_CPP)
def test_host_core_is_standalone_cpp17(name: str):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-Wno-unknown-pragmas", f"-I{ROOT / 'csrc'}", str(ROOT / "csrc" / name)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"


def test_cuda_kernels_skipped_when_nvcc_and_torch_cuda_majors_differ(monkeypatch, capsys):
    """torch's BuildExtension raises when nvcc's major CUDA version differs from torch's (a CUDA 13
    toolkit beside a cu12x wheel), failing the whole _C build on such a GPU machine; the CUDA
    kernels are left out instead (the ops fall back to Triton), with a warning."""
    import types

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found on PATH")
    release = extension_build.nvcc_release(nvcc)
    assert release is not None and re.fullmatch(r"\d+\.\d+", release), release
    import torch.utils.cpp_extension as cpp_ext

    monkeypatch.setattr(cpp_ext, "CUDA_HOME", extension_build.cuda_home_of(nvcc))
    monkeypatch.delenv("PGEN_NO_CUDA", raising=False)
    major = int(release.split(".")[0])
    same = types.SimpleNamespace(version=types.SimpleNamespace(cuda=f"{major}.1"))
    other = types.SimpleNamespace(version=types.SimpleNamespace(cuda=f"{major - 1}.8"))
    assert extension_build.cuda_version_clash(same) is None
    assert extension_build.want_cuda(same)
    assert extension_build.cuda_version_clash(other) is not None
    assert not extension_build.want_cuda(other)
    assert "building without the CUDA kernels" in capsys.readouterr().err
