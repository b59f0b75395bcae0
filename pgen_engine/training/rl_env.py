"""The RL environment: which prompts each step sees, and how its images are rewarded.

* :class:`RLPromptSource` — deterministic per-step prompt batches from the training
  windows (a resumed or multi-rank run draws the same prompts), and a fixed held-out
  batch for before/after evaluation. Seeds are derived with
  :func:`pgen_engine.ops.rng.mix_seed` from ``(run seed, stream, step, example)``.
* :class:`RewardEnv` — codes -> images (the data tokenizer's decoder) -> the composite
  reward against each user's history / future items / the catalogue / ground truth.
* :func:`check_tokenizer_matches_checkpoint` — refuses an RL run whose image tokenizer is
  not the one its SFT checkpoint was trained with.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pgen_engine.config import RLConfig, RLConfigError, RunConfig, load_config
from pgen_engine.data.history import run_tokenizer_file
from pgen_engine.data.prompts import normalize_pixels
from pgen_engine.data.splits import Example, build_splits
from pgen_engine.stage_config import PROMPT_WINDOWS
from pgen_engine.data.synth import attributes_to_codes, load_ground_truth, read_attributes
from pgen_engine.models.patch_kmeans import PatchKMeansTokenizer
from pgen_engine.models.vq_tokenizer import JanusVQTokenizer
from pgen_engine.ops.rng import mix_seed
from pgen_engine.rewards import CompositeReward, RewardContext, make_embedder
from pgen_engine.typed_config import read_yaml_file

from .sft_data import DataPrepError, work_dir

# mix_seed streams of the run seed: per-step prompt draws, the fixed evaluation batch, request seeds
STREAM_DRAW, STREAM_EVAL, STREAM_REQUEST = 1, 2, 3


def _seed(*parts: int) -> int:
    """``mix_seed`` folded over ``parts`` (run seed first) as a Python int."""
    out = torch.tensor(parts[0], dtype=torch.int64)
    for p in parts[1:]:
        out = mix_seed(out, p)
    return int(out)


@dataclasses.dataclass
class PromptBatch:
    """Prompts of one RL step on this rank, with what the rewards need.

    Attributes:
        prompts / code_masks: B id lists / bool lists.
        seeds: B request seeds.
        history: B lists of history item ids; future: B lists of later train items (from the
            window's own target on when ``future_includes_target``).
        target_attributes: int64 ``[B, A]`` ground truth (synthetic data) or None.
        pixel_values: pixels history mode: B float32 ``[n_i, 3, S, S]`` history images; None in codes mode.
        image_features: frozen vision tower: B cached tower outputs ``[n_i, T_img, D_vision]`` of
            the same images (the trainer's log-probs use them instead of re-encoding), or None.
    """

    prompts: list[list[int]]
    code_masks: list[list[bool]] | None
    seeds: list[int]
    history: list[list[str]]
    future: list[list[str]]
    target_attributes: torch.Tensor | None = None
    pixel_values: list[torch.Tensor] | None = None
    image_features: list[torch.Tensor] | None = None


class RewardEnv:
    """Turns codes into scored images for a batch of prompts.

    Args:
        reward: a ``CompositeReward``.
        decode: ``codes int64 [N, T] -> uint8 [N, H, W, 3]``.
        item_images: ``item_ids -> uint8 [n, H, W, 3]`` in the same image space as ``decode``
            (history / future / catalogue items are embedded from these, cached).
        embedder: the reward embedder (None when no component needs embeddings).
        catalogue: item ids of the catalogue (novelty), or None.
        read_attributes: synthetic read-out, or None.
    """

    def __init__(self, reward, decode: Callable[[torch.Tensor], torch.Tensor],
                 item_images: Callable[[list[str]], torch.Tensor], embedder=None, *,
                 catalogue: list[str] | None = None, read_attributes=None):
        self.reward, self.decode, self.item_images = reward, decode, item_images
        self.embedder, self.catalogue, self.read_attributes = embedder, catalogue, read_attributes
        self._emb: dict[str, torch.Tensor] = {}
        self._cat: torch.Tensor | None = None

    def _embed_items(self, ids: list[str]) -> torch.Tensor:
        missing = [i for i in dict.fromkeys(ids) if i not in self._emb]
        if missing:
            e = self.embedder.embed(self.item_images(missing)).cpu()
            self._emb.update(zip(missing, e))
        dim = self.embedder.dim
        return torch.stack([self._emb[i] for i in ids]) if ids else torch.zeros(0, dim)

    def __call__(self, batch: PromptBatch, tokens: torch.Tensor, group_size: int
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (total float32 ``[B*G]``, {component: float32 ``[B*G]``}) on CPU."""
        B = len(batch.prompts)
        images = self.decode(tokens)
        user_index = torch.arange(B).repeat_interleave(group_size)
        needs = self.embedder is not None
        dim = self.embedder.dim if needs else 1
        hist = [self._embed_items(h) if needs else torch.zeros(0, dim) for h in batch.history]
        fut = [self._embed_items(f) if needs else torch.zeros(0, dim) for f in batch.future]
        cat = None
        if needs and self.catalogue is not None:
            if self._cat is None:
                self._cat = self._embed_items(self.catalogue)
            cat = self._cat
        tgt = None
        if batch.target_attributes is not None:
            tgt = batch.target_attributes.repeat_interleave(group_size, dim=0)
        ctx = RewardContext(user_index=user_index, group_index=user_index.clone(), history_embeds=hist,
                            future_embeds=fut, catalogue_embeds=cat, target_attributes=tgt,
                            read_attributes=self.read_attributes)
        total, comps = self.reward(images, ctx)
        return total.float().cpu(), {k: v.float().cpu() for k, v in comps.items()}


def rl_prompt_windows(mode: str, sft_windows: list[Example], dataset, data_cfg, *, log: bool = False
                      ) -> list[Example]:
    """The train-split windows RL draws prompts from (``rl.prompt_windows``).

    Args:
        mode: "sft" (``sft_windows`` as they are), "unseen" (train windows of the same
            users and window settings that are not in ``sft_windows``) or "all".
        sft_windows: the windows SFT trained on (``build_splits(..., max_windows_per_user)``).
        dataset: the loaded dataset the splits come from.
        data_cfg: the run's ``data`` section (history_k, stride, min_interactions).
        log: print how many windows were chosen (when not "sft").
    Returns:
        train-split :class:`Example` windows in time order per user.
    Raises:
        RLConfigError: an unknown mode, or "unseen" when SFT trained on every window.
    """
    if mode == "sft":
        return list(sft_windows)
    if mode not in PROMPT_WINDOWS:
        raise RLConfigError(f"rl.prompt_windows={mode!r}: expected one of {list(PROMPT_WINDOWS)}")
    every = build_splits(dataset, k=data_cfg.history_k, stride=data_cfg.stride, max_windows_per_user=None,
                         min_interactions=data_cfg.min_interactions).train
    seen = {(ex.user_id, ex.position) for ex in sft_windows}
    chosen = every if mode == "all" else [ex for ex in every if (ex.user_id, ex.position) not in seen]
    if not chosen:
        raise RLConfigError(f"rl.prompt_windows={mode!r}: no train window to draw from (SFT trained on every one, "
                            f"data.max_windows_per_user={data_cfg.max_windows_per_user}); use 'sft' or 'all', "
                            f"or give SFT fewer windows per user")
    if log:
        print(f"[rl] prompts from {len(chosen)} train windows (rl.prompt_windows={mode}; SFT trained on "
              f"{len(sft_windows)})", flush=True)
    return chosen


class RLPromptSource:
    """Deterministic per-step prompt batches from the training windows.

    Step ``s`` draws ``prompts_per_step`` examples with a generator seeded by ``(seed, s)``
    (so resumed / multi-rank runs agree), rank ``r`` takes every ``world``-th of them.
    """

    def __init__(self, examples, splits, cache, builder, *, titles=None, ground_truth=None,
                 future_horizon: int | None = None, future_includes_target: bool = False, seed: int = 0,
                 image_loader=None, vision_features=None, held_out_targets: bool = False):
        if not examples:
            raise ValueError("RLPromptSource: no training examples")
        if builder.mode == "pixels" and image_loader is None:
            raise ValueError("RLPromptSource: pixels history mode needs an image_loader (item id -> uint8 image)")
        self.image_loader, self.vision_features = image_loader, vision_features
        self.examples, self.splits, self.cache, self.builder = list(examples), splits, cache, builder
        self.titles, self.gt, self.horizon, self.seed = titles or {}, ground_truth, future_horizon, seed
        self.include_target = future_includes_target
        # Validation monitor only: a held-out (valid) example's "future" is its own target.
        # Why: future_items never returns held-out targets, so without this the in-run eval
        # reported future_interest as 0.0 for every step. Training batches never set it.
        if held_out_targets and any(ex.split == "train" for ex in self.examples):
            raise ValueError("RLPromptSource: held_out_targets is for valid/test examples only "
                             "(train windows' rewards must use train-split future items)")
        self.held_out_targets = held_out_targets

    def _target_attributes(self, ex) -> list[int]:
        steps = self.gt.get(ex.user_id)
        if not steps or ex.position >= len(steps):
            raise ValueError(f"ground truth has no step {ex.position} for user {ex.user_id}")
        return list(attributes_to_codes(steps[ex.position]["preferred"]))

    def batch(self, step: int, prompts_per_step: int, rank: int = 0, world: int = 1) -> PromptBatch:
        """This rank's share of step ``step``'s prompts (drawn with replacement)."""
        if prompts_per_step % world:
            raise ValueError(f"rl.prompts_per_step={prompts_per_step} is not divisible by world size {world}")
        g = torch.Generator().manual_seed(_seed(self.seed, STREAM_DRAW, step))
        idx = torch.randint(0, len(self.examples), (prompts_per_step,), generator=g).tolist()[rank::world]
        return self._make(idx, step)

    def fixed_batch(self, n: int, rank: int = 0, world: int = 1) -> PromptBatch:
        """The same ``n`` distinct prompts (and sampling seeds) on every call: this rank's share.

        Used for before/after evaluation; ``n`` is capped at the number of examples and
        rounded down to a multiple of ``world``.
        """
        n = min(n, len(self.examples)) // world * world
        if n < 1:
            raise ValueError(f"fixed_batch: need >= {world} examples for {world} ranks, have {len(self.examples)}")
        g = torch.Generator().manual_seed(_seed(self.seed, STREAM_EVAL))
        idx = torch.randperm(len(self.examples), generator=g)[:n].tolist()[rank::world]
        return self._make(idx, -1)

    def _make(self, idx: list[int], step: int) -> PromptBatch:
        prompts, masks, hist, fut, attrs, pix, feats = [], [], [], [], [], [], []
        for i in idx:
            ex = self.examples[i]
            titles = [self.titles.get(h, "") for h in ex.history] if self.builder.with_titles else None
            if self.builder.mode == "pixels":
                # the same prompt and pixels SFT trained on (SFTDataset.__getitem__)
                p = self.builder.build(titles=titles, num_history=len(ex.history))
                pix.append(normalize_pixels(torch.from_numpy(np.stack([self.image_loader(h) for h in ex.history]))))
                if self.vision_features is not None:
                    feats.append(self.vision_features(list(ex.history)))
            else:
                p = self.builder.build(self.cache.codes(list(ex.history)), titles)
            prompts.append(p.input_ids.tolist())
            masks.append(p.gen_code_mask.tolist())
            hist.append(list(ex.history))
            fut.append([ex.target] if self.held_out_targets else
                       self.splits.future_items(ex, self.horizon, include_target=self.include_target))
            if self.gt is not None:
                attrs.append(self._target_attributes(ex))
        # one seed per (step, example): the same request draws the same samples on any rank
        seeds = [_seed(self.seed, STREAM_REQUEST, step, i) for i in idx]
        return PromptBatch(prompts, masks, seeds, hist, fut,
                           torch.tensor(attrs, dtype=torch.long) if self.gt is not None else None,
                           pix if self.builder.mode == "pixels" else None, feats or None)


def reward_embedder_spec(rl: RLConfig, work: str | Path) -> dict:
    """``rl.embedder`` with, for a learned ``cocons_cnn``, its artifact folder filled in
    (default ``WORK/reward_embedder``, next to the tokenizer and token cache)."""
    spec = dict(rl.embedder)
    if spec.get("type") == "cocons_cnn" and not spec.get("path"):
        spec["path"] = str(Path(work) / "reward_embedder")
    return spec


def ensure_reward_embedder(spec: dict, decode: Callable[[torch.Tensor], torch.Tensor], cache, item_ids: list[str],
                           train_sequences: dict[str, list[str]] | None,
                           item_meta: list[dict] | None = None) -> None:
    """Train (or reuse by data hash) a ``cocons_cnn`` reward embedder at ``spec["path"]``.

    It learns from the catalogue images in the reward's image space (cached codes through
    ``decode``) and the **train split** sequences only (plus ``item_meta``, each item's
    items.jsonl fields, when ``rl.embedder.metadata_frac > 0``); other embedder types need nothing.
    """
    if spec.get("type") != "cocons_cnn":
        return
    if train_sequences is None:
        raise RLConfigError("rl.embedder type cocons_cnn needs the train split's sequences to train on")
    # late import: cocons pulls in the evaluator module (and tqdm) only for runs that use it
    from pgen_engine.rewards.cocons import reward_config_from_spec, train_reward_embedder

    try:
        cfg = reward_config_from_spec(spec)
    except ValueError as e:
        raise RLConfigError(f"rl.embedder: {e}") from None
    index = {iid: n for n, iid in enumerate(item_ids)}
    images = torch.cat([decode(cache.codes(item_ids[i:i + 256])) for i in range(0, len(item_ids), 256)])
    seqs = [[index[i] for i in seq] for seq in train_sequences.values()]
    try:
        train_reward_embedder(images, seqs, spec["path"], cfg, item_meta=item_meta)
    except ValueError as e:
        raise RLConfigError(f"rl.embedder: {e}") from None


def build_reward_env(rl: RLConfig, tokenizer, cache, dataset_dir: str | Path, item_ids: list[str],
                     decode_with: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                     work: str | Path | None = None) -> tuple[RewardEnv, Any]:
    """The reward environment of a run; -> (RewardEnv, ground truth or None).

    Images live in the data tokenizer's space: generated codes and every item's cached
    codes are decoded by the same decoder, so rewards compare like with like. A learned
    ``cocons_cnn`` reward embedder is loaded from ``work`` (:func:`reward_embedder_spec`):
    train it first with :func:`ensure_reward_embedder` (the RL stage does, on rank 0).
    """
    decode = decode_with or tokenizer.decode
    spec = reward_embedder_spec(rl, work if work is not None else Path(dataset_dir) / "reward_work")
    try:
        embedder = make_embedder(spec)
    except (ValueError, TypeError, OSError) as e:
        raise RLConfigError(f"rl.embedder: {e}") from None
    try:
        reward = CompositeReward.from_config(rl.rewards, embedder)
    except (ValueError, TypeError) as e:
        raise RLConfigError(f"rl.rewards: {e}") from None
    gt = read_attrs = None
    if "attribute_match" in rl.rewards:
        try:
            gt = load_ground_truth(dataset_dir)
        except FileNotFoundError as e:
            raise RLConfigError(f"rl.rewards.attribute_match needs a synthetic dataset: {e}") from None
        read_attrs = read_attributes
    needs_cat = "novelty" in rl.rewards or any(getattr(r, "needs_catalogue", False) for _, r in reward.components.values())
    env = RewardEnv(reward, decode, lambda ids: decode(cache.codes(ids)),
                    embedder if reward.needs_embeddings else None,
                    catalogue=item_ids if needs_cat else None, read_attributes=read_attrs)
    return env, gt


def sft_tokenizer_path(checkpoint: str | Path) -> Path | None:
    """The image-tokenizer file of the SFT run that exported ``checkpoint`` (``<run>/final``), if known.

    Reads ``<checkpoint>/../config.resolved.yaml``; None when there is none (a checkpoint not
    made by this engine) or its tokenizer is not ``patch_kmeans``.
    """
    resolved = Path(checkpoint).parent / "config.resolved.yaml"
    return run_tokenizer_file(load_config(resolved)) if resolved.is_file() else None


def check_tokenizer_matches_checkpoint(cfg: RunConfig, tokenizer) -> None:
    """Fail when the RL run's image tokenizer is not the one its SFT checkpoint was trained with.

    A different PatchKMeans fit gives the same geometry but different codes, which would
    silently make the SFT policy's images meaningless; the run must reuse the SFT run's
    ``data.work_dir`` (and data settings).
    """
    if cfg.model.checkpoint is None:
        return
    if cfg.data.tokenizer == "vq":
        _check_vq_matches_checkpoint(cfg, tokenizer)
        return
    path = sft_tokenizer_path(cfg.model.checkpoint)
    if path is None or not path.is_file():
        return
    theirs = PatchKMeansTokenizer.load(path).fingerprint()
    if theirs != tokenizer.fingerprint():
        raise DataPrepError(f"model.checkpoint={cfg.model.checkpoint}: trained with the image tokenizer {path}, "
                            f"but this run's data.work_dir={work_dir(cfg)} holds a different one; set data.* "
                            "(work_dir, codebook_size, ...) as in the SFT run")


def _check_vq_matches_checkpoint(cfg: RunConfig, tokenizer) -> None:
    """``data.tokenizer: vq``: the SFT model carries the VQ it was trained with as its own
    ``vqmodel.*`` (frozen unless its run trained ``vqmodel``), so that is the reference; the
    VQ in this run's ``data.work_dir`` is retrained over when other VQ settings or another
    dataset share the folder, and its codes would then mean other pixels to the policy."""
    resolved = Path(cfg.model.checkpoint).parent / "config.resolved.yaml"
    try:
        tree = read_yaml_file(resolved) if resolved.is_file() else {}
        if "vqmodel" in ((tree or {}).get("train") or {}).get("trainable", []):
            return  # the SFT run trained its VQ: the checkpoint's copy is not the data tokenizer
        ckpt_vq = JanusVQTokenizer.from_checkpoint(cfg.model.checkpoint)
    except (OSError, ValueError, AttributeError):
        return  # no readable VQ in the checkpoint: nothing to compare against (loading it fails elsewhere)
    # compared at bf16 precision: a bf16 run exports its (frozen) VQ rounded to bf16
    ours, theirs = tokenizer.state_dict(), ckpt_vq.state_dict()
    same = ours.keys() == theirs.keys() and all(
        ours[k].shape == theirs[k].shape and torch.equal(ours[k].to(torch.bfloat16), theirs[k].to(torch.bfloat16))
        for k in ours)
    if not same:
        raise DataPrepError(f"model.checkpoint={cfg.model.checkpoint}: its VQ (vqmodel.*, {ckpt_vq.fingerprint()}) is not this run's "
                            f"image tokenizer {work_dir(cfg) / 'vq_tokenizer.safetensors'} ({tokenizer.fingerprint()}): "
                            "the SFT run's tokenizer was retrained or replaced; set data.* (work_dir, vq_*, ...) as "
                            "in the SFT run, or use data.tokenizer=checkpoint_vq")
