"""Backend resolution shared by every op family."""
from __future__ import annotations

import pytest
import torch

from pgen_engine.ops import _backend as B


def test_auto_on_cpu_prefers_cpp_then_torch(monkeypatch):
    monkeypatch.delenv("PGEN_OPS_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert B.resolve_backend("auto", cpu, ("torch", "triton"), "nothing") == "torch"
    if B.has_ext_function("sample_cpu"):
        assert B.resolve_backend("auto", cpu, ("torch", "cpp"), "sample") == "cpp"


def test_forced_backend_from_env(monkeypatch):
    monkeypatch.setenv("PGEN_OPS_BACKEND", "torch")
    assert B.resolve_backend("auto", torch.device("cpu"), ("torch", "cpp"), "sample") == "torch"
    monkeypatch.setenv("PGEN_OPS_BACKEND", "cuda")  # not implemented by this op -> its reference
    assert B.resolve_backend("auto", torch.device("cpu"), ("torch",), "x") == "torch"


def test_clear_errors():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        B.resolve_backend("tpu", cpu, ("torch",), "op")
    with pytest.raises(ValueError, match="not implemented"):
        B.resolve_backend("triton", cpu, ("torch",), "op")
    with pytest.raises(RuntimeError, match="CUDA"):
        B.resolve_backend("cuda", cpu, ("torch", "cuda"), "op")


@pytest.mark.parametrize("arch,auto", [(75, "torch"), (70, "torch"), (80, "triton"), (86, "triton"), (90, "triton")])
def test_triton_only_on_ampere_or_newer(monkeypatch, arch, auto):
    """The Triton tiles need >= 99 KiB of shared memory: a T4 (sm_75) takes the torch path under
    "auto" and an explicit "triton" there is an error naming the architecture."""
    monkeypatch.delenv("PGEN_OPS_BACKEND", raising=False)
    monkeypatch.setattr(B, "triton_available", lambda: True)
    monkeypatch.setattr(B, "device_arch", lambda device: arch)
    monkeypatch.setattr(B, "has_ext_function", lambda name: False)
    cuda = torch.device("cuda", 0)
    assert B.resolve_backend("auto", cuda, ("torch", "triton"), "op") == auto
    if auto == "torch":
        with pytest.raises(RuntimeError, match=f"compute capability >= 8.0.*sm_{arch}.*backend='torch'"):
            B.resolve_backend("triton", cuda, ("torch", "triton"), "op")
    else:
        assert B.resolve_backend("triton", cuda, ("torch", "triton"), "op") == "triton"
    assert B.resolve_backend("auto", torch.device("cpu"), ("torch", "triton"), "op") == "torch"
