"""The Generator's history-image inputs, checked against the prompts and split per prompt.

A prompt with ``n`` history images holds ``n * num_image_tokens`` image placeholders. Its
images come either as pixels (``pixel_values``, one tensor for the whole call, in reading
order: the vision tower + aligner run in the prefill) or as aligned features
(``image_embeds``, one entry per prompt: the tower already ran, e.g. a frozen tower's
feature cache). Both are split here into one chunk per prompt (None for a prompt without
images); the prefill tells them apart by rank (pixels 4-D, features 3-D).
"""
from __future__ import annotations

from typing import Sequence

import torch


def split_pixels(num_images: Sequence[int], pixel_values, image_size: int, image_token_id: int
                 ) -> list[torch.Tensor | None]:
    """``pixel_values`` ``[sum n_i, 3, S, S]`` (floating, in [-1, 1]) -> per-prompt chunks.

    ``num_images[i]`` is prompt ``i``'s image count; ValueError when the pixels do not fit.
    """
    need = sum(num_images)
    if pixel_values is None:
        if need:
            raise ValueError(f"the prompts hold placeholders for {need} image(s) but pixel_values is None")
        return [None] * len(num_images)
    S = image_size
    if not need:
        raise ValueError(f"pixel_values holds {len(pixel_values)} image(s) but the prompts hold no image "
                         f"placeholder (id {image_token_id}); pass pixel_values=None")
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
    out, i = [], 0
    for n in num_images:
        out.append(pixel_values[i:i + n] if n else None)
        i += n
    return out


def split_image_embeds(num_images: Sequence[int], image_embeds, num_tokens: int, hidden_size: int
                       ) -> list[torch.Tensor | None]:
    """Check per-prompt aligned features ``[n_i, num_tokens, hidden_size]`` (floating; None for
    a prompt without images) against each prompt's placeholders -> the per-prompt chunks."""
    B = len(num_images)
    if isinstance(image_embeds, torch.Tensor) or not hasattr(image_embeds, "__len__"):
        raise ValueError(f"image_embeds must be a sequence of {B} entries (one per prompt: a "
                         f"[n_i, T_img, H] tensor or None), got {type(image_embeds).__name__}")
    if len(image_embeds) != B:
        raise ValueError(f"image_embeds has {len(image_embeds)} entries but there are {B} prompts "
                         "(one entry per prompt)")
    out = []
    for i, (n, e) in enumerate(zip(num_images, image_embeds)):
        if e is None:
            if n:
                raise ValueError(f"image_embeds[{i}] is None but prompt {i} holds placeholders for {n} image(s)")
            out.append(None)
            continue
        if not isinstance(e, torch.Tensor) or not e.is_floating_point():
            what = e.dtype if isinstance(e, torch.Tensor) else type(e).__name__
            raise ValueError(f"image_embeds[{i}] must be a floating tensor (aligned vision features), got {what}")
        if tuple(e.shape) != (n, num_tokens, hidden_size):
            raise ValueError(f"image_embeds[{i}] must be [n_img, T_img, H] = [{n}, {num_tokens}, {hidden_size}] "
                             f"(prompt {i} holds {n * num_tokens} image placeholders = {n} image(s); H = the "
                             f"model's hidden size), got {tuple(e.shape)}")
        out.append(e if n else None)
    return out
