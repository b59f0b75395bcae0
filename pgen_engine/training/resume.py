"""Where a training run resumes from, and whether it may: ``--resume`` resolution, the
fresh-start and config/data checks, and setting aside checkpoints a resume abandons.

A run may continue for more steps, save or log at another rate or into another folder, but not
with other training settings or data (:func:`check_resume_config`, :func:`check_resume_data`):
those weights would otherwise be passed off as a run of the new config.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pgen_engine.io_utils import atomic_write_text

from .checkpoints import (CHECKPOINTS, CONFIG_KEY, DATA_HASH_KEY, LATEST, META, ResumeError, complete_checkpoints,
                          latest_checkpoint, read_meta)

ABANDONED = "abandoned"  # <output_dir>/checkpoints/abandoned/: newer checkpoints a resume left behind


#: config keys (dotted; a key covers everything under it) that may differ between a run and
#: its resumption: how long, how often, where and how verbosely — not what is trained.
#: (also memory / speed switches that leave the math alone: loader workers, recomputation, ZeRO buckets)
RESUMABLE_CHANGES = ("output_dir", "logging", "train.max_steps", "train.save_every", "train.keep_checkpoints",
                     "train.log_every", "train.micro_batch_size", "train.max_micro_batch_size", "data.work_dir",
                     "rl.eval_every", "rl.eval_prompts", "data.num_workers", "deepspeed.activation_checkpointing",
                     "deepspeed.stage3_prefetch_bucket_size", "deepspeed.stage3_param_persistence_threshold",
                     "deepspeed.reduce_bucket_size")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def config_changes(saved: dict[str, Any], current: dict[str, Any],
                   defaults: dict[str, Any] | None = None) -> list[str]:
    """Training settings that differ between two resolved configs (``config_to_dict`` trees),
    as ``"key: saved -> current"`` lines, ignoring :data:`RESUMABLE_CHANGES`.

    ``defaults`` (flattened ``"section.key" -> default``, :func:`pgen_engine.config.config_defaults`):
    a key the saved config lacks is a setting added after that run was written; when the
    current value is that setting's default (which by convention is the earlier behaviour),
    it is not a change.
    """
    a, b = _flatten(saved), _flatten(current)
    allowed = lambda k: any(k == p or k.startswith(p + ".") for p in RESUMABLE_CHANGES)  # noqa: E731
    missing = object()
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, missing), b.get(k, missing)
        if allowed(k) or va == vb or (isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple))
                                      and list(va) == list(vb)):
            continue
        if isinstance(va, str) and isinstance(vb, str) and os.path.realpath(va) == os.path.realpath(vb):
            continue  # one path spelt two ways (relative / absolute, a symlink, a trailing slash)
        if va is missing and defaults is not None and k in defaults and defaults[k] == vb:
            continue
        show = lambda v: "(unset)" if v is missing else repr(v)  # noqa: E731
        out.append(f"{k}: {show(va)} -> {show(vb)}")
    return out


def check_resume_config(ckpt: Path, current: dict[str, Any], defaults: dict[str, Any] | None = None) -> None:
    """Refuse to resume ``ckpt`` under a config whose training settings differ from its own.

    Args:
        ckpt: a complete checkpoint folder.
        current: the run's resolved config (``config_to_dict``).
        defaults: the config's field defaults (``config_defaults``): settings added since the
            checkpoint was written pass when they are at their default.
    Raises:
        ResumeError: naming the checkpoint and every differing key (saved -> now), or a checkpoint past
            ``train.max_steps``. A checkpoint written before configs were recorded is accepted as is.
    """
    meta = read_meta(ckpt)
    step, max_steps = meta.get("step"), (current.get("train") or {}).get("max_steps")
    if isinstance(step, int) and isinstance(max_steps, int) and step > max_steps:
        # resumed, it trained nothing, re-exported final/ and wrote summary.json "steps": max_steps
        raise ResumeError(f"{ckpt}: already trained {step} steps, past train.max_steps={max_steps}; resume with "
                          f"train.max_steps >= {step}, or export it as it is with train.max_steps={step}")
    saved = meta.get(CONFIG_KEY)
    if saved is None:
        return
    if saved.get("stage", current.get("stage")) != current.get("stage"):  # named first, not one of dozens of keys
        raise ResumeError(f"{ckpt}: a checkpoint of stage {saved.get('stage')!r}, this config is stage "
                          f"{current.get('stage')!r}; a stage resumes only its own checkpoints (RL starts from the "
                          "SFT run's final/ as model.checkpoint)")
    diff = config_changes(saved, current, defaults)
    if diff:
        shown = "; ".join(diff[:8]) + (f"; ... ({len(diff) - 8} more)" if len(diff) > 8 else "")
        raise ResumeError(f"{ckpt}: trained with other settings than this config ({shown}); resume with the "
                          f"checkpoint's settings, or start fresh in another output_dir (or delete "
                          f"{Path(ckpt).parent})")


def check_resume_data(ckpt: Path, data_hash: str) -> None:
    """ResumeError when ``ckpt`` was trained on other data than ``data_hash`` (unrecorded: accepted)."""
    saved = read_meta(ckpt).get(DATA_HASH_KEY)
    if saved is not None and saved != data_hash:
        raise ResumeError(f"{ckpt}: trained on other data (data hash {str(saved)[:12]}, this run's {data_hash[:12]}: "
                          "the dataset in data.dataset_dir, its training windows, the image tokenizer in data.work_dir "
                          "or the weights in model.checkpoint differ); resume with the checkpoint's data and tokenizer, "
                          "or start fresh in another output_dir")


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """``--resume`` value -> a checkpoint folder or None.

    "auto": the latest complete checkpoint under ``output_dir/checkpoints`` (None when there
    is none); a path: that checkpoint, or the latest of a checkpoints folder or of a run's folder.
    """
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir / CHECKPOINTS)
    p = Path(resume)
    p = p / CHECKPOINTS if (p / CHECKPOINTS / LATEST).is_file() else p  # a run's output_dir
    found = latest_checkpoint(p) if (p / LATEST).is_file() else p
    if found is None or not (found / META).is_file():
        raise ResumeError(f"--resume {resume}: not a complete checkpoint folder (expected a run's output_dir, its "
                          f"{CHECKPOINTS}/ folder or a {CHECKPOINTS}/stepN folder holding {META})")
    return found


def check_fresh_start(output_dir: Path, resume_auto: bool = False, resumed_from: Path | None = None) -> None:
    """Refuse to start a run in ``output_dir`` when it already holds one (a complete checkpoint or
    an exported ``final/``): from scratch, after ``--resume auto`` found no complete checkpoint
    there (``resume_auto``: the ``final/`` would be trained again and replaced), or resuming
    ``resumed_from``, a checkpoint of another folder (its checkpoints would mix with the held ones).

    Starting there rewrote ``config.resolved.yaml`` at once (the old ``final/`` then described by the new
    settings) and mixed the old run's checkpoints with the new one's.

    Raises:
        ResumeError: naming the folder and what it holds.
    """
    held = [str(p) for p in complete_checkpoints(output_dir / CHECKPOINTS)[-1:]]
    if (output_dir / "final" / "config.json").is_file():
        held.append(str(output_dir / "final"))
    if held and resumed_from is not None:
        raise ResumeError(f"--resume {resumed_from}: output_dir={output_dir} already holds another training run "
                          f"({', '.join(held)}), which this one would mix its checkpoints with and replace; continue "
                          "that one with --resume auto, or resume this checkpoint into an output_dir of its own")
    if held and resume_auto:
        raise ResumeError(f"output_dir={output_dir} holds a finished run ({', '.join(held)}) but no complete "
                          f"checkpoint under {output_dir / CHECKPOINTS} to resume from; --resume auto would train it "
                          "again from scratch and replace it: start fresh in another output_dir (or delete this one)")
    if held:
        raise ResumeError(f"output_dir={output_dir} already holds a training run ({', '.join(held)}); continue it "
                          "with --resume auto, or start fresh in another output_dir (or delete this one)")


def set_aside_newer(ckpt: Path) -> list[Path]:
    """Move the complete checkpoints of ``ckpt``'s folder newer than ``ckpt`` into its
    ``abandoned/`` subfolder and point ``latest`` at ``ckpt``; returns their new paths (rank 0 only).

    Resuming an older checkpoint starts a new trajectory from it. Left in place, the newer
    checkpoints of the old trajectory counted against ``train.keep_checkpoints`` (the new run's
    own checkpoints were rotated out first) and ``--resume auto`` picked them after a crash that
    lost ``latest``. They are moved, not deleted: nothing a user may still want is lost.
    """
    root = ckpt.parent
    newer = [p for p in complete_checkpoints(root) if p.name > ckpt.name]
    moved = []
    for p in newer:
        target = root / ABANDONED / p.name
        n = 1
        while target.exists():  # abandoned twice at the same step: keep both
            n += 1
            target = root / ABANDONED / f"{p.name}-{n}"
        target.parent.mkdir(exist_ok=True)
        os.replace(p, target)
        moved.append(target)
    if moved:
        atomic_write_text(root / LATEST, ckpt.name + "\n")
    return moved
