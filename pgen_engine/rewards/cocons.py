"""A learned reward embedder: a small CNN trained on the train split's co-consumption.

Why: the hand-made pixel-statistics embedding is dominated by the background and the
colour histogram. On the synthetic demo data, changing an item's background lowers its
pixel-statistics cosine by 0.44, its colour by 0.14, but its shape or pattern by only
0.02 -- so a reward in that space hardly sees half of what users choose by. A CNN
trained contrastively on which items the same users consume close in time learns the
image features that matter for what users do next, from data real datasets have.

What it is trained on: the **train split** only (per user, the items before the valid
and test targets), exactly like the evaluator (:mod:`pgen_engine.eval.evaluator`, whose
training routine it reuses), but it is a **distinct artifact**: its own kind
(``pgen_reward_embedder``), file names and seed, so it is a different model. Rewards may
use it; they still may not use the evaluator (``make_embedder`` refuses evaluator
artifacts), and this module refuses an evaluator artifact as well. On synthetic data
neither model sees the ground-truth preferences that ``attr_acc_future`` scores.

Artifact: ``DIR/reward_embedder.safetensors`` + ``DIR/reward_embedder.json`` (config,
training-data hash, the held-out-user recall@10 sanity number).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from pgen_engine.eval.evaluator import CNNArtifactEmbedder, EvaluatorConfig, is_evaluator_artifact, metadata_groups

__all__ = ["KIND", "META_FILE", "WEIGHTS_FILE", "RewardEmbedderConfig", "CoConsumptionEmbedder",
           "train_reward_embedder", "reward_config_from_spec"]

KIND = "pgen_reward_embedder"
META_FILE = "reward_embedder.json"
WEIGHTS_FILE = "reward_embedder.safetensors"

# The reward model's defaults differ from the evaluator's on purpose: another seed (a
# different network), consecutive items only (window 1: "what comes next"), by default no
# metadata pairs (`rl.embedder.metadata_field` / `metadata_frac` turn them on: item fields such
# as genres, train-split items only) and no instance pairs (the evaluator's anti-collapse term;
# `rl.embedder.instance_frac` turns them on, the demo RL runs were measured without).
SPEC_FIELDS = {"steps": 400, "seed": 1, "window": 1, "dim": 64, "width": 32, "image_size": 32, "lr": 2e-3,
               "tau": 0.1, "batch_size": 128, "instance_frac": 0.0, "metadata_frac": 0.0, "metadata_field": "genres"}
_FLOAT_FIELDS = ("lr", "tau", "instance_frac", "metadata_frac")
_STR_FIELDS = ("metadata_field",)


def RewardEmbedderConfig(**overrides: Any) -> EvaluatorConfig:
    """The training config of the reward embedder (:data:`SPEC_FIELDS` defaults + ``overrides``).

    Raises ``ValueError`` naming unknown fields.
    """
    unknown = sorted(set(overrides) - set(SPEC_FIELDS))
    if unknown:
        raise ValueError(f"reward embedder: unknown field(s) {unknown}; allowed: {sorted(SPEC_FIELDS)}")
    vals = {**SPEC_FIELDS, **overrides}

    def num(k: str, kind: type) -> Any:  # names the field (was int()'s bare "invalid literal for int()")
        try:
            return kind(vals[k])
        except (TypeError, ValueError):
            raise ValueError(f"reward embedder: {k} must be {'an int' if kind is int else 'a number'}, "
                             f"got {vals[k]!r}") from None

    ints = {k: num(k, int) for k in vals if k not in _FLOAT_FIELDS + _STR_FIELDS}
    floats = {k: num(k, float) for k in _FLOAT_FIELDS}
    for k in _STR_FIELDS:
        if not isinstance(vals[k], str) or not vals[k].strip():
            raise ValueError(f"reward embedder: {k} must be a non-empty string of item field names, got {vals[k]!r}")
    try:
        return EvaluatorConfig(**ints, **floats, **{k: vals[k] for k in _STR_FIELDS})
    except ValueError as e:  # the shared config's checks speak of "evaluator"; this is the reward's
        raise ValueError(re.sub(r"^evaluator:? ", "reward embedder: ", str(e))) from None


def reward_config_from_spec(spec: Mapping[str, Any]) -> EvaluatorConfig:
    """``rl.embedder`` spec ``{type: cocons_cnn, path?, steps?, seed?, ...}`` -> training config."""
    return RewardEmbedderConfig(**{k: v for k, v in spec.items() if k not in ("type", "path")})


class CoConsumptionEmbedder(CNNArtifactEmbedder):
    """The trained reward CNN as an :class:`ImageEmbedder` (eval mode, CPU by default).

    Attributes:
        meta: the artifact's ``reward_embedder.json`` (kind, config, data_hash, sanity).
    """

    KIND, META_FILE, WEIGHTS_FILE, LABEL = KIND, META_FILE, WEIGHTS_FILE, "reward-embedder"

    @classmethod
    def _missing_hint(cls) -> str:
        return "; the RL stage trains one into data.work_dir when rl.embedder is {type: cocons_cnn}"

    @classmethod
    def load(cls, directory: str | Path) -> "CoConsumptionEmbedder":
        """Load an artifact written by :func:`train_reward_embedder`.

        Raises:
            ValueError: ``directory`` is the evaluation embedder, or its metadata is malformed
                or of another kind.
            FileNotFoundError: the metadata or weights file is missing.
        """
        if is_evaluator_artifact(directory):
            raise ValueError(f"{Path(directory)}: this is the independent evaluation embedder; rewards may not use it "
                             f"(train a reward embedder with rl.embedder: {{type: cocons_cnn}})")
        return super().load(directory)


def train_reward_embedder(images: torch.Tensor, train_sequences: Sequence[Sequence[int]], out_dir: str | Path,
                          config: EvaluatorConfig | None = None, *, item_meta: Sequence[dict] | None = None,
                          progress: bool = False) -> CoConsumptionEmbedder:
    """Train (or reuse, when ``out_dir`` holds one with the same data hash) the reward embedder.

    Args:
        images: uint8 ``[C, H, W, 3]`` catalogue images in the reward's image space (item index = row).
        train_sequences: per user, item indices of the **train split** in time order.
        out_dir: artifact folder (must not be an evaluator artifact).
        item_meta: per item, its extra metadata dict; read only when ``config.metadata_frac > 0``
            (``config.metadata_field`` must then name a field some train-split items share).
    Returns:
        The embedder; ``meta["data_hash"]`` is the sha256 of images, sequences and config.
    """
    cfg = config or RewardEmbedderConfig()
    if is_evaluator_artifact(out_dir):
        raise ValueError(f"{Path(out_dir)}: holds the evaluation embedder; the reward embedder needs its own folder")
    meta: Sequence[dict] = [{}] * images.shape[0]
    if cfg.metadata_frac > 0:
        if item_meta is None or len(item_meta) != images.shape[0]:
            raise ValueError(f"reward embedder: metadata_frac {cfg.metadata_frac} needs one metadata dict per catalogue "
                             f"item ({images.shape[0]}), got {None if item_meta is None else len(item_meta)}")
        train_items = {int(i) for s in train_sequences for i in s}
        if not metadata_groups(item_meta, cfg.metadata_field, train_items):
            raise ValueError(f"reward embedder: no two train-split items share a value of metadata field(s) "
                             f"{cfg.metadata_field!r}; name item fields of items.jsonl, or set metadata_frac 0")
        meta = item_meta
    # without metadata pairs the hash reads no metadata, so earlier artifacts are reused
    return CoConsumptionEmbedder.train_or_reuse(images, train_sequences, meta, out_dir, cfg, progress=progress)
