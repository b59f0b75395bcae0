"""The native dataset layout and its loader (the validator of `pgen data validate` is :mod:`.validate`).

A dataset is a folder holding::

    interactions.csv   header ``user_id,item_id,timestamp`` (+ any extra columns, kept);
                       UTF-8 like items.jsonl (a leading byte-order mark, as Excel writes, is fine);
                       one row per interaction. ``timestamp`` is unix seconds (int or
                       float) or ISO-8601 (``2018-03-01T12:00:00``, ``...Z``, offsets;
                       naive times are read as UTC). Within one user, rows must appear in
                       non-decreasing time order (rows of different users may
                       interleave); equal timestamps are ordered by file order, which is
                       the tie-break every downstream step (splits, windows) relies on.
    items.jsonl        one JSON object per line: ``item_id`` (string or int, stored as
                       string), ``title`` (string, may be empty), ``image`` (path relative
                       to the dataset folder, or null), any extra fields (kept in
                       ``Item.extra``). An item with a null image loads, but tokenizing,
                       training and evaluation need an image for every item
                       (``pgen data validate`` reports such items as a problem).
    images/            the item images (any format PIL reads).

Bad input (malformed lines, unknown or duplicate ids, missing images, unparsable or
decreasing timestamps, empty ids) raises :class:`DataError` naming the file and line;
with ``on_error="skip"`` the offending row/item is dropped instead and one warning with
per-kind counts is emitted (also available as ``Dataset.skipped``).
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import json
import math
import os
import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from pgen_engine.errors import PgenUserError

from ..io_utils import atomic_dir

INTERACTIONS_FILE = "interactions.csv"
ITEMS_FILE = "items.jsonl"
IMAGES_DIR = "images"
REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp")
ON_ERROR = ("raise", "skip")


class DataError(PgenUserError, ValueError):
    """Bad dataset input; the message names the file (and line) and what was expected."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One catalogue item.

    Attributes:
        item_id: the id, as a string.
        title: the title ("" when absent).
        image_path: absolute path of the image, or None when the item has no image.
        extra: every other field of its items.jsonl object.
    """

    item_id: str
    title: str
    image_path: Path | None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Interaction:
    """One (user, item, time) event; ``line`` is its 1-based line in interactions.csv."""

    item_id: str
    timestamp: float
    line: int
    extra: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Dataset:
    """A loaded dataset.

    Attributes:
        root: the dataset folder.
        items: item id -> :class:`Item`, in items.jsonl order.
        interactions: user id -> that user's interactions in time order (ties in file
            order), users in order of first appearance.
        skipped: kind of problem -> number of rows/items dropped (``on_error="skip"``).
        skipped_first: kind of problem -> the first such problem's message ("FILE:LINE: ...").
    """

    root: Path
    items: dict[str, Item]
    interactions: dict[str, list[Interaction]]
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped_first: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def num_users(self) -> int:
        return len(self.interactions)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_interactions(self) -> int:
        return sum(len(v) for v in self.interactions.values())

    def time_span(self) -> tuple[float, float] | None:
        """(earliest, latest) timestamp in unix seconds, or None when there is none."""
        ts = [x.timestamp for seq in self.interactions.values() for x in seq]
        return (min(ts), max(ts)) if ts else None

    def item_sequence(self, user_id: str) -> list[str]:
        """The user's item ids in time order."""
        return [x.item_id for x in self.interactions[user_id]]


# unix seconds of 0001-01-01 and 9999-12-31T23:59:59 (datetime's range)
_MIN_UNIX, _MAX_UNIX = -62135596800.0, 253402300799.0


def parse_timestamp(text: str) -> float:
    """Unix seconds (``"964980499"``, ``"1.5e9"``) or ISO-8601 -> float unix seconds.

    Raises ValueError for anything else (including NaN/inf).
    """
    s = text.strip()
    if not s:
        raise ValueError("empty timestamp")
    try:
        v = float(s)
    except ValueError:
        iso = s[:-1] + "+00:00" if s.endswith(("Z", "z")) else s
        d = _dt.datetime.fromisoformat(iso)  # raises ValueError with its own message
        if d.tzinfo is None:
            d = d.replace(tzinfo=_dt.timezone.utc)
        v = d.timestamp()
        if not _MIN_UNIX <= v <= _MAX_UNIX:  # 0001-01-01T00:00+01:00 is in year 0 in UTC
            raise ValueError(f"timestamp {s!r} is outside the years 1..9999 once converted to UTC")
        return v
    if not math.isfinite(v):
        raise ValueError(f"timestamp {s!r} is not finite")
    if not _MIN_UNIX <= v <= _MAX_UNIX:  # outside datetime's years 1..9999: reports could not print it
        raise ValueError(f"timestamp {s!r} is outside the years 1..9999 as unix seconds"
                         + (" (milliseconds? divide by 1000)" if _MIN_UNIX <= v / 1000 <= _MAX_UNIX else ""))
    return v


class _Problems:
    """Raises on the first problem, or counts problems per kind (``on_error="skip"``)."""

    def __init__(self, on_error: str):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.skip = on_error == "skip"
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def __call__(self, kind: str, message: str) -> None:
        if not self.skip:
            raise DataError(message)
        self.counts[kind] += 1
        self.examples.setdefault(kind, message)

    def warn(self, where: Path) -> None:
        if self.counts:
            detail = "; ".join(f"{k}: {n} (first: {self.examples[k]})" for k, n in sorted(self.counts.items()))
            warnings.warn(f"{where}: skipped bad input -- {detail}", stacklevel=3)


def _text_lines(path: Path, f: Iterable[str]) -> Iterator[str]:
    """The lines of the open text file ``f``; a byte that is not UTF-8 raises DataError naming ``path``."""
    try:
        yield from f
    except UnicodeDecodeError as e:
        bad = e.object[e.start:e.start + 1].hex()
        raise DataError(f"{path}: not UTF-8 text ({e.reason}, byte 0x{bad}); re-save it as UTF-8") from None


def _csv_rows(path: Path, reader) -> Iterator[list[str]]:
    """The rows of ``reader``; a line the csv module cannot parse raises DataError naming ``path`` and the line."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
        yield row


def _json_hint(line: str) -> str:
    """What a malformed items.jsonl line most likely is, for the error message ("" when unsure)."""
    s = line.strip()
    if s.startswith("[") or s in ("]", "],"):
        return "; items.jsonl is JSON Lines: one object per line, not a JSON array"
    return "; a trailing comma? each line must be exactly one JSON object" if s.endswith(",") else ""


def _header_hint(header: list[str]) -> str:
    """Why a header lacks the required columns, when it is a common slip ("" when unsure)."""
    lower = {h.lower(): h for h in header}
    if found := [lower[c] for c in REQUIRED_COLUMNS if c not in header and c in lower]:
        return f" (column names are case-sensitive: found {', '.join(map(repr, found))})"
    seps = [sep for sep in (";", "\t", "|") if len(header) == 1 and sep in header[0]]
    return f" (the file must be comma-separated; this header is separated by {seps[0]!r})" if seps else ""


def _load_items(root: Path, problems: _Problems, check_images: bool) -> dict[str, Item]:
    path = root / ITEMS_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing (expected one JSON object per line with item_id, title, image)")
    items: dict[str, Item] = {}
    with open(path, encoding="utf-8-sig") as f:
        for lineno, raw in enumerate(_text_lines(path, f), start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                problems("malformed_item_line", f"{where}: malformed JSON ({e.msg} at column {e.colno}){_json_hint(raw)}")
                continue
            if not isinstance(obj, dict):
                problems("malformed_item_line", f"{where}: expected a JSON object, got {type(obj).__name__}")
                continue
            iid = obj.pop("item_id", None)
            if isinstance(iid, bool) or not isinstance(iid, (str, int)) or str(iid).strip() == "":
                problems("missing_item_id", f"{where}: 'item_id' must be a non-empty string or int, got {iid!r}")
                continue
            iid = str(iid).strip()
            if iid in items:
                problems("duplicate_item_id", f"{where}: duplicate item_id {iid!r}")
                continue
            title = obj.pop("title", "")
            if title is None:
                title = ""
            if not isinstance(title, str):
                problems("bad_title", f"{where}: 'title' must be a string, got {type(title).__name__}")
                continue
            image = obj.pop("image", None)
            image_path = None
            if image is not None:
                if not isinstance(image, str) or not image.strip():
                    problems("bad_image_field", f"{where}: 'image' must be a relative path string or null, got {image!r}")
                    continue
                image_path = (root / image).resolve() if not os.path.isabs(image) else Path(image)
                if check_images and not image_path.is_file():
                    hint = "; use '/' as the path separator" if "\\" in image else ""
                    problems("missing_image", f"{where}: image file {image_path} of item {iid!r} does not exist{hint}")
                    continue
            items[iid] = Item(iid, title, image_path, obj)
    return items


def _load_interactions(root: Path, items: dict[str, Item], problems: _Problems) -> dict[str, list[Interaction]]:
    path = root / INTERACTIONS_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing (expected a CSV with header {','.join(REQUIRED_COLUMNS)})")
    out: dict[str, list[Interaction]] = {}
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(_text_lines(path, f))
        rows = _csv_rows(path, reader)
        try:
            header = next(rows)
        except StopIteration:
            raise DataError(f"{path}:1: empty file (expected header {','.join(REQUIRED_COLUMNS)})") from None
        header = [h.strip() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DataError(f"{path}:1: header {header} lacks column(s) {missing}{_header_hint(header)}; expected "
                            f"{','.join(REQUIRED_COLUMNS)} (+ any extra columns)")
        if len(set(header)) != len(header):
            raise DataError(f"{path}:1: duplicate column names in header {header}")
        iu, ii, it = (header.index(c) for c in REQUIRED_COLUMNS)
        extra_cols = [(j, h) for j, h in enumerate(header) if h not in REQUIRED_COLUMNS]
        for row in rows:
            lineno = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            where = f"{path}:{lineno}"
            if len(row) != len(header):
                problems("malformed_interaction_line", f"{where}: expected {len(header)} fields, got {len(row)}")
                continue
            if any("\0" in v for v in row):  # the csv module keeps NUL bytes: "414\0" was a user of its own
                problems("malformed_interaction_line", f"{where}: NUL byte in a field (binary data in a text file; "
                         "expected UTF-8 text)")
                continue
            uid, iid = row[iu].strip(), row[ii].strip()
            if not uid:
                problems("empty_user_id", f"{where}: empty user_id")
                continue
            if iid not in items:
                problems("unknown_item_id", f"{where}: item_id {iid!r} is not in {ITEMS_FILE} (or was dropped)")
                continue
            try:
                ts = parse_timestamp(row[it])
            except ValueError as e:
                problems("bad_timestamp", f"{where}: unparsable timestamp {row[it]!r} "
                         f"(expected unix seconds or ISO-8601): {e}")
                continue
            seq = out.setdefault(uid, [])
            if seq and ts < seq[-1].timestamp:
                problems("non_monotonic_timestamp", f"{where}: timestamp {row[it]!r} of user {uid!r} is earlier than "
                         f"the user's previous row (line {seq[-1].line}); rows of a user must be in time order")
                continue
            seq.append(Interaction(iid, ts, lineno, {h: row[j] for j, h in extra_cols}))
    # A user whose every row was dropped would otherwise linger as an empty history.
    return {u: s for u, s in out.items() if s}


def load_dataset(root: str | os.PathLike, *, on_error: str = "raise", check_images: bool = True) -> Dataset:
    """Load a dataset folder in the native layout (see the module docstring).

    Args:
        root: the dataset folder.
        on_error: "raise" -> the first bad row raises :class:`DataError`; "skip" -> bad
            rows/items are dropped, counted in ``Dataset.skipped`` and warned about once.
        check_images: check that every item's image file exists (cheap; does not decode).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected a dataset folder with {INTERACTIONS_FILE}, {ITEMS_FILE})")
    problems = _Problems(on_error)
    items = _load_items(root, problems, check_images)
    interactions = _load_interactions(root, items, problems)
    problems.warn(root)
    return Dataset(root, items, interactions, dict(problems.counts), dict(problems.examples))


# ---------------------------------------------------------------------------- images

def filter_by_rating(dataset: Dataset, min_rating: float, column: str = "rating") -> Dataset:
    """Keep only interactions whose ``column`` is >= ``min_rating`` (what counts as a positive).

    Raises :class:`DataError` naming interactions.csv when the column is absent or a value
    is not a number.
    """
    path = dataset.root / INTERACTIONS_FILE
    out: dict[str, list[Interaction]] = {}
    for uid, seq in dataset.interactions.items():
        keep = []
        for x in seq:
            if column not in x.extra:
                raise DataError(f"{path}:{x.line}: no {column!r} column (needed for a rating threshold)")
            try:
                r = float(x.extra[column])
            except ValueError:
                r = math.nan
            if not math.isfinite(r):  # a NaN rating would silently count as "not positive"
                raise DataError(f"{path}:{x.line}: {column} {x.extra[column]!r} is not a finite number") from None
            if r >= min_rating:
                keep.append(x)
        if keep:
            out[uid] = keep
    return dataclasses.replace(dataset, interactions=out)


def tied_timestamps(dataset: Dataset) -> list[Interaction]:
    """Interactions whose timestamp equals the same user's previous interaction's (file order)."""
    return [x for seq in dataset.interactions.values() for prev, x in zip(seq, seq[1:]) if x.timestamp == prev.timestamp]


# Bumped whenever the pixels an image file decodes to change (the token / vision caches key on
# it, so they rebuild once instead of serving codes of the old rule).
# 2: EXIF orientation applied; transparent pixels composited onto white.
IMAGE_DECODE_RULE = 2


_T = Image.Transpose  # EXIF orientation tag -> the transpose that shows the image upright
_ORIENTATION = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE, 6: _T.ROTATE_270,
                7: _T.TRANSVERSE, 8: _T.ROTATE_90}


def _upright(im):
    """``im`` with its EXIF orientation applied: the pixels of ``ImageOps.exif_transpose``.

    That function also re-serialises the EXIF block without the tag, and a malformed tag in an
    image that decodes fine made it raise ``struct.error`` (a traceback from `pgen data tokenize`,
    while `pgen data validate` said OK). Only the pixels are needed here; an EXIF block PIL cannot
    parse gives no orientation, and the image is taken as stored, as image viewers show it."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # PIL's EXIF parser raises many types (struct.error, SyntaxError, ...) for bad blocks
        orientation = 1
    method = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return im.transpose(method) if method is not None else im


def _to_rgb(im):
    """PIL image -> upright RGB PIL image.

    - EXIF orientation is applied: a phone photo stored sideways with an orientation tag is
      shown upright by every viewer, so it must be tokenized upright too.
    - Transparency (RGBA, LA, PA, or a palette / RGB image with a transparent colour) is
      composited onto white, as a poster or product shot is seen on a page. ``convert("RGB")``
      would drop the alpha channel and keep whatever colour the transparent pixels happen to
      store (often black).
    - 16/32-bit grayscale is scaled to 8 bits, not clipped: PIL's own ``convert("RGB")`` clips
      "I;16"/"I" pixels at 255, which turns a 16-bit grayscale PNG almost entirely white.
    """
    im.load()
    im = _upright(im)
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.int64)
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = np.clip(a, 0, 65535) // 257  # 16-bit range -> 8-bit
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def fit_square(im, size: int) -> np.ndarray:
    """PIL image -> RGB uint8 ``[size, size, 3]``: the shorter side resized to ``size``
    (bicubic), then the centre square cropped. The one resize rule for dataset and history images."""
    im = _to_rgb(im)
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8).copy()


def load_image(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """Read an image as RGB uint8 ``[H, W, 3]``.

    With ``size``, :func:`fit_square` gives ``[size, size, 3]``. Raises :class:`DataError`
    naming the file when it is missing or cannot be decoded.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            arr = fit_square(im, size) if size is not None else np.asarray(_to_rgb(im), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: image file does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: corrupt or unreadable image ({e})") from None
    return arr.copy()


# ---------------------------------------------------------------------------- writing

def write_dataset(
    out: str | os.PathLike,
    items: Iterable[dict[str, Any]],
    interactions: Iterable[tuple[str, str, float | int | str]],
    *,
    image_files: dict[str, tuple[str, bytes | os.PathLike]] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a dataset in the native layout, atomically (the folder appears complete or not at all).

    Args:
        out: the dataset folder to create (replaced if it holds a dataset; any other non-empty
            folder is refused with :class:`DataError`).
        items: JSON-able dicts with at least ``item_id``, ``title``, ``image`` (relative path or None).
        interactions: (user_id, item_id, timestamp) rows, already in time order per user.
        image_files: relative path -> (``"bytes"``, data) or (``"copy"``, source path).
        extra_files: relative path -> text content (e.g. ground_truth.jsonl).
    """
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not (out / ITEMS_FILE).is_file():
        # the new dataset replaces the folder: only ever an earlier dataset
        raise DataError(f"{out}: exists and is not a dataset (no {ITEMS_FILE}); not replacing it: choose an empty "
                        "or new folder")
    with atomic_dir(out) as tmp:
        with open(tmp / ITEMS_FILE, "w", encoding="utf-8") as f:
            for obj in items:
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        with open(tmp / INTERACTIONS_FILE, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(REQUIRED_COLUMNS)
            for row in interactions:
                w.writerow(row)
        (tmp / IMAGES_DIR).mkdir(exist_ok=True)
        for rel, (how, src) in (image_files or {}).items():
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if how == "bytes":
                dst.write_bytes(src)  # type: ignore[arg-type]
            elif how == "copy":
                shutil.copyfile(src, dst)
            else:
                raise ValueError(f"image_files[{rel!r}]: mode must be 'bytes' or 'copy', got {how!r}")
        for rel, text in (extra_files or {}).items():
            (tmp / rel).write_text(text, encoding="utf-8")
    return out
