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
import codecs
import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

_DTYPES = ("float32", "bfloat16", "float16")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
FIELDS = ("id", "prompt", "input_ids", "history")
MANIFEST = "manifest.jsonl"
_MAX_STEM = 80  # characters (ASCII) of an id kept in a file name; longer ids get a hash suffix
_STAGE_PREFIX = ".pgen-generate."


@dataclasses.dataclass(frozen=True)
class PromptLine:
    """One valid prompts.jsonl line."""

    line: int
    id: str
    text: str | None
    input_ids: list[int]
    history: list[dict] | None = None  # the items as given ({"image", "title"}; --data adds "item_id")
    gen_code_mask: list[bool] | None = None
    pixel_values: object = None  # float32 [n, 3, S, S] (pixels history mode)
    history_files: list[str] | None = None  # the history images' resolved paths (for --grid)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise _DuplicateKey(k)
        obj[k] = v
    return obj


def _utf8_error(s: str) -> str | None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not encodable as UTF-8 ({e.reason} at character {e.start})"
    return None


def _parse_history(obj: dict, where: str, base: Path, prompter) -> tuple[list[dict], object] | str:
    """The ``"history"`` field -> (items as recorded, HistoryInput), or the error message."""
    from pgen_engine.data.dataset import DataError

    hist = obj["history"]
    if not isinstance(hist, list):
        return f"{where}: field 'history' must be a list of {{\"image\": path, \"title\": text}} objects"
    if not hist:
        return f"{where}: field 'history' is empty; a user history needs at least one item"
    if "input_ids" in obj:
        return f"{where}: 'history' and 'input_ids' cannot be combined (the history builds the prompt)"
    extra = obj.get("prompt")
    if extra is not None and not isinstance(extra, str):
        return f"{where}: field 'prompt' must be a string, got {type(extra).__name__}"
    items, srcs = [], []
    for j, it in enumerate(hist, start=1):
        if not isinstance(it, dict) or not isinstance(it.get("image"), str) or not it["image"].strip():
            return f"{where}: field 'history' item {j} must be an object with a non-empty string 'image' path"
        bad = [k for k in it if k not in ("image", "title", "item_id")]
        if bad:
            return f"{where}: field 'history' item {j} has unknown key(s) {', '.join(map(repr, bad))}"
        title = it.get("title", "")
        if not isinstance(title, str):
            return f"{where}: field 'history' item {j}: 'title' must be a string"
        items.append({k: it[k] for k in ("item_id", "image", "title") if k in it})
        srcs.append((base / it["image"], title))
    if prompter is None:
        return f"{where}: field 'history' needs the checkpoint's history prompt builder"
    try:
        built = prompter.build(srcs, extra=extra or None)
    except DataError as e:  # names the image file
        return f"{where}: field 'history': {e}"
    except Exception as e:  # a tokenizer / image tokenizer's own error types
        return f"{where}: field 'history' cannot be turned into a prompt ({type(e).__name__}: {e})"
    return items, built


def _parse_line(raw: bytes, where: str, seen: dict[str, int], n: int, tokenizer, special, vocab_size: int,
                max_positions: int | None, num_image_tokens: int, base: Path | None = None,
                prompter=None) -> PromptLine | str:
    """A valid line, or the error message for it."""
    try:
        text_line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
    try:
        obj = json.loads(text_line, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        return f"{where}: duplicate key {e.args[0]!r} in the object"
    except json.JSONDecodeError as e:
        return f"{where}: not valid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return f"{where}: not valid JSON (nested too deeply)"
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(obj), "a number")
        return f"{where}: expected a JSON object, got {kind}"
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        return (f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; expected 'id' and 'history' "
                "(+ optional 'prompt'), 'prompt' or 'input_ids'")
    pid = obj.get("id")
    if isinstance(pid, bool) or not isinstance(pid, (str, int)) or not str(pid).strip():
        return f"{where}: field 'id' must be a non-empty string or int, got {pid!r}"
    pid = str(pid)
    bad = _utf8_error(pid)
    if bad:
        return f"{where}: field 'id' is {bad}"
    if pid in seen:
        return f"{where}: duplicate id {pid!r} (first on line {seen[pid]})"
    if "history" in obj:
        got = _parse_history(obj, where, base or Path("."), prompter)
        if isinstance(got, str):
            return got
        items, h = got
        if max_positions is not None and len(h.input_ids) + num_image_tokens > max_positions:
            return (f"{where}: the history of {len(items)} item(s) makes a prompt of {len(h.input_ids)} tokens; with "
                    f"the {num_image_tokens} image tokens that exceeds the model's max_position_embeddings="
                    f"{max_positions}; use fewer history items")
        seen[pid] = n
        return PromptLine(n, pid, obj.get("prompt"), h.input_ids, items, h.gen_code_mask, h.pixel_values,
                          [str((base or Path(".")) / it["image"]) for it in items])
    has_text, has_ids = "prompt" in obj, "input_ids" in obj
    if has_text == has_ids:
        return f"{where}: exactly one of 'prompt' (text) or 'input_ids' (list of ints) is required"
    if has_text:
        text = obj["prompt"]
        if not isinstance(text, str):
            return f"{where}: field 'prompt' must be a string, got {type(text).__name__}"
        bad = _utf8_error(text)
        if bad:
            return f"{where}: field 'prompt' is {bad}"
        try:
            ids = [special.bos, *tokenizer.encode(text), special.boi]
        except Exception as e:  # a third-party tokenizer's own error types
            return f"{where}: field 'prompt' cannot be tokenised ({type(e).__name__}: {e})"
    else:
        text = None
        ids = obj["input_ids"]
        if (not isinstance(ids, list) or not ids
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
            return f"{where}: field 'input_ids' must be a non-empty list of ints"
        bad_ids = [t for t in ids if not 0 <= t < vocab_size]
        if bad_ids:
            return f"{where}: input_ids value {bad_ids[0]} outside the vocabulary [0, {vocab_size})"
        if ids[-1] != special.boi:
            return (f"{where}: input_ids must end with the begin-of-image id {special.boi} (<boi>), "
                    f"got {ids[-1]}")
    n_img = sum(1 for t in ids if t == special.image)
    if n_img:
        return (f"{where}: the prompt holds {n_img} <image> placeholder token(s) (id {special.image}); "
                "history images come through the 'history' field")
    if max_positions is not None and len(ids) + num_image_tokens > max_positions:
        return (f"{where}: the prompt is {len(ids)} tokens; with the {num_image_tokens} image tokens that exceeds "
                f"the model's max_position_embeddings={max_positions} (at most "
                f"{max_positions - num_image_tokens} prompt tokens)")
    seen[pid] = n
    return PromptLine(n, pid, text, list(ids))


def read_prompts(path: str | Path, tokenizer, special, vocab_size: int, *, max_positions: int | None = None,
                 num_image_tokens: int = 0, prompter=None) -> list[PromptLine]:
    """Parse and validate a prompts.jsonl file.

    Args:
        path: the file (UTF-8, optional BOM, LF or CRLF line ends).
        tokenizer: object with ``encode(text) -> list[int]`` (no special tokens).
        special: :class:`pgen_engine.SpecialTokens` (bos / boi framing of text prompts; the
            ``image`` placeholder id is refused).
        vocab_size: text vocabulary size; ``input_ids`` must lie in ``[0, vocab_size)``.
        max_positions: the model's ``max_position_embeddings``; a prompt plus
            ``num_image_tokens`` must fit in it (None: no limit).
        num_image_tokens: image tokens generated after each prompt.
        prompter: the checkpoint's :class:`~pgen_engine.data.history.HistoryPrompter`
            (needed by ``"history"`` lines; their images are read relative to ``path``).
    Returns:
        the prompts in file order.
    Raises:
        FileNotFoundError: no such file.
        ValueError: ``path`` is a directory; one message per invalid line
            (``path:line: what is wrong``); or no prompt at all.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; expected a prompts .jsonl file")
    if not path.exists():
        raise FileNotFoundError(f"{path}: prompts file does not exist")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file; expected a prompts .jsonl file")
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    errors: list[str] = []
    out: list[PromptLine] = []
    seen: dict[str, int] = {}
    # split on LF only: a JSON string may hold U+2028 and friends, which str.splitlines() splits on
    for n, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if not raw.strip():
            continue
        got = _parse_line(raw, f"{path}:{n}", seen, n, tokenizer, special, vocab_size, max_positions,
                          num_image_tokens, path.parent, prompter)
        if isinstance(got, str):
            errors.append(got)
        else:
            out.append(got)
    if errors:
        shown = errors[:20] + ([f"... and {len(errors) - 20} more invalid line(s)"] if len(errors) > 20 else [])
        raise ValueError(f"{len(errors)} invalid prompt line(s):\n" + "\n".join(shown))
    if not out:
        raise ValueError(f"{path}: no prompts (the file is empty or holds only blank lines)")
    return out


def _file_stem(pid: str, used: set[str]) -> str:
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


def _sampling_params(args: argparse.Namespace) -> "SamplingParams":
    """The flags' SamplingParams; its validation errors are re-worded to name the flag."""
    from .sampling_params import SamplingParams, SamplingParamsError

    try:
        return SamplingParams(guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, greedy=args.greedy, seed=args.seed)
    except SamplingParamsError as e:
        detail = e.detail.replace("use greedy", "use --greedy")
        raise ValueError(f"--{e.field.replace('_', '-')} {detail}") from None


def _check_args(args: argparse.Namespace) -> None:
    """Refuse invalid flag values before anything is loaded; messages name the flag."""
    import torch

    for name in ("num_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.sampling = _sampling_params(args)
    try:
        dev = torch.device(args.device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device {args.device!r} is not a torch device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _check_out(out_dir: Path, checkpoint: Path, prompts: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: exists and is not a directory (expected an output directory)")
    if out_dir.is_dir() and checkpoint.is_dir() and out_dir.resolve() == checkpoint.resolve():
        raise ValueError(f"--out {out_dir}: is the checkpoint directory; choose another output directory")
    if prompts.exists() and prompts.resolve() == (out_dir / MANIFEST).resolve():
        raise ValueError(f"--out {out_dir}: its {MANIFEST} would overwrite the prompts file {prompts}")


def _make_out(out_dir: Path) -> tuple[Path, bool]:
    """Create ``out_dir`` if needed and a staging folder inside it -> (stage, created out_dir)."""
    import tempfile

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
            _rmdir_quiet(out_dir)
        raise ValueError(f"--out {out_dir}: not writable ({e.strerror or e})") from None
    return stage, created


def _rmdir_quiet(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:
        pass


def _save_png(array, path: Path) -> None:
    from PIL import Image

    with open(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")
        f.flush()
        os.fsync(f.fileno())


def _load_tokenizer(checkpoint: Path, special):
    try:
        from pgen_engine.data.text_tokenizer import HF_TOKENIZER_FILES, load_text_tokenizer
    except ImportError as e:  # the data layer is part of the package; this guards partial installs
        raise RuntimeError(f"text prompts need pgen_engine.data.text_tokenizer: {e}") from e
    try:
        return load_text_tokenizer(checkpoint, special)
    except FileNotFoundError:
        raise
    except Exception as e:  # transformers' tokenizer loaders raise many error types
        files = [f for f in HF_TOKENIZER_FILES if (checkpoint / f).is_file()]
        raise ValueError(f"{checkpoint}: cannot load the tokenizer ({', '.join(files)}): "
                         f"{type(e).__name__}: {e}") from None


def dataset_prompts(data_dir: str | Path, users: str, split: str, prompter, *, history_k: int,
                    min_interactions: int, max_positions: int | None, num_image_tokens: int) -> list[PromptLine]:
    """``--data DIR --users 1,2,3 --split S``: each user's ``split`` example (its last
    ``history_k`` items before the target, oldest first) as a history prompt.

    Raises ValueError naming the flag / user / image for an unknown user, a user without a
    ``split`` example, or a missing / corrupt image.
    """
    from pgen_engine.data.dataset import DataError, load_dataset
    from pgen_engine.data.splits import build_splits

    ids = [u.strip() for u in users.split(",") if u.strip()]
    if not ids:
        raise ValueError(f"--users {users!r}: expected a comma-separated list of user ids")
    if len(set(ids)) != len(ids):
        raise ValueError(f"--users {users!r}: duplicate user id(s)")
    try:
        ds = load_dataset(data_dir, check_images=False)
    except (DataError, OSError) as e:
        raise ValueError(f"--data {data_dir}: {e}") from None
    splits = build_splits(ds, k=history_k, min_interactions=min_interactions)
    by_user = {ex.user_id: ex for ex in getattr(splits, split)}
    out, errors = [], []
    for n, uid in enumerate(ids, start=1):
        where = f"--data {data_dir} --users: user {uid!r}"
        if uid not in ds.interactions:
            errors.append(f"{where}: not in the dataset")
            continue
        ex = by_user.get(uid)
        if ex is None or not ex.history:
            errors.append(f"{where}: no {split} example (users need >= {min_interactions} interactions)")
            continue
        items = [{"item_id": i, "image": str(ds.items[i].image_path), "title": ds.items[i].title}
                 for i in ex.history]
        if any(ds.items[i].image_path is None for i in ex.history):
            errors.append(f"{where}: a history item has no image")
            continue
        try:
            h = prompter.build([(Path(it["image"]), it["title"]) for it in items])
        except DataError as e:
            errors.append(f"{where}: {e}")
            continue
        if max_positions is not None and len(h.input_ids) + num_image_tokens > max_positions:
            errors.append(f"{where}: the history of {len(items)} item(s) makes a prompt of {len(h.input_ids)} "
                          f"tokens; with the {num_image_tokens} image tokens that exceeds max_position_embeddings="
                          f"{max_positions}")
            continue
        out.append(PromptLine(n, uid, None, h.input_ids, items, h.gen_code_mask, h.pixel_values,
                              [it["image"] for it in items]))
    if errors:
        raise ValueError(f"{len(errors)} invalid user(s):\n" + "\n".join(errors[:20]))
    return out


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
    _check_out(out_dir, checkpoint, prompts_path)

    import torch
    from tqdm.auto import tqdm

    from pgen_engine.io_utils import atomic_write_text
    from pgen_engine.models import load_model
    from pgen_engine.models.checkpoint import load_checkpoint_config

    from pgen_engine.data.history import prompter_for_checkpoint, trained_history_mode

    from .generator import Generator, NonFiniteLogitsError
    from .personal import decode_codes, request_seed_for_id

    # everything that can be checked without the weights, before loading them
    cfg, special = load_checkpoint_config(checkpoint)
    tokenizer = _load_tokenizer(checkpoint, special)
    T = cfg.num_image_tokens
    mode, _ = trained_history_mode(checkpoint, args.run_config)
    model = None
    if mode == "codes":  # history images are encoded by the run's image tokenizer (maybe the model's VQ)
        model = load_model(checkpoint, device=args.device, dtype=getattr(torch, args.dtype))
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
    stage, created = _make_out(out_dir)
    published = False
    try:
        if model is None:
            model = load_model(checkpoint, device=args.device, dtype=getattr(torch, args.dtype))
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
                images = decode_codes(model, prompter, codes).cpu().numpy()
                for i, p in enumerate(chunk):
                    stem = _file_stem(p.id, used)
                    for j in range(args.num_samples):
                        name = f"{stem}_{j}.png"
                        _save_png(images[i * args.num_samples + j], stage / name)
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
            _write_grid(Path(args.grid), prompts, stage, args.num_samples, used_stems=names)
        for name in names:
            os.replace(stage / name, out_dir / name)
        os.replace(stage / MANIFEST, out_dir / MANIFEST)
        published = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not published:
            _rmdir_quiet(out_dir)
    if not args.quiet:
        print(f"wrote {len(manifest)} image(s) and {MANIFEST} to {out_dir}")
    return 0


def _write_grid(path: Path, prompts: list[PromptLine], stage: Path, num_samples: int, used_stems: list[str]) -> None:
    """``--grid``: per prompt, a row of its history images (if any) and a row of its samples, one PNG."""
    import numpy as np
    import torch
    from PIL import Image

    from pgen_engine.data.history import load_history_image
    from pgen_engine.eval.report import image_grid, save_png

    rows = []
    for i, p in enumerate(prompts):
        gen = np.stack([np.asarray(Image.open(stage / used_stems[i * num_samples + j])) for j in range(num_samples)])
        if p.history_files:
            hist = np.stack([load_history_image(f, gen.shape[1]) for f in p.history_files])
            rows.append((f"{p.id[:18]}: history", torch.from_numpy(hist)))
        rows.append((f"{p.id[:18]}: generated", torch.from_numpy(gen)))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(path, image_grid(rows))


def _run_data_config(checkpoint: Path, run_config: str | None):
    """The ``data`` section of the checkpoint's training run (defaults when there is none)."""
    from pgen_engine.config import DataConfig, load_config

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
    p.add_argument("--users", default=None, help="comma-separated user ids of --data")
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
