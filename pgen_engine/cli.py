"""The ``pgen`` command.

Each area registers its own sub-commands (``register(subparsers)`` in
``pgen_engine/<area>/cli.py``); this module only assembles them and turns errors into one
clear line on stderr plus a non-zero exit code.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

from pgen_engine.errors import PgenUserError, one_line
from pgen_engine.models import load_model
from pgen_engine.models.checkpoint import stored_dtypes
from pgen_engine.termination import EXIT_STATUS, Terminated, raise_on_sigterm, restore_sigterm

# Modules that contribute sub-commands, in the order `pgen --help` lists them.
COMMAND_MODULES = (
    "pgen_engine.data.cli",
    "pgen_engine.generation.cli",
    "pgen_engine.eval.cli",
    "pgen_engine.training.plan",
)


def _info(args: argparse.Namespace) -> int:
    model = load_model(args.checkpoint, device="cpu", dtype=torch.float32 if args.dtype == "float32" else
                       getattr(torch, args.dtype))
    c = model.config
    groups = {}
    for name, p in model.named_parameters():
        g = name.split(".")[0]
        groups[g] = groups.get(g, 0) + p.numel()
    info = {
        "checkpoint": str(args.checkpoint),
        "parameters": model.num_parameters(),
        "parameters_by_part": groups,
        "text_vocab_size": c.text.vocab_size,
        "image_codebook_size": c.codebook_size,
        "image_tokens_per_image": c.num_image_tokens,
        "image_size": c.image_size,
        "hidden_size": c.text.hidden_size,
        "layers": c.text.num_layers,
        "heads": c.text.num_heads,
        "kv_heads": c.text.num_kv_heads,
        "head_dim": c.text.head_dim,
        "tie_word_embeddings": c.tie_word_embeddings,
        "stored_dtypes": stored_dtypes(args.checkpoint),
        "special_tokens": model.special_tokens.as_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            if isinstance(v, int) and k == "parameters":
                v = f"{v:,} ({v / 1e6:.2f} M)"
            print(f"{k:<{width}}  {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgen", description="pgen_engine: personalized image generation "
                                     "with Janus-style models (data, training, generation, evaluation).")
    parser.add_argument("--debug", action="store_true",
                        help="re-raise errors with their full traceback instead of a one-line message")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="print a checkpoint's geometry and parameter count")
    p.add_argument("checkpoint", help="Hugging Face Janus checkpoint directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_info)
    for mod_name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:
                continue  # area without commands in this build
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and not any(x.startswith("-") for x in extra):
        args.overrides += extra  # `pgen plan --config C a=1 --gpus 2 b=2`: overrides after an option
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # SIGTERM runs `finally` blocks (temporary files of atomic writes are removed) and ends with
    # one line; `pgen demo`'s training stages stop at a step boundary with a checkpoint
    previous_sigterm = raise_on_sigterm()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("pgen: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        hint = " (run the same command again to continue)" if e.checkpoint else ""  # `pgen demo` resumes stages
        print(f"pgen {args.command}: error: {one_line(e)}{hint}", file=sys.stderr)
        return EXIT_STATUS
    except (PgenUserError, ValueError, FileNotFoundError, OSError, RuntimeError, KeyError) as e:
        if args.debug:
            raise
        print(f"pgen {args.command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        restore_sigterm(previous_sigterm)


if __name__ == "__main__":
    sys.exit(main())
