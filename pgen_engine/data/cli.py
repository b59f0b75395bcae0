"""``pgen data ...`` sub-commands: synth, validate, convert, tokenize.

Each handler returns an exit code; errors print one line to stderr and return non-zero
(2 for bad arguments/input, 1 for an unusable dataset).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

from ..models.image_quality import quality_line
from .convert import convert_amazon2023, convert_microlens
from .dataset import ITEMS_FILE, DataError, Dataset, load_dataset, load_image
from .validate import validate_dataset, verify_image
from .fit_tokenizer import TokenizerFitSettings, fit_items, fit_tokenizer, held_out_quality, load_tokenizer
from .synth import SynthConfig, generate_synthetic
from .token_cache import build_token_cache


def _err(msg: str) -> int:
    print(f"pgen data: error: {msg}", file=sys.stderr)
    return 2


def cmd_synth(a: argparse.Namespace) -> int:
    try:
        cfg = SynthConfig(num_users=a.users, num_items=a.items, seed=a.seed, image_size=a.image_size)
        t = time.perf_counter()
        generate_synthetic(a.out, cfg)
    except (ValueError, OSError) as e:
        return _err(str(e))
    print(f"wrote synthetic dataset ({a.users} users, {a.items} items) to {a.out} "
          f"in {time.perf_counter() - t:.1f}s")
    return 0


def cmd_validate(a: argparse.Namespace) -> int:
    rep = validate_dataset(a.dir)
    print(rep.summary())
    return 0 if rep.usable else 1


def cmd_convert(a: argparse.Namespace) -> int:
    try:
        if a.source == "amazon2023":
            missing = [n for n in ("reviews", "meta", "images") if getattr(a, n) is None]
            if missing:
                return _err(f"--from amazon2023 needs {', '.join('--' + m for m in missing)}")
            stats = convert_amazon2023(a.reviews, a.meta, a.images, a.out)
        else:
            missing = [n for n in ("interactions", "covers") if getattr(a, n) is None]
            if missing:
                return _err(f"--from microlens needs {', '.join('--' + m for m in missing)}")
            stats = convert_microlens(a.interactions, a.covers, a.out)
    except (DataError, OSError) as e:
        return _err(str(e))
    print(json.dumps({"out": str(a.out), **stats}))
    return 0


def _without_unreadable_images(ds: Dataset) -> Dataset:
    """``--on-error skip``: items whose image does not decode lose it (``image_path`` None), so
    fitting and the held-out score pass over them. The token cache is built from the dataset as
    loaded: it skips them too and warns with the real reason (a copy with null images made it say
    '"image": null' for a corrupt file)."""
    bad: dict[str, str] = {}
    for iid, item in ds.items.items():
        if item.image_path is not None:
            try:
                load_image(item.image_path)
            except DataError as e:
                bad[iid] = str(e)
    if not bad:
        return ds
    items = {i: dataclasses.replace(it, image_path=None) if i in bad else it for i, it in ds.items.items()}
    return dataclasses.replace(ds, items=items)


def _check_images_the_fit_skips(ds: Dataset, s: TokenizerFitSettings) -> None:
    """``--fit --on-error raise``: the token cache built after the fit needs every item's image.
    The fit decodes its own fit and held-out images before training; an item without an image, or
    one the fit never loads (outside the fit sample and the held-out set), is checked here, so a bad
    one fails before minutes of fitting instead of after them (with a tokenizer file left behind).
    Structure only (:func:`verify_image`): the token cache decodes these images right after the fit,
    and decoding a large catalogue twice costs ~25x more than this check; a JPEG cut short still
    fails there, with the fitted tokenizer kept for the rerun (its key covers only the fit's images)."""
    no_image = [i for i, it in ds.items.items() if it.image_path is None]
    if no_image:
        raise DataError(f"{ds.root / ITEMS_FILE}: {len(no_image)} item(s) have no image (\"image\": null; first: "
                        f"{no_image[0]!r}); every item needs one to be tokenized (--on-error skip skips them)")
    loaded = set().union(*fit_items(ds, s))
    for iid, item in ds.items.items():
        if iid not in loaded:
            verify_image(item.image_path)  # DataError naming the file


def _check_fit_target(path: Path, kind: str) -> None:
    """``--fit`` writes ``path``: refuse a folder, and a file that is not a tokenizer of ``kind``
    (a mistyped path such as the dataset's items.jsonl would otherwise be overwritten)."""
    if path.is_dir():
        raise ValueError(f"--tokenizer {path}: is a folder (expected the .safetensors file to write)")
    if path.exists():
        try:
            load_tokenizer(kind, path)
        except (ValueError, OSError, KeyError, RuntimeError) as e:
            raise ValueError(f"--tokenizer {path}: exists and is not a {kind} tokenizer file ({e}); not overwriting "
                             "it: delete it or choose another path") from None


def _check_loaded_geometry(tok, path: Path, given: dict[str, int | None]) -> None:
    """Without --fit the tokenizer is used as it is: a size flag the user set that disagrees
    with it is an error (it would otherwise be ignored silently), naming flag and file."""
    side = math.isqrt(tok.num_tokens)
    have = {"--image-size": tok.image_size, "--codebook": tok.codebook_size, "--codes-per-side": side,
            "--patch-size": tok.image_size // side if side and tok.image_size % side == 0 else None}
    for flag, v in given.items():
        if v is not None and v != have[flag]:
            raise ValueError(f"{flag} {v} differs from the tokenizer {path} ({flag.lstrip('-')} {have[flag]}); "
                             "without --fit the tokenizer is used as it is: drop the flag, or add --fit to train "
                             "one with these settings")


def cmd_tokenize(a: argparse.Namespace) -> int:
    # kind-dependent defaults: vq 64 px / 8x8 codes / 1024 entries; patch_kmeans 32 px / 4-px patches / 256
    vq = a.kind == "vq"
    for flag, v in (("--image-size", a.image_size), ("--codebook", a.codebook_size), ("--held-out", a.held_out),
                    ("--codes-per-side", a.codes_per_side),
                    ("--fit-images", a.fit_images), ("--iters", a.iters), ("--max-steps", a.max_steps),
                    ("--train-batch-size", a.train_batch_size)):
        if v is not None and v < 1:  # 0 must not silently mean "the default"
            return _err(f"{flag} must be >= 1, got {v}")
    if not a.time_budget > 0:
        return _err(f"--time-budget must be > 0 seconds, got {a.time_budget}")
    # what the user set explicitly: without --fit these must match the tokenizer that is loaded
    given = {"--image-size": a.image_size, "--codebook": a.codebook_size, "--codes-per-side": a.codes_per_side,
             "--patch-size": a.patch_size}
    a.image_size = a.image_size if a.image_size is not None else (64 if vq else 32)
    a.codebook_size = a.codebook_size if a.codebook_size is not None else (1024 if vq else 256)
    if a.patch_size is None and a.codes_per_side is None and not vq:
        a.patch_size = 4
    if a.patch_size is not None:
        if a.codes_per_side is not None:
            return _err("give --codes-per-side or --patch-size, not both")
        if a.patch_size < 1 or a.image_size % a.patch_size:
            return _err(f"--patch-size {a.patch_size} must divide --image-size {a.image_size}")
        a.codes_per_side = a.image_size // a.patch_size
    if a.threads is not None:
        if a.threads < 1:
            return _err(f"--threads must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    with warnings.catch_warnings(record=True) as caught:  # skipped input: "warning: ..." lines, not
        warnings.simplefilter("always")  # Python's "FILE:LINE: UserWarning: ..." with a source line
        try:
            return _tokenize(a, given)
        finally:
            for msg in dict.fromkeys(str(w.message) for w in caught):  # each distinct one once
                print(f"warning: {msg}", file=sys.stderr)


def _tokenize(a: argparse.Namespace, given: dict[str, int | None]) -> int:
    try:
        loaded = load_dataset(a.dir, on_error=a.on_error)
        ds = _without_unreadable_images(loaded) if a.on_error == "skip" else loaded
        if a.fit:
            _check_fit_target(a.tokenizer, a.kind)
            s = TokenizerFitSettings(
                kind=a.kind, image_size=a.image_size, codes_per_side=a.codes_per_side or 8,
                codebook=a.codebook_size,
                seed=a.seed, held_out=a.held_out, fit_images=a.fit_images, time_budget_s=a.time_budget,
                max_steps=a.max_steps, batch_size=a.train_batch_size, iters=a.iters)
            s.validate()
            if a.on_error == "raise":
                _check_images_the_fit_skips(ds, s)
            tok, quality, reused = fit_tokenizer(ds, a.tokenizer, s, progress=not a.quiet)
            print(f"{'reusing' if reused else 'wrote'} {a.kind} tokenizer {a.tokenizer} "
                  f"(fingerprint {tok.fingerprint()}{', same images and settings' if reused else ''})")
        else:
            tok = load_tokenizer(a.kind, a.tokenizer)
            _check_loaded_geometry(tok, a.tokenizer, given)
            quality = held_out_quality(ds, tok, a.held_out)
        cache = build_token_cache(loaded, tok, a.out, batch_size=a.batch_size, progress=not a.quiet,
                                  on_error=a.on_error)
    except (DataError, ValueError, KeyError, OSError) as e:
        return _err(str(e))
    print(f"token cache {a.out}: {len(cache)} items x {cache.num_tokens} codes ({len(cache.skipped)} skipped)")
    print(f"codebook usage (held-out): {quality['used']}/{tok.codebook_size} codes used "
          f"({100 * quality['usage']:.0f}%), perplexity {quality['perplexity']:.1f}, {quality['dead']} dead")
    print(quality_line(quality))
    return 0


def register(subparsers) -> None:
    """Add the ``data`` command (with synth/validate/convert/tokenize) to ``subparsers``."""
    p = subparsers.add_parser("data", help="datasets: synth, validate, convert, tokenize")
    sub = p.add_subparsers(dest="data_command", required=True)

    s = sub.add_parser("synth", help="write the synthetic known-answer dataset")
    s.add_argument("--users", type=int, required=True)
    s.add_argument("--items", type=int, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=32)
    s.set_defaults(func=cmd_synth)

    v = sub.add_parser("validate", help="check a dataset folder and print a summary")
    v.add_argument("dir", type=Path)
    v.set_defaults(func=cmd_validate)

    c = sub.add_parser("convert", help="convert Amazon-2023 or MicroLens data to the native layout")
    c.add_argument("--from", dest="source", choices=("amazon2023", "microlens"), required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--reviews", type=Path)
    c.add_argument("--meta", type=Path)
    c.add_argument("--images", type=Path)
    c.add_argument("--interactions", type=Path)
    c.add_argument("--covers", type=Path)
    c.set_defaults(func=cmd_convert)

    t = sub.add_parser("tokenize", help="fit/load an image tokenizer (Janus VQ or PatchKMeans), build the token cache")
    t.add_argument("dir", type=Path, help="dataset folder")
    t.add_argument("--out", type=Path, required=True, help="cache folder")
    t.add_argument("--tokenizer", type=Path, required=True,
                   help="tokenizer .safetensors file (written with --fit, read otherwise); with --kind vq "
                        "also a Janus checkpoint directory (its own VQ)")
    t.add_argument("--fit", action="store_true",
                   help="fit the tokenizer on the train split's item images first (reused when the images and "
                        "settings are unchanged)")
    t.add_argument("--kind", choices=("vq", "patch_kmeans"), default="patch_kmeans",
                   help="vq: train a small Janus VQ-VAE; patch_kmeans: k-means over image patches")
    t.add_argument("--image-size", type=int, default=None, help="pixels (default: vq 64, patch_kmeans 32)")
    t.add_argument("--codes-per-side", type=int, default=None, help="codes per image side (default: vq 8, patch_kmeans image_size/4)")
    t.add_argument("--patch-size", type=int, default=None,
                   help="PatchKMeans patch side (same as --codes-per-side image_size/patch_size)")
    t.add_argument("--codebook", "--codebook-size", dest="codebook_size", type=int, default=None,
                   help="codebook entries (default: vq 1024, patch_kmeans 256)")
    t.add_argument("--time-budget", type=float, default=780.0,
                   help="vq: training seconds (default 780: with loading, scoring and the token cache a default "
                        "run on ~3,000 posters stays within 15 min on 2 idle CPU cores)")
    t.add_argument("--max-steps", type=int, default=100_000, help="vq: training steps at most")
    t.add_argument("--train-batch-size", type=int, default=4, help="vq: images per training step")
    t.add_argument("--iters", type=int, default=15, help="patch_kmeans: Lloyd iterations")
    t.add_argument("--fit-images", type=int, default=4000, help="fit on at most this many train images")
    t.add_argument("--held-out", type=int, default=128, help="held-out images scored (at most a tenth of the items)")
    t.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is fastest on a busy shared machine; default: torch's)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_tokenize)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m pgen_engine.data.cli data ...``."""
    parser = argparse.ArgumentParser(prog="pgen")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
