"""Personalized generation: user histories in, images of the next item out.

:func:`generate_for_users` is what :meth:`pgen_engine.Generator.generate_for_users` runs:
each history (a list of ``(image, title)`` pairs, oldest first) becomes a prompt through the
checkpoint's :class:`~pgen_engine.data.history.HistoryPrompter` (the template, history order,
history mode and unconditional prompt its training used), then :meth:`Generator.generate`.

Seeds: an ``int`` seed with ``user_ids`` gives user ``u`` the request seed
:func:`request_seed_for_id` ``(seed, user_ids[u])`` — the images of a user depend only on
the seed, its id and its history, never on the other users of the call or their order
(``pgen generate`` uses the same rule with each line's ``id``). Without ``user_ids`` the
rules of :meth:`Generator.generate` apply (an int seed is mixed with the position).
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from pgen_engine.data.history import batch_inputs, prompter_for_checkpoint
from pgen_engine.ops.rng import mix_seed

_MASK63 = (1 << 63) - 1


def request_seed_for_id(seed: int, request_id: str) -> int:
    """The request seed of ``request_id`` under base ``seed``: ``mix_seed(seed, h)`` with ``h``
    the first 63 bits of SHA-256 of the id's UTF-8 bytes (stable across runs and machines)."""
    h = int.from_bytes(hashlib.sha256(str(request_id).encode("utf-8")).digest()[:8], "little") & _MASK63
    return int(mix_seed(int(seed), h))


def generate_for_users(gen, histories: Sequence[Sequence], *, num_samples: int = 1, prompter=None,
                       user_ids: Sequence[str] | None = None, extra: Sequence[str | None] | None = None,
                       seed: int | Sequence[int] = 0, return_images: bool = False, decode_batch_size: int = 16,
                       **sampling) -> torch.Tensor:
    """Generate ``num_samples`` images per user history.

    Args:
        gen: the :class:`~pgen_engine.Generator`.
        histories: U histories (a list, or any iterable); each a non-empty list of
            ``(image, title)`` (image: path, PIL image or uint8 ``[H, W, 3]`` array), oldest first.
        num_samples: images per user; output row ``u * num_samples + j``.
        prompter: a :class:`~pgen_engine.data.history.HistoryPrompter`; default: the one of the
            checkpoint the model was loaded from (``model.source_dir``).
        user_ids: U ids; with an int ``seed`` they key each user's request seed.
        extra: U optional texts added after each history.
        seed: int, or U request seeds used as given.
        return_images: VQ-decode to uint8 ``[U * num_samples, H, W, 3]`` instead of codes.
        sampling: ``guidance_scale``, ``temperature``, ``top_k``, ``top_p``, ``greedy`` of
            :meth:`Generator.generate`.
    Returns:
        int64 codes ``[U * num_samples, T]`` or uint8 images.
    """
    if isinstance(histories, (str, bytes)):
        raise TypeError("generate_for_users: histories is a list of histories (each a list of (image, title)), "
                        f"got a {type(histories).__name__}")
    histories = list(histories)  # a generator / other iterable of histories: len() and indexing below
    user_ids = None if user_ids is None else list(user_ids)
    extra = None if extra is None else list(extra)
    if len(histories) == 0:
        raise ValueError("generate_for_users: no histories")
    if prompter is None:
        src = getattr(gen.model, "source_dir", None)
        if src is None:
            raise ValueError("generate_for_users: the model was not loaded from a checkpoint folder; pass prompter=")
        prompter = prompter_for_checkpoint(src, gen.model)
    if user_ids is not None and len(user_ids) != len(histories):
        raise ValueError(f"generate_for_users: {len(histories)} histories but {len(user_ids)} user_ids")
    if extra is not None and len(extra) != len(histories):
        raise ValueError(f"generate_for_users: {len(histories)} histories but {len(extra)} extra texts")
    inputs = []
    for u, h in enumerate(histories):
        try:
            inputs.append(prompter.build(h, extra=None if extra is None else extra[u]))
        except (ValueError, TypeError, OSError) as e:
            raise type(e)(f"history {u}: {e}") from None
    if user_ids is not None and isinstance(seed, int):
        seed = [request_seed_for_id(seed, str(i)) for i in user_ids]
    ids, masks, pixels = batch_inputs(inputs)
    codes = gen.generate(ids, None, pixels, gen_code_mask=masks if prompter.mode == "codes" else None,
                         num_samples=num_samples, seed=seed, **sampling)
    if not return_images:
        return codes
    return decode_codes(gen.model, prompter, codes, decode_batch_size)


def decode_codes(model, prompter, codes: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Codes ``[N, T]`` -> uint8 ``[N, H, W, 3]`` with the run's image tokenizer (the one its
    image tokens came from), else the checkpoint's VQ decoder."""
    tok = getattr(prompter, "image_tokenizer", None)
    dec = tok.decode if tok is not None else model.decode_images
    return torch.cat([dec(c.to(model.device) if tok is None else c.cpu()).cpu() for c in codes.split(batch_size)])
