"""Supervised fine-tuning: history -> next item's image codes, loss on image tokens only.

Objective: for every position ``i`` with ``loss_mask[i]`` (the collator's shift
convention: position ``i`` predicts token ``i + 1``, True exactly where token ``i + 1`` is
a target image code), the negative log-prob of ``labels[i]`` under the generation head,
via :meth:`JanusModel.image_token_logprobs` (the fused, chunked ``token_logprobs`` op), averaged
over the micro-batch's target tokens. Condition dropout (prompt -> its "pad"
unconditional counterpart with probability ``train.cond_dropout_p``) happens in the loader.

The model runs inside :class:`~pgen_engine.training.engine.ObjectiveModule`, whose
``forward(fn, ...)`` calls ``fn(model, ...)``: DeepSpeed's engine forward then covers the
whole objective, so ZeRO-3 gathers every parameter it touches. The lifecycle (init,
resume, loop, checkpoints, export, summary) is :class:`~pgen_engine.training.trainer.Trainer`'s;
this module supplies :class:`SFTStage`, whose ``train_step`` is one optimizer step.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pgen_engine.config import RunConfig
from pgen_engine.data.prompts import build_sft_loader, num_batches

from .checkpoints import CONFIG_KEY, ResumeError, read_meta
from .distributed import mean_over_ranks
from .errors import NonFiniteError  # noqa: F401  (re-exported: sft.NonFiniteError is public)
from .sft_data import DataPrepError
from .metrics import device_peak_flops, train_flops_per_token
from .trainer import Stage, Trainer

BATCH_KEYS = ("input_ids", "gen_code_mask", "attention_mask", "position_ids", "loss_mask", "labels")


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean image-token cross-entropy of a collated batch.

    Args:
        model: a JanusModel.
        batch: the collator's dict — ``input_ids``/``labels`` int64 ``[B,L]``, ``gen_code_mask``/
            ``attention_mask``/``loss_mask`` bool ``[B,L]``, ``position_ids`` int64 ``[B,L]``,
            optional ``pixel_values`` ``[n_img,3,H,W]`` or cached ``image_features``
            ``[n_img,T_img,D_vision]`` (frozen vision tower).
    Returns:
        (loss: fp32 scalar, n_targets: int64 scalar — target tokens in the batch).
    """
    mask = batch["loss_mask"]
    embeds = model.embed_inputs(batch["input_ids"], batch["gen_code_mask"], batch.get("pixel_values"),
                                image_features=batch.get("image_features"))
    hidden = model.forward_train(embeds, batch["attention_mask"], batch.get("position_ids"))
    targets = batch["labels"][mask]
    if targets.numel() == 0:
        raise ValueError("batch has no target image tokens (loss_mask is all False)")
    logp, _ = model.image_token_logprobs(hidden[mask], targets)
    return -logp.float().mean(), mask.sum()


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class _Batches:
    """Endless iteration over the loader's epochs, counting consumed micro-batches."""

    def __init__(self, loader):
        self.loader = loader
        self.it = iter(loader)

    def next(self) -> dict[str, torch.Tensor]:
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)


def check_one_batch(cfg: RunConfig, num_windows: int, micro_batch_size: int, world_size: int) -> None:
    """An epoch needs at least one micro-batch per rank (``micro_batch_size x world_size``
    training windows); fewer is a :class:`DataPrepError` naming the dataset, the counts and
    the settings that change them (a small dataset of the user's own, not a bug)."""
    need = micro_batch_size * world_size
    if num_windows < need:
        raise DataPrepError(
            f"data.dataset_dir={cfg.data.dataset_dir}: {num_windows} training window(s), fewer than one batch "
            f"({micro_batch_size} per rank x {world_size} rank(s) = {need}); lower train.global_batch_size or "
            "train.max_micro_batch_size, or make more windows (data.max_windows_per_user, data.stride, "
            "data.min_interactions)")


def _saved_micro_batch(cfg: RunConfig, ckpt: Path | None, micro: int) -> int:
    """The micro-batch a checkpoint written before its client state recorded it was trained with:
    from the config in its metadata (``micro`` when there is none: nothing to compare)."""
    if ckpt is None:
        return micro
    meta = read_meta(ckpt)
    train = (meta.get(CONFIG_KEY) or {}).get("train")
    if not isinstance(train, dict) or "world_size" not in meta:
        return micro
    saved = dataclasses.replace(cfg.train, micro_batch_size=train.get("micro_batch_size"),
                                max_micro_batch_size=train.get("max_micro_batch_size", cfg.train.max_micro_batch_size))
    return saved.micro_batch_for(int(meta["world_size"]))


def data_position(consumed: int, saved_micro: int, micro: int, n: int, world_size: int,
                  ckpt: Path | None = None) -> tuple[int, int]:
    """(epoch, position in micro-batches of ``micro``) of a loader that has consumed ``consumed``
    micro-batches of ``saved_micro`` examples per rank over ``n`` examples.

    Every epoch's order is the same whatever the batch size (a seeded permutation, dealt to the
    ranks in turn), so the examples consumed in the epoch are a prefix of it in either size.

    Raises:
        ResumeError: that prefix is not a whole number of new micro-batches.
    """
    epoch, position = divmod(consumed, num_batches(n, saved_micro, world_size))
    if saved_micro == micro:
        return epoch, position
    done = position * saved_micro  # examples of this epoch each rank has trained on
    if done % micro:
        raise ResumeError(f"{ckpt}: stopped after {done} examples per rank into epoch {epoch}, not a whole number of "
                          f"train.micro_batch_size={micro} batches (it trained with {saved_micro}); resume with "
                          f"train.micro_batch_size={saved_micro} or a divisor of {done}")
    return epoch, done // micro


class SFTStage(Stage):
    """The SFT stage: each ``train_step`` is ``grad_accum`` micro-batches and one optimizer step.

    Client state: ``micro_batches`` consumed, so a resumed run continues the loader exactly
    where the checkpoint left it (epoch and position within the epoch).
    """

    name = "sft"

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.consumed = 0
        self.loss = float("nan")

    def setup(self, trainer: Trainer, client: dict[str, Any]) -> None:
        cfg, dist, data = self.cfg, trainer.dist, trainer.data
        self.trainer, self.te, self.device = trainer, trainer.te, dist.device
        self.consumed = int(client.get("micro_batches", 0))
        # a run resumed at max_steps runs no step: its summary reports the checkpoint's last loss
        # (JSON null for checkpoints written before the loss was recorded), never NaN
        self.loss = float(client.get("last_loss", float("nan")))
        micro = trainer.te.micro_batch_size
        check_one_batch(cfg, len(data.dataset), micro, dist.world_size)
        self.per_epoch = num_batches(len(data.dataset), micro, dist.world_size)
        # the count is in micro-batches of the size the checkpoint was trained with: a resume with
        # another train.micro_batch_size (a resumable change) used to read it in the new size
        saved_micro = int(client.get("micro_batch_size") or _saved_micro_batch(cfg, trainer.last_saved, micro))
        epoch, position = data_position(self.consumed, saved_micro, micro, len(data.dataset), dist.world_size,
                                        trainer.last_saved)
        self.consumed = epoch * self.per_epoch + position
        loader = build_sft_loader(data.dataset, data.special, batch_size=micro, seed=cfg.seed,
                                  rank=dist.rank, world_size=dist.world_size, epoch=epoch, position=position,
                                  cond_dropout_p=cfg.train.cond_dropout_p, num_workers=cfg.data.num_workers)
        self.batches = _Batches(loader)
        self.peak = device_peak_flops(dist.device)
        self.lm_params = sum(p.numel() for n, p in trainer.te.model.named_parameters()
                             if n.split(".")[0] in ("language_model", "generation_head", "generation_aligner"))

    def train_step(self, step: int) -> dict[str, Any]:
        engine, world = self.te.engine, self.trainer.dist.world_size
        t0 = time.perf_counter()
        lr = float(engine.get_lr()[0])
        losses, tokens, seq_len = [], 0, 0
        for _ in range(self.te.grad_accum):
            batch = _to_device(self.batches.next(), self.device)
            loss, _ = engine(sft_loss, batch)
            value = float(loss.detach())
            self.trainer.check_finite(value, "loss", step + 1)
            engine.backward(loss)
            engine.step()
            self.consumed += 1
            losses.append(value)
            tokens += int(batch["attention_mask"].sum())
            seq_len = max(seq_len, batch["input_ids"].shape[1])
        self.loss = mean_over_ranks(sum(losses) / len(losses))
        dt = time.perf_counter() - t0
        tok_s = mean_over_ranks(tokens / dt) * world
        row = {"step": step + 1, "loss": self.loss, "lr": lr, "tokens_per_s": tok_s, "step_time_s": dt,
               "epoch": self.consumed // self.per_epoch}
        if self.peak is not None:
            cfg_t = self.te.model.config.text
            flops = train_flops_per_token(self.lm_params, cfg_t.num_layers, cfg_t.hidden_size, seq_len)
            row["mfu"] = tok_s * flops / (self.peak * world)
        return row

    def client_state(self) -> dict[str, Any]:
        return {"micro_batches": self.consumed, "micro_batch_size": self.te.micro_batch_size, "last_loss": self.loss}

    def summary(self) -> dict[str, Any]:
        return {"final_loss": self.loss if math.isfinite(self.loss) else None}


def run(cfg: RunConfig, resume: str | None = None) -> dict[str, Any]:
    """Train ``cfg`` (stage sft) to ``train.max_steps``; returns a summary dict (rank 0's view).

    Writes ``output_dir/{config.resolved.yaml, metrics.jsonl, checkpoints/, final/, summary.json}``.

    Raises:
        NonFiniteError: loss or gradient norm not finite (no checkpoint written for that step).
        DataPrepError, ConfigError, ResumeError: bad inputs, with one-line messages.
    """
    return Trainer(cfg, SFTStage(cfg)).run(resume)
