"""Fit (or reuse) an image tokenizer on a dataset's train-split item images.

Used by ``pgen data tokenize --fit``. Two kinds share one code budget
(``codes_per_side ** 2`` codes per image from a ``codebook`` of K entries):

* ``vq``: a small Janus VQ-VAE trained here (:mod:`pgen_engine.models.vq_train`);
* ``patch_kmeans``: :class:`~pgen_engine.models.patch_kmeans.PatchKMeansTokenizer` with
  ``image_size / codes_per_side`` pixel patches.

Held-out images: the items that never occur in a user's train sequence, topped up to
``held_out`` with train items chosen by a hash of their id; none of them is fitted on.
The fitted tokenizer file records a key over (kind, settings, the bytes of every fitted
image, the held-out ids) and its held-out scores, so a second run with the same inputs
reuses it without training.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..io_utils import folder_problem
from ..models.image_quality import evaluate_tokenizer
from ..models.image_tokenizer import ImageTokenizer
from ..models.patch_kmeans import PatchKMeansTokenizer
from ..models.vq_tokenizer import JanusVQTokenizer
from ..models.vq_train import VQTrainConfig, train_vq
from .dataset import DataError, Dataset, load_image
from .splits import build_splits

KINDS = ("vq", "patch_kmeans")


@dataclasses.dataclass
class TokenizerFitSettings:
    """Everything that changes the fitted tokenizer (the cache key covers all fields)."""

    kind: str = "vq"
    image_size: int = 64
    codes_per_side: int = 8
    codebook: int = 1024
    seed: int = 0
    held_out: int = 128
    fit_images: int = 4000
    # vq only
    time_budget_s: float = 780.0
    max_steps: int = 100_000
    batch_size: int = 4  # VQTrainConfig's default (measured best at a fixed budget)
    # patch_kmeans only
    iters: int = 15

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"--kind must be one of {KINDS}, got {self.kind!r}")
        if self.codes_per_side < 1 or self.image_size % self.codes_per_side:
            raise ValueError(f"--codes-per-side {self.codes_per_side} must divide --image-size {self.image_size}")
        if self.codebook < 2:
            raise ValueError(f"--codebook must be >= 2, got {self.codebook}")
        if self.held_out < 1 or self.fit_images < 2:
            raise ValueError("--held-out must be >= 1 and --fit-images >= 2")


def split_items(dataset: Dataset, held_out: int) -> tuple[list[str], list[str]]:
    """(fit item ids, held-out item ids), both restricted to items with an image.

    Held-out: items outside every user's train sequence (leave-one-out splits), topped up
    with train items in sha1(item id) order until ``min(held_out, n // 10)`` (at least 1);
    the rest of the train items are fitted on.
    """
    with_image = [i for i, it in dataset.items.items() if it.image_path is not None]
    if len(with_image) < 3:
        raise DataError(f"{dataset.root}: need at least 3 items with images to fit a tokenizer, got {len(with_image)}")
    train = {i for seq in build_splits(dataset).train_sequences.values() for i in seq}
    want = max(1, min(held_out, len(with_image) // 10))
    outside = [i for i in with_image if i not in train]
    by_hash = sorted((i for i in with_image if i in train), key=lambda i: hashlib.sha1(i.encode()).hexdigest())
    held = (outside + by_hash)[:want]
    held_set = set(held)
    fit = [i for i in with_image if i not in held_set and (i in train or not train)]
    if len(fit) < 2:
        raise DataError(f"{dataset.root}: only {len(fit)} train-split item image(s) left to fit a tokenizer on")
    return fit, held


def fit_items(dataset: Dataset, s: TokenizerFitSettings) -> tuple[list[str], list[str]]:
    """(fit item ids, held-out item ids) a fit with ``s`` uses: :func:`split_items`, then at
    most ``s.fit_images`` fit items, a seeded (``s.seed``) sample in catalogue order."""
    fit_ids, held_ids = split_items(dataset, s.held_out)
    if len(fit_ids) > s.fit_images:
        rng = np.random.default_rng(s.seed)
        fit_ids = [fit_ids[j] for j in sorted(rng.choice(len(fit_ids), s.fit_images, replace=False).tolist())]
    return fit_ids, held_ids


def _vq_train_config(s: TokenizerFitSettings) -> VQTrainConfig:
    """The VQ training recipe for ``s``: its sizes and budget, the rest VQTrainConfig's defaults."""
    return VQTrainConfig(image_size=s.image_size, codes_per_side=s.codes_per_side, codebook_size=s.codebook,
                         batch_size=s.batch_size, max_steps=s.max_steps, time_budget_s=s.time_budget_s, seed=s.seed)


def _fit_key(dataset: Dataset, fit_ids: list[str], held_ids: list[str], s: TokenizerFitSettings) -> str:
    # the whole VQ recipe is keyed, so a changed training default retrains instead of reusing
    keyed: Any = dataclasses.asdict(s)
    if s.kind == "vq":
        keyed = [keyed, dataclasses.asdict(_vq_train_config(s))]
    h = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode())
    for group, ids in (("fit", fit_ids), ("held", held_ids)):
        h.update(group.encode())
        for i in ids:
            h.update(i.encode() + b"\0")
            if group == "fit":
                h.update(hashlib.sha256(Path(dataset.items[i].image_path).read_bytes()).digest())
    return h.hexdigest()[:32]


def load_images(dataset: Dataset, ids: list[str], size: int, progress: bool = False, desc: str = "") -> torch.Tensor:
    """uint8 ``[len(ids), size, size, 3]``: the items' images as the tokenizers see them."""
    it = ids
    if progress:
        it = tqdm(ids, desc=desc, unit="img")
    return torch.from_numpy(np.stack([load_image(dataset.items[i].image_path, size) for i in it]))


def _load_kind(kind: str, path: Path) -> ImageTokenizer:
    if kind == "vq":
        return JanusVQTokenizer.load(path)
    return PatchKMeansTokenizer.load(path)


def load_tokenizer(kind: str, path: str | os.PathLike) -> ImageTokenizer:
    """Read a tokenizer of ``kind`` (``vq`` also accepts a Janus checkpoint directory)."""
    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {KINDS}, got {kind!r}")
    return _load_kind(kind, Path(path))


def _check_writable(path: Path) -> None:
    """Refuse, before fitting, a tokenizer path whose folder cannot take the file: the fit (a VQ one
    runs up to its time budget, 13 min by default) used to be thrown away when the save failed."""
    parent = path.parent
    problem = folder_problem(parent)
    if problem is None and parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        problem = "is not writable"
    if problem is not None:
        raise ValueError(f"{path}: cannot be written: its folder {parent} {problem}; nothing was fitted")


def fit_tokenizer(
    dataset: Dataset,
    path: str | os.PathLike,
    settings: TokenizerFitSettings,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[ImageTokenizer, dict[str, Any], bool]:
    """Fit a tokenizer on ``dataset``'s train-split images and save it to ``path``.

    Returns ``(tokenizer, held-out quality dict, reused)``; ``reused`` is True when
    ``path`` already holds a tokenizer fitted with the same key (nothing is trained).
    The quality dict is :func:`pgen_engine.models.image_quality.evaluate_tokenizer`'s.
    """
    settings.validate()
    path = Path(path)
    fit_ids, held_ids = fit_items(dataset, settings)
    key = _fit_key(dataset, fit_ids, held_ids, settings)
    if path.is_file():
        try:
            old = _load_kind(settings.kind, path)
        except (ValueError, OSError):
            old = None
        if old is not None and old.meta.get("fit_key") == key and "held_out" in old.meta:
            return old, old.meta["held_out"], True
    _check_writable(path)
    fit_imgs = load_images(dataset, fit_ids, settings.image_size, progress, "loading fit images")
    held_imgs = load_images(dataset, held_ids, settings.image_size, progress, "loading held-out images")
    if settings.kind == "vq":
        tok, rep = train_vq(fit_imgs, _vq_train_config(settings), progress=progress)
        log(f"trained Janus VQ ({settings.codebook} codes, {settings.codes_per_side}x{settings.codes_per_side} "
            f"per image) on {len(fit_ids)} images: {rep.steps} steps in {rep.seconds:.0f}s, "
            f"{rep.revived} dead codes revived")
    else:
        tok = PatchKMeansTokenizer.fit(fit_imgs, patch_size=settings.image_size // settings.codes_per_side,
                                       codebook_size=settings.codebook, iters=settings.iters, seed=settings.seed)
        log(f"fit PatchKMeans ({settings.codebook} codes, patch {tok.patch_size}) on {len(fit_ids)} images")
    quality = evaluate_tokenizer(tok, held_imgs)
    tok.meta = {"fit_key": key, "held_out": quality, "fit_images": len(fit_ids),
                "settings": dataclasses.asdict(settings)}
    tok.save(path)
    return tok, quality, False


def held_out_quality(dataset: Dataset, tokenizer: ImageTokenizer, held_out: int = 128) -> dict[str, Any]:
    """Score an existing tokenizer on ``dataset``'s held-out items (see :func:`split_items`)."""
    _, held_ids = split_items(dataset, held_out)
    return evaluate_tokenizer(tokenizer, load_images(dataset, held_ids, tokenizer.image_size, False, ""))
