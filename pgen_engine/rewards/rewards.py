"""Reward functions for online RL on generated images.

Every reward is a small class with one ``__call__(images, ctx) -> FloatTensor[N]``:
``images`` are the N generated images (uint8 ``[N, H, W, 3]``) and ``ctx`` is a
:class:`RewardContext` saying, for each image, which user and which GRPO group it belongs
to, plus that user's history / future / catalogue embeddings.

Embedding-based rewards read ``ctx.image_embeds`` when it is set (the
:class:`CompositeReward` embeds once and shares it), else embed with their own embedder.
All embeddings are treated as directions: they are L2-normalised here before any cosine.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from .embedders import ImageEmbedder, as_image_batch

__all__ = [
    "RewardContext",
    "Reward",
    "PreferenceReward",
    "FutureInterestReward",
    "NoveltyPenalty",
    "DiversityReward",
    "AttributeMatchReward",
    "CompositeReward",
    "REWARD_REGISTRY",
    "reward_stats",
]


def _check_index(t: Any, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32) or t.ndim != 1:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"RewardContext.{name}: expected an integer LongTensor [N], got {got}")
    return t.long()


def _check_embed_list(items: Any, name: str) -> list[torch.Tensor]:
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"RewardContext.{name}: expected a list of [n_u, D] tensors (one per user), got {type(items).__name__}")
    out = []
    for u, e in enumerate(items):
        if not isinstance(e, torch.Tensor) or e.ndim != 2 or not e.is_floating_point():
            got = f"{e.dtype} {tuple(e.shape)}" if isinstance(e, torch.Tensor) else type(e).__name__
            raise ValueError(f"RewardContext.{name}[{u}]: expected a float tensor [n_u, D], got {got}")
        out.append(e)
    return out


@dataclass
class _Packed:
    """Per-user embedding lists concatenated: ``embeds [T, D]`` (normalised) and ``owner LongTensor[T]``."""

    embeds: torch.Tensor
    owner: torch.Tensor
    counts: torch.Tensor  # LongTensor[U]: rows per user


def _pack(items: list[torch.Tensor], dim: int | None, device: torch.device) -> _Packed:
    counts = torch.tensor([e.shape[0] for e in items], dtype=torch.long)
    widths = {e.shape[1] for e in items if e.shape[0] > 0}
    d = dim if dim is not None else (widths.pop() if len(widths) == 1 else 0)
    nonempty = [e for e in items if e.shape[0] > 0]
    embeds = torch.cat([e.to(device, torch.float32) for e in nonempty]) if nonempty else torch.zeros(0, d, device=device)
    owner = torch.repeat_interleave(torch.arange(len(items)), counts).to(device)
    return _Packed(F.normalize(embeds, dim=-1), owner, counts.to(device))


@dataclass
class RewardContext:
    """Per-image conditioning for rewards (N images, U users).

    Attributes:
        user_index: LongTensor ``[N]``, image -> index into the per-user lists.
        group_index: LongTensor ``[N]``, images sharing one prompt (a GRPO group) share an id.
        history_embeds: U tensors ``[h_u, D]`` of the user's history item embeddings.
        future_embeds: U tensors ``[f_u, D]`` of later train-split items (may be ``[0, D]``),
            or None when unknown.
        catalogue_embeds: ``[C, D]`` all catalogue items, or None.
        target_attributes: LongTensor ``[N, A]``, the user's ground-truth current preference
            (synthetic data); entries < 0 mean "no preference" and are not scored.
        read_attributes: callable ``uint8 [N,H,W,3] -> LongTensor [N, A]`` (synthetic data).
        image_embeds: float ``[N, D]`` embeddings of the images, set by CompositeReward.
    """

    user_index: torch.Tensor
    group_index: torch.Tensor
    history_embeds: list[torch.Tensor]
    future_embeds: list[torch.Tensor] | None = None
    catalogue_embeds: torch.Tensor | None = None
    target_attributes: torch.Tensor | None = None
    read_attributes: Callable[[torch.Tensor], torch.Tensor] | None = None
    image_embeds: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.user_index = _check_index(self.user_index, "user_index")
        self.group_index = _check_index(self.group_index, "group_index")
        n = self.user_index.shape[0]
        if self.group_index.shape[0] != n:
            raise ValueError(f"RewardContext.group_index has {self.group_index.shape[0]} entries, user_index has {n}")
        self.history_embeds = _check_embed_list(self.history_embeds, "history_embeds")
        num_users = len(self.history_embeds)
        if n and (int(self.user_index.min()) < 0 or int(self.user_index.max()) >= num_users):
            raise ValueError(
                f"RewardContext.user_index values must be in [0, {num_users}) (len(history_embeds)), "
                f"got range [{int(self.user_index.min())}, {int(self.user_index.max())}]"
            )
        if self.future_embeds is not None:
            self.future_embeds = _check_embed_list(self.future_embeds, "future_embeds")
            if len(self.future_embeds) != num_users:
                raise ValueError(f"RewardContext.future_embeds has {len(self.future_embeds)} users, history_embeds has {num_users}")
        if self.catalogue_embeds is not None:
            c = self.catalogue_embeds
            if not isinstance(c, torch.Tensor) or c.ndim != 2 or not c.is_floating_point():
                raise ValueError(f"RewardContext.catalogue_embeds: expected a float tensor [C, D], got {getattr(c, 'shape', type(c))}")
        if self.target_attributes is not None:
            t = self.target_attributes
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[0] != n or t.is_floating_point():
                raise ValueError(f"RewardContext.target_attributes: expected an integer tensor [N={n}, A], got {getattr(t, 'shape', type(t))}")
        if self.read_attributes is not None and not callable(self.read_attributes):
            raise TypeError("RewardContext.read_attributes must be callable: uint8 [N,H,W,3] -> LongTensor [N, A]")
        if self.image_embeds is not None:
            e = self.image_embeds
            if not isinstance(e, torch.Tensor) or e.ndim != 2 or e.shape[0] != n:
                raise ValueError(f"RewardContext.image_embeds: expected [N={n}, D], got {getattr(e, 'shape', type(e))}")

    @property
    def num_images(self) -> int:
        return int(self.user_index.shape[0])

    @property
    def num_users(self) -> int:
        return len(self.history_embeds)

    def with_image_embeds(self, image_embeds: torch.Tensor) -> "RewardContext":
        """A copy carrying ``image_embeds`` ``[N, D]`` (the packed-embedding cache is shared)."""
        ctx = dataclasses.replace(self, image_embeds=image_embeds)
        ctx._cache = self._cache
        return ctx

    def packed(self, which: str, device: torch.device) -> _Packed:
        """``history``/``future`` lists concatenated once per context and device."""
        key = (which, str(device))
        if key not in self._cache:
            items = self.history_embeds if which == "history" else self.future_embeds
            if items is None:
                raise ValueError(f"RewardContext.{which}_embeds is None but a reward needs it")
            self._cache[key] = _pack(items, None, device)
        return self._cache[key]


class Reward:
    """Base class: ``__call__(images uint8 [N,H,W,3], ctx) -> float32 [N]``."""

    needs_embeddings: bool = False

    def __init__(self, embedder: ImageEmbedder | None = None):
        self.embedder = embedder

    def image_embeds(self, images: torch.Tensor, ctx: RewardContext) -> torch.Tensor:
        """Normalised float32 ``[N, D]``: ``ctx.image_embeds`` if set, else embedded here."""
        if ctx.image_embeds is not None:
            e = ctx.image_embeds
        elif self.embedder is not None:
            e = self.embedder.embed(images)
        else:
            raise ValueError(f"{type(self).__name__}: no ctx.image_embeds and no embedder to compute them")
        return F.normalize(e.float(), dim=-1)

    def _check(self, images: Any, ctx: RewardContext) -> torch.Tensor:
        images = as_image_batch(images)
        if images.shape[0] != ctx.num_images:
            raise ValueError(f"{type(self).__name__}: got {images.shape[0]} images but ctx describes {ctx.num_images}")
        return images

    def __call__(self, images: torch.Tensor, ctx: RewardContext) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")


def _check_agg(agg: str, cls: str) -> str:
    if agg not in ("mean", "max"):
        raise ValueError(f"{cls}: agg must be 'mean' or 'max', got {agg!r}")
    return agg


def _owned_similarity(e: torch.Tensor, user_index: torch.Tensor, packed: _Packed, agg: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Aggregate cosine of each image ``e [N, D]`` to its own user's rows of ``packed``.

    Returns ``(values float32 [N], has_rows BoolTensor [N])``; values are 0 where the user has no rows.
    """
    if packed.embeds.shape[0] and packed.embeds.shape[1] != e.shape[1]:
        raise ValueError(f"embedding width mismatch: images have D={e.shape[1]}, user embeddings have D={packed.embeds.shape[1]}")
    user_index = user_index.to(e.device)
    if packed.embeds.shape[0] == 0:  # nobody has rows (e.g. no future items on valid/test prompts)
        zeros = torch.zeros(e.shape[0], dtype=e.dtype, device=e.device)
        return zeros, torch.zeros(e.shape[0], dtype=torch.bool, device=e.device)
    sims = e @ packed.embeds.T  # [N, T]; one matmul for all users, then mask to own rows
    mine = packed.owner.unsqueeze(0) == user_index.unsqueeze(1)
    counts = packed.counts[user_index]
    has = counts > 0
    if agg == "max":
        vals = sims.masked_fill(~mine, float("-inf")).amax(dim=1) if sims.shape[1] else torch.zeros_like(counts, dtype=e.dtype)
    else:
        vals = (sims * mine).sum(dim=1) / counts.clamp(min=1)
    return torch.where(has, vals, torch.zeros_like(vals)), has


class PreferenceReward(Reward):
    """Cosine of each image to its user's history item embeddings (``agg`` = mean or max), in [-1, 1]."""

    needs_embeddings = True

    def __init__(self, agg: str = "mean", embedder: ImageEmbedder | None = None):
        super().__init__(embedder)
        self.agg = _check_agg(agg, "PreferenceReward")

    def __call__(self, images: torch.Tensor, ctx: RewardContext) -> torch.Tensor:
        images = self._check(images, ctx)
        e = self.image_embeds(images, ctx)
        vals, has = _owned_similarity(e, ctx.user_index, ctx.packed("history", e.device), self.agg)
        if not bool(has.all()):
            bad = sorted(set(ctx.user_index[~has.cpu()].tolist()))
            raise ValueError(f"PreferenceReward: users {bad[:10]} have an empty history")
        return vals


class FutureInterestReward(Reward):
    """Cosine of each image to its user's future (later train-split) items; 0 for users with none.

    ``snap=True`` scores the image's nearest catalogue item instead of the image, minus the
    image's distance to it: ``cos(cat[nn], future) - (1 - cos(image, cat[nn]))``. Why: a
    learned reward embedder can be fooled off the catalogue's image manifold (measured on
    the demo: GRPO raised the plain cosine while the images left the catalogue and their
    true attributes got worse); snapped, only *which* item an image depicts and how cleanly
    it depicts it are rewarded. Needs ``ctx.catalogue_embeds``.
    """

    needs_embeddings = True
    needs_catalogue = False

    def __init__(self, agg: str = "max", snap: bool = False, embedder: ImageEmbedder | None = None):
        super().__init__(embedder)
        self.agg = _check_agg(agg, "FutureInterestReward")
        if not isinstance(snap, bool):
            raise ValueError(f"FutureInterestReward: snap must be true or false, got {snap!r}")
        self.snap = self.needs_catalogue = snap

    def __call__(self, images: torch.Tensor, ctx: RewardContext) -> torch.Tensor:
        images = self._check(images, ctx)
        if ctx.future_embeds is None:
            raise ValueError("FutureInterestReward: ctx.future_embeds is None (pass [0, D] tensors for users without future items)")
        e = self.image_embeds(images, ctx)
        penalty = torch.zeros(e.shape[0], device=e.device)
        if self.snap:
            if ctx.catalogue_embeds is None or ctx.catalogue_embeds.shape[0] == 0:
                raise ValueError("FutureInterestReward(snap=True): ctx.catalogue_embeds is None or empty")
            cat = F.normalize(ctx.catalogue_embeds.to(e.device, torch.float32), dim=-1)
            if cat.shape[1] != e.shape[1]:
                raise ValueError(f"FutureInterestReward: catalogue D={cat.shape[1]} but image embeddings D={e.shape[1]}")
            best, nn = (e @ cat.T).max(dim=1)
            e, penalty = cat[nn], 1.0 - best
        vals, has = _owned_similarity(e, ctx.user_index, ctx.packed("future", e.device), self.agg)
        return torch.where(has, vals - penalty, vals)


class NoveltyPenalty(Reward):
    """Penalise near-copies: ``-max(0, max_cos - threshold) / (1 - threshold)`` in [-1, 0].

    ``max_cos`` is the largest cosine of the image to its user's history items and/or every
    catalogue item (``against``). Memorising a training image is the failure this guards.
    """

    needs_embeddings = True
    SOURCES = ("history", "catalogue")

    def __init__(self, threshold: float = 0.9, against: tuple[str, ...] = ("history", "catalogue"), embedder: ImageEmbedder | None = None):
        super().__init__(embedder)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 <= threshold < 1.0:
            raise ValueError(f"NoveltyPenalty: threshold must be a number in [-1, 1), got {threshold!r}")
        against = (against,) if isinstance(against, str) else tuple(against)
        if not against or any(a not in self.SOURCES for a in against):
            raise ValueError(f"NoveltyPenalty: against must be a non-empty subset of {self.SOURCES}, got {against!r}")
        self.threshold = float(threshold)
        self.against = against

    def __call__(self, images: torch.Tensor, ctx: RewardContext) -> torch.Tensor:
        images = self._check(images, ctx)
        e = self.image_embeds(images, ctx)
        best = torch.full((e.shape[0],), -1.0, device=e.device)
        if "history" in self.against:
            vals, has = _owned_similarity(e, ctx.user_index, ctx.packed("history", e.device), "max")
            best = torch.where(has, torch.maximum(best, vals), best)
        if "catalogue" in self.against:
            if ctx.catalogue_embeds is None:
                raise ValueError("NoveltyPenalty: against includes 'catalogue' but ctx.catalogue_embeds is None")
            cat = F.normalize(ctx.catalogue_embeds.to(e.device, torch.float32), dim=-1)
            if cat.shape[0]:
                if cat.shape[1] != e.shape[1]:
                    raise ValueError(f"NoveltyPenalty: catalogue D={cat.shape[1]} but image embeddings D={e.shape[1]}")
                best = torch.maximum(best, (e @ cat.T).amax(dim=1))
        return -(best - self.threshold).clamp(min=0.0) / (1.0 - self.threshold)


class DiversityReward(Reward):
    """In-group diversity: ``1 - mean cosine`` to the other images of the same group.

    An image alone in its group scores 0 (no evidence either way). Range [0, 2].
    """

    needs_embeddings = True

    def __call__(self, images: torch.Tensor, ctx: RewardContext) -> torch.Tensor:
        images = self._check(images, ctx)
        e = self.image_embeds(images, ctx)
        g = ctx.group_index.to(e.device)
        same = g.unsqueeze(0) == g.unsqueeze(1)
        same.fill_diagonal_(False)
        others = same.sum(dim=1)
        mean_sim = ((e @ e.T) * same).sum(dim=1) / others.clamp(min=1)
        return torch.where(others > 0, 1.0 - mean_sim, torch.zeros_like(mean_sim))


class AttributeMatchReward(Reward):
    """Fraction of read-out attributes equal to the target (synthetic data), in [0, 1].

    Target entries < 0 are "no preference" and excluded; a row with none scores 0.
    """

    def __call__(self, images: torch.Tensor, ctx: RewardContext) -> torch.Tensor:
        images = self._check(images, ctx)
        if ctx.target_attributes is None or ctx.read_attributes is None:
            raise ValueError("AttributeMatchReward: ctx.target_attributes and ctx.read_attributes are both required")
        pred = ctx.read_attributes(images)
        target = ctx.target_attributes
        if not isinstance(pred, torch.Tensor) or pred.shape != target.shape:
            raise ValueError(
                f"AttributeMatchReward: read_attributes returned {getattr(pred, 'shape', type(pred))}, "
                f"expected the target_attributes shape {tuple(target.shape)}"
            )
        pred = pred.to(target.device)
        valid = target >= 0
        hits = ((pred == target) & valid).sum(dim=1).float()
        n_valid = valid.sum(dim=1)
        return torch.where(n_valid > 0, hits / n_valid.clamp(min=1), torch.zeros_like(hits))


REWARD_REGISTRY: dict[str, type[Reward]] = {
    "preference": PreferenceReward,
    "future_interest": FutureInterestReward,
    "novelty": NoveltyPenalty,
    "diversity": DiversityReward,
    "attribute_match": AttributeMatchReward,
}


class CompositeReward:
    """Weighted sum of named reward components sharing one image embedding pass.

    ``__call__(images, ctx) -> (total float32 [N], {name: float32 [N]})``; components are
    the unweighted values, ``total = sum_i weight_i * component_i``.
    """

    def __init__(self, components: Mapping[str, tuple[float, Reward]], embedder: ImageEmbedder | None = None):
        if not components:
            raise ValueError("CompositeReward: needs at least one component")
        for name, (w, r) in components.items():
            _check_weight(name, w)
            if not callable(r):
                raise TypeError(f"CompositeReward: component {name!r} is not callable")
        self.components = dict(components)
        self.embedder = embedder

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], embedder: ImageEmbedder | None) -> "CompositeReward":
        """Build from a YAML-style dict ``{name: {"weight": w, **kwargs}}``.

        Names are the keys of :data:`REWARD_REGISTRY`; other keys are constructor kwargs
        (e.g. ``agg``, ``threshold``). Raises ``ValueError`` on an unknown name, a missing or
        non-finite weight, or an unknown kwarg.
        """
        if not isinstance(cfg, Mapping) or not cfg:
            raise ValueError(f"reward config must be a non-empty mapping of component -> options, got {cfg!r}")
        comps: dict[str, tuple[float, Reward]] = {}
        for name, opts in cfg.items():
            if name not in REWARD_REGISTRY:
                raise ValueError(f"reward config: unknown component {name!r}; known: {sorted(REWARD_REGISTRY)}")
            if not isinstance(opts, Mapping):
                raise ValueError(f"reward config.{name}: expected a mapping with 'weight', got {opts!r}")
            opts = dict(opts)
            if "weight" not in opts:
                raise ValueError(f"reward config.{name}: missing 'weight'")
            w = _check_weight(name, opts.pop("weight"))
            rcls = REWARD_REGISTRY[name]
            if "against" in opts and isinstance(opts["against"], list):
                opts["against"] = tuple(opts["against"])
            try:
                reward = rcls(**opts) if not rcls.needs_embeddings else rcls(**opts, embedder=embedder)
            except TypeError as e:
                raise ValueError(f"reward config.{name}: bad option(s) {sorted(opts)} for {rcls.__name__}: {e}") from e
            comps[name] = (w, reward)
        return cls(comps, embedder)

    @property
    def needs_embeddings(self) -> bool:
        return any(getattr(r, "needs_embeddings", False) for _, r in self.components.values())

    def __call__(self, images: torch.Tensor, ctx: RewardContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = as_image_batch(images)
        if images.shape[0] != ctx.num_images:
            raise ValueError(f"CompositeReward: got {images.shape[0]} images but ctx describes {ctx.num_images}")
        if self.needs_embeddings and ctx.image_embeds is None:
            if self.embedder is None:
                raise ValueError("CompositeReward: embedding-based components need an embedder (or ctx.image_embeds)")
            ctx = ctx.with_image_embeds(self.embedder.embed(images))
        values: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for name, (w, reward) in self.components.items():
            v = reward(images, ctx)
            if not isinstance(v, torch.Tensor) or v.shape != (ctx.num_images,):
                raise ValueError(f"reward component {name!r} returned {getattr(v, 'shape', type(v))}, expected [{ctx.num_images}]")
            v = v.float()
            if not bool(torch.isfinite(v).all()):
                bad = (~torch.isfinite(v)).nonzero().flatten()[:10].tolist()
                raise ValueError(f"reward component {name!r} produced non-finite values at images {bad}")
            values[name] = v
            total = w * v if total is None else total + w * v.to(total.device)
        assert total is not None
        return total, values


def _check_weight(name: str, w: Any) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(float(w)):
        raise ValueError(f"reward config.{name}.weight must be a finite number, got {w!r}")
    return float(w)


def reward_stats(components: Mapping[str, torch.Tensor], prefix: str = "reward/") -> dict[str, float]:
    """Flat logging stats: ``{prefix}{name}/{mean,std,min,max}`` per component.

    ``std`` is the population std (0 for a single value). Empty tensors give NaN stats.
    """
    out: dict[str, float] = {}
    for name, v in components.items():
        v = v.detach().float().flatten()
        key = f"{prefix}{name}"
        if v.numel() == 0:
            out.update({f"{key}/{s}": float("nan") for s in ("mean", "std", "min", "max")})
            continue
        out[f"{key}/mean"] = float(v.mean())
        out[f"{key}/std"] = float(v.std(unbiased=False))
        out[f"{key}/min"] = float(v.min())
        out[f"{key}/max"] = float(v.max())
    return out
