"""Train one Janus VQ recipe on a dataset's fit split and print its held-out reconstruction.

    python tools/vq_ablation.py ../shared/data/movielens-posters --set time_budget_s=390 \\
        --set crop_size=0 [--set lr=3e-3 ...] [--threads 1] [--out result.json]

The fit / held-out split and the images are exactly what ``pgen data tokenize --kind vq``
uses (``fit_tokenizer.split_items``, at most ``--fit-images`` fit images, 128 held out);
``--set`` overrides any :class:`~pgen_engine.models.vq_train.VQTrainConfig` field, so two
recipes run side by side (one thread each) compare at the same load. Prints one JSON line:
the overrides, steps, seconds and the held-out quality of
:func:`~pgen_engine.models.image_quality.evaluate_tokenizer`. Nothing is cached or saved
except ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from pgen_engine.data.dataset import DataError, load_dataset
from pgen_engine.data.fit_tokenizer import TokenizerFitSettings, fit_items, load_images
from pgen_engine.io_utils import atomic_write_text
from pgen_engine.models.image_quality import evaluate_tokenizer
from pgen_engine.models.vq_train import VQTrainConfig, train_vq

FIELDS = {f.name: f.type for f in dataclasses.fields(VQTrainConfig)}


def parse_overrides(pairs: list[str]) -> dict:
    """``["lr=3e-3", "crop_size=0", "bf16=false"]`` -> typed VQTrainConfig overrides."""
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in FIELDS:
            raise ValueError(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of {sorted(FIELDS)}")
        kind = FIELDS[key]
        try:
            if kind == "bool":
                if text.lower() not in ("true", "false"):
                    raise ValueError
                out[key] = text.lower() == "true"
            else:
                out[key] = int(text) if kind == "int" else float(text)
        except ValueError:
            raise ValueError(f"--set {pair!r}: {key} expects a {kind}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="dataset directory (the `pgen data` layout)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="VQTrainConfig override")
    ap.add_argument("--held-out", type=int, default=128)
    ap.add_argument("--fit-images", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", help="also write the JSON line here (atomically)")
    a = ap.parse_args(argv)
    try:
        over = parse_overrides(a.set)
        cfg = VQTrainConfig(**over)
        cfg.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    # the items `pgen data tokenize` would fit and hold out with these sizes and seed
    settings = TokenizerFitSettings(kind="vq", image_size=cfg.image_size, codes_per_side=cfg.codes_per_side,
                                    codebook=cfg.codebook_size, seed=cfg.seed, held_out=a.held_out,
                                    fit_images=a.fit_images)
    try:
        settings.validate()
        ds = load_dataset(a.data)
        fit, held = fit_items(ds, settings)
    except (DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok, rep = train_vq(load_images(ds, fit, cfg.image_size), cfg, progress=False)
    q = evaluate_tokenizer(tok, load_images(ds, held, cfg.image_size))
    line = json.dumps({"overrides": over, "steps": rep.steps, "seconds": round(rep.seconds, 1),
                       "held_out": {k: v for k, v in q.items() if not isinstance(v, list)}})
    print(line)
    if a.out:
        atomic_write_text(Path(a.out), line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
