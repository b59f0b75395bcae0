"""Model + DeepSpeed engine construction shared by every training stage (sft, rl).

One function, :func:`build_engine`, loads the checkpoint, freezes the parameter groups
that are not trained, switches activation checkpointing, builds the DeepSpeed config with
:func:`pgen_engine.config.build_deepspeed_config` and calls ``deepspeed.initialize``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from pgen_engine.config import PARAMETER_GROUPS, RunConfig, build_deepspeed_config, lr_lambda, resolve_precision

from .distributed import DistInfo


@dataclasses.dataclass
class TrainEngine:
    """A DeepSpeed engine around a :class:`pgen_engine.models.JanusModel`.

    Attributes:
        engine: the ``deepspeed.DeepSpeedEngine``; ``engine.module`` is the JanusModel.
        ds_config: the DeepSpeed config dict it was built with.
        precision: "bf16" or "fp32".
        grad_accum: micro-batches per optimizer step on each rank.
        trainable_params: number of trained parameters.
    """

    engine: object
    ds_config: dict
    precision: str
    grad_accum: int
    trainable_params: int

    @property
    def model(self):
        return self.engine.module


def parameter_group(name: str) -> str:
    """The group (first name component) of a JanusModel parameter name; ValueError if unknown."""
    group = name.split(".", 1)[0]
    if group not in PARAMETER_GROUPS:
        raise ValueError(f"parameter {name!r} belongs to no known group {PARAMETER_GROUPS}")
    return group


def set_trainable(model: torch.nn.Module, groups: list[str]) -> int:
    """Freeze every parameter outside ``groups``; returns the number of trainable elements."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(parameter_group(name) in groups)
        n += p.numel() if p.requires_grad else 0
    return n


def build_engine(cfg: RunConfig, model_dir: str | Path, dist_info: DistInfo,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> TrainEngine:
    """Load ``model_dir`` and wrap it in a DeepSpeed engine configured by ``cfg``.

    ``wrap(model)`` (optional) returns the module DeepSpeed drives (e.g. an objective
    wrapper holding the JanusModel as a child); trainable groups are set on the JanusModel first.

    Every rank loads the full checkpoint on CPU before ZeRO partitions it (fine up to 7B
    on a typical 8-GPU host; weights are loaded in bf16 when training in bf16).
    """
    import deepspeed

    from pgen_engine.models import load_model

    precision = resolve_precision(cfg.deepspeed, dist_info.device.type)
    if precision == "bf16" and dist_info.device.type != "cuda":
        raise ValueError("deepspeed.precision=bf16 needs a CUDA device; use fp32 (or auto) on CPU")
    ds_config = build_deepspeed_config(cfg, dist_info.world_size, dist_info.device.type)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = load_model(model_dir, device="cpu", dtype=dtype)
    model.train()
    model.language_model.gradient_checkpointing = cfg.deepspeed.activation_checkpointing
    n_train = set_trainable(model, cfg.train.trainable)
    module = wrap(model) if wrap is not None else model
    params = [p for p in module.parameters() if p.requires_grad]
    schedule = lr_lambda(cfg.train)
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=params, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    return TrainEngine(engine, ds_config, precision, ds_config["gradient_accumulation_steps"], n_train)
