"""Reading a ``pgen generate`` prompts file (JSONL): one :class:`PromptLine` per valid line, or
every invalid line reported as ``file:line: what is wrong`` (the format is described in
:mod:`pgen_engine.generation.cli`)."""
from __future__ import annotations

import codecs
import dataclasses
import json
from pathlib import Path

from pgen_engine.data.dataset import DataError

FIELDS = ("id", "prompt", "input_ids", "history")


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
    if len(errors) == 1:  # one problem: one line (was "1 invalid prompt line(s):" and the line below it)
        raise ValueError(errors[0])
    if errors:
        shown = errors[:20] + ([f"... and {len(errors) - 20} more invalid line(s)"] if len(errors) > 20 else [])
        raise ValueError(f"{len(errors)} invalid prompt line(s):\n" + "\n".join(shown))
    if not out:
        raise ValueError(f"{path}: no prompts (the file is empty or holds only blank lines)")
    return out
