"""Converters from public dataset formats to the native layout (see ``dataset.py``).

* Amazon Reviews 2023: a reviews JSONL (``user_id``, ``parent_asin``, ``timestamp`` in
  milliseconds) and a meta JSONL (``parent_asin``, ``title``, ``images`` list); item
  images are local files named by asin (``<asin>.jpg|.jpeg|.png|.webp``, or upper case) in a folder.
* MicroLens / PixelRec: an interactions CSV with ``user,item,timestamp`` and a cover
  folder with ``<item>.jpg``.

Items without a local image and interactions on such items are dropped (counted in the
returned stats). Interactions are sorted per user by time (stable: ties keep input
order). Output is written atomically.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from .dataset import _MAX_UNIX, _MIN_UNIX, DataError, _csv_rows, _text_lines, parse_timestamp, write_dataset

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def _check_file_key(key: str, where: str, field: str) -> None:
    """An item id names its image file (``<id>.jpg``) in the source folder and in the output's
    ``images/``: one that is not a plain file name (a path separator, ``.`` / ``..``, a NUL, or
    too long for a file system) could read or write outside those folders, so it is refused."""
    if key in (".", "..") or any(c in key for c in "/\\\0") or len(key.encode("utf-8", "surrogatepass")) > 250:
        raise DataError(f"{where}: {field} {key!r} cannot name an image file (expected a plain file name: no '/', "
                        "'\\', NUL, '.' or '..', at most 250 bytes)")


_NUL = "NUL byte in a field (binary data in a text file; expected UTF-8 text)"  # as the dataset loader says


def _find_image(folder: Path, key: str) -> Path | None:
    """``folder/<key>.<ext>`` for an ext of IMAGE_EXTS, lower or upper case (cameras and Windows
    tools write ``.JPG``: such covers used to be missed and their items dropped)."""
    for ext in IMAGE_EXTS:
        for e in (ext, ext.upper()):
            p = folder / f"{key}{e}"
            if p.is_file():
                return p
    return None


def _read_jsonl(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(_text_lines(path, f), 1):
            if not line.strip():
                continue
            if "\0" in line:  # json.loads said only "Invalid control character" / "Extra data"
                raise DataError(f"{path}:{lineno}: {_NUL.replace('a field', 'the line')}")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, obj


def _finish(out: Path, items: dict[str, dict], events: list[tuple[str, str, float, int]],
            images: dict[str, Path], nothing_left: str) -> dict[str, int]:
    if not events:  # an empty dataset used to be written (exit 0) when no item had an image
        raise DataError(f"{nothing_left} (looked for <id>{'|'.join(IMAGE_EXTS)}); nothing written")
    events.sort(key=lambda e: (e[0], e[2], e[3]))
    used = {e[1] for e in events}
    items_out = [obj for iid, obj in items.items() if iid in used]
    rows = [(u, i, int(t) if float(t).is_integer() else t) for u, i, t, _ in events]
    files = {obj["image"]: ("copy", images[obj["item_id"]]) for obj in items_out}
    write_dataset(out, items_out, rows, image_files=files)
    return {"users": len({e[0] for e in events}), "items": len(items_out), "interactions": len(rows)}


def convert_amazon2023(reviews: str | os.PathLike, meta: str | os.PathLike, images: str | os.PathLike,
                       out: str | os.PathLike) -> dict[str, int]:
    """Amazon Reviews 2023 -> native layout at ``out``; returns counts (incl. dropped)."""
    reviews, meta, images, out = Path(reviews), Path(meta), Path(images), Path(out)
    if not images.is_dir():
        raise DataError(f"{images}: image folder does not exist")
    items: dict[str, dict] = {}
    paths: dict[str, Path] = {}
    dropped_items = 0
    for lineno, obj in _read_jsonl(meta):
        asin = obj.get("parent_asin")
        if not isinstance(asin, str) or not asin:
            raise DataError(f"{meta}:{lineno}: missing 'parent_asin'")
        if asin in items:
            raise DataError(f"{meta}:{lineno}: duplicate parent_asin {asin!r}")
        _check_file_key(asin, f"{meta}:{lineno}", "parent_asin")
        img = _find_image(images, asin)
        if img is None:
            dropped_items += 1
            continue
        paths[asin] = img
        extra = {k: v for k, v in obj.items() if k in ("main_category", "categories", "store", "average_rating")}
        items[asin] = {"item_id": asin, "title": str(obj.get("title") or ""), "image": f"images/{asin}{img.suffix}",
                       **extra}
    events: list[tuple[str, str, float, int]] = []
    dropped = 0
    for lineno, obj in _read_jsonl(reviews):
        for k in ("user_id", "parent_asin", "timestamp"):
            if k not in obj:
                raise DataError(f"{reviews}:{lineno}: missing field {k!r}")
        user = obj["user_id"]
        if isinstance(user, bool) or not isinstance(user, (str, int)) or not str(user).strip():
            raise DataError(f"{reviews}:{lineno}: 'user_id' must be a non-empty string, got {user!r}")
        if "\0" in str(user):  # a "\u0000" escape: written out, the dataset loader refuses the line
            raise DataError(f"{reviews}:{lineno}: 'user_id' {user!r}: {_NUL}")
        try:
            ts = float(obj["timestamp"]) / 1000.0
        except (TypeError, ValueError):
            ts = math.nan
        if isinstance(obj["timestamp"], bool) or not _MIN_UNIX <= ts <= _MAX_UNIX:  # NaN fails this too
            raise DataError(f"{reviews}:{lineno}: timestamp {obj['timestamp']!r} is not milliseconds") from None
        if obj["parent_asin"] not in items:
            dropped += 1
            continue
        events.append((str(user).strip(), obj["parent_asin"], ts, lineno))
    stats = _finish(out, items, events, paths, f"{reviews}: no review is of an item of {meta} with an image in {images}")
    return {**stats, "dropped_items": dropped_items, "dropped_interactions": dropped}


def convert_microlens(interactions: str | os.PathLike, covers: str | os.PathLike,
                      out: str | os.PathLike) -> dict[str, int]:
    """MicroLens/PixelRec ``user,item,timestamp`` CSV + cover folder -> native layout."""
    interactions, covers, out = Path(interactions), Path(covers), Path(out)
    if not interactions.is_file():
        raise DataError(f"{interactions}: file does not exist")
    if not covers.is_dir():
        raise DataError(f"{covers}: cover folder does not exist")
    items: dict[str, dict] = {}
    paths: dict[str, Path] = {}
    missing: set[str] = set()
    events: list[tuple[str, str, float, int]] = []
    dropped = 0
    with open(interactions, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(_text_lines(interactions, f))
        rows = _csv_rows(interactions, reader)
        header = [h.strip() for h in next(rows, [])]
        if any("\0" in h for h in header):
            raise DataError(f"{interactions}:1: {_NUL}")
        if header[:3] != ["user", "item", "timestamp"]:
            raise DataError(f"{interactions}:1: header must start with user,item,timestamp, got {header}")
        for row in rows:
            lineno = reader.line_num
            if not row:
                continue
            if any("\0" in v for v in row):  # the csv module keeps NUL bytes: "u\0" was written out as a user
                raise DataError(f"{interactions}:{lineno}: {_NUL}")
            if len(row) < 3:
                raise DataError(f"{interactions}:{lineno}: expected >= 3 fields, got {len(row)}")
            u, i = row[0].strip(), row[1].strip()
            if not u or not i:
                raise DataError(f"{interactions}:{lineno}: empty {'user' if not u else 'item'} id")
            text = row[2].strip()
            try:
                if float(text) > 1e11:  # MicroLens stores milliseconds
                    text = repr(float(text) / 1000.0)
            except ValueError:
                pass  # ISO-8601 or garbage: parse_timestamp says which
            try:
                ts = parse_timestamp(text)
            except ValueError as e:
                raise DataError(f"{interactions}:{lineno}: bad timestamp {row[2]!r} ({e})") from None
            if i not in items and i not in missing:
                _check_file_key(i, f"{interactions}:{lineno}", "item")
                img = _find_image(covers, i)
                if img is None:
                    missing.add(i)
                else:
                    paths[i] = img
                    items[i] = {"item_id": i, "title": "", "image": f"images/{i}{img.suffix}"}
            if i in missing:
                dropped += 1
                continue
            events.append((u, i, ts, lineno))
    stats = _finish(out, items, events, paths, f"{interactions}: no interaction is of an item with a cover in {covers}")
    return {**stats, "dropped_items": len(missing), "dropped_interactions": dropped}
