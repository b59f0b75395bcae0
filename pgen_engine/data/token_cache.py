"""Image-token cache: every item image tokenized once, stored memory-mapped.

Folder layout (``cache_dir``)::

    codes.bin    int16 (K <= 32767) or int32 codes, C-order ``[num_items, T]``
    done.bin     uint8 ``[num_items]``: 0 not yet, 1 done, 2 skipped (missing/corrupt image)
    index.json   fingerprint, dtype, num_tokens, codebook_size, image_size, item_ids,
                 images (:func:`images_signature`), skipped {item_id: reason}, complete

While building, everything lives in a sibling staging folder ``.<name>.partial``; codes
are flushed before their done-bits, so a crash loses at most one batch and a rerun with
the same items and tokenizer continues where it stopped. Only a complete build is moved
into ``cache_dir`` (old cache renamed aside first), so a failed run never touches an
existing cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..io_utils import allocate_file, atomic_path, atomic_write_json, folder_problem, replace_dir
from ..models.image_tokenizer import ImageTokenizer
from .dataset import IMAGE_DECODE_RULE, ITEMS_FILE, DataError, Dataset, load_image

FORMAT = "pgen-token-cache"
VERSION = 1
PENDING, DONE, SKIPPED = 0, 1, 2


def _staging(cache_dir: Path) -> Path:
    return cache_dir.parent / f".{cache_dir.name}.partial"


def _code_dtype(codebook_size: int) -> str:
    return "int16" if codebook_size <= np.iinfo(np.int16).max + 1 else "int32"


def _index(tokenizer: ImageTokenizer, item_ids: list[str], images: str) -> dict:
    return {"format": FORMAT, "version": VERSION, "fingerprint": tokenizer.fingerprint(),
            "dtype": _code_dtype(tokenizer.codebook_size), "num_tokens": tokenizer.num_tokens,
            "codebook_size": tokenizer.codebook_size, "image_size": tokenizer.image_size,
            "item_ids": item_ids, "images": images, "skipped": {}, "complete": False}


def images_signature(dataset: Dataset, item_ids: Sequence[str]) -> str:
    """sha1 over the image decoding rule and each item's image file (resolved path, size,
    mtime), in ``item_ids`` order.

    Item ids alone do not identify the images: two datasets (e.g. synthetic ones with other
    seeds) share ids, and an image can be replaced in place. A cache whose signature differs
    is rebuilt instead of serving another dataset's codes. Stat only, so reuse stays cheap.
    """
    h = hashlib.sha1(f"decode rule {IMAGE_DECODE_RULE}\n".encode())
    for i in item_ids:
        path = dataset.items[i].image_path
        try:
            st = os.stat(path) if path is not None else None
        except OSError:
            st = None
        size, mtime = (st.st_size, st.st_mtime_ns) if st is not None else (-1, -1)
        h.update(f"{i}\0{path}\0{size}\0{mtime}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _read_index(d: Path) -> dict | None:
    try:
        return json.loads((d / "index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _sized(f: Path, nbytes: int) -> bool:
    return f.is_file() and f.stat().st_size == nbytes


def _damage(root: Path, idx: dict) -> str | None:
    """What is wrong with the files of a complete cache ``root`` (index ``idx``), or None.

    Checks the sizes of ``codes.bin`` / ``done.bin``, that every done-bit is 1 (done) or 2
    (skipped, listed in ``skipped``) and that every code lies in ``[0, codebook_size)``: a
    truncated, overwritten or hand-edited cache must not reach the model as wrong codes.
    """
    try:
        n, t = max(len(idx["item_ids"]), 1), int(idx["num_tokens"])
        dtype, k = np.dtype(idx["dtype"]), int(idx["codebook_size"])
    except (KeyError, TypeError, ValueError) as e:
        return f"{root}/index.json: malformed token cache index ({e!r})"
    for name, expect in (("codes.bin", n * t * dtype.itemsize), ("done.bin", n)):
        f = root / name
        size = f.stat().st_size if f.is_file() else -1
        if size != expect:
            return f"{f}: size {size} bytes, expected {expect}; the cache is corrupt"
    if not idx["item_ids"]:
        return None
    done = np.fromfile(root / "done.bin", dtype=np.uint8)[:len(idx["item_ids"])]
    skipped = set(idx.get("skipped") or {})
    bad = [i for i, d in zip(idx["item_ids"], done.tolist()) if d != DONE and not (d == SKIPPED and i in skipped)]
    if bad:
        return f"{root}/done.bin: item {bad[0]!r} (and {len(bad) - 1} more) not marked done in a complete cache"
    codes = np.memmap(root / "codes.bin", dtype=dtype, mode="r", shape=(n, t))[done == DONE]
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= k):
        return (f"{root}/codes.bin: codes in [{int(codes.min())}, {int(codes.max())}], expected [0, {k}); "
                "the cache is corrupt")
    return None


def build_token_cache(
    dataset: Dataset,
    tokenizer: ImageTokenizer,
    cache_dir: str | os.PathLike,
    *,
    batch_size: int = 64,
    progress: bool = True,
    on_error: str = "raise",
    item_ids: Sequence[str] | None = None,
    _stop_after_batches: int | None = None,
) -> "TokenCache":
    """Tokenize every item image once (resized/centre-cropped to ``tokenizer.image_size``, RGB).

    Args:
        dataset: the loaded dataset (items without an image are errors / skipped).
        tokenizer: any :class:`ImageTokenizer`; its ``fingerprint()`` keys the cache.
        cache_dir: the cache folder (created, or replaced on success when it holds a token cache;
            any other non-empty folder is refused with DataError).
        batch_size: images per ``tokenizer.encode`` call.
        progress: show a tqdm bar.
        on_error: "raise" -> a missing/corrupt image raises :class:`DataError` naming it;
            "skip" -> the item is marked skipped, counted and warned about.
        item_ids: restrict to these items (default: all items, in dataset order).
        _stop_after_batches: testing hook that simulates a crash after that many batches.

    Returns the opened cache. An existing complete cache with the same fingerprint and
    items is reused as is; one whose files are damaged (sizes, done-bits, codes out of
    range) is rebuilt with a warning, as is a staging folder whose files have the wrong size.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cache_dir = Path(cache_dir)
    ids = list(dataset.items) if item_ids is None else [str(i) for i in item_ids]
    unknown = [i for i in ids if i not in dataset.items]
    if unknown:
        raise KeyError(f"item ids not in the dataset: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    if len(set(ids)) != len(ids):
        raise ValueError("item_ids contains duplicates")
    problem = folder_problem(cache_dir)
    if problem is not None:  # found only when the finished cache was moved in: after every image was encoded
        raise DataError(f"{cache_dir}: {problem} (expected the token cache folder); nothing encoded")
    if cache_dir.is_dir() and any(cache_dir.iterdir()) and (_read_index(cache_dir) or {}).get("format") != FORMAT:
        # the cache replaces the folder: never a dataset, its images or any other non-cache folder
        raise DataError(f"{cache_dir}: exists and is not a token cache (no {FORMAT} index.json); not replacing it: "
                        "choose an empty or new folder")
    fp = tokenizer.fingerprint()
    images = images_signature(dataset, ids)
    existing = _read_index(cache_dir)
    if existing and existing.get("format") == FORMAT and existing.get("version") == VERSION \
            and existing.get("complete") and existing.get("fingerprint") == fp and existing.get("item_ids") == ids \
            and existing.get("images") == images:
        problem = _damage(cache_dir, existing)
        if problem is None:  # every check TokenCache.open makes has passed: no second read of codes.bin
            return TokenCache(cache_dir, existing)
        # a damaged cache of the right key is rebuilt (in staging; it is replaced only on success)
        warnings.warn(f"{problem}; rebuilding the token cache", stacklevel=2)

    stage = _staging(cache_dir)
    want = _index(tokenizer, ids, images)
    idx = _read_index(stage)
    keys = ("format", "version", "fingerprint", "dtype", "num_tokens", "item_ids", "images")
    n, t = len(ids), tokenizer.num_tokens
    if idx is None or any(idx.get(k) != want[k] for k in keys) \
            or not _sized(stage / "codes.bin", max(n, 1) * t * np.dtype(want["dtype"]).itemsize) \
            or not _sized(stage / "done.bin", max(n, 1)):
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        try:
            allocate_file(stage / "codes.bin", max(n, 1) * t * np.dtype(want["dtype"]).itemsize)
            allocate_file(stage / "done.bin", max(n, 1))
            atomic_write_json(stage / "index.json", want)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)  # nothing encoded yet: nothing to resume, no stray folder
            raise
        idx = want
    codes = np.memmap(stage / "codes.bin", dtype=want["dtype"], mode="r+", shape=(max(n, 1), t))
    done = np.memmap(stage / "done.bin", dtype=np.uint8, mode="r+", shape=(max(n, 1),))
    skipped: dict[str, str] = dict(idx.get("skipped", {}))
    for j in np.flatnonzero(done[:n] == SKIPPED).tolist():  # a crash between a skip's done-bit and
        if ids[j] not in skipped:  # index.json: the item is retried, not lost
            done[j] = PENDING
    todo = np.flatnonzero(done[:n] == PENDING).tolist()
    bar = None
    if progress:
        bar = tqdm(total=n, initial=n - len(todo), desc="tokenizing images", unit="img")
    batches = 0
    try:
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            imgs, rows = [], []
            for j in chunk:
                item = dataset.items[ids[j]]
                try:
                    if item.image_path is None:
                        raise DataError(f"{dataset.root / ITEMS_FILE}: item {item.item_id!r} has no image (\"image\": "
                                        "null); every item needs one to be tokenized")
                    imgs.append(load_image(item.image_path, tokenizer.image_size))
                    rows.append(j)
                except DataError as e:
                    if on_error == "raise":
                        raise
                    skipped[ids[j]] = str(e)
                    done[j] = SKIPPED
            if rows:
                out = tokenizer.encode(torch.from_numpy(np.stack(imgs)))
                codes[rows] = out.numpy().astype(want["dtype"])
                codes.flush()  # codes reach the file before their done-bits
                done[rows] = DONE
            done.flush()
            if skipped != idx.get("skipped", {}):
                idx = {**idx, "skipped": skipped}
                atomic_write_json(stage / "index.json", idx)
            if bar is not None:
                bar.update(len(chunk))
            batches += 1
            if _stop_after_batches is not None and batches >= _stop_after_batches:
                raise KeyboardInterrupt("simulated crash (_stop_after_batches)")
    finally:
        if bar is not None:
            bar.close()
        del codes, done
    if skipped:
        warnings.warn(f"{cache_dir}: skipped {len(skipped)} item(s) with missing/corrupt images "
                      f"(first: {next(iter(skipped.values()))})", stacklevel=2)
    final = {**idx, "skipped": skipped, "complete": True}
    problem = _damage(stage, final)
    if problem is not None:  # never replace a cache (maybe a good one) with a staging folder that would not open
        raise DataError(f"{problem}; delete {stage} and rerun")
    atomic_write_json(stage / "index.json", final)
    replace_dir(stage, cache_dir)
    return TokenCache(cache_dir, final)  # its files passed _damage above: no second read of codes.bin


class TokenCache:
    """Read-only view of a complete cache; ``codes(item_ids) -> LongTensor [N, T]``."""

    def __init__(self, root: Path, index: dict):
        self.root = root
        self.index = index
        self.fingerprint: str = index["fingerprint"]
        self.num_tokens: int = int(index["num_tokens"])
        self.codebook_size: int = int(index["codebook_size"])
        self.image_size: int = int(index["image_size"])
        self.item_ids: list[str] = list(index["item_ids"])
        self.skipped: dict[str, str] = dict(index.get("skipped", {}))
        self._row = {iid: j for j, iid in enumerate(self.item_ids)}
        n = max(len(self.item_ids), 1)
        self._codes = np.memmap(root / "codes.bin", dtype=index["dtype"], mode="r", shape=(n, self.num_tokens))
        self._done = np.memmap(root / "done.bin", dtype=np.uint8, mode="r", shape=(n,))

    @classmethod
    def open(cls, cache_dir: str | os.PathLike, tokenizer_fingerprint: str) -> "TokenCache":
        """Open ``cache_dir``; refuses a cache built by another tokenizer or left incomplete."""
        root = Path(cache_dir)
        idx = _read_index(root)
        if idx is None or idx.get("format") != FORMAT:
            raise DataError(f"{root}: not a token cache (no valid index.json)")
        if idx.get("version") != VERSION:
            raise DataError(f"{root}: token cache version {idx.get('version')} is not supported (expected {VERSION})")
        if idx["fingerprint"] != tokenizer_fingerprint:
            raise DataError(f"{root}: cache was built by tokenizer {idx['fingerprint']}, not by the requested "
                            f"tokenizer {tokenizer_fingerprint}; rebuild it (pgen data tokenize) or point elsewhere")
        if not idx.get("complete"):
            raise DataError(f"{root}: token cache is incomplete; rerun the build to finish it")
        problem = _damage(root, idx)
        if problem is not None:
            raise DataError(f"{problem}; delete {root} and rerun to rebuild it")
        return cls(root, idx)

    def __len__(self) -> int:
        return len(self.item_ids) - len(self.skipped)

    def __contains__(self, item_id: str) -> bool:
        j = self._row.get(item_id)
        return j is not None and self._done[j] == DONE

    def codes(self, item_ids: Sequence[str]) -> torch.Tensor:
        """int64 ``[len(item_ids), T]``; KeyError naming the item when absent or skipped."""
        rows = []
        for iid in item_ids:
            j = self._row.get(iid)
            if j is None:
                raise KeyError(f"item {iid!r} is not in the token cache {self.root}")
            if self._done[j] != DONE:
                raise KeyError(f"item {iid!r} has no codes in {self.root}: {self.skipped.get(iid, 'not tokenized')}")
            rows.append(j)
        if not rows:
            return torch.empty(0, self.num_tokens, dtype=torch.long)
        return torch.from_numpy(np.asarray(self._codes[rows], dtype=np.int64))


def cache_features(
    dataset: Dataset,
    encoder: Callable[[torch.Tensor], torch.Tensor],
    path: str | os.PathLike,
    *,
    image_size: int,
    batch_size: int = 32,
    item_ids: Sequence[str] | None = None,
) -> None:
    """Optional: store vision-encoder features of every item image in one safetensors file.

    ``encoder`` maps uint8 ``[B, S, S, 3]`` -> float ``[B, ...]``; the file holds
    ``features [N, ...]`` and metadata ``item_ids`` (JSON list). Written atomically.
    """
    ids = list(dataset.items) if item_ids is None else list(item_ids)
    no_image = [i for i in ids if dataset.items[i].image_path is None]
    if no_image:
        raise DataError(f"items without an image cannot be encoded: {no_image[:5]}")
    feats = []
    for s in range(0, len(ids), batch_size):
        imgs = [load_image(dataset.items[i].image_path, image_size) for i in ids[s:s + batch_size]]
        feats.append(encoder(torch.from_numpy(np.stack(imgs))).detach().cpu())
    with atomic_path(path) as tmp:
        save_file({"features": torch.cat(feats).contiguous()}, str(tmp), metadata={"item_ids": json.dumps(ids)})
