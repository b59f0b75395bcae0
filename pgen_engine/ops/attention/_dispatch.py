"""Backend choice for the attention ops, and the lazy import of their Triton kernels."""
from __future__ import annotations

import torch

from pgen_engine.ops._backend import resolve_backend


@torch.compiler.assume_constant_result
def resolve(backend: str, device: torch.device, supported: tuple[str, ...], op: str) -> str:
    # resolve_backend imports modules (a Dynamo graph break); under torch.compile its
    # result is a per-graph constant, so evaluate it eagerly at trace time.
    return resolve_backend(backend, device, supported, op)


def triton_kernels():
    from pgen_engine.ops import _triton_attention  # late import: triton is optional (extra 'kernels')

    return _triton_attention
