"""Which history mode (``data.history_mode``: ``"pixels"`` or ``"codes"``) a model was trained with,
read back from its run's ``config.resolved.yaml`` or defaulted from its architecture, and the check
that refuses running it with the other one. See :mod:`pgen_engine.data.history` for the modes."""
from __future__ import annotations

import json
import os
from pathlib import Path


from ..models.checkpoint import read_training_record
from ..models.checkpoint_writer import TRAINING_RECORD
from ..typed_config import read_yaml_file
from .prompts import MODES as HISTORY_MODES


class HistoryModeError(ValueError):
    """A model is run with another history mode than it was trained with."""


def checkpoint_has_vision_tower(model_dir: str | os.PathLike) -> bool:
    """True when ``model_dir/config.json`` describes a vision tower (``vision_config`` with >= 1 layer).

    Raises FileNotFoundError / ValueError naming the file when it is missing or not JSON.
    """
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: model config not found") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable model config ({e})") from None
    v = cfg.get("vision_config") if isinstance(cfg, dict) else None
    return isinstance(v, dict) and int(v.get("num_hidden_layers", 1) or 0) >= 1


def default_history_mode(model_dir: str | os.PathLike | None) -> str:
    """``"pixels"`` when the model has a vision tower, else ``"codes"``.

    ``model_dir=None`` is the freshly initialised tiny Janus of a run without
    ``model.checkpoint``, which always has one.
    """
    if model_dir is None:
        return "pixels"
    return "pixels" if checkpoint_has_vision_tower(model_dir) else "codes"


def check_history_mode(trained: str, requested: str | None, *, where: str) -> str:
    """The mode to run with: ``trained``, or an error when ``requested`` differs.

    Raises:
        HistoryModeError: naming both modes and ``where`` the trained mode came from.
    """
    if trained not in HISTORY_MODES:
        raise HistoryModeError(f"{where}: data.history_mode={trained!r}; expected one of {list(HISTORY_MODES)}")
    if requested is not None and requested != trained:
        raise HistoryModeError(f"{where}: the model was trained with data.history_mode={trained!r} but is being run "
                               f"with history_mode={requested!r}; history images must enter the model the way it "
                               "was trained")
    return trained


def trained_history_mode(checkpoint: str | os.PathLike, run_config: str | os.PathLike | None = None
                         ) -> tuple[str, str]:
    """(mode, where) for a checkpoint: the mode its own training record holds
    (``CHECKPOINT/pgen_training.json``, written by pgen's export; a run config that says
    otherwise is an error), else ``data.history_mode`` of its run's ``config.resolved.yaml``
    (default ``CHECKPOINT/../config.resolved.yaml``, written by training next to ``final/``);
    a run config without the key predates the setting and trained with ``"codes"``; neither
    -> the default for the checkpoint's architecture (:func:`default_history_mode`).
    """
    ckpt = Path(checkpoint)
    recorded = recorded_history_mode(ckpt)
    path = Path(run_config) if run_config else ckpt.parent / "config.resolved.yaml"
    if recorded is not None:
        # the export's own record is authoritative; a run config that says otherwise was edited
        # by hand, or belongs to another run (--run-config), and would run the model wrongly
        if path.is_file():
            from_config = _config_history_mode(path)
            if from_config is not None and from_config != recorded:
                raise HistoryModeError(
                    f"{path}: data.history_mode={from_config!r}, but the checkpoint records that it was trained with "
                    f"{recorded!r} ({ckpt / TRAINING_RECORD}); fix the run config or point --run-config at the run "
                    "that trained this checkpoint")
        return recorded, str(ckpt / TRAINING_RECORD)
    if path.is_file():
        mode = _config_history_mode(path)
        if mode is not None:
            return mode, str(path)
    return default_history_mode(ckpt), f"{ckpt / 'config.json'} (no run config with data.history_mode)"


def recorded_history_mode(checkpoint: str | os.PathLike) -> str | None:
    """``history_mode`` of the checkpoint's own training record (``pgen_training.json``, written
    by pgen training's export), or None for a checkpoint without one (foreign, or older).

    Raises HistoryModeError / ValueError naming the file when it is unreadable or holds an
    unknown mode."""
    rec = read_training_record(checkpoint)
    mode = None if rec is None else rec.get("history_mode")
    if mode is not None and mode not in HISTORY_MODES:
        raise HistoryModeError(f"{Path(checkpoint) / TRAINING_RECORD}: history_mode={mode!r}; expected one of "
                               f"{list(HISTORY_MODES)}")
    return mode


def _config_history_mode(path: Path) -> str | None:
    """``data.history_mode`` of the run config at ``path`` ("codes" when the key is absent: the
    run predates the setting), or None when it is null (resolved at data preparation)."""
    tree = read_yaml_file(path) or {}
    data = tree.get("data") if isinstance(tree, dict) else None
    data = data if isinstance(data, dict) else {}
    mode = data.get("history_mode", "codes")
    if mode is not None and mode not in HISTORY_MODES:
        raise HistoryModeError(f"{path}: data.history_mode={mode!r}; expected one of {list(HISTORY_MODES)}")
    return mode


def run_history_mode(requested: str | None, checkpoint: str | os.PathLike | None) -> str:
    """The history mode of a training run starting from ``checkpoint``.

    A checkpoint written by an earlier pgen run (its training record, or a ``config.resolved.yaml``
    beside it) fixes
    the mode: ``requested`` must agree (:class:`HistoryModeError` otherwise). A foreign
    checkpoint (e.g. Janus-Pro from the Hub) takes ``requested``, else its architecture
    default; no checkpoint (the tiny init model) -> ``requested`` or ``"pixels"``.
    """
    if checkpoint is None:
        return requested or "pixels"
    if recorded_history_mode(checkpoint) is not None or (Path(checkpoint).parent / "config.resolved.yaml").is_file():
        trained, where = trained_history_mode(checkpoint)
        return check_history_mode(trained, requested, where=where)
    return requested or default_history_mode(checkpoint)
