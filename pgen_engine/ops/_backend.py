"""Backend selection shared by every op family.

``backend="auto"`` resolves once per call from the tensors' device: CUDA tensors use the
CUDA kernel from ``pgen_engine._C`` when the op has one, else the Triton kernel; CPU
tensors use the in-package torch reference (or the C++ CPU path where an op has one).
Tests force a backend by passing it explicitly, or globally with the environment variable
``PGEN_OPS_BACKEND`` (e.g. ``PGEN_OPS_BACKEND=triton`` under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import os

import torch

from pgen_engine import envs

from ._triton_config import device_arch

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")
# The Triton kernels' tiles are sized and compile-checked for compute capability >= 8.0 (>= 99 KiB
# of shared memory per block, native bf16); on a T4 (sm_75, 64 KiB) fp16 prefill needs 96 KiB and
# fp32 backward 128 KiB, so their launches would fail: "auto" takes the torch path there.
MIN_TRITON_ARCH = 80


try:  # plain imports (not importlib) so torch.compile can trace callers of these helpers
    import triton as _triton  # noqa: F401

    _TRITON_IMPORTS = True
except Exception:  # pragma: no cover - triton is optional
    _TRITON_IMPORTS = False

if _TRITON_IMPORTS:  # the CPU interpreter (tests, `pgen plan`) with NumPy >= 2.4 on Triton 3.6
    from pgen_engine.ops import _triton_interpreter

    _triton_interpreter.apply()

try:
    from pgen_engine import _C as _EXT
except ImportError:
    _EXT = None


def triton_available() -> bool:
    """True when Triton imports and can run here (a GPU, or the CPU interpreter)."""
    return _TRITON_IMPORTS and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def triton_runs_on(device: torch.device) -> bool:
    """True when the Triton kernels can run on ``device``: a GPU of compute capability >=
    :data:`MIN_TRITON_ARCH`, or CPU tensors under the interpreter."""
    if not triton_available():
        return False
    return device.type != "cuda" or device_arch(device) >= MIN_TRITON_ARCH


def extension():
    """The compiled ``pgen_engine._C`` module, or None when it was not built."""
    return _EXT


def has_ext_function(name: str) -> bool:
    """True when ``pgen_engine._C`` is built and exports ``name``."""
    ext = extension()
    return ext is not None and hasattr(ext, name)


def resolve_backend(backend: str, device: torch.device, supported: tuple[str, ...], op: str) -> str:
    """Turn ``backend`` (possibly "auto") into a concrete backend for ``op`` on ``device``.

    Args:
        backend: one of :data:`BACKENDS`.
        device: device of the op's main input.
        supported: the concrete backends ``op`` implements, e.g. ``("torch", "triton")``.
        op: op name, for error messages.
    Raises:
        ValueError: unknown backend, or one ``op`` does not implement.
        RuntimeError: a requested backend that cannot run here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        forced = envs.get("PGEN_OPS_BACKEND")
        if forced and forced != "auto":
            if forced in supported:
                return resolve_backend(forced, device, supported, op)
            return "torch"
        if device.type == "cuda":
            if "cuda" in supported and has_ext_function(f"{op}_cuda"):
                return "cuda"
            if "triton" in supported and triton_runs_on(device):
                return "triton"
            return "torch"
        if "cpp" in supported and has_ext_function(f"{op}_cpu"):
            return "cpp"
        return "torch"
    if backend not in supported:
        raise ValueError(f"{op}: backend {backend!r} is not implemented; available: {supported}")
    if backend == "triton" and not triton_available():
        raise RuntimeError(f"{op}: backend 'triton' needs a CUDA GPU or TRITON_INTERPRET=1")
    if backend == "triton" and not triton_runs_on(device):
        arch = device_arch(device)
        raise RuntimeError(f"{op}: backend 'triton' needs compute capability >= {MIN_TRITON_ARCH // 10}.0 (Ampere "
                           f"or newer); this GPU is sm_{arch}: use backend='torch'")
    if backend == "cuda" and (device.type != "cuda" or not has_ext_function(f"{op}_cuda")):
        raise RuntimeError(f"{op}: backend 'cuda' needs CUDA tensors and pgen_engine._C built with CUDA")
    if backend == "cpp" and not has_ext_function(f"{op}_cpu"):
        raise RuntimeError(f"{op}: backend 'cpp' needs pgen_engine._C (run `make build`)")
    return backend
