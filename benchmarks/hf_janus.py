"""``transformers``' Janus image ``generate`` as the reference, across the transformers releases in use.

The benchmarks and the tests compare ``pg.Generator`` with ``JanusForConditionalGeneration.generate(...,
generation_mode="image")``. Two things differ between transformers 5.x releases:

* ``from_pretrained`` drops ``generation_config.generation_kwargs``, which image-mode ``generate``
  reads ``boi_token_id`` from: :func:`load_hf_janus` sets it back.
* Some releases (5.17 seen; 5.24 does not) call ``GenerationMixin._prepare_static_cache`` from Janus'
  image ``generate`` without its ``prefill_chunk_size`` argument (``TypeError: missing 1 required
  positional argument``): :func:`fix_static_cache` defaults it to ``None`` (no chunking) on the
  instance, found by signature (feature detection), so releases that pass it are untouched.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

import pgen_engine as pg


def fix_static_cache(hf) -> None:
    """Default ``prefill_chunk_size`` to None in ``hf._prepare_static_cache`` when the method takes it.

    A caller that passes it (positionally, the 4th argument, or by keyword) is unchanged.
    """
    orig = hf._prepare_static_cache
    if getattr(orig, "_pgen_fixed", False) or "prefill_chunk_size" not in inspect.signature(orig).parameters:
        return

    def call(*args, **kwargs):
        if len(args) < 4:
            kwargs.setdefault("prefill_chunk_size", None)
        return orig(*args, **kwargs)

    call._pgen_fixed = True
    hf._prepare_static_cache = call


def load_hf_janus(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """``JanusForConditionalGeneration.from_pretrained(path)`` in eval mode, ready for image ``generate``
    on this transformers release (``boi_token_id`` restored, :func:`fix_static_cache` applied)."""
    from transformers import JanusForConditionalGeneration  # late import: transformers takes seconds to import

    kw = {} if dtype is None else {"dtype": dtype}
    hf = JanusForConditionalGeneration.from_pretrained(path, **kw)
    if device is not None:
        hf = hf.to(device)
    prepare_image_generate(hf, pg.SpecialTokens.builtin().boi)
    return hf.eval()


def prepare_image_generate(hf, boi_token_id: int) -> None:
    """Make an already built ``JanusForConditionalGeneration`` ready for image ``generate``."""
    hf.generation_config.generation_kwargs = {"boi_token_id": boi_token_id}
    fix_static_cache(hf)
