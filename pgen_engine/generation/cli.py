"""``pgen generate``: prompts.jsonl -> PNG images + ``manifest.jsonl``.

Each non-blank line of the prompts file is a JSON object with an ``"id"`` (string or int,
unique) and either ``"prompt"`` (text; tokenised with the checkpoint's tokenizer and framed
as ``<bos> text <boi>``) or ``"input_ids"`` (a list of token ids used as given, e.g. a
prompt built by :mod:`pgen_engine.data.prompts`). Invalid lines are all reported with
their line numbers before anything is generated.

Sample ``j`` of the prompt on line ``n`` uses request seed ``mix_seed(--seed, n)``, so an
image does not change with ``--batch-size`` or with the other prompts in the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

_DTYPES = ("float32", "bfloat16", "float16")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclasses.dataclass(frozen=True)
class PromptLine:
    """One valid prompts.jsonl line."""

    line: int
    id: str
    text: str | None
    input_ids: list[int]


def read_prompts(path: str | Path, tokenizer, special, vocab_size: int) -> list[PromptLine]:
    """Parse and validate a prompts.jsonl file.

    Args:
        path: the file.
        tokenizer: object with ``encode(text) -> list[int]`` (no special tokens).
        special: :class:`pgen_engine.SpecialTokens` (bos / boi framing of text prompts).
        vocab_size: text vocabulary size; ``input_ids`` must lie in ``[0, vocab_size)``.
    Returns:
        the prompts in file order.
    Raises:
        FileNotFoundError: no such file.
        ValueError: one message per invalid line (``path:line: what is wrong``), or no prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompts file does not exist")
    errors: list[str] = []
    out: list[PromptLine] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            errors.append(f"{where}: not valid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
            continue
        pid = obj.get("id")
        if isinstance(pid, bool) or not isinstance(pid, (str, int)) or str(pid) == "":
            errors.append(f"{where}: field 'id' must be a non-empty string or int, got {pid!r}")
            continue
        pid = str(pid)
        if pid in seen:
            errors.append(f"{where}: duplicate id {pid!r} (first on line {seen[pid]})")
            continue
        has_text, has_ids = "prompt" in obj, "input_ids" in obj
        if has_text == has_ids:
            errors.append(f"{where}: exactly one of 'prompt' (text) or 'input_ids' (list of ints) is required")
            continue
        if has_text:
            text = obj["prompt"]
            if not isinstance(text, str):
                errors.append(f"{where}: field 'prompt' must be a string, got {type(text).__name__}")
                continue
            ids = [special.bos, *tokenizer.encode(text), special.boi]
        else:
            text = None
            ids = obj["input_ids"]
            if (not isinstance(ids, list) or not ids
                    or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
                errors.append(f"{where}: field 'input_ids' must be a non-empty list of ints")
                continue
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                errors.append(f"{where}: input_ids value {bad[0]} outside the vocabulary [0, {vocab_size})")
                continue
        seen[pid] = n
        out.append(PromptLine(n, pid, text, list(ids)))
    if errors:
        shown = errors[:20] + ([f"... and {len(errors) - 20} more invalid line(s)"] if len(errors) > 20 else [])
        raise ValueError(f"{len(errors)} invalid prompt line(s):\n" + "\n".join(shown))
    if not out:
        raise ValueError(f"{path}: no prompts (the file is empty)")
    return out


def _file_stem(pid: str, used: set[str]) -> str:
    stem = _SAFE.sub("_", pid).strip("._") or "prompt"
    base, k = stem, 1
    while stem in used:  # ids that differ only in unsafe characters
        k += 1
        stem = f"{base}~{k}"
    used.add(stem)
    return stem


def run_generate(args: argparse.Namespace) -> int:
    """Implementation of ``pgen generate`` (see :func:`register` for the arguments)."""
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from pgen_engine.io_utils import atomic_path, atomic_write_text
    from pgen_engine.models import load_model
    from pgen_engine.ops.rng import mix_seed

    from .generator import Generator

    for name in ("num_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    model = load_model(args.checkpoint, device=args.device, dtype=getattr(torch, args.dtype))
    try:
        from pgen_engine.data.text_tokenizer import load_text_tokenizer
    except ImportError as e:  # the data layer is part of the package; this guards partial installs
        raise RuntimeError(f"text prompts need pgen_engine.data.text_tokenizer: {e}") from e
    tokenizer = load_text_tokenizer(args.checkpoint, model.special_tokens)
    prompts = read_prompts(args.prompts, tokenizer, model.special_tokens, model.config.text.vocab_size)
    T = model.num_image_tokens
    gen = Generator(model, max_batch_size=args.batch_size * args.num_samples,
                    max_seq_len=max(len(p.input_ids) for p in prompts) + T, uncond_mode=args.uncond_mode,
                    scheduler=args.scheduler)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    manifest: list[str] = []
    bar = tqdm(total=len(prompts) * args.num_samples, desc="pgen generate", unit="img", disable=args.quiet)
    try:
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start:start + args.batch_size]
            seeds = [int(mix_seed(args.seed, p.line)) for p in chunk]
            images = gen.generate_images([p.input_ids for p in chunk], num_samples=args.num_samples,
                                         guidance_scale=args.guidance_scale, temperature=args.temperature,
                                         top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, seed=seeds)
            images = images.cpu().numpy()
            for i, p in enumerate(chunk):
                stem = _file_stem(p.id, used)
                for j in range(args.num_samples):
                    name = f"{stem}_{j}.png"
                    with atomic_path(out_dir / name) as tmp:
                        Image.fromarray(images[i * args.num_samples + j]).save(tmp, format="PNG")
                    rec = {"id": p.id, "sample": j, "file": name, "line": p.line, "seed": seeds[i],
                           "num_prompt_tokens": len(p.input_ids), "guidance_scale": args.guidance_scale,
                           "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                           "greedy": args.greedy, "uncond_mode": args.uncond_mode}
                    if p.text is not None:
                        rec["prompt"] = p.text
                    manifest.append(json.dumps(rec, ensure_ascii=False))
                    bar.update(1)
    finally:
        bar.close()
    atomic_write_text(out_dir / "manifest.jsonl", "\n".join(manifest) + "\n")
    if not args.quiet:
        print(f"wrote {len(manifest)} image(s) and manifest.jsonl to {out_dir}")
    return 0


def register(subparsers) -> None:
    """Add ``pgen generate`` to the ``pgen`` sub-command parser."""
    p = subparsers.add_parser("generate", help="generate images for the prompts of a JSONL file",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Hugging Face Janus checkpoint directory")
    p.add_argument("--prompts", required=True, help='JSONL: {"id": ..., "prompt": "text"} or {"id": ..., '
                   '"input_ids": [...]} per line')
    p.add_argument("--out", required=True, help="output directory (PNGs + manifest.jsonl)")
    p.add_argument("--num-samples", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="CFG scale; 1 turns CFG off (default 5)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="1 disables (default)")
    p.add_argument("--greedy", action="store_true", help="argmax of the CFG-mixed logits instead of sampling")
    p.add_argument("--uncond-mode", choices=("pad", "short"), default="pad")
    p.add_argument("--scheduler", choices=("waves", "continuous"), default="waves",
                   help="waves (default) or the C++ continuous-batching scheduler over a paged cache (pad mode)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=_DTYPES, default="float32")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    p.set_defaults(func=run_generate)
