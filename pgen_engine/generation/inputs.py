"""The Generator's inputs, validated: prompts, history images and request seeds.

:func:`parse_prompts` turns ``input_ids`` (a left-padded ``[B,S]`` tensor with its mask, or
``B`` lists of ids) into :class:`Prompt` records; :func:`split_pixels` / :func:`split_embeds`
assign the history images (pixels, or aligned features) to their prompts; :func:`request_seeds`
gives each prompt its request seed. Every error names the prompt / field and what was expected.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from pgen_engine.data.prompts import uncond_pad_ids
from pgen_engine.ops.rng import mix_seed

from .coerce import INT64_MAX, INT64_MIN, as_flag, as_int


# how far pixel_values may stray outside [-1, 1] (rounding of a resize or a low-precision dtype)
PIXEL_RANGE_SLACK = 0.02


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One validated prompt: real tokens only (padding stripped)."""

    ids: list[int]
    code_mask: list[bool] | None
    num_images: int  # vision placeholders / num_image_tokens, i.e. images in pixel_values it consumes


def as_int64_seed(x, what: str) -> int:
    x = as_int(x, what)
    if not INT64_MIN <= x < 2 ** 64:
        raise ValueError(f"{what}: {x} does not fit in 64 bits")
    return x - 2 ** 64 if x > INT64_MAX else x


def binary_mask(mask, name: str, B: int, S: int, values: str) -> torch.Tensor:
    """``mask`` (a tensor or nested lists) checked as a ``[B,S]`` mask of 0 / 1 -> bool ``[B,S]``
    (CPU). ``.bool()`` alone would read 2, 0.5, -1 or NaN as "set"; errors name ``name`` and say
    which ``values`` are allowed."""
    if not isinstance(mask, torch.Tensor):
        try:
            mask = torch.as_tensor(mask)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{name} must be a [B,S] tensor of {values}: {e}") from None
    if tuple(mask.shape) != (B, S):
        raise ValueError(f"{name} shape {tuple(mask.shape)} != input_ids shape {(B, S)}")
    m = mask.detach().cpu()
    flags = m.bool()
    if not bool((m == flags.to(m.dtype)).all()):
        raise ValueError(f"{name} must hold only {values}, got values "
                         f"{sorted(set(m[m != flags.to(m.dtype)].tolist()))[:5]}")
    return flags


def parse_prompts(model, input_ids, attention_mask, gen_code_mask) -> list[Prompt]:
    """Validate ``Generator.generate``'s ``input_ids`` / ``attention_mask`` / ``gen_code_mask``
    (see there) -> one :class:`Prompt` per row, padding stripped. Errors name the prompt and position."""
    if model.device.type == "meta":  # else torch's NotImplementedError about nonzero's meta kernel
        raise ValueError("the model is on the meta device (shapes only, no weights): Generator.generate needs a "
                         "model loaded on cpu or cuda (kv_bytes works on meta)")
    img_id = model.config.image_token_id
    T_img = model.num_image_tokens
    if isinstance(input_ids, torch.Tensor):
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an int64 or int32 [B,S] tensor, got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        B, S = input_ids.shape
        if attention_mask is None:
            mask = torch.ones(B, S, dtype=torch.bool)
        else:
            mask = binary_mask(attention_mask, "attention_mask", B, S, "0 (left padding) and 1 (token)")
            # left padding only: once a row starts, it never stops
            if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
                raise ValueError("attention_mask must be left padding (each row 0..0 then 1..1)")
        ids_rows = input_ids.detach().cpu().long().tolist()
        cm_rows = None if gen_code_mask is None else \
            binary_mask(gen_code_mask, "gen_code_mask", B, S, "bools (or 0 / 1)").tolist()
        mask_rows = mask.tolist()
        rows = []
        for b in range(B):
            start = S - sum(mask_rows[b])
            rows.append((ids_rows[b][start:], None if cm_rows is None else cm_rows[b][start:]))
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask is only accepted with a tensor input_ids (lists are unpadded)")
        rows = []
        if isinstance(input_ids, (str, bytes)):
            raise TypeError("input_ids must be token ids ([B,S] tensor or B lists of ints), got a string: "
                            "tokenize the prompt first")
        if isinstance(input_ids, Mapping):  # its keys would be read as prompts ("prompt 0 is a string")
            raise TypeError(f"input_ids must be token ids ([B,S] tensor or B lists of ints), got "
                            f"{type(input_ids).__name__}")
        try:
            ids_list = list(input_ids)
        except TypeError:  # None, one int: "'NoneType' object is not iterable" named no argument
            raise TypeError("input_ids must be token ids ([B,S] tensor or B lists of ints), got "
                            f"{type(input_ids).__name__} {input_ids!r}") from None
        if gen_code_mask is not None and (isinstance(gen_code_mask, (str, bytes))
                                          or not hasattr(gen_code_mask, "__len__")):
            raise TypeError("gen_code_mask must be B lists of bools (one per prompt), got "
                            f"{type(gen_code_mask).__name__} {gen_code_mask!r}")
        if gen_code_mask is not None and len(gen_code_mask) != len(ids_list):
            raise ValueError(f"gen_code_mask has {len(gen_code_mask)} rows, input_ids {len(ids_list)}")
        for b, r in enumerate(ids_list):
            if isinstance(r, (str, bytes)):
                raise TypeError(f"input_ids: prompt {b} is a string; pass token ids (tokenize the prompt first)")
            try:
                toks = list(r)
            except TypeError:  # e.g. one flat list of ids: its rows are ints
                raise TypeError(f"input_ids: prompt {b} must be a sequence of token ids, got "
                                f"{type(r).__name__} {r!r} (pass B prompts as B lists of ints, or a [B,S] "
                                "tensor)") from None
            ids = [as_int(t, f"input_ids: prompt {b}, position {pos}") for pos, t in enumerate(toks)]
            cm = None
            if gen_code_mask is not None:
                row = gen_code_mask[b]
                if isinstance(row, (str, bytes)) or not hasattr(row, "__iter__"):
                    raise TypeError(f"gen_code_mask: prompt {b} must be a list of bools, got {type(row).__name__} "
                                    f"{row!r}")
                cm = list(row)
                if not all(c is True or c is False for c in cm):  # the common case costs one pass
                    # as_flag: bool() would read 2, 0.5 or "no" as "a VQ code"
                    cm = [as_flag(c, f"gen_code_mask: prompt {b}, position {pos}") for pos, c in enumerate(cm)]
                if len(cm) != len(ids):
                    raise ValueError(f"prompt {b}: gen_code_mask has {len(cm)} entries, input_ids {len(ids)}")
            rows.append((ids, cm))
    if not rows:
        raise ValueError("input_ids holds no prompt")
    vocab = model.config.text.vocab_size
    max_pos = model.config.text.max_position_embeddings
    K = model.codebook_size
    prompts = []
    for b, (ids, cm) in enumerate(rows):
        if not ids:
            raise ValueError(f"prompt {b} is empty (no attended token)")
        if len(ids) + T_img > max_pos:  # positions past the trained context: silently degraded images
            raise ValueError(f"prompt {b}: {len(ids)} tokens + {T_img} image tokens exceed the model's "
                             f"max_position_embeddings={max_pos}")
        for pos, t in enumerate(ids):
            is_code = cm is not None and cm[pos]
            hi = K if is_code else vocab
            if not 0 <= t < hi:
                kind = "VQ code" if is_code else "token id"
                raise ValueError(f"prompt {b}, position {pos}: {kind} {t} outside [0, {hi})")
        n_ph = sum(1 for pos, t in enumerate(ids) if t == img_id and not (cm is not None and cm[pos]))
        if n_ph % T_img:
            raise ValueError(f"prompt {b} holds {n_ph} image placeholders (id {img_id}), not a multiple of "
                             f"{T_img} per image")
        prompts.append(Prompt(ids, cm if cm is not None and any(cm) else None, n_ph // T_img))
    return prompts


def split_pixels(model, prompts: list[Prompt], pixel_values) -> list[torch.Tensor | None]:
    """Check ``pixel_values`` ``[N_img,3,H,W]`` against the prompts' placeholders -> each prompt's
    images ``[n_i,3,H,W]`` (None for a prompt without any)."""
    need = sum(p.num_images for p in prompts)
    if pixel_values is None:
        if need:
            raise ValueError(f"the prompts hold placeholders for {need} image(s) but pixel_values is None")
        return [None] * len(prompts)
    S = model.image_size
    if not need:
        raise ValueError(f"pixel_values holds {len(pixel_values)} image(s) but the prompts hold no image "
                         f"placeholder (id {model.config.image_token_id}); pass pixel_values=None")
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        what = pixel_values.dtype if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be a floating tensor normalised to [-1, 1], got {what} "
                         "(uint8 images: pgen_engine.models.janus.uint8_to_pixels)")
    # the vision tower's patch grid is fixed: a smaller image would give fewer patches and
    # broadcast them over its position table without an error
    if tuple(pixel_values.shape) != (need, 3, S, S):
        raise ValueError(f"pixel_values must be [N_img,3,H,W] = [{need},3,{S},{S}] (N_img: images whose "
                         f"placeholders the prompts hold; H = W = the model's image_size), got "
                         f"{tuple(pixel_values.shape)}")
    # one reduction before any model work: [0, 255] / ImageNet-normalised pixels would silently
    # condition on garbage (NaN passes: the decode loop reports it as NonFiniteLogitsError, by row)
    lo, hi = (float(v) for v in pixel_values.detach().aminmax())
    if lo < -1.0 - PIXEL_RANGE_SLACK or hi > 1.0 + PIXEL_RANGE_SLACK:
        raise ValueError(f"pixel_values must be normalised to [-1, 1] (mean = std = 0.5), got values in "
                         f"[{lo:.3g}, {hi:.3g}] (uint8 images: pgen_engine.models.janus.uint8_to_pixels)")
    out, i = [], 0
    for p in prompts:
        out.append(pixel_values[i:i + p.num_images] if p.num_images else None)
        i += p.num_images
    return out


def split_embeds(model, prompts: list[Prompt], image_embeds) -> list[torch.Tensor | None]:
    """Check per-prompt aligned features against each prompt's placeholders -> the chunks
    (3-D ``[n_i, T_img, H]``; the Generator's prefill tells them from 4-D pixels)."""
    if isinstance(image_embeds, torch.Tensor) or not hasattr(image_embeds, "__len__"):
        raise ValueError(f"image_embeds must be a sequence of {len(prompts)} entries (one per prompt: a "
                         f"[n_i, T_img, H] tensor or None), got {type(image_embeds).__name__}")
    if len(image_embeds) != len(prompts):
        raise ValueError(f"image_embeds has {len(image_embeds)} entries but there are {len(prompts)} prompts "
                         "(one entry per prompt)")
    T_img = model.num_image_tokens
    H = model.config.text.hidden_size
    out = []
    for i, (p, e) in enumerate(zip(prompts, image_embeds)):
        if e is None:
            if p.num_images:
                raise ValueError(f"image_embeds[{i}] is None but prompt {i} holds placeholders for "
                                 f"{p.num_images} image(s)")
            out.append(None)
            continue
        if not isinstance(e, torch.Tensor) or not e.is_floating_point():
            what = e.dtype if isinstance(e, torch.Tensor) else type(e).__name__
            raise ValueError(f"image_embeds[{i}] must be a floating tensor (aligned vision features), got {what}")
        if tuple(e.shape) != (p.num_images, T_img, H):
            raise ValueError(f"image_embeds[{i}] must be [n_img, T_img, H] = [{p.num_images}, {T_img}, {H}] "
                             f"(prompt {i} holds {p.num_images * T_img} image placeholders = {p.num_images} "
                             f"image(s); H = the model's hidden size), got {tuple(e.shape)}")
        out.append(e if p.num_images else None)
    return out


def request_seeds(seed, B: int) -> torch.Tensor:
    """One int64 request seed per prompt: ``mix_seed(seed, i)`` for one int, or ``B`` ints as given."""
    if getattr(seed, "ndim", None) == 0:  # 0-d tensor / array: one seed
        seed = seed.item()
    if isinstance(seed, (str, bytes)) or not hasattr(seed, "__iter__"):  # one request seed for the call
        return mix_seed(as_int64_seed(seed, "seed"), torch.arange(B, dtype=torch.int64))
    seeds = list(seed)
    if len(seeds) != B:
        raise ValueError(f"seed: expected one int or {B} ints (one per prompt), got {len(seeds)}")
    return torch.tensor([as_int64_seed(s, f"seed[{i}]") for i, s in enumerate(seeds)], dtype=torch.int64)


def uncond_ids(p: Prompt, special, uncond_mode: str) -> tuple[int, ...]:
    """The unconditional prompt of ``p``: ``[bos, boi]`` (``"short"``) or ``p`` with every token
    but BOS / begin-of-image replaced by padding (``"pad"``)."""
    sp = special
    if uncond_mode == "short":
        return (sp.bos, sp.boi)
    cm = None if p.code_mask is None else torch.tensor(p.code_mask, dtype=torch.bool)
    return tuple(uncond_pad_ids(torch.tensor(p.ids, dtype=torch.long), cm, sp).tolist())
