"""``pgen eval`` and ``pgen demo``."""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

def _embedder(spec: str):
    from pgen_engine.rewards.embedders import make_embedder

    if spec == "pixel_stats":
        return make_embedder({"type": "pixel_stats"})
    kind, _, path = spec.partition(":")
    if not path:
        raise ValueError(f"--embedder {spec!r}: expected 'pixel_stats' or TYPE:PATH (e.g. clip:/models/clip)")
    return make_embedder({"type": kind, "path": path})


def cmd_eval(a: argparse.Namespace) -> int:
    import torch

    from pgen_engine.generation.generator import Generator
    from pgen_engine.models import load_model

    from . import evaluate as E

    t0 = time.time()
    ckpt = Path(a.checkpoint)
    model = load_model(ckpt, device=a.device, dtype=getattr(torch, a.dtype))
    settings = E.PromptSettings.for_checkpoint(ckpt, a.run_config)
    if a.history_mode is not None:
        from pgen_engine.data.history import check_history_mode

        check_history_mode(settings.history_mode, a.history_mode, where=str(a.run_config or ckpt.parent / "config.resolved.yaml"))
    if a.tokenizer:
        settings = dataclasses.replace(settings, tokenizer_path=Path(a.tokenizer))
    tok = settings.tokenizer(model)
    embedder = _embedder(a.embedder)
    out = Path(a.out) if a.out else None
    cache_dir = Path(a.cache_dir) if a.cache_dir else (out or ckpt) / f"token_cache_{tok.fingerprint()[:16]}"
    data = E.prepare_eval_data(a.data, tok, cache_dir, embedder, k=settings.history_k, progress=not a.quiet)
    examples = data.examples(a.split, a.max_users)
    if not examples:
        raise ValueError(f"{a.data}: no {a.split} examples (too few interactions per user?)")
    builder = settings.prompt_builder(model, ckpt, tok.num_tokens)
    gen = Generator(model, max_batch_size=max(a.num_images, min(64, a.batch_prompts * a.num_images)))
    kw = dict(guidance_scale=a.guidance_scale, temperature=a.temperature, top_k=a.top_k, seed=a.seed,
              batch_prompts=a.batch_prompts, progress=not a.quiet)
    systems = {}
    if a.baselines:
        systems["popularity"] = E.popularity_system(data, examples, a.num_images)
        systems["recommend"] = E.retrieve_system(data, examples, a.num_images)
        systems["non-personalized"] = E.generate_system("non-personalized", gen, data, builder, examples,
                                                        a.num_images, personalized=False, **kw)
    systems[a.name] = E.generate_system(a.name, gen, data, builder, examples, a.num_images, **kw)
    rows = {name: E.compute_metrics(s, data, examples, embedder) for name, s in systems.items()}
    table = E.format_table(rows)
    print(table)
    print(f"history mode: {settings.history_mode} (history images "
          f"{'through the vision tower' if settings.history_mode == 'pixels' else 'as VQ codes'})")
    result = {"checkpoint": str(ckpt), "data": str(a.data), "split": a.split, "users": len(examples),
              "history_mode": settings.history_mode,
              "num_images": a.num_images, "metrics": rows, "seconds": round(time.time() - t0, 1)}
    if out:
        from pgen_engine.io_utils import atomic_write_json

        atomic_write_json(out / "eval.json", result)
        print(f"wrote {out / 'eval.json'}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(Path(a.out), data=a.data, quick=a.quick, progress=not a.quiet, seed=a.seed)
    print(f"report: {report}")
    return 0


def register(subparsers) -> None:
    """Add ``eval`` and ``demo`` to the ``pgen`` command."""
    p = subparsers.add_parser("eval", help="generate for users and compare with recommend / popularity baselines")
    p.add_argument("--checkpoint", required=True, help="Janus checkpoint directory (e.g. a run's final/)")
    p.add_argument("--data", required=True, help="dataset in the native layout")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--num-images", type=int, default=10, help="images generated per user")
    p.add_argument("--max-users", type=int, default=None, help="evaluate the first N users only")
    p.add_argument("--tokenizer", default=None, help="PatchKMeans tokenizer file (default: the run's, else the "
                   "checkpoint's VQ model)")
    p.add_argument("--cache-dir", default=None, help="token cache folder (built when missing)")
    p.add_argument("--embedder", default="pixel_stats", help="pixel_stats, or clip:PATH / siglip:PATH / janus:PATH")
    p.add_argument("--history-mode", choices=("pixels", "codes"), default=None,
                   help="refuse to run unless the model was trained with this history mode (default: its run's)")
    p.add_argument("--run-config", default=None, help="the training run's config.resolved.yaml (default: "
                   "CHECKPOINT/../config.resolved.yaml) — gives the prompt format and the image tokenizer")
    p.add_argument("--baselines", action="store_true", help="add popularity, recommend and non-personalized rows")
    p.add_argument("--name", default="model", help="row name of the checkpoint in the table")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-prompts", type=int, default=16, help="prompts per generation batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="write eval.json here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    d = subparsers.add_parser("demo", help="synthetic data -> tokenizer -> SFT -> RL -> eval -> report (CPU)")
    d.add_argument("--out", default="runs/demo", help="run folder; the report is OUT/report.md")
    d.add_argument("--data", default=None, help="a native-layout dataset instead of the synthetic one "
                   "(e.g. ../shared/data/movielens-posters)")
    d.add_argument("--quick", action="store_true", help="smaller sizes (CI smoke run)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)
