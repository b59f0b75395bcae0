"""Sequence lengths of the run: the longest prompt its real PromptBuilder builds."""
from __future__ import annotations

from pathlib import Path

import torch

from pgen_engine.config import RunConfig
from pgen_engine.data.dataset import load_dataset
from pgen_engine.data.prompts import PromptBuilder
from pgen_engine.data.text_tokenizer import ByteTokenizer, load_text_tokenizer
from pgen_engine.models.special_tokens import SpecialTokens


# Bytes per history-item title when the dataset cannot be read (the MovieLens titles are
# at most 110 bytes; 24 on average).
TITLE_BUDGET_BYTES = 128


def history_mode(cfg: RunConfig) -> str:
    """The run's ``data.history_mode``; unresolved (checkpoint not on disk yet) -> "pixels",
    the default of every model with a vision tower (every Janus)."""
    return cfg.data.history_mode or "pixels"


def prompt_tokens(cfg: RunConfig) -> tuple[int, str]:
    """-> (tokens of the longest prompt the run builds, where the text lengths came from).

    Builds a prompt of ``data.history_k`` history images with the real PromptBuilder in the
    run's history mode (codes, or ``<image>`` placeholders in pixels mode).
    """
    d = cfg.data
    ckpt = Path(cfg.model.checkpoint) if cfg.model.checkpoint else None
    tok, where = ByteTokenizer(), "byte-level text lengths (an upper bound)"
    special = SpecialTokens.builtin()
    if ckpt is not None and (ckpt / "config.json").is_file():
        special = SpecialTokens.from_checkpoint(ckpt)
        tok = load_text_tokenizer(ckpt, special)
        where = f"{ckpt}'s text tokenizer"
        if isinstance(tok, ByteTokenizer):
            where = "byte-level text (the checkpoint has no tokenizer files)"
    title = "x" * TITLE_BUDGET_BYTES
    if d.with_titles:
        try:
            titles = [it.title for it in load_dataset(d.dataset_dir, check_images=False).items.values()]
            title = max(titles, key=lambda t: len(tok.encode(f"{t}\n")))
            where += ", the dataset's longest title"
        except Exception:  # dataset not readable here: the documented budget instead
            where += f", titles of {TITLE_BUDGET_BYTES} bytes (dataset not readable)"
    per_image = (d.tokenizer_image_size // d.patch_size) ** 2
    mode = history_mode(cfg)
    builder = PromptBuilder(tok, special, per_image, mode=mode, with_titles=d.with_titles,
                            instruction=d.instruction)
    codes = torch.zeros(d.history_k, per_image, dtype=torch.long) if mode == "codes" else None
    p = builder.build(codes, [title] * d.history_k if d.with_titles else None, num_history=d.history_k)
    return len(p), where
