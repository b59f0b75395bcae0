"""``pgen data validate``: load a dataset leniently and report everything wrong with it.

:func:`validate_dataset` never raises for bad content: every problem (bad rows, missing or
corrupt images, no usable interactions) becomes a line of the :class:`ValidationReport`,
each bad-row kind with the file:line of its first occurrence.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import warnings
from pathlib import Path

from PIL import Image

from .dataset import (INTERACTIONS_FILE, ITEMS_FILE, DataError, Dataset, Interaction, load_dataset, load_image,
                      tied_timestamps)
from .splits import DEFAULT_MIN_INTERACTIONS, SPLIT_MIN_INTERACTIONS


def verify_image(path: str | os.PathLike) -> None:
    """PIL's structural check of an image file, without decoding its pixels (~0.03 ms against
    ~0.8 ms for :func:`~pgen_engine.data.dataset.load_image` on a 185 x 278 JPEG): catches a
    file that is not an image, an unknown format or a broken PNG chunk, not a JPEG cut short.

    Raises :class:`DataError` worded as ``load_image``'s (``PATH: corrupt or unreadable image (why)``).
    """
    try:
        with Image.open(path) as im:
            im.verify()
    except FileNotFoundError:
        raise DataError(f"{path}: image file does not exist") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataError(f"{path}: corrupt or unreadable image ({' '.join(str(e).split()) or type(e).__name__})") from None


@dataclasses.dataclass
class ValidationReport:
    """What ``pgen data validate`` prints; ``usable`` is False when anything is wrong."""

    root: Path
    users: int = 0
    items: int = 0
    interactions: int = 0
    images_found: int = 0
    images_missing: int = 0
    images_corrupt: int = 0
    items_without_image: int = 0
    time_span: tuple[float, float] | None = None
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped_first: dict[str, str] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)
    flags: dict[str, tuple[int, str]] = dataclasses.field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return not self.problems and self.interactions > 0

    def summary(self) -> str:
        def iso(t: float) -> str:
            return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d")

        span = f"{iso(self.time_span[0])} .. {iso(self.time_span[1])}" if self.time_span else "n/a"
        lines = [
            f"dataset:       {self.root}",
            f"users:         {self.users}",
            f"items:         {self.items}",
            f"interactions:  {self.interactions}",
            f"images:        {self.images_found} found, {self.images_missing} missing, "
            f"{self.images_corrupt} corrupt, {self.items_without_image} items without image",
            f"time span:     {span}",
        ]
        for kind, n in sorted(self.skipped.items()):
            first = self.skipped_first.get(kind)
            lines.append(f"bad input:     {kind}: {n}" + (f" (first: {first})" if first else ""))
        for kind, (n, first) in sorted(self.flags.items()):
            lines.append(f"flag:          {kind}: {n} (first: {first})")
        lines += [f"problem:       {p}" for p in self.problems[:20]]
        if len(self.problems) > 20:
            lines.append(f"problem:       ... and {len(self.problems) - 20} more")
        lines.append(f"status:        {'OK' if self.usable else 'UNUSABLE'}")
        return "\n".join(lines)


def compact_date_timestamps(dataset: Dataset) -> list[Interaction]:
    """Interactions whose timestamp reads as a compact ``YYYYMMDD`` date, when *every*
    timestamp of the dataset does (else []).

    All-digit timestamps are unix seconds, so ``20200101`` is 1970-08-23: the order within a
    user survives, but the time span, tie checks and any time-based split are then about 1970.
    Only a dataset whose every value is such a date is flagged: unix seconds of 1970 that happen
    to look like dates in a real log are unlikely, every one of them far more so."""
    xs = [x for seq in dataset.interactions.values() for x in seq]
    if not xs:
        return []
    for x in xs:
        t = x.timestamp
        if t != int(t) or not 19000101 <= t <= 21001231:
            return []
        try:
            _dt.date(int(t) // 10000, int(t) // 100 % 100, int(t) % 100)
        except ValueError:
            return []
    return xs


def validate_dataset(root: str | os.PathLike, *, decode_images: bool = True) -> ValidationReport:
    """Load ``root`` leniently and check everything; never raises for bad content.

    Every image is opened (and decoded when ``decode_images``) so corrupt files are found.
    """
    root = Path(root)
    rep = ValidationReport(root)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = load_dataset(root, on_error="skip", check_images=False)
    except DataError as e:
        rep.problems.append(str(e))
        return rep
    rep.users, rep.items, rep.interactions = ds.num_users, ds.num_items, ds.num_interactions
    rep.time_span, rep.skipped, rep.skipped_first = ds.time_span(), dict(ds.skipped), dict(ds.skipped_first)
    for kind, n in ds.skipped.items():
        rep.problems.append(f"{n} bad row(s)/item(s) of kind {kind}")
    ties = tied_timestamps(ds)
    if ties:
        # Not an error: the order of tied events is file order. Evaluation drops held-out
        # targets that tie their predecessor (pgen_engine.eval.evaluate.tied_targets).
        rep.flags["tied_timestamp"] = (len(ties), f"{root / INTERACTIONS_FILE}:{ties[0].line}: same timestamp as "
                                       "the user's previous interaction (order between them is file order)")
    dated = compact_date_timestamps(ds)
    if dated:
        rep.flags["timestamp_looks_like_yyyymmdd"] = (
            len(dated), f"{root / INTERACTIONS_FILE}:{dated[0].line}: {int(dated[0].timestamp)} was read as unix "
            "seconds (all-digit timestamps are); if these are dates, write them as ISO-8601 (e.g. 2020-01-01)")
    for item in ds.items.values():
        if item.image_path is None:
            rep.items_without_image += 1
            continue
        if not item.image_path.is_file():
            rep.images_missing += 1
            hint = "; use '/' as the path separator" if "\\" in str(item.image_path) else ""
            rep.problems.append(f"{item.image_path}: missing image of item {item.item_id!r}{hint}")
            continue
        try:
            if decode_images:  # the very decode tokenizing and training do (orientation, RGB), so OK means usable
                load_image(item.image_path)
            else:
                verify_image(item.image_path)
            rep.images_found += 1
        except DataError as e:  # load_image's "PATH: corrupt or unreadable image (why)"
            rep.images_corrupt += 1
            rep.problems.append(f"{e} of item {item.item_id!r}")
        except Exception as e:  # PIL raises many types for broken files
            rep.images_corrupt += 1
            rep.problems.append(f"{item.image_path}: corrupt image of item {item.item_id!r} ({type(e).__name__})")
    if rep.items_without_image:
        # tokenizing, training and evaluation all need every item's image (each item is a
        # catalogue image and may be a history or target image): "OK" would promise too much
        first = next(i for i in ds.items.values() if i.image_path is None)
        rep.problems.append(f"{root / ITEMS_FILE}: {rep.items_without_image} item(s) have no image (first: "
                            f"{first.item_id!r}); tokenizing, training and evaluation need an image for every item")
    if rep.interactions == 0:
        rep.problems.append(f"{root / INTERACTIONS_FILE}: no usable interactions")
    _check_history_lengths(ds, rep)
    return rep


def _check_history_lengths(ds: Dataset, rep: ValidationReport) -> None:
    """Users too short for the splits: flagged, and a problem when no user is long enough (training
    and evaluation would find no example; validate used to say OK for such a dataset)."""
    short = [(u, len(s)) for u, s in ds.interactions.items() if len(s) < DEFAULT_MIN_INTERACTIONS]
    if short:
        rep.flags["short_user_history"] = (
            len(short), f"user {short[0][0]!r} has {short[0][1]} interaction(s); users with fewer than "
            f"{DEFAULT_MIN_INTERACTIONS} (data.min_interactions, at least {SPLIT_MIN_INTERACTIONS}) are left out of "
            "training and evaluation")
    if ds.interactions and max(len(s) for s in ds.interactions.values()) < SPLIT_MIN_INTERACTIONS:
        rep.problems.append(f"{ds.root / INTERACTIONS_FILE}: no user has {SPLIT_MIN_INTERACTIONS} or more interactions "
                            "(history + validation + test item); training and evaluation need such users")
