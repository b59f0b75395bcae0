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
