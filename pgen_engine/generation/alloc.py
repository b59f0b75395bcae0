"""Naming the buffers of a :meth:`~pgen_engine.generation.Generator.generate` call that do not fit.

An absurd ``num_samples`` or batch used to surface as the allocator's own message
("DefaultCPUAllocator: can't allocate memory ...", or CUDA's OutOfMemoryError), which names
neither the argument nor the size. :func:`allocating` turns such a failure into a
:class:`GenerationMemoryError` that does.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from pgen_engine.errors import PgenUserError, one_line


class GenerationMemoryError(PgenUserError, MemoryError):
    """The output and KV buffers one generate call needs could not be allocated; raised before
    any decoding, the Generator stays usable.

    Attributes:
        nbytes: the bytes the call asked for (output codes + the KV storage of its largest wave).
    """

    def __init__(self, message: str, nbytes: int):
        super().__init__(message)
        self.nbytes = nbytes


def is_allocation_failure(e: BaseException) -> bool:
    """Whether ``e`` is torch's "out of memory": CUDA raises OutOfMemoryError, the CPU allocator
    a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory ...")."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "allocate" in str(e))


@contextlib.contextmanager
def allocating(call: str, what: str, nbytes: int, device, on_failure: Callable[[], None] | None = None
               ) -> Iterator[None]:
    """Run the block's allocations; an out-of-memory there raises GenerationMemoryError naming
    ``call`` (the arguments, e.g. ``num_samples=...``), ``what`` and ``nbytes`` on ``device``.
    ``on_failure`` runs first (e.g. to drop a partly grown cache)."""
    try:
        yield
    except RuntimeError as e:
        if not is_allocation_failure(e):
            raise
        if on_failure is not None:
            on_failure()
        raise GenerationMemoryError(
            f"{call} needs {what}, {nbytes / 2 ** 30:.3g} GiB in all on {device}, which could not be allocated "
            f"({one_line(e)}); use a smaller num_samples or max_batch_size", nbytes) from None
