"""``pgen generate``: prompts.jsonl -> PNG images + ``manifest.jsonl``.

Each non-blank line of the prompts file (UTF-8, an optional BOM, LF or CRLF) is a JSON
object with an ``"id"`` (string or int, unique) and one of:

* ``"history"``: the user's items, oldest first, each ``{"image": PATH, "title": TEXT}``
  (``PATH`` relative to the prompts file; ``title`` optional), plus an optional
  ``"prompt"`` (extra text after the history). The prompt is built exactly as the model's
  training built it (:mod:`pgen_engine.data.history`: template, titles, history order, the
  history mode it was trained with — pixels through the vision tower or VQ codes — and the
  same unconditional prompt for CFG);
* ``"prompt"`` alone (text; tokenised with the checkpoint's tokenizer and framed as
  ``<bos> text <boi>``);
* ``"input_ids"`` (a list of token ids used as given, ending with ``<boi>``; ``<image>``
  placeholder ids are refused: history images come through ``"history"``).

``--data DIR --users 1,2,3 [--split test]`` instead builds each user's history from a
dataset in the native layout (the run's ``history_k`` last items before the split's target).

Invalid lines (a missing or corrupt history image, an empty history, a history too long for
the model's context, ...) are all reported as ``file:line: what is wrong`` before anything
is generated, and nothing is written.

Sample ``j`` of the prompt with id ``i`` uses request seed
:func:`~pgen_engine.generation.personal.request_seed_for_id` ``(--seed, i)``: an image depends
only on ``--seed``, its line's id and content, never on the line's position, ``--batch-size``
or the other prompts in the file. ``manifest.jsonl`` records, per image, the history items it
was conditioned on and the history mode.

Outputs are staged in a hidden folder inside ``--out`` and moved into place only once every
image and the manifest are written: a failed or interrupted run leaves earlier results in
``--out`` as they were. ``manifest.jsonl`` describes the latest run; PNGs of earlier runs
that it does not list are left alone.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pgen_engine import models
from pgen_engine.config import DataConfig, load_config
from pgen_engine.data.history import prompter_for_checkpoint
from pgen_engine.data.history_mode import trained_history_mode
from pgen_engine.data.text_tokenizer import HF_TOKENIZER_FILES, load_text_tokenizer
from pgen_engine.generation.dataset_prompts import dataset_prompts
from pgen_engine.generation.generator import GenerationMemoryError, Generator, NonFiniteLogitsError
from pgen_engine.generation.output_dir import (MANIFEST, check_out, file_stem, make_out, publish, rmdir_quiet,
                                               write_grid, write_png)
from pgen_engine.generation.personal import decode_codes, request_seed_for_id
from pgen_engine.generation.prompt_file import read_prompts
from pgen_engine.generation.sampling_params import SamplingParams, SamplingParamsError
from pgen_engine.io_utils import atomic_write_text
from pgen_engine.models.checkpoint import checked_device
from pgen_engine.models.checkpoint import load_checkpoint_config

_DTYPES = ("float32", "bfloat16", "float16")


def _sampling_params(args: argparse.Namespace) -> "SamplingParams":
    """The flags' SamplingParams; its validation errors are re-worded to name the flag."""
    try:
        return SamplingParams(guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, greedy=args.greedy, seed=args.seed)
    except SamplingParamsError as e:
        detail = e.detail.replace("use greedy", "use --greedy")
        raise ValueError(f"--{e.field.replace('_', '-')} {detail}") from None


def _check_args(args: argparse.Namespace) -> None:
    """Refuse invalid flag values before anything is loaded; messages name the flag."""
    for name in ("num_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.sampling = _sampling_params(args)
    if checked_device(args.device, label=f"--device {args.device!r}").type == "meta":  # before any model work
        raise ValueError(f"--device {args.device!r}: holds shapes only, no weights, so it cannot generate; "
                         "use cpu or cuda")


def _load_tokenizer(checkpoint: Path, special):
    try:
        return load_text_tokenizer(checkpoint, special)
    except (FileNotFoundError, ValueError):  # already name the checkpoint and what is wrong
        raise
    except Exception as e:  # transformers' tokenizer loaders raise many error types
        files = [f for f in HF_TOKENIZER_FILES if (checkpoint / f).is_file()]
        raise ValueError(f"{checkpoint}: cannot load the tokenizer ({', '.join(files)}): "
                         f"{type(e).__name__}: {e}") from None


def run_generate(args: argparse.Namespace) -> int:
    """Implementation of ``pgen generate`` (see :func:`register` for the arguments)."""
    _check_args(args)
    if (args.prompts is None) == (args.data is None):
        raise ValueError("give exactly one of --prompts FILE or --data DIR --users IDS")
    if args.data is not None and not args.users:
        raise ValueError("--data needs --users (comma-separated user ids)")
    if args.users and args.data is None:
        raise ValueError("--users needs --data DIR")
    if args.run_config is not None and not Path(args.run_config).is_file():
        raise ValueError(f"--run-config {args.run_config}: file not found (expected a training run's "
                         "config.resolved.yaml)")
    checkpoint, out_dir = Path(args.checkpoint), Path(args.out)
    prompts_path = Path(args.prompts) if args.prompts is not None else Path(args.data)
    check_out(out_dir, checkpoint, prompts_path)
    if args.grid is not None:  # checked before any work: the grid is written only after every image
        grid = Path(args.grid)
        if grid.is_dir():
            raise ValueError(f"--grid {grid}: is a directory (expected the path of a PNG file to write)")
        if grid.exists() and prompts_path.exists() and grid.resolve() == prompts_path.resolve():
            raise ValueError(f"--grid {grid}: would overwrite the prompts file")

    # everything that can be checked without the weights, before loading them
    cfg, special = load_checkpoint_config(checkpoint)
    tokenizer = _load_tokenizer(checkpoint, special)
    T = cfg.num_image_tokens
    if cfg.text.max_position_embeddings < T + 2:  # <bos> <boi> + the image tokens at the very least
        raise ValueError(f"{checkpoint / 'config.json'}: text_config.max_position_embeddings="
                         f"{cfg.text.max_position_embeddings} leaves no room for a prompt before the {T} image "
                         "tokens; this checkpoint cannot generate images")
    mode, _ = trained_history_mode(checkpoint, args.run_config)
    model = None
    if mode == "codes":  # history images are encoded by the run's image tokenizer (maybe the model's VQ)
        model = models.load_model(checkpoint, device=args.device, dtype=getattr(torch, args.dtype))
    prompter = prompter_for_checkpoint(checkpoint, model, run_config=args.run_config,
                                       history_mode=args.history_mode)
    if args.data is not None:
        run = _run_data_config(checkpoint, args.run_config)
        prompts = dataset_prompts(args.data, args.users, args.split, prompter, history_k=run.history_k,
                                  min_interactions=run.min_interactions,
                                  max_positions=cfg.text.max_position_embeddings, num_image_tokens=T)
    else:
        prompts = read_prompts(prompts_path, tokenizer, special, cfg.text.vocab_size,
                               max_positions=cfg.text.max_position_embeddings, num_image_tokens=T,
                               prompter=prompter)
    stage, created = make_out(out_dir)
    published = False
    try:
        if model is None:
            model = models.load_model(checkpoint, device=args.device, dtype=getattr(torch, args.dtype))
        gen = Generator(model, max_batch_size=args.batch_size * args.num_samples,
                        max_seq_len=max(len(p.input_ids) for p in prompts) + T, uncond_mode=args.uncond_mode)
        used: set[str] = set()
        names: list[str] = []
        manifest: list[str] = []
        bar = tqdm(total=len(prompts) * args.num_samples, desc="pgen generate", unit="img", disable=args.quiet)
        try:
            for start in range(0, len(prompts), args.batch_size):
                chunk = prompts[start:start + args.batch_size]
                seeds = [request_seed_for_id(args.seed, p.id) for p in chunk]
                masks = [p.gen_code_mask or [False] * len(p.input_ids) for p in chunk]
                px = [p.pixel_values for p in chunk if p.pixel_values is not None]
                try:
                    codes = gen.generate([p.input_ids for p in chunk], None,
                                         torch.cat(px).to(model.device) if px else None,
                                         gen_code_mask=masks if any(map(any, masks)) else None,
                                         num_samples=args.num_samples, sampling=args.sampling.replace(seed=seeds))
                except NonFiniteLogitsError as e:
                    # the weights are finite (load_model checks): the activations overflow,
                    # e.g. a model trained in bf16 run in float16
                    hint = "; try --dtype float32" if args.dtype != "float32" else ""
                    line = chunk[e.row // args.num_samples].line
                    raise ValueError(f"{args.checkpoint}: the model's image logits for the prompt on line {line} are "
                                     f"NaN/Inf in {args.dtype} at image token {e.token} (the weights are finite, "
                                     f"the activations overflow){hint}; no image was written") from None
                except GenerationMemoryError as e:  # the Generator's message names its arguments, not the flags
                    raise ValueError(f"--num-samples {args.num_samples} with --batch-size {args.batch_size}: "
                                     f"{e}; no image was written") from None
                images = decode_codes(model, prompter, codes).cpu().numpy()
                for i, p in enumerate(chunk):
                    stem = file_stem(p.id, used)
                    for j in range(args.num_samples):
                        name = f"{stem}_{j}.png"
                        write_png(images[i * args.num_samples + j], stage / name)
                        names.append(name)
                        rec = {"id": p.id, "sample": j, "file": name, "line": p.line, "seed": seeds[i],
                               "base_seed": args.seed, "num_prompt_tokens": len(p.input_ids),
                               "guidance_scale": args.guidance_scale, "temperature": args.temperature,
                               "top_k": args.top_k, "top_p": args.top_p, "greedy": args.greedy,
                               "uncond_mode": args.uncond_mode}
                        if p.text is not None:
                            rec["prompt"] = p.text
                        if p.history is not None:
                            rec["history"] = p.history
                            rec["history_mode"] = prompter.mode
                        manifest.append(json.dumps(rec, ensure_ascii=False))
                        bar.update(1)
        finally:
            bar.close()
        # the manifest is written (and synced) before anything moves, so a full disk or an
        # error here leaves --out untouched; the moves below are renames within one folder
        atomic_write_text(stage / MANIFEST, "\n".join(manifest) + "\n")
        if args.grid:
            write_grid(Path(args.grid), prompts, stage, args.num_samples, used_stems=names)
        # a folder in the way would stop the moves half-way (some images replaced, no manifest)
        blocked = [n for n in (*names, MANIFEST) if (out_dir / n).exists() and not (out_dir / n).is_file()]
        if blocked:
            raise ValueError(f"--out {out_dir}: {blocked[0]!r} there is not a file and would be replaced by an "
                             f"output; move it away (nothing was written)")
        publish(stage, out_dir, names)
        published = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not published:
            rmdir_quiet(out_dir)
    if not args.quiet:
        print(f"wrote {len(manifest)} image(s) and {MANIFEST} to {out_dir}")
    return 0


def _run_data_config(checkpoint: Path, run_config: str | None):
    """The ``data`` section of the checkpoint's training run (defaults when there is none)."""
    path = Path(run_config) if run_config else checkpoint.parent / "config.resolved.yaml"
    return load_config(path).data if path.is_file() else DataConfig()


def register(subparsers) -> None:
    """Add ``pgen generate`` to the ``pgen`` sub-command parser."""
    p = subparsers.add_parser("generate", help="generate images for the prompts of a JSONL file",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Hugging Face Janus checkpoint directory")
    p.add_argument("--prompts", default=None, help='JSONL, one per line: {"id": ..., "history": [{"image": '
                   '"posters/1.jpg", "title": "..."}, ...], "prompt": "optional extra text"} (paths relative to the '
                   'file), {"id": ..., "prompt": "text"} or {"id": ..., "input_ids": [...]}')
    p.add_argument("--data", default=None, help="instead of --prompts: a native-layout dataset; with --users, each "
                   "user's history of the --split example is the prompt")
    p.add_argument("--users", default=None, help="comma-separated user ids of --data, or @FILE with one id per line")
    p.add_argument("--split", choices=("train", "valid", "test"), default="test",
                   help="which example's history --data uses (default test: the user's last history_k items "
                   "before the final item)")
    p.add_argument("--grid", default=None, help="also write one PNG: per prompt, its history images and its "
                   "generated samples")
    p.add_argument("--history-mode", choices=("pixels", "codes"), default=None,
                   help="refuse to run unless the model was trained with this history mode (default: the mode "
                   "of its run config)")
    p.add_argument("--run-config", default=None, help="the training run's config.resolved.yaml (default: "
                   "CHECKPOINT/../config.resolved.yaml): prompt template, history mode, image tokenizer")
    p.add_argument("--out", required=True, help="output directory (PNGs + manifest.jsonl); written only when "
                   "the run completes")
    p.add_argument("--num-samples", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="CFG scale; 1 turns CFG off (default 5)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="1 disables (default)")
    p.add_argument("--greedy", action="store_true", help="argmax of the CFG-mixed logits instead of sampling")
    p.add_argument("--uncond-mode", choices=("pad", "short"), default="pad")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=_DTYPES, default="float32")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    p.set_defaults(func=run_generate)
