"""The output folder of ``pgen generate``: safe file names, a staging folder inside ``--out``
whose files are renamed into place only when the run completes, PNG writing and the
``--grid`` sheet."""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pgen_engine.data.history import load_history_image
from pgen_engine.eval.report import image_grid, save_png
from pgen_engine.generation.prompt_file import PromptLine

MANIFEST = "manifest.jsonl"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_STEM = 80  # characters (ASCII) of an id kept in a file name; longer ids get a hash suffix
_STAGE_PREFIX = ".pgen-generate."


def file_stem(pid: str, used: set[str]) -> str:
    """A file-name stem for ``pid``: ASCII ``[A-Za-z0-9._-~]``, at most ``_MAX_STEM + 11`` characters,
    distinct from every stem in ``used`` even on a case-insensitive file system."""
    stem = _SAFE.sub("_", pid).strip("._") or "prompt"
    if len(stem) > _MAX_STEM:
        stem = stem[:_MAX_STEM].rstrip("._") + "-" + hashlib.sha1(pid.encode("utf-8")).hexdigest()[:10]
    base, k = stem, 1
    while stem.casefold() in used:  # ids that differ only in unsafe characters or in case
        k += 1
        stem = f"{base}~{k}"
    used.add(stem.casefold())
    return stem


def check_out(out_dir: Path, checkpoint: Path, prompts: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: exists and is not a directory (expected an output directory)")
    if out_dir.is_dir() and checkpoint.is_dir() and out_dir.resolve() == checkpoint.resolve():
        raise ValueError(f"--out {out_dir}: is the checkpoint directory; choose another output directory")
    if prompts.exists() and prompts.resolve() == (out_dir / MANIFEST).resolve():
        raise ValueError(f"--out {out_dir}: its {MANIFEST} would overwrite the prompts file {prompts}")


def make_out(out_dir: Path) -> tuple[Path, bool]:
    """Create ``out_dir`` if needed and a staging folder inside it -> (stage, created out_dir)."""
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"--out {out_dir}: a parent of it is not a directory") from None
    except OSError as e:
        raise ValueError(f"--out {out_dir}: cannot create the output directory ({e.strerror or e})") from None
    try:
        stage = Path(tempfile.mkdtemp(prefix=_STAGE_PREFIX, suffix=".tmp", dir=out_dir))
    except OSError as e:
        if created:
            rmdir_quiet(out_dir)
        raise ValueError(f"--out {out_dir}: not writable ({e.strerror or e})") from None
    return stage, created


def rmdir_quiet(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:
        pass


def publish(stage: Path, out_dir: Path, names: list[str]) -> None:
    """Rename ``names`` and then ``MANIFEST`` from ``stage`` into ``out_dir``, all or nothing.

    Files they replace are first moved aside into ``stage/.old`` (the old manifest before any
    image), and an exception or Ctrl-C part-way moves everything back: ``out_dir`` never holds
    new images next to the old manifest. A ``kill -9`` part-way leaves no manifest at all.
    """
    aside = stage / ".old"
    aside.mkdir()
    done: list[tuple[str, bool]] = []  # (name, an old file was moved aside)
    try:
        for name in (MANIFEST, *names):
            # lexists: a (dangling) symlink there is an old entry too; exists() said no, and the
            # roll-back then deleted what had replaced it, losing the link
            if os.path.lexists(out_dir / name):
                os.replace(out_dir / name, aside / name)
                done.append((name, True))
            else:
                done.append((name, False))
        for name in (*names, MANIFEST):
            os.replace(stage / name, out_dir / name)
    except BaseException:
        for name, had_old in reversed(done):
            if had_old:
                os.replace(aside / name, out_dir / name)
            else:
                (out_dir / name).unlink(missing_ok=True)
        raise


def write_png(array, path: Path) -> None:
    """Write ``array`` as a PNG at ``path`` (in the staging folder). A failed write (a full disk) is
    an OSError naming the image's place in ``--out``: it was a bare ``[Errno 27] File too large``."""
    try:
        with open(path, "wb") as f:
            Image.fromarray(array).save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno is None or e.filename not in (None, str(path)):
            raise
        shown = path.parent.parent / path.name if path.parent.name.startswith(_STAGE_PREFIX) else path
        raise OSError(e.errno, e.strerror, str(shown)) from e


def write_grid(path: Path, prompts: list[PromptLine], stage: Path, num_samples: int, used_stems: list[str]) -> None:
    """``--grid``: per prompt, a row of its history images (if any) and a row of its samples, one PNG."""
    rows = []
    for i, p in enumerate(prompts):
        gen = np.stack([np.asarray(Image.open(stage / used_stems[i * num_samples + j])) for j in range(num_samples)])
        if p.history_files:
            hist = np.stack([load_history_image(f, gen.shape[1]) for f in p.history_files])
            rows.append((f"{p.id[:18]}: history", torch.from_numpy(hist)))
        rows.append((f"{p.id[:18]}: generated", torch.from_numpy(gen)))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(path, image_grid(rows))
