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

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file, save as safetensors_bytes

from pgen_engine.eval.evaluator import (EvaluatorConfig, SmallCNN, _to_input, data_hash, fit_cocons_cnn,
                                        is_evaluator_artifact)
from pgen_engine.io_utils import atomic_write_bytes, atomic_write_json

from .embedders import ImageEmbedder

__all__ = ["KIND", "META_FILE", "WEIGHTS_FILE", "RewardEmbedderConfig", "CoConsumptionEmbedder",
           "train_reward_embedder", "reward_config_from_spec"]

KIND = "pgen_reward_embedder"
META_FILE = "reward_embedder.json"
WEIGHTS_FILE = "reward_embedder.safetensors"

# The reward model's defaults differ from the evaluator's on purpose: another seed (a
# different network), consecutive items only (window 1: "what comes next"), no metadata.
SPEC_FIELDS = {"steps": 400, "seed": 1, "window": 1, "dim": 64, "width": 32, "image_size": 32, "lr": 2e-3,
               "tau": 0.1, "batch_size": 128}


def RewardEmbedderConfig(**overrides: Any) -> EvaluatorConfig:
    """The training config of the reward embedder (:data:`SPEC_FIELDS` defaults + ``overrides``).

    Raises ``ValueError`` naming unknown fields.
    """
    unknown = sorted(set(overrides) - set(SPEC_FIELDS))
    if unknown:
        raise ValueError(f"reward embedder: unknown field(s) {unknown}; allowed: {sorted(SPEC_FIELDS)}")
    vals = {**SPEC_FIELDS, **overrides}
    ints = {k: int(v) for k, v in vals.items() if k not in ("lr", "tau")}
    return EvaluatorConfig(**ints, lr=float(vals["lr"]), tau=float(vals["tau"]), metadata_frac=0.0)


def reward_config_from_spec(spec: Mapping[str, Any]) -> EvaluatorConfig:
    """``rl.embedder`` spec ``{type: cocons_cnn, path?, steps?, seed?, ...}`` -> training config."""
    return RewardEmbedderConfig(**{k: v for k, v in spec.items() if k not in ("type", "path")})


class CoConsumptionEmbedder(ImageEmbedder):
    """The trained reward CNN as an :class:`ImageEmbedder` (eval mode, CPU by default).

    Attributes:
        meta: the artifact's ``reward_embedder.json`` (kind, config, data_hash, sanity).
    """

    def __init__(self, net: SmallCNN, config: EvaluatorConfig, meta: dict, *, batch_size: int = 256):
        self.net = net.eval()
        self.config = config
        self.meta = meta
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def _embed_batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[n, H, W, 3]`` -> ``[n, dim]`` (unnormalised; :meth:`embed` normalises)."""
        return self.net(_to_input(images, self.config.image_size))

    @classmethod
    def load(cls, directory: str | Path) -> "CoConsumptionEmbedder":
        """Load an artifact written by :func:`train_reward_embedder`.

        Raises:
            ValueError: ``directory`` is the evaluation embedder, or its metadata is malformed
                or of another kind.
            FileNotFoundError: the metadata or weights file is missing.
        """
        d = Path(directory)
        if is_evaluator_artifact(d):
            raise ValueError(f"{d}: this is the independent evaluation embedder; rewards may not use it "
                             f"(train a reward embedder with rl.embedder: {{type: cocons_cnn}})")
        meta_path = d / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: not a reward-embedder artifact (missing {META_FILE}; the RL stage "
                                    "trains one into data.work_dir when rl.embedder is {type: cocons_cnn})")
        try:
            meta = json.loads(meta_path.read_text())
            cfg = EvaluatorConfig(**meta["config"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{meta_path}: malformed reward-embedder metadata ({e})") from None
        if meta.get("kind") != KIND:
            raise ValueError(f"{meta_path}: kind is {meta.get('kind')!r}, expected {KIND!r}")
        if not (d / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{d / WEIGHTS_FILE}: missing reward-embedder weights")
        net = SmallCNN(cfg.dim, cfg.width)
        net.load_state_dict(load_file(str(d / WEIGHTS_FILE)))
        return cls(net, cfg, meta)


def train_reward_embedder(images: torch.Tensor, train_sequences: Sequence[Sequence[int]], out_dir: str | Path,
                          config: EvaluatorConfig | None = None, *, progress: bool = False) -> CoConsumptionEmbedder:
    """Train (or reuse, when ``out_dir`` holds one with the same data hash) the reward embedder.

    Args:
        images: uint8 ``[C, H, W, 3]`` catalogue images in the reward's image space (item index = row).
        train_sequences: per user, item indices of the **train split** in time order.
        out_dir: artifact folder (must not be an evaluator artifact).
    Returns:
        The embedder; ``meta["data_hash"]`` is the sha256 of images, sequences and config.
    """
    cfg = config or RewardEmbedderConfig()
    out = Path(out_dir)
    if is_evaluator_artifact(out):
        raise ValueError(f"{out}: holds the evaluation embedder; the reward embedder needs its own folder")
    digest = data_hash(images, train_sequences, [], cfg)  # no item metadata: metadata_frac is 0
    if (out / META_FILE).is_file():
        try:
            old = CoConsumptionEmbedder.load(out)
            if old.meta.get("data_hash") == digest:
                return old
        except (ValueError, OSError, RuntimeError):
            pass  # stale or broken artifact: retrain below
    net, info = fit_cocons_cnn(images, train_sequences, [{}] * images.shape[0], cfg, progress=progress,
                               desc="reward embedder")
    meta = {"kind": KIND, "config": dataclasses.asdict(cfg), "data_hash": digest, **info}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / WEIGHTS_FILE, safetensors_bytes({k: v.contiguous() for k, v in net.state_dict().items()}))
    atomic_write_json(out / META_FILE, meta)
    return CoConsumptionEmbedder(net, cfg, meta)
