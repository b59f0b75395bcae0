"""Prompts, unconditional prompts, the SFT collator and a resumable sharded loader.

Prompt format (``<x>`` = special id, ``{...}`` = text tokens)::

    <bos> {User: <instruction>\\n}
      per history item: [{title\\n}] <boi> c_1 .. c_T <eoi> {\\n}     ("codes" mode)
                        [{title\\n}] <boi> <image> x n <eoi> {\\n}    ("pixels" mode)
    {Assistant:} <boi>

A generation prompt always ends with ``<boi>``. In "codes" mode the history codes are raw
VQ ids placed in ``input_ids`` with ``gen_code_mask`` True: the model embeds those
positions with its *generation* (VQ) embedding, every other position with the text
embedding. In "pixels" mode each history image is ``n = image_tokens_per_image``
``<image>`` placeholders that the model fills, in order of appearance, with the vision
encoder features of ``pixel_values`` (``[n_img, 3, H, W]`` float, ``(x/255 - 0.5)/0.5``).

Training sequence = prompt ++ target codes ``[T]``. Shift convention: position ``i``
predicts token ``i + 1``. ``loss_mask[i]`` is True iff token ``i + 1`` is a target image
code (so it is True at the prompt's final ``<boi>`` and at the first ``T - 1`` target
positions, never at the last one), and ``labels[i] = input_ids[i + 1]`` there, -100
elsewhere: ``loss = cross_entropy(logits[loss_mask], labels[loss_mask])``.

Condition dropout replaces a prompt by its "pad" unconditional counterpart (the same
:func:`unconditional` that inference's classifier-free guidance uses).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..models.special_tokens import SpecialTokens
from .splits import Example

IGNORE_INDEX = -100
MODES = ("codes", "pixels")  # the values of data.history_mode


@dataclasses.dataclass
class Prompt:
    """One prompt.

    Attributes:
        input_ids: int64 ``[S]``.
        gen_code_mask: bool ``[S]``, True where ``input_ids`` holds a VQ code.
        num_vision_images: number of history images whose placeholders are in the prompt.
    """

    input_ids: torch.Tensor
    gen_code_mask: torch.Tensor
    num_vision_images: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def uncond_pad_ids(input_ids: torch.Tensor, gen_code_mask: torch.Tensor | None, special: SpecialTokens
                   ) -> torch.Tensor:
    """The "pad" unconditional ids: ``transformers``' Janus rule, the one rule used everywhere.

    Every text token except ``bos`` and ``boi`` becomes ``special.pad``; VQ codes of history
    images (``gen_code_mask``) become ``pad`` too, whatever their value. Same shape as
    ``input_ids`` (``[S]`` or ``[B, S]``).
    """
    keep = (input_ids == special.bos) | (input_ids == special.boi)
    if gen_code_mask is not None:
        keep &= ~gen_code_mask
    return torch.where(keep, input_ids, torch.full_like(input_ids, special.pad))


def unconditional(prompt: Prompt, special: SpecialTokens, mode: str = "pad") -> Prompt:
    """The classifier-free-guidance counterpart of ``prompt``.

    "pad": same length, :func:`uncond_pad_ids` (every token except bos/boi becomes pad),
    ``gen_code_mask`` all False, no vision images. "short": ``[bos, boi]``.
    """
    if mode == "pad":
        ids = uncond_pad_ids(prompt.input_ids, prompt.gen_code_mask, special)
        return Prompt(ids, torch.zeros_like(prompt.gen_code_mask), 0)
    if mode == "short":
        return Prompt(torch.tensor([special.bos, special.boi], dtype=torch.long), torch.zeros(2, dtype=torch.bool), 0)
    raise ValueError(f"unconditional mode must be 'pad' or 'short', got {mode!r}")


def normalize_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float32 ``[N, 3, H, W]`` in [-1, 1] as Janus expects."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N,H,W,3], got {images.dtype} {tuple(images.shape)}")
    return (images.permute(0, 3, 1, 2).to(torch.float32) / 255.0 - 0.5) / 0.5


class PromptBuilder:
    """Builds :class:`Prompt` s for examples.

    Args:
        text_tokenizer: object with ``encode(text) -> list[int]``.
        special: special token ids.
        image_tokens_per_image: T (codes mode: codes per history image; pixels mode:
            placeholders per history image).
        mode: "codes" or "pixels" (``data.history_mode``).
        with_titles: put each history item's title before its image.
        instruction: the instruction text after "User: ".
    """

    def __init__(self, text_tokenizer, special: SpecialTokens, image_tokens_per_image: int, *,
                 mode: str = "codes", with_titles: bool = False,
                 instruction: str = "Generate the image of the next item this user will like."):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if image_tokens_per_image < 1:
            raise ValueError(f"image_tokens_per_image must be >= 1, got {image_tokens_per_image}")
        self.tok, self.special, self.T = text_tokenizer, special, int(image_tokens_per_image)
        self.mode, self.with_titles, self.instruction = mode, with_titles, instruction
        self._head = [special.bos] + list(text_tokenizer.encode(f"User: {instruction}\n"))
        self._nl = list(text_tokenizer.encode("\n"))
        self._tail = list(text_tokenizer.encode("Assistant:")) + [special.boi]

    def build(self, history_codes: Sequence[torch.Tensor] | torch.Tensor | None = None,
              titles: Sequence[str] | None = None, num_history: int | None = None,
              extra: str | None = None) -> Prompt:
        """Build a prompt.

        Args:
            history_codes: codes mode: int ``[n, T]`` (or n tensors ``[T]``), oldest first.
            titles: n titles (used when ``with_titles``).
            num_history: pixels mode: number of history images n.
            extra: optional text placed after the history, before ``Assistant:`` (inference
                only; ``None`` gives exactly the training template).
        """
        if self.mode == "codes":
            if history_codes is None:
                raise ValueError("codes mode needs history_codes [n, T]")
            hc = torch.stack(list(history_codes)) if not isinstance(history_codes, torch.Tensor) else history_codes
            if hc.ndim != 2 or hc.shape[1] != self.T:
                raise ValueError(f"history_codes must be [n, {self.T}], got {tuple(hc.shape)}")
            n = hc.shape[0]
        else:
            if num_history is None:
                raise ValueError("pixels mode needs num_history")
            n = int(num_history)
        if self.with_titles and (titles is None or len(titles) != n):
            raise ValueError(f"with_titles=True needs {n} titles, got {None if titles is None else len(titles)}")
        ids: list[int] = list(self._head)
        mask: list[bool] = [False] * len(ids)
        sp = self.special
        for j in range(n):
            if self.with_titles:
                t = list(self.tok.encode(f"{titles[j]}\n"))
                ids += t
                mask += [False] * len(t)
            ids.append(sp.boi)
            mask.append(False)
            if self.mode == "codes":
                ids += hc[j].tolist()
                mask += [True] * self.T
            else:
                ids += [sp.image] * self.T
                mask += [False] * self.T
            ids += [sp.eoi] + self._nl
            mask += [False] * (1 + len(self._nl))
        if extra:
            t = list(self.tok.encode(f"{extra}\n"))
            ids += t
            mask += [False] * len(t)
        ids += self._tail
        mask += [False] * len(self._tail)
        return Prompt(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool),
                      n if self.mode == "pixels" else 0)

    def unconditional(self, prompt: Prompt, mode: str = "pad") -> Prompt:
        return unconditional(prompt, self.special, mode)


@dataclasses.dataclass
class TrainingSample:
    """Prompt + target codes ``[T]`` (+ in pixels mode ``pixel_values [n_img, 3, H, W]``, or the
    cached vision-tower outputs ``image_features [n_img, T_img, D_vision]`` of a frozen tower)."""

    prompt: Prompt
    target: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_features: torch.Tensor | None = None


def apply_cond_dropout(sample: TrainingSample, special: SpecialTokens, p: float,
                       generator: torch.Generator | None) -> TrainingSample:
    """With probability ``p`` replace the prompt by its "pad" unconditional counterpart."""
    if p <= 0:
        return sample
    if float(torch.rand((), generator=generator)) < p:
        return TrainingSample(unconditional(sample.prompt, special, "pad"), sample.target, None)
    return sample


class SFTCollator:
    """Left-pads :class:`TrainingSample` s into a batch dict.

    Output (L = max over the batch of S + T):
        input_ids int64 [B, L], gen_code_mask bool [B, L] (code history slots + targets),
        attention_mask bool [B, L], position_ids int64 [B, L] (0 at the first real token),
        loss_mask bool [B, L], labels int64 [B, L] (see the module docstring),
        pixel_values float32 [sum n_img, 3, H, W] (pixels samples, batch order) when any, or
        image_features float32 [sum n_img, T_img, D_vision] when the samples carry cached features.
    """

    def __init__(self, special: SpecialTokens, *, cond_dropout_p: float = 0.0,
                 generator: torch.Generator | None = None):
        if not 0.0 <= cond_dropout_p <= 1.0:
            raise ValueError(f"cond_dropout_p must be in [0, 1], got {cond_dropout_p}")
        self.special, self.p, self.generator = special, cond_dropout_p, generator

    def __call__(self, samples: Sequence[TrainingSample]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        samples = [apply_cond_dropout(s, self.special, self.p, self.generator) for s in samples]
        lens = [len(s.prompt) + s.target.shape[0] for s in samples]
        B, L = len(samples), max(lens)
        ids = torch.full((B, L), self.special.pad, dtype=torch.long)
        gmask = torch.zeros(B, L, dtype=torch.bool)
        att = torch.zeros(B, L, dtype=torch.bool)
        lmask = torch.zeros(B, L, dtype=torch.bool)
        pix, feats = [], []
        for b, s in enumerate(samples):
            if s.target.ndim != 1:
                raise ValueError(f"target codes must be 1-D [T], got {tuple(s.target.shape)}")
            S, off = len(s.prompt), L - lens[b]
            ids[b, off:off + S] = s.prompt.input_ids
            ids[b, off + S:] = s.target
            gmask[b, off:off + S] = s.prompt.gen_code_mask
            gmask[b, off + S:] = True
            att[b, off:] = True
            lmask[b, off + S - 1:L - 1] = True  # position i predicts i+1: boi .. second-last code
            if s.prompt.num_vision_images and s.image_features is not None:
                if s.image_features.shape[0] != s.prompt.num_vision_images:
                    raise ValueError(f"sample {b}: prompt has {s.prompt.num_vision_images} vision images but "
                                     f"image_features is {tuple(s.image_features.shape)}")
                feats.append(s.image_features)
            elif s.prompt.num_vision_images:
                if s.pixel_values is None or s.pixel_values.shape[0] != s.prompt.num_vision_images:
                    raise ValueError(f"sample {b}: prompt has {s.prompt.num_vision_images} vision images but "
                                     f"pixel_values is {None if s.pixel_values is None else tuple(s.pixel_values.shape)}")
                pix.append(s.pixel_values)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        labels[:, :-1] = torch.where(lmask[:, :-1], ids[:, 1:], IGNORE_INDEX)
        pos = (att.long().cumsum(1) - 1).clamp_min(0)
        out = {"input_ids": ids, "gen_code_mask": gmask, "attention_mask": att, "position_ids": pos,
               "loss_mask": lmask, "labels": labels}
        if pix and feats:
            raise ValueError("a batch mixes pixel_values and cached image_features")
        if pix:
            out["pixel_values"] = torch.cat(pix)
        if feats:
            out["image_features"] = torch.cat(feats)
        return out


class SFTDataset(torch.utils.data.Dataset):
    """Examples -> :class:`TrainingSample` s, codes read from a :class:`TokenCache`.

    ``image_loader(item_id) -> uint8 [H, W, 3]`` is required in pixels mode; with
    ``vision_features(item_ids) -> float32 [n, T_img, D_vision]`` (a frozen tower's cached
    outputs, :mod:`pgen_engine.data.vision_cache`) samples carry those instead of pixels.
    ``titles`` maps item id -> title when the builder uses titles.
    """

    def __init__(self, examples: Sequence[Example], cache, builder: PromptBuilder, *,
                 titles: dict[str, str] | None = None,
                 image_loader: Callable[[str], np.ndarray] | None = None,
                 vision_features: Callable[[Sequence[str]], torch.Tensor] | None = None):
        if builder.mode == "pixels" and image_loader is None:
            raise ValueError("pixels mode needs an image_loader")
        if builder.T != cache.num_tokens and builder.mode == "codes":
            raise ValueError(f"builder expects {builder.T} codes per image, cache has {cache.num_tokens}")
        self.examples, self.cache, self.builder = list(examples), cache, builder
        self.titles, self.image_loader, self.vision_features = titles or {}, image_loader, vision_features

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> TrainingSample:
        ex = self.examples[i]
        titles = [self.titles.get(h, "") for h in ex.history] if self.builder.with_titles else None
        target = self.cache.codes([ex.target])[0]
        if self.builder.mode == "codes":
            hist = self.cache.codes(list(ex.history))
            return TrainingSample(self.builder.build(hist, titles), target)
        if self.vision_features is not None:
            return TrainingSample(self.builder.build(titles=titles, num_history=len(ex.history)), target,
                                  image_features=self.vision_features(list(ex.history)))
        imgs = torch.from_numpy(np.stack([self.image_loader(h) for h in ex.history]))
        return TrainingSample(self.builder.build(titles=titles, num_history=len(ex.history)), target,
                              normalize_pixels(imgs))


class ResumableShardSampler(torch.utils.data.Sampler):
    """Batches of example indices: shuffled per (seed, epoch), sharded by rank, resumable.

    Every epoch is a permutation of ``range(n)`` from ``torch.Generator(seed + epoch)``,
    truncated to a multiple of ``world_size * batch_size`` (equal batch count per rank),
    then rank ``r`` takes every ``world_size``-th index starting at ``r``. ``position``
    is the number of batches this rank has consumed; iteration starts there, and
    ``state_dict()`` / ``load_state_dict()`` carry (epoch, position).
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 epoch: int = 0, position: int = 0, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world_size
        self.epoch, self.position, self.shuffle = epoch, position, shuffle
        if self.batches_per_epoch() == 0:
            raise ValueError(f"{n} examples are fewer than one batch per rank "
                             f"(batch_size {batch_size} x world_size {world_size})")

    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self.shuffle:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            perm = list(range(self.n))
        nb = self.batches_per_epoch()
        mine = perm[: nb * self.batch_size * self.world][self.rank::self.world]
        return [mine[j * self.batch_size:(j + 1) * self.batch_size] for j in range(nb)]

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.position

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._epoch_batches(self.epoch)
        while self.position < len(batches):
            b = batches[self.position]
            self.position += 1
            yield b
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class _EpochTaggedSampler(ResumableShardSampler):
    """Yields batches of (epoch, index) so the dataset can seed per-sample randomness
    without shared state (safe with worker processes)."""

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:  # type: ignore[override]
        epoch = self.epoch
        for batch in super().__iter__():
            yield [(epoch, i) for i in batch]


class _TaggedDataset(torch.utils.data.Dataset):
    def __init__(self, base: SFTDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[tuple[int, int], TrainingSample]:
        return key, self.base[key[1]]


def build_sft_loader(
    dataset: SFTDataset,
    special: SpecialTokens,
    *,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    position: int = 0,
    cond_dropout_p: float = 0.0,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset``: deterministic per ``seed``, sharded by (rank, world_size),
    resumable from (epoch, position) via ``loader.batch_sampler.state_dict()``.

    Condition dropout is decided per sample from (seed, epoch, example index), so it
    is the same whichever rank, worker count or resume point produced the batch.
    """
    sampler = _EpochTaggedSampler(len(dataset), batch_size, seed=seed, rank=rank, world_size=world_size,
                                  epoch=epoch, position=position)
    collate = _SeededDropCollator(SFTCollator(special), cond_dropout_p, seed)
    return torch.utils.data.DataLoader(_TaggedDataset(dataset), batch_sampler=sampler,
                                       collate_fn=collate, num_workers=num_workers)


class _SeededDropCollator:
    def __init__(self, collator: SFTCollator, p: float, seed: int):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"cond_dropout_p must be in [0, 1], got {p}")
        self.collator, self.p, self.seed = collator, p, seed

    def __call__(self, tagged: Sequence[tuple[tuple[int, int], TrainingSample]]) -> dict[str, torch.Tensor]:
        out = []
        for (epoch, i), s in tagged:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_033 + i)
            out.append(apply_cond_dropout(s, self.collator.special, self.p, g))
        return self.collator(out)


def num_batches(n: int, batch_size: int, world_size: int = 1) -> int:
    """Batches per rank per epoch for ``n`` examples (what the sampler yields)."""
    return math.floor(n / (batch_size * world_size))
