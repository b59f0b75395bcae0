"""Vision-tower features of catalogue items, computed once per tower weights (pixels history).

In ``pixels`` history mode every history image goes through the vision tower. A frozen
tower (``vision_model`` not in ``train.trainable``, the default) gives every item the same
output forever, so its features are computed once, in batches, and kept:

* on disk next to the token cache (:func:`build_vision_cache`, folder
  ``vision_<fingerprint>``): ``features.bin`` ``[num_items, T_img, D_vision]`` in the dtype
  the model trains in (float32, or bfloat16 / float16: half the bytes, and exactly what
  :meth:`~pgen_engine.models.janus.JanusModel.embed_inputs` casts float32 features to before
  the aligner, so a bf16 run sees the same numbers) (C order, memory-mapped) + ``index.json``. The key is (item, weights version), the
  version being :func:`vision_fingerprint` of the tower's weights, so a different tower
  never reads another tower's features;
* in memory for a live model (:class:`VisionFeatureCache`), keyed by (item, version) where
  the version changes whenever a trainable tower's weights may have changed (after every
  optimizer step), so features are recomputed exactly when the tower trains.

What is stored is the tower's output *before* the aligner; the aligner (trainable) is applied
in :meth:`pgen_engine.models.janus.JanusModel.embed_inputs` (``image_features=``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..io_utils import allocate_file, atomic_write_json, replace_dir
from .dataset import DataError, load_image
from .prompts import normalize_pixels
from .token_cache import images_signature

FORMAT = "pgen-vision-cache"
VERSION = 1

# torch dtype name -> (numpy storage dtype, torch dtype); bfloat16 is stored as its raw 16 bits
_STORAGE = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16),
            "bfloat16": (np.uint16, torch.bfloat16)}


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _STORAGE:
        raise ValueError(f"vision feature cache dtype must be one of {sorted(_STORAGE)}, got {dtype}")
    return name


def _to_numpy(x: torch.Tensor, name: str) -> np.ndarray:
    x = x.to(_STORAGE[name][1]).contiguous()
    return x.view(torch.int16).numpy().view(np.uint16) if name == "bfloat16" else x.numpy()


def _from_numpy(a: np.ndarray, name: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.int16).view(torch.bfloat16) if name == "bfloat16" else t


def vision_fingerprint(vision_model: torch.nn.Module) -> str:
    """SHA-256 over the tower's parameter names, shapes, dtypes and values (hex, 16 chars)."""
    h = hashlib.sha256()
    for name, p in sorted(vision_model.state_dict().items()):
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_items(model, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """uint8 ``[n, S, S, 3]`` -> float32 vision-tower outputs ``[n, T_img, D_vision]`` (batched)."""
    out = []
    for lo in range(0, images.shape[0], batch_size):
        px = normalize_pixels(images[lo:lo + batch_size]).to(model.device)
        out.append(model.vision_hidden(px).float().cpu())
    return torch.cat(out)


class VisionCache:
    """Read-only view of a complete on-disk cache: ``features(item_ids) -> [n, T_img, D]`` in
    :attr:`dtype` (float32 for caches written before the dtype was recorded)."""

    def __init__(self, root: Path, index: dict):
        self.root, self.index = root, index
        self.fingerprint: str = index["fingerprint"]
        self.item_ids: list[str] = list(index["item_ids"])
        self.shape = (int(index["num_tokens"]), int(index["dim"]))
        self.dtype_name: str = index.get("dtype", "float32")
        self.dtype: torch.dtype = _STORAGE[self.dtype_name][1]
        self._row = {iid: j for j, iid in enumerate(self.item_ids)}
        n = max(len(self.item_ids), 1)
        self._x = np.memmap(root / "features.bin", dtype=_STORAGE[self.dtype_name][0], mode="r",
                            shape=(n, *self.shape))

    @classmethod
    def open(cls, root: str | os.PathLike, fingerprint: str) -> "VisionCache":
        """Open ``root``; refuses another tower's cache or an incomplete one (DataError naming it)."""
        root = Path(root)
        try:
            idx = json.loads((root / "index.json").read_text())
        except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise DataError(f"{root}: not a vision feature cache (no valid index.json)") from None
        if not isinstance(idx, dict) or idx.get("format") != FORMAT or idx.get("version") != VERSION:
            raise DataError(f"{root}: not a version-{VERSION} vision feature cache")
        if idx.get("fingerprint") != fingerprint:
            raise DataError(f"{root}: features of vision tower {idx.get('fingerprint')}, not of {fingerprint}")
        if not idx.get("complete"):
            raise DataError(f"{root}: vision feature cache is incomplete; rebuild it")
        if idx.get("dtype", "float32") not in _STORAGE:
            raise DataError(f"{root}: unknown feature dtype {idx.get('dtype')!r} (expected one of {sorted(_STORAGE)})")
        try:
            n = max(len(idx["item_ids"]), 1)
            itemsize = np.dtype(_STORAGE[idx.get("dtype", "float32")][0]).itemsize
            want = n * int(idx["num_tokens"]) * int(idx["dim"]) * itemsize
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{root / 'index.json'}: malformed vision feature cache index ({e!r})") from None
        f = root / "features.bin"
        size = f.stat().st_size if f.is_file() else -1
        if size != want:
            raise DataError(f"{f}: size {size} bytes, expected {want} from index.json (truncated or missing?); "
                            f"delete {root} to rebuild it")
        return cls(root, idx)

    def features(self, item_ids: Sequence[str]) -> torch.Tensor:
        """``[n, T_img, D_vision]`` (:attr:`dtype`) in the given order (KeyError naming an unknown item)."""
        try:
            rows = [self._row[i] for i in item_ids]
        except KeyError as e:
            raise KeyError(f"{self.root}: item {e.args[0]!r} is not in the vision feature cache") from None
        return _from_numpy(self._x[rows], self.dtype_name)


def build_vision_cache(dataset, model, cache_root: str | os.PathLike, *, batch_size: int = 32,
                       item_ids: Sequence[str] | None = None, dtype: torch.dtype = torch.float32) -> VisionCache:
    """Encode every item image once with ``model``'s (frozen) vision tower; reuse a complete
    cache of the same tower and items.

    Args:
        dataset: the loaded dataset (items need an image; a missing one is a DataError).
        model: a :class:`~pgen_engine.models.janus.JanusModel` (its ``image_size`` sets the input side).
        cache_root: the folder under which ``vision_<fingerprint>`` is written (atomically:
            staged, then renamed).
        batch_size: images per tower forward.
        item_ids: restrict to these items (default: all, in dataset order).
        dtype: storage dtype: the dtype the model trains in (float32, bfloat16 or float16).
            The tower's outputs (computed in ``model``'s dtype) are rounded to it once here,
            as :meth:`~pgen_engine.models.janus.JanusModel.embed_inputs` would round them
            before the aligner; a cache of another dtype is rebuilt.
    """
    fp = vision_fingerprint(model.vision_model)
    root = Path(cache_root) / f"vision_{fp}"
    ids = list(dataset.items) if item_ids is None else [str(i) for i in item_ids]
    name = _dtype_name(dtype)
    images = images_signature(dataset, ids)  # the same ids may name other images (another dataset)
    try:
        cache = VisionCache.open(root, fp)
        if cache.item_ids == ids and cache.dtype_name == name and cache.index.get("images") == images:
            return cache
    except DataError:
        pass
    size = int(model.image_size)
    stage = root.parent / f".{root.name}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    out = None
    try:
        for lo in range(0, len(ids), batch_size):
            chunk = ids[lo:lo + batch_size]
            imgs = []
            for i in chunk:
                item = dataset.items[i]
                if item.image_path is None:
                    raise DataError(f"item {i!r} has no image (pixels history needs every history image)")
                imgs.append(load_image(item.image_path, size))
            feats = _to_numpy(encode_items(model, torch.from_numpy(np.stack(imgs)), batch_size), name)
            if out is None:  # blocks reserved up front: a full disk is an error naming the file, not a SIGBUS
                shape = (max(len(ids), 1), *feats.shape[1:])
                allocate_file(stage / "features.bin", int(np.prod(shape)) * np.dtype(_STORAGE[name][0]).itemsize)
                out = np.memmap(stage / "features.bin", dtype=_STORAGE[name][0], mode="r+", shape=shape)
            out[lo:lo + len(chunk)] = feats
        if out is None:
            raise DataError(f"{dataset.root}: no items to encode")
        out.flush()
        shape = out.shape[1:]
        del out
        atomic_write_json(stage / "index.json", {"format": FORMAT, "version": VERSION, "fingerprint": fp,
                                                 "item_ids": ids, "images": images,
                                                 "num_tokens": int(shape[0]), "dim": int(shape[1]),
                                                 "dtype": name,
                                                 "image_size": size, "complete": True})
        replace_dir(stage, root)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return VisionCache.open(root, fp)


class VisionFeatureCache:
    """In-memory (item, weights version) -> vision-tower output, for a live model.

    ``version`` is a callable returning the tower's current weights version: a constant
    for a frozen tower, the optimizer step count for a trainable one. :meth:`features`
    encodes only the items missing for the current version, in one batch, and drops
    entries of older versions.

    Args:
        model: the JanusModel whose ``vision_hidden`` encodes.
        images: ``item ids -> uint8 [n, S, S, 3]`` at the model's ``image_size`` (or, with
            ``encode``, whatever ``encode`` takes).
        version: weights version callable (default: constant, i.e. frozen tower).
        batch_size: images per tower forward.
        encode: ``images(ids)[chunk] -> [n, T_img, D_vision]`` instead of :func:`encode_items`
            on ``model`` (e.g. through a ZeRO-3 engine's forward, which gathers the tower's
            shards). Called without grad; its outputs are stored float32 on the CPU.
    """

    def __init__(self, model, images: Callable[[Sequence[str]], torch.Tensor],
                 version: Callable[[], object] | None = None, batch_size: int = 32,
                 encode: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if batch_size < 1:
            raise ValueError(f"VisionFeatureCache: batch_size={batch_size} must be >= 1")
        self.model, self.images, self.batch_size, self.encode = model, images, batch_size, encode
        self.version = version or (lambda: 0)
        self._feats: dict[str, torch.Tensor] = {}
        self._version: object = None
        self.encoded = 0  # items encoded so far (tests / benchmarks count re-encodes)

    def features(self, item_ids: Sequence[str]) -> torch.Tensor:
        """float32 ``[n, T_img, D_vision]`` for ``item_ids`` (duplicates encoded once)."""
        v = self.version()
        if v != self._version:
            self._feats.clear()
            self._version = v
        missing = [i for i in dict.fromkeys(item_ids) if i not in self._feats]
        if missing:
            imgs = self.images(missing)
            if self.encode is None:
                f = encode_items(self.model, imgs, self.batch_size)
            else:
                with torch.no_grad():
                    f = torch.cat([self.encode(imgs[lo:lo + self.batch_size]).float().cpu()
                                   for lo in range(0, len(missing), self.batch_size)])
                if f.shape[0] != len(missing) or f.ndim != 3:
                    raise ValueError(f"VisionFeatureCache: encode gave {tuple(f.shape)} for {len(missing)} images, "
                                     "expected [n, T_img, D_vision]")
            self._feats.update(zip(missing, f))
            self.encoded += len(missing)
        return torch.stack([self._feats[i] for i in item_ids])
