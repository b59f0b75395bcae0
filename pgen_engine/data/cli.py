"""``pgen data ...`` sub-commands: synth, validate, convert, tokenize.

Each handler returns an exit code; errors print one line to stderr and return non-zero
(2 for bad arguments/input, 1 for an unusable dataset).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _err(msg: str) -> int:
    print(f"pgen data: error: {msg}", file=sys.stderr)
    return 2


def cmd_synth(a: argparse.Namespace) -> int:
    from .synth import SynthConfig, generate_synthetic

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
    from .dataset import validate_dataset

    rep = validate_dataset(a.dir)
    print(rep.summary())
    return 0 if rep.usable else 1


def cmd_convert(a: argparse.Namespace) -> int:
    from .convert import convert_amazon2023, convert_microlens
    from .dataset import DataError

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


def cmd_tokenize(a: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..models.patch_kmeans import PatchKMeansTokenizer
    from .dataset import DataError, load_dataset, load_image
    from .token_cache import build_token_cache

    try:
        ds = load_dataset(a.dir, on_error=a.on_error)
        if a.fit:
            rng = np.random.default_rng(a.seed)
            ids = [i for i, it in ds.items.items() if it.image_path is not None]
            pick = sorted(rng.choice(len(ids), size=min(a.fit_images, len(ids)), replace=False).tolist())
            imgs = []
            for j in pick:
                try:
                    imgs.append(load_image(ds.items[ids[j]].image_path, a.image_size))
                except DataError:
                    if a.on_error == "raise":
                        raise
            tok = PatchKMeansTokenizer.fit(torch.from_numpy(np.stack(imgs)), patch_size=a.patch_size,
                                           codebook_size=a.codebook_size, iters=a.iters, seed=a.seed)
            tok.save(a.tokenizer)
            print(f"fit PatchKMeans ({a.codebook_size} codes, patch {a.patch_size}) on {len(imgs)} images -> "
                  f"{a.tokenizer} (fingerprint {tok.fingerprint()})")
        else:
            tok = PatchKMeansTokenizer.load(a.tokenizer)
        cache = build_token_cache(ds, tok, a.out, batch_size=a.batch_size, progress=not a.quiet,
                                  on_error=a.on_error)
    except (DataError, ValueError, KeyError, OSError) as e:
        return _err(str(e))
    print(f"token cache {a.out}: {len(cache)} items x {cache.num_tokens} codes ({len(cache.skipped)} skipped)")
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

    t = sub.add_parser("tokenize", help="build the image-token cache (PatchKMeans)")
    t.add_argument("dir", type=Path, help="dataset folder")
    t.add_argument("--out", type=Path, required=True, help="cache folder")
    t.add_argument("--tokenizer", type=Path, required=True,
                   help="PatchKMeans .safetensors file (written with --fit, read otherwise)")
    t.add_argument("--fit", action="store_true", help="fit a new PatchKMeans tokenizer first")
    t.add_argument("--image-size", type=int, default=32)
    t.add_argument("--patch-size", type=int, default=4)
    t.add_argument("--codebook-size", type=int, default=256)
    t.add_argument("--iters", type=int, default=15)
    t.add_argument("--fit-images", type=int, default=1000)
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
