"""Strict loading and atomic saving of Hugging Face Janus checkpoints.

One loader for every caller (CLI, trainer, tests): every tensor in the files must be
consumed, every parameter must be found, every shape must match — never ``strict=False``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint_writer import (INDEX_NAME, SIDECAR_GLOBS, SINGLE_NAME, TRAINING_RECORD, hf_key as _hf_key,
                                save_checkpoint)
from .janus import JanusModel
from .janus_config import CheckpointError, JanusModelConfig
from .special_tokens import SpecialTokens

__all__ = ["INDEX_NAME", "SINGLE_NAME", "SIDECAR_GLOBS", "load_checkpoint_config", "load_model",
           "save_checkpoint"]
LOADABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _shard_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: invalid index file ({e!r}); expected a JSON object with 'weight_map'")
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise CheckpointError(f"{index}: 'weight_map' must be an object mapping tensor names to shard file names")
        outside = sorted({v for v in weight_map.values() if Path(v).name != v or v in ("", ".", "..")})
        if outside:
            raise CheckpointError(f"{index}: shard file name(s) {', '.join(map(repr, outside[:3]))} are not plain file "
                                  "names in the checkpoint directory")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{index}: references missing shard file(s): {', '.join(missing)}")
        return [path / f for f in files]
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found
    pickled = [] if found else sorted(p.name for p in path.glob("*.bin"))
    raise CheckpointError(
        f"{path}: no weights found (expected {SINGLE_NAME}, or {INDEX_NAME} with shards)"
        + (f"; found {len(found)} *.safetensors files without an index" if found else "")
        # pickled weights are never unpickled here (arbitrary code); transformers can re-save them
        + (f"; found {pickled[0]}{' and others' if len(pickled) > 1 else ''}: pgen reads safetensors only, re-save "
           "with JanusForConditionalGeneration.from_pretrained(DIR).save_pretrained(OUT)" if pickled else "")
    )


def _read_tensors(files: list[Path]) -> dict[str, tuple[Path, object]]:
    """key -> (file, open safetensors handle). Raises CheckpointError on unreadable files."""
    where: dict[str, tuple[Path, object]] = {}
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt")
            keys = list(handle.keys())
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise CheckpointError(f"{f}: cannot read safetensors file ({e}); the file may be truncated or corrupt")
        for k in keys:
            if k in where:
                raise CheckpointError(f"{f}: tensor {k!r} also present in {where[k][0].name}")
            where[k] = (f, handle)
    return where


def read_training_record(path: str | Path) -> dict | None:
    """The training record a pgen export wrote into checkpoint ``path`` (``pgen_training.json``:
    ``stage``, ``history_mode``), or None for a checkpoint without one (foreign, or older).

    Raises ValueError naming the file when it is unreadable or not a JSON object."""
    f = Path(path) / TRAINING_RECORD
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{f}: unreadable training record ({e})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{f}: unreadable training record (expected a JSON object, got {type(rec).__name__})")
    return rec


def stored_dtypes(path: str | Path) -> dict[str, int]:
    """How many tensors of each stored dtype the checkpoint's weight files hold, e.g.
    ``{"BF16": 280}`` (safetensors' dtype names), read from the file headers only.

    Raises CheckpointError for a folder without readable weights."""
    counts: dict[str, int] = {}
    for key, (_, handle) in _read_tensors(_shard_files(Path(path))).items():
        dtype = handle.get_slice(key).get_dtype()
        counts[dtype] = counts.get(dtype, 0) + 1
    return dict(sorted(counts.items()))


_LM_HEAD, _EMBED = "lm_head.weight", "model.language_model.embed_tokens.weight"


def _tying_as_stored(cfg: JanusModelConfig, tensors: dict) -> tuple[JanusModelConfig, dict[str, torch.Tensor]]:
    """``cfg``, untied when it ties lm_head to embed_tokens but the checkpoint holds both with
    different values: ``transformers`` then keeps both (warning that the config is wrong), so the
    engine does too instead of dropping the checkpoint's lm_head. The config it saves says so.
    Also returns the tensors read for the comparison, so the load does not read them again (the
    embedding is the largest tensor of a checkpoint)."""
    if not cfg.tie_word_embeddings or _LM_HEAD not in tensors or _EMBED not in tensors:
        return cfg, {}
    try:
        head, emb = (tensors[k][1].get_tensor(k) for k in (_LM_HEAD, _EMBED))
    except Exception:  # unreadable: the load reports it, naming the file and tensor
        return cfg, {}
    if head.shape == emb.shape and torch.equal(head, emb.to(head.dtype)):
        return cfg, {_EMBED: emb}
    return dataclasses.replace(cfg, tie_word_embeddings=False, raw={**cfg.raw, "tie_word_embeddings": False}), \
        {_LM_HEAD: head, _EMBED: emb}


def _reset_buffers(model: JanusModel, device: torch.device) -> None:
    # Non-persistent buffers are not in checkpoints; recompute them after meta construction.
    lm = model.language_model
    t = model.config.text
    inv = 1.0 / (t.rope_theta ** (torch.arange(0, t.head_dim, 2, dtype=torch.int64).float() / t.head_dim))
    lm.rotary.inv_freq = (inv / t.rope_scaling_factor).to(device)
    emb = model.vision_model.embeddings
    emb.position_ids = torch.arange(emb.num_patches, device=device).expand((1, -1))


def _not_a_checkpoint_hint(path: Path) -> str:
    """For a folder without config.json: what it looks like instead (a pgen training run...)."""
    if (path / "final" / "config.json").is_file():
        return (f"; {path} looks like a pgen training run directory: its exported Hugging Face checkpoint "
                f"is {path / 'final'}")
    if (path / "pgen_checkpoint.json").is_file() or (path / "latest").is_file():
        run = path.parent if (path / "latest").is_file() else path.parent.parent
        return (f"; {path} is a resumable DeepSpeed training checkpoint (sharded optimizer state), not a "
                f"Hugging Face checkpoint: use the run's exported model {run / 'final'}")
    return ""


def load_checkpoint_config(path: str | Path) -> tuple[JanusModelConfig, SpecialTokens]:
    """Read and validate a checkpoint's ``config.json`` and special token ids, no weights.

    Lets a caller check its inputs (prompt lengths, token ids) against the model before
    paying for a weight load; :func:`load_model` starts with it.

    Raises:
        CheckpointError: not a checkpoint folder (with a hint when it is a ``pgen train`` run
            or DeepSpeed checkpoint), or what :meth:`JanusModelConfig.from_dir` and
            :meth:`SpecialTokens.from_checkpoint` refuse — the message names the file and field.
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if path.is_dir() and not cfg_file.is_file():
        hint = _not_a_checkpoint_hint(path)
        if hint:
            raise CheckpointError(f"{cfg_file}: missing (expected a Hugging Face checkpoint directory with "
                                  f"config.json){hint}")
    return JanusModelConfig.from_dir(path), SpecialTokens.from_checkpoint(path)


def checked_device(device: str | torch.device, label: str | None = None) -> torch.device:
    """``device`` as a torch.device that exists here; otherwise a CheckpointError (a
    ValueError) whose message starts with ``label`` (default ``device 'X'``), raised before any
    weight is read: torch would fail later with a bare AssertionError / RuntimeError."""
    label = label or f"device {str(device)!r}"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{label} is not a torch device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckpointError(f"{label}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CheckpointError(f"{label}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
               ) -> JanusModel:
    """Load a Hugging Face Janus checkpoint directory strictly.

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` (or a sharded
            ``model.safetensors.index.json``), as written by ``transformers``'
            ``JanusForConditionalGeneration.save_pretrained`` or :meth:`JanusModel.save_pretrained`.
        device: where the weights go.
        dtype: parameter dtype (fp32, bf16 or fp16), a torch.dtype or its name ("bfloat16").
    Returns:
        the model in eval mode.
    Raises:
        CheckpointError: missing/unexpected key, shape mismatch, wrong ``model_type``,
            truncated file, NaN/Inf weights, unsupported dtype or an invalid config (see
            :func:`load_checkpoint_config`) — the message names the file and key.
    """
    if not isinstance(path, (str, os.PathLike)):  # Path(None) says only "expected str, bytes or os.PathLike"
        raise TypeError(f"path must be a checkpoint folder (str or os.PathLike), got {type(path).__name__} {path!r}")
    path = Path(path)
    if isinstance(dtype, str):  # "bfloat16" / "torch.bfloat16", as pgen generate --dtype and transformers take it
        named = getattr(torch, dtype.removeprefix("torch."), None)
        dtype = named if isinstance(named, torch.dtype) else dtype
    if dtype not in LOADABLE_DTYPES:  # a str "bfloat16" was refused as "dtype bfloat16 is not supported"
        raise CheckpointError(f"dtype {dtype!r} is not supported; use one of {LOADABLE_DTYPES} (or its name)")
    device = checked_device(device)
    cfg, special = load_checkpoint_config(path)
    tensors = _read_tensors(_shard_files(path))
    cfg, read = _tying_as_stored(cfg, tensors)
    try:
        with torch.device("meta"):
            model = JanusModel(cfg, special)
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: cannot build the model this config describes ({e})") from None

    params = dict(model.named_parameters(remove_duplicate=False))
    expected = {}
    for name, p in params.items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        expected[_hf_key(name)] = (name, p)
    optional = {_LM_HEAD} if cfg.tie_word_embeddings else set()
    stored = {}  # expected key -> the checkpoint's key, where they differ
    if cfg.tie_word_embeddings and _EMBED not in tensors and _LM_HEAD in tensors:
        # transformers ties the pair to whichever of the two the checkpoint holds
        tensors[_EMBED] = tensors.pop(_LM_HEAD)
        stored[_EMBED] = _LM_HEAD
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - optional)
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} missing tensor(s) in the checkpoint: "
                              + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        f = tensors[unexpected[0]][0]
        raise CheckpointError(f"{f}: {len(unexpected)} unexpected tensor(s) not used by the Janus model: "
                              + ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else ""))

    model.to_empty(device=device)
    model.to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, (name, _) in expected.items():
            f, handle = tensors[key]
            src = stored.get(key, key)
            try:
                t = read.pop(src) if src in read else handle.get_tensor(src)
            except Exception as e:
                raise CheckpointError(f"{f}: cannot read tensor {src!r} ({e}); the file may be truncated")
            p = params[name]
            if t.dtype not in LOADABLE_DTYPES:
                raise CheckpointError(f"{f}: tensor {src!r} has dtype {t.dtype}; expected one of "
                                      "float32/float16/bfloat16")
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(f"{f}: tensor {src!r} has shape {tuple(t.shape)}, the config implies "
                                      f"{tuple(p.shape)}")
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{f}: tensor {src!r} contains NaN or Inf")
            cast = t.to(device=device, dtype=dtype)
            # float16 holds at most 65504: larger weights turn Inf in the cast, and generation then
            # blamed "the activations" of finite weights
            if dtype == torch.float16 and t.dtype != torch.float16 and not torch.isfinite(cast).all():
                raise CheckpointError(f"{f}: tensor {src!r} holds values beyond float16's range (largest "
                                      f"|value| {float(t.abs().max()):.4g} > 65504); load it as float32 or bfloat16")
            p.copy_(cast)
    _reset_buffers(model, device)
    model.source_dir = path
    return model.eval()
