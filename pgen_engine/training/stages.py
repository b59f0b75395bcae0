"""Stage dispatch: the config's ``stage`` value -> the function that runs it (a plain mapping)."""
from __future__ import annotations

from typing import Any, Callable

from pgen_engine.config import RunConfig

from . import rl, sft

RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {"sft": sft.run, "rl": rl.run}


def run_stage(cfg: RunConfig, resume: str | None = None) -> dict[str, Any]:
    """Run ``cfg.stage`` to completion; returns its summary (see :class:`.trainer.Trainer`)."""
    return RUNNERS[cfg.stage](cfg, resume=resume)
