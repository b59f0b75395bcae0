"""Writing a JanusModel as a Hugging Face Janus checkpoint (the reader is :mod:`.checkpoint`).

Kept apart from the reader so that :meth:`JanusModel.save_pretrained` can use it without an
import circle (the reader builds JanusModels, so it imports :mod:`.janus`).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from pgen_engine.io_utils import _umask, atomic_dir
from pgen_engine.models.janus_config import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files that travel with a checkpoint but are not weights (tokenizer, processor). A BPE tokenizer
# saved in the slow layout is vocab.json + merges.txt (+ added_tokens.json for tokens added on
# top): without them final/'s tokenizer did not load, or lost its added special tokens.
SIDECAR_GLOBS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
                 "merges.txt", "*.model", "preprocessor_config.json", "processor_config.json", "chat_template*")


# What a pgen training run records in the checkpoint it exports (stage, data.history_mode), so
# the checkpoint says how it was trained even when moved away from its run's config.resolved.yaml.
TRAINING_RECORD = "pgen_training.json"


def hf_key(name: str) -> str:
    """Engine parameter name -> checkpoint key."""
    return name if name.startswith("lm_head.") else "model." + name


def _generation_config(model: torch.nn.Module) -> dict:
    """The source checkpoint's ``generation_config.json`` (guidance_scale, sampling settings: what
    ``transformers``' Janus generate runs with) with the model's special token ids written over
    it; the ids alone for a model without a readable source file. An ``eos_token_id`` list that
    holds the model's eos is kept (transformers stops on any of them)."""
    ids = model.special_tokens.generation_config_dict()
    src = getattr(model, "source_dir", None)
    old: object = {}
    if src is not None and (Path(src) / "generation_config.json").is_file():
        try:
            old = json.loads((Path(src) / "generation_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # the loader read it at load time; gone bad since: the ids suffice
            old = {}
    if not isinstance(old, dict):
        old = {}
    kwargs = old.get("generation_kwargs")
    out = {**old, **ids, "generation_kwargs": {**(kwargs if isinstance(kwargs, dict) else {}),
                                               **ids["generation_kwargs"]}}
    eos = old.get("eos_token_id")
    if isinstance(eos, list) and ids["eos_token_id"] in eos:
        out["eos_token_id"] = eos
    return out


def export_target_problem(path: str | Path) -> str | None:
    """Why a checkpoint may not be written at ``path`` (it replaces the folder there: only ever an
    earlier checkpoint), or None. A file, or a non-empty folder without ``config.json``."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        return "exists and is not a folder"
    if target.is_dir() and any(target.iterdir()) and not (target / "config.json").is_file():
        return "exists and is not a checkpoint (no config.json)"
    return None


def save_checkpoint(model: torch.nn.Module, path: str | Path, *, max_shard_bytes: int = 4 << 30,
                    extra_json: dict[str, dict] | None = None) -> None:
    """Write ``model`` (a :class:`~pgen_engine.models.janus.JanusModel`) as a Hugging Face Janus
    checkpoint at ``path``, atomically.

    Produces ``config.json``, ``generation_config.json`` and ``model.safetensors`` (or shards +
    index when larger than ``max_shard_bytes``); tokenizer files of the source checkpoint are
    copied along. An existing checkpoint at ``path`` is replaced only once the new one is
    complete; a non-empty folder without ``config.json`` is refused (CheckpointError).
    ``extra_json``: file name -> object, written as JSON into the same atomic folder (e.g. the
    training record :data:`TRAINING_RECORD` a pgen run adds).
    """
    target = Path(path)
    problem = export_target_problem(target)
    if problem:
        raise CheckpointError(f"{target}: {problem}; not replacing it: choose an empty or new folder")
    cfg = json.loads(json.dumps(model.config.raw))  # a copy: the sub-sections are edited below
    dtype = str(model.dtype).replace("torch.", "")
    cfg["dtype"] = dtype
    # a dtype key the input carried (transformers 4.x wrote "torch_dtype", also per section) says
    # what the tensors written here are: a bf16 input trained in float32 kept "torch_dtype":
    # "bfloat16" next to "dtype": "float32" and F32 tensors (transformers 4.x reads the former)
    for section in (cfg, *(v for v in cfg.values() if isinstance(v, dict))):
        for key in ("dtype", "torch_dtype"):
            if key in section:
                section[key] = dtype
    state = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        state[hf_key(name)] = p.detach().to("cpu").contiguous()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(state):
        n = state[k].numel() * state[k].element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = state[k]
        size += n
    gen_cfg = _generation_config(model)
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_NAME), metadata={"format": "pt"})
        else:
            weight_map = {}
            total = 0
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                for k, t in shard.items():
                    weight_map[k] = name
                    total += t.numel() * t.element_size()
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2) + "\n")
        for name, obj in (extra_json or {}).items():
            if Path(name).name != name or name in ("config.json", "generation_config.json"):
                raise ValueError(f"save_checkpoint: extra_json name {name!r} must be a plain new file name")
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        src = getattr(model, "source_dir", None)
        if src is not None and Path(src).is_dir():
            for pattern in SIDECAR_GLOBS:
                for f in Path(src).glob(pattern):
                    if f.is_file():
                        shutil.copy2(f, tmp / f.name)
        # safetensors' save_file creates its files 0600: model.safetensors of an export (or of
        # train.py's init_model / final/) was unreadable to anyone but its writer, next to a 0644 config.json
        mode = 0o666 & ~_umask()
        for f in tmp.iterdir():
            os.chmod(f, mode)
