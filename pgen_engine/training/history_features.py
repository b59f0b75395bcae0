"""Vision-tower features of an RL step's history images (pixels history mode), each distinct
item encoded once per weights version instead of once per prompt or per row.

The rollout, the trainer's no-grad log-prob passes and the update all need the tower's
outputs of the same history images. A GRPO group's ``G`` rows share one prompt, and prompts
of one step share items, so encoding per row repeats the same work many times.

* **Frozen tower** (``vision_model`` not trainable): the outputs never change; the run's
  on-disk cache (:class:`pgen_engine.data.vision_cache.VisionCache`) gives them as
  ``PromptBatch.image_features`` and no pass calls the tower.
* **Trainable tower**: :class:`RLHistoryFeatures` keeps an in-memory
  :class:`~pgen_engine.data.vision_cache.VisionFeatureCache` per model, versioned by the
  policy's weights (:meth:`RLHistoryFeatures.weights_changed` after every update), so the
  rollout and the policy's log-prob pass share one no-grad encoding of each distinct item,
  and the frozen reference gets its own. The update, which needs gradients through the
  tower, encodes each distinct item of a micro-batch once *with* grad
  (:meth:`pgen_engine.training.sequences.Sequences.tower_history`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from pgen_engine.data.vision_cache import VisionFeatureCache

from .rl_env import PromptBatch


def tower_trains(model: torch.nn.Module) -> bool:
    """True when any vision-tower parameter of ``model`` (a JanusModel) requires grad."""
    return any(p.requires_grad for p in model.vision_model.parameters())


def _tower(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The objective run through an engine's forward: ``[n,3,S,S]`` -> ``[n,T_img,D_vision]``, in
    eval mode like the rollout and the log-prob passes that use the features."""
    was = model.training
    model.eval()
    try:
        return model.vision_hidden(pixel_values.to(model.device))
    finally:
        model.train(was)


class RLHistoryFeatures:
    """Per-step vision-tower features of history items for the policy and the reference.

    Args:
        policy: the policy JanusModel (``engine.module``'s model).
        policy_forward: ``fn, *args -> fn(policy, *args)`` through the training engine
            (ZeRO-3 gathers the tower's shards there).
        reference_module / reference_forward: the frozen reference and its forward, or None.
        batch_size: images per tower forward.
    """

    def __init__(self, policy: torch.nn.Module, policy_forward: Callable[..., torch.Tensor], *,
                 reference_module: torch.nn.Module | None = None,
                 reference_forward: Callable[..., torch.Tensor] | None = None, batch_size: int = 32):
        self.policy = policy
        self.version = 0
        self._pixels: dict[str, torch.Tensor] = {}
        # both caches hold one weights version's items only (cleared when it changes), so memory
        # stays bounded by a step's distinct items; the reference's tower never changes, but
        # keeping all items ever seen would grow to the whole catalogue
        self._policy = VisionFeatureCache(policy, self._images, version=lambda: self.version, batch_size=batch_size,
                                          encode=lambda px: policy_forward(_tower, px))
        self._reference = None
        if reference_module is not None:
            self._reference = VisionFeatureCache(reference_module, self._images, version=lambda: self.version,
                                                 batch_size=batch_size, encode=lambda px: reference_forward(_tower, px))

    @property
    def policy_encoded(self) -> int:
        """Items the policy's tower encoded so far through this cache (tests / benchmarks)."""
        return self._policy.encoded

    def weights_changed(self) -> None:
        """Call after the policy's weights may have changed (an update): features are recomputed."""
        self.version += 1

    def _images(self, ids: Sequence[str]) -> torch.Tensor:
        return torch.stack([self._pixels[i] for i in ids])

    def _remember(self, batch: PromptBatch) -> list[str]:
        """Index the batch's pixels by item id; -> the batch's item ids, prompt after prompt."""
        flat: list[str] = []
        for i, (ids, px) in enumerate(zip(batch.history, batch.pixel_values)):
            if len(ids) != px.shape[0]:
                raise ValueError(f"PromptBatch: prompt {i} has {px.shape[0]} history images but {len(ids)} item ids")
            self._pixels.update(zip(ids, px))
            flat.extend(ids)
        return flat

    def _per_prompt(self, cache: VisionFeatureCache, batch: PromptBatch) -> list[torch.Tensor]:
        flat = self._remember(batch)
        try:
            if not flat:
                raise ValueError("PromptBatch: pixels history mode but no prompt has a history image")
            feats = cache.features(flat)
        finally:
            self._pixels.clear()  # the cache keeps features, not the images
        out, at = [], 0
        for ids in batch.history:
            out.append(feats[at:at + len(ids)])
            at += len(ids)
        return out

    def for_policy(self, batch: PromptBatch) -> list[torch.Tensor] | None:
        """B tower outputs ``[n_i, T_img, D_vision]`` of the policy for the rollout and the
        no-grad log-prob pass; None in codes mode. A frozen tower uses the batch's cached
        features when it has them (the tower is then not called at all)."""
        if batch.pixel_values is None:
            return None
        if batch.image_features is not None and not tower_trains(self.policy):
            return batch.image_features
        return self._per_prompt(self._policy, batch)

    def for_reference(self, batch: PromptBatch, policy_features: list[torch.Tensor] | None
                      ) -> list[torch.Tensor] | None:
        """The reference's tower outputs: the policy's while the policy's tower is frozen (both
        are the checkpoint's tower), else the reference's own, encoded once per distinct item."""
        if policy_features is None or not tower_trains(self.policy):
            return policy_features
        if self._reference is None:
            raise ValueError("RLHistoryFeatures: a trainable vision tower needs the reference module to encode "
                             "the reference's history features")
        return self._per_prompt(self._reference, batch)
