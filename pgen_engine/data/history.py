"""A user's history -> model input: the one place where history items become a prompt.

``data.history_mode`` says how history images enter the model:

* ``"pixels"`` — through the understanding path: each image is ``T`` ``<image>``
  placeholders that the vision tower + aligner fill from ``pixel_values``
  (``[n, 3, S, S]`` float32 in [-1, 1], ``S`` = the model's ``image_size``). The default
  for checkpoints with a vision tower (every Janus / Janus-Pro checkpoint).
* ``"codes"`` — the image tokenizer's VQ codes, embedded by the generation embedding
  (``gen_code_mask`` True). The default for models without a vision tower.

SFT (:mod:`pgen_engine.training.sft_data`), RL rollouts and the trainer's log-probs, eval,
``pgen generate`` and :meth:`pgen_engine.Generator.generate_for_users` all build prompts
with :class:`HistoryPrompter`, so template, history order (oldest first) and the
unconditional prompt of classifier-free guidance (:func:`pgen_engine.data.prompts.unconditional`:
every history slot becomes ``pad``, no images) are the same everywhere.

The mode a model was trained with is saved in its run's ``config.resolved.yaml``
(``data.history_mode``, resolved from ``null`` when the config was loaded);
:func:`~pgen_engine.data.history_mode.trained_history_mode` reads it back and
:func:`~pgen_engine.data.history_mode.check_history_mode` refuses a run that asks for the other mode.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from pgen_engine.config import DataConfig, load_config
from pgen_engine.models.checkpoint import load_checkpoint_config
from pgen_engine.models.image_tokenizer import VQImageTokenizer
from pgen_engine.models.patch_kmeans import PatchKMeansTokenizer

from .dataset import DataError, fit_square, load_image
from .history_mode import check_history_mode, trained_history_mode
from .prompts import PromptBuilder, normalize_pixels
from .text_tokenizer import load_text_tokenizer

ImageSource = Union[str, os.PathLike, np.ndarray, Image.Image]


def load_history_image(src: ImageSource, size: int) -> np.ndarray:
    """A history image (path, PIL image or uint8 ``[H, W, 3]`` array) -> uint8 ``[size, size, 3]``.

    Raises :class:`pgen_engine.data.dataset.DataError` naming the file for a missing or
    corrupt image, ValueError for an array of the wrong type/shape.
    """
    if isinstance(src, (str, os.PathLike)):
        return load_image(src, size)
    if isinstance(src, Image.Image):
        return fit_square(src, size)
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8 or src.ndim != 3 or src.shape[2] != 3:
            raise ValueError(f"a history image array must be uint8 [H, W, 3], got {src.dtype} {src.shape}")
        return fit_square(Image.fromarray(src), size)
    raise TypeError(f"a history image must be a path, a PIL image or a uint8 [H, W, 3] array, "
                    f"got {type(src).__name__}")


@dataclasses.dataclass
class HistoryInput:
    """One user's prompt, ready for the Generator / the trainer.

    Attributes:
        input_ids: the prompt's token ids (ends with ``<boi>``).
        gen_code_mask: True where ``input_ids`` holds a history VQ code (codes mode).
        pixel_values: float32 ``[n, 3, S, S]`` (pixels mode) or None.
        num_items: n, the history length.
    """

    input_ids: list[int]
    gen_code_mask: list[bool]
    pixel_values: torch.Tensor | None
    num_items: int


def batch_inputs(inputs: Sequence[HistoryInput]) -> tuple[list[list[int]], list[list[bool]], torch.Tensor | None]:
    """-> (B id lists, B mask lists, pixel_values ``[sum n, 3, S, S]`` in batch order or None):
    the Generator's list-prompt arguments."""
    px = [h.pixel_values for h in inputs if h.pixel_values is not None]
    return ([h.input_ids for h in inputs], [h.gen_code_mask for h in inputs], torch.cat(px) if px else None)


class HistoryPrompter:
    """Builds :class:`HistoryInput` s from history images and titles, in either mode.

    Args:
        builder: the run's :class:`PromptBuilder` (its ``mode`` is the history mode).
        image_size: pixels mode: the vision tower's input side (the model's ``image_size``).
        image_tokenizer: the run's :class:`~pgen_engine.models.image_tokenizer.ImageTokenizer`:
            required in codes mode (its ``encode`` turns history images into codes); in
            either mode it decodes generated codes (:func:`pgen_engine.generation.personal.decode_codes`).
    """

    def __init__(self, builder: PromptBuilder, *, image_size: int | None = None, image_tokenizer=None):
        if builder.mode == "pixels" and not image_size:
            raise ValueError("pixels history needs the vision tower's image_size")
        if builder.mode == "codes" and image_tokenizer is None:
            raise ValueError("codes history needs an image tokenizer")
        self.builder, self.image_size, self.image_tokenizer = builder, image_size, image_tokenizer

    @property
    def mode(self) -> str:
        return self.builder.mode

    @property
    def load_size(self) -> int:
        """Side the history images are loaded at (vision tower input or tokenizer input)."""
        return int(self.image_size if self.mode == "pixels" else self.image_tokenizer.image_size)

    def from_arrays(self, images: torch.Tensor, titles: Sequence[str] | None = None, *,
                    codes: torch.Tensor | None = None, extra: str | None = None) -> HistoryInput:
        """A prompt from already-loaded images.

        Args:
            images: uint8 ``[n, load_size, load_size, 3]`` oldest first (may be None in codes
                mode when ``codes`` is given).
            titles: n titles (used when the builder puts titles in prompts).
            codes: codes mode: precomputed ``[n, T]`` codes (e.g. from the token cache).
            extra: optional text after the history (inference only).
        """
        b = self.builder
        t = None
        if b.with_titles:
            n = int(images.shape[0] if images is not None else codes.shape[0])
            t = list(titles) if titles is not None else [""] * n
        if self.mode == "pixels":
            if images is None or images.shape[0] < 1:
                raise ValueError("a history needs at least one image")
            p = b.build(titles=t, num_history=images.shape[0], extra=extra)
            return HistoryInput(p.input_ids.tolist(), p.gen_code_mask.tolist(), normalize_pixels(images),
                                images.shape[0])
        if codes is None:
            if images is None or images.shape[0] < 1:
                raise ValueError("a history needs at least one image")
            codes = self.image_tokenizer.encode(images).cpu().long()
        p = b.build(codes, t, extra=extra)
        return HistoryInput(p.input_ids.tolist(), p.gen_code_mask.tolist(), None, int(codes.shape[0]))

    def build(self, history: Sequence[tuple[ImageSource, str]] | Sequence[ImageSource],
              extra: str | None = None) -> HistoryInput:
        """A prompt from a history: ``(image, title)`` pairs (or bare images), oldest first.

        Images are paths, PIL images or uint8 ``[H, W, 3]`` arrays.
        """
        if isinstance(history, (str, bytes, os.PathLike)):  # one path, not a history of its characters
            raise ValueError(f"a history is a sequence of (image, title) items, got the single path {history!r}")
        if len(history) == 0:
            raise ValueError("a history needs at least one item")
        srcs, titles = [], []
        for item in history:
            if isinstance(item, tuple):
                if len(item) != 2 or not isinstance(item[1], str):
                    raise ValueError(f"a history item is (image, title: str), got {item!r}")
                srcs.append(item[0])
                titles.append(item[1])
            else:
                srcs.append(item)
                titles.append("")
        imgs = torch.from_numpy(np.stack([load_history_image(s, self.load_size) for s in srcs]))
        return self.from_arrays(imgs, titles, extra=extra)


def prompter_for_checkpoint(checkpoint: str | os.PathLike, model=None, *, run_config: str | os.PathLike | None = None,
                            history_mode: str | None = None) -> HistoryPrompter:
    """The :class:`HistoryPrompter` a checkpoint was trained with: instruction, titles and
    history mode from its run config (:func:`trained_history_mode`), the checkpoint's text
    tokenizer, and the run's image tokenizer (PatchKMeans file of the run, else the
    checkpoint's VQ, which needs ``model``; codes mode requires one).

    Raises HistoryModeError when ``history_mode`` is given and differs from the trained mode.
    """
    ckpt = Path(checkpoint)
    mode, where = trained_history_mode(ckpt, run_config)
    mode = check_history_mode(mode, history_mode, where=where)
    path = Path(run_config) if run_config else ckpt.parent / "config.resolved.yaml"
    run = load_config(path) if path.is_file() else None
    cfg, special = load_checkpoint_config(ckpt)
    instruction = (run.data if run else run_data_defaults()).instruction
    with_titles = run.data.with_titles if run else False
    builder = PromptBuilder(load_text_tokenizer(ckpt, special), special, cfg.num_image_tokens, mode=mode,
                            with_titles=with_titles, instruction=instruction)
    tok = run_image_tokenizer(run, model, where=str(path))
    if mode == "codes" and tok is None:
        raise ValueError(f"{ckpt}: codes history needs the run's image tokenizer or the loaded model (its VQ)")
    if mode == "codes" and (tok.num_tokens, tok.codebook_size) != (cfg.num_image_tokens, cfg.codebook_size):
        # else every history line fails on its own with "history_codes must be [n, T]"
        raise ValueError(f"{path}: the run's image tokenizer gives {tok.num_tokens} codes per image from "
                         f"{tok.codebook_size} entries; the checkpoint {ckpt} expects {cfg.num_image_tokens} "
                         f"and {cfg.codebook_size}")
    return HistoryPrompter(builder, image_size=cfg.image_size if mode == "pixels" else None, image_tokenizer=tok)


def run_data_defaults():
    return DataConfig()


def run_tokenizer_file(run) -> Path | None:
    """The PatchKMeans file a training run (``run``: its RunConfig, or None for a foreign
    checkpoint) fitted: ``<data.work_dir>/tokenizer.safetensors``, where an unset
    ``data.work_dir`` means ``<output_dir>/data_work`` as in training. None when the run's
    image tokenizer is the model's own VQ (``vq``, ``checkpoint_vq``) or there is no run."""
    if run is None or run.data.tokenizer != "patch_kmeans":
        return None
    wd = Path(run.data.work_dir) if run.data.work_dir else Path(run.output_dir) / "data_work"
    return wd / "tokenizer.safetensors"


def run_image_tokenizer(run, model, *, where: str):
    """The image tokenizer of a training run (``run``: its RunConfig, or None for a foreign
    checkpoint): the run's PatchKMeans file (:func:`run_tokenizer_file`), else the
    model's VQ (None when ``model`` is None)."""
    tok = run_tokenizer_file(run)
    if tok is not None:
        if not tok.is_file():
            raise FileNotFoundError(f"{where}: the run's image tokenizer {tok} is missing (paths in the run config "
                                    "are relative to the directory training ran in)")
        return PatchKMeansTokenizer.load(tok)
    return None if model is None else _vq(model)


def _vq(model):
    return VQImageTokenizer(model)



class CatalogueImages:
    """``item_id -> uint8 [size, size, 3]``: each catalogue image decoded once, kept in memory.

    Args:
        dataset: the loaded :class:`~pgen_engine.data.dataset.Dataset`.
        size: the side images are loaded at (the vision tower's ``image_size``).
        max_bytes: memory cap; items past it are decoded on every call.
    """

    def __init__(self, dataset, size: int, *, max_bytes: int = 2 << 30):
        self.dataset, self.size, self.max_bytes = dataset, int(size), int(max_bytes)
        self._cache: dict[str, np.ndarray] = {}
        self._bytes = 0

    def __call__(self, item_id: str) -> np.ndarray:
        got = self._cache.get(item_id)
        if got is not None:
            return got

        item = self.dataset.items.get(item_id)
        if item is None:
            raise KeyError(f"item {item_id!r} is not in the dataset")
        if item.image_path is None:
            raise DataError(f"item {item_id!r} has no image")
        arr = load_image(item.image_path, self.size)
        if self._bytes + arr.nbytes <= self.max_bytes:
            self._cache[item_id] = arr
            self._bytes += arr.nbytes
        return arr

    def batch(self, item_ids: Sequence[str]) -> torch.Tensor:
        """uint8 ``[n, size, size, 3]`` in the given order."""
        return torch.from_numpy(np.stack([self(i) for i in item_ids]))
