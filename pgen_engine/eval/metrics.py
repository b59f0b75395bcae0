"""Evaluation metrics: pure functions on embeddings (and attribute read-outs).

Conventions:
  * ``gen_embeds [N, D]`` are the generated images' embeddings, ``gen_user LongTensor[N]``
    maps each to its user in ``[0, U)``; per-user item embeddings are lists of U tensors
    ``[n_u, D]``. Embeddings are L2-normalised here, so every similarity is a cosine.
  * Per-image / per-user results are tensors; a value that does not exist (a user with no
    future item, a user with one image for diversity) is NaN, never a silent 0 — average
    with :func:`nanmean`.
  * Ranking follows "generate vs recommend": any method produces ``scores [U, C]`` over the
    catalogue and goes through :func:`rank_metrics`, so generation, popularity and
    retrieve-and-rank baselines are measured by exactly the same code.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_KS",
    "cosine_matrix",
    "history_alignment",
    "future_alignment",
    "generated_item_scores",
    "true_item_ranks",
    "rank_metrics",
    "generation_rank_metrics",
    "user_diversity",
    "novelty",
    "attribute_accuracy",
    "nanmean",
    "row_cosines",
    "user_id_ranks",
]

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20)
# elements of one [rows, users or items] similarity block (64 MB of float32): metrics over all
# test users work in blocks of this size instead of whole matrices
CHUNK_ELEMENTS = 1 << 24


def _embeds(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a float tensor [n, D], got {got}")
    bad = ~torch.isfinite(x).all(dim=-1)
    if bool(bad.any()):  # else a NaN similarity reads as "undefined" and is silently averaged away
        raise ValueError(f"{name}: {int(bad.sum())} of {x.shape[0]} embeddings hold NaN or inf (first: row "
                         f"{int(bad.nonzero()[0, 0])}); the embedder failed on those images")
    return F.normalize(x.float(), dim=-1)


def _users(gen_user: torch.Tensor, n: int, num_users: int, name: str = "gen_user") -> torch.Tensor:
    if not isinstance(gen_user, torch.Tensor) or gen_user.ndim != 1 or gen_user.is_floating_point():
        raise ValueError(f"{name}: expected an integer tensor [N], got {getattr(gen_user, 'shape', type(gen_user))}")
    if gen_user.shape[0] != n:
        raise ValueError(f"{name} has {gen_user.shape[0]} entries but there are {n} generated embeddings")
    if n and (int(gen_user.min()) < 0 or int(gen_user.max()) >= num_users):
        raise ValueError(f"{name} values must be in [0, {num_users}), got [{int(gen_user.min())}, {int(gen_user.max())}]")
    return gen_user.long()


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[N, M]`` between rows of ``a [N, D]`` and ``b [M, D]`` (float32)."""
    a, b = _embeds(a, "a"), _embeds(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"cosine_matrix: widths differ, a has D={a.shape[1]}, b has D={b.shape[1]}")
    return a @ b.to(a.device).T


def row_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of each row of ``a [N, D]`` with the same row of ``b [N, D]`` -> ``[N]`` (float32)."""
    a, b = _embeds(a, "a"), _embeds(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"row_cosines: shapes differ, a {tuple(a.shape)}, b {tuple(b.shape)}")
    return (a * b.to(a.device)).sum(-1)


def _per_user_sims(gen_embeds: torch.Tensor, gen_user: torch.Tensor, items: Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    """For each generated image, cosines ``[n_u]`` to its user's items."""
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{name}: expected a list of U tensors [n_u, D], got {type(items).__name__}")
    e = _embeds(gen_embeds, "gen_embeds")
    users = _users(gen_user, e.shape[0], len(items))
    normed = []
    for u, it in enumerate(items):
        it = _embeds(it, f"{name}[{u}]")
        if it.shape[0] and it.shape[1] != e.shape[1]:
            raise ValueError(f"{name}[{u}] has D={it.shape[1]} but gen_embeds has D={e.shape[1]}")
        normed.append(it.to(e.device))
    return [normed[int(u)] @ e[i] for i, u in enumerate(users.tolist())]


def history_alignment(
    gen_embeds: torch.Tensor, gen_user: torch.Tensor, history_embeds: Sequence[torch.Tensor], k: int = 5
) -> dict[str, torch.Tensor]:
    """How close each generated image is to its user's history.

    Args:
        gen_embeds: ``[N, D]``; gen_user: LongTensor ``[N]``; history_embeds: U tensors ``[h_u, D]``.
        k: top-k for the top-k mean (uses all items when ``h_u < k``).
    Returns:
        ``{"max": [N], f"top{k}_mean": [N]}`` float32; NaN for a user with empty history.
    """
    if k < 1:
        raise ValueError(f"history_alignment: k must be >= 1, got {k}")
    sims = _per_user_sims(gen_embeds, gen_user, history_embeds, "history_embeds")
    nan = float("nan")
    mx = [float(s.max()) if s.numel() else nan for s in sims]
    topk = [float(s.topk(min(k, s.numel())).values.mean()) if s.numel() else nan for s in sims]
    return {"max": torch.tensor(mx, dtype=torch.float32), f"top{k}_mean": torch.tensor(topk, dtype=torch.float32)}


def future_alignment(
    gen_embeds: torch.Tensor, gen_user: torch.Tensor, future_embeds: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Similarity of each generated image to its user's held-out next item(s).

    Returns ``{"max": [N], "mean": [N]}`` float32 (cosine to the best / average future item),
    NaN for users without future items.
    """
    sims = _per_user_sims(gen_embeds, gen_user, future_embeds, "future_embeds")
    nan = float("nan")
    return {
        "max": torch.tensor([float(s.max()) if s.numel() else nan for s in sims], dtype=torch.float32),
        "mean": torch.tensor([float(s.mean()) if s.numel() else nan for s in sims], dtype=torch.float32),
    }


def generated_item_scores(
    gen_embeds: torch.Tensor, gen_user: torch.Tensor, catalogue_embeds: torch.Tensor, num_users: int, agg: str = "max"
) -> torch.Tensor:
    """Score every catalogue item for every user from that user's generated images.

    ``score[u, c] = agg_i cos(gen_i, item_c)`` over the images ``i`` of user ``u``.

    Returns:
        float32 ``[U, C]``. Raises if a user has no generated image.
    """
    if agg not in ("max", "mean"):
        raise ValueError(f"generated_item_scores: agg must be 'max' or 'mean', got {agg!r}")
    e = _embeds(gen_embeds, "gen_embeds")
    users = _users(gen_user, e.shape[0], num_users)
    cat = _embeds(catalogue_embeds, "catalogue_embeds").to(e.device)
    if cat.shape[1] != e.shape[1]:
        raise ValueError(f"generated_item_scores: widths differ, gen_embeds D={e.shape[1]}, catalogue D={cat.shape[1]}")
    users = users.to(e.device)
    counts = torch.bincount(users, minlength=num_users)
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().flatten()[:10].tolist()
        raise ValueError(f"generated_item_scores: users {missing} have no generated images")
    out = torch.zeros(num_users, cat.shape[0], dtype=torch.float32, device=e.device)
    if agg == "max":
        out.fill_(float("-inf"))
    # images in chunks: the whole [N, C] similarity matrix is 2 GB at 100k images x 5k items
    step = max(1, CHUNK_ELEMENTS // max(1, cat.shape[0]))
    for i in range(0, e.shape[0], step):
        sims = e[i:i + step] @ cat.T  # [n, C]
        idx = users[i:i + step].unsqueeze(1).expand_as(sims)
        if agg == "max":
            out.scatter_reduce_(0, idx, sims, reduce="amax", include_self=True)
        else:
            out.scatter_add_(0, idx, sims)
    return out if agg == "max" else out.div_(counts.unsqueeze(1).to(out.dtype))


def true_item_ranks(
    scores: torch.Tensor, true_items: torch.Tensor, exclude: Sequence[Sequence[int]] | None = None
) -> torch.Tensor:
    """0-based rank of each user's true item among the catalogue, ties counted pessimistically.

    ``rank[u] = #{c : score[u,c] > score[u,t]} + #{c != t : score[u,c] == score[u,t]}`` over
    items not in ``exclude[u]`` — an item tied with the true one ranks above it, so a
    constant scorer gets the worst rank, never a lucky one.

    Args:
        scores: float ``[U, C]`` (higher = more recommended); NaN is an error.
        true_items: LongTensor ``[U]`` in ``[0, C)``.
        exclude: per user, item ids that must not be recommended (the history). Must not
            contain the user's true item.
    Returns:
        LongTensor ``[U]``.
    """
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2 or not scores.is_floating_point():
        raise ValueError(f"scores: expected a float tensor [U, C], got {getattr(scores, 'shape', type(scores))}")
    num_users, num_items = scores.shape
    if not isinstance(true_items, torch.Tensor) or true_items.ndim != 1 or true_items.is_floating_point():
        raise ValueError(f"true_items: expected an integer tensor [U], got {getattr(true_items, 'shape', type(true_items))}")
    if true_items.shape[0] != num_users:
        raise ValueError(f"true_items has {true_items.shape[0]} users but scores has {num_users} rows")
    if num_users and (int(true_items.min()) < 0 or int(true_items.max()) >= num_items):
        raise ValueError(f"true_items must be in [0, {num_items}), got [{int(true_items.min())}, {int(true_items.max())}]")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN")
    true_items = true_items.long().to(scores.device)
    s = scores.float()
    allowed = torch.ones_like(s, dtype=torch.bool)
    if exclude is not None:
        if len(exclude) != num_users:
            raise ValueError(f"exclude has {len(exclude)} users but scores has {num_users} rows")
        for u, items in enumerate(exclude):
            items = [int(i) for i in items]
            if any(i < 0 or i >= num_items for i in items):
                raise ValueError(f"exclude[{u}] has item ids outside [0, {num_items})")
            if int(true_items[u]) in items:
                raise ValueError(f"exclude[{u}] contains the user's true item {int(true_items[u])}")
            if items:
                allowed[u, items] = False
    true_score = s.gather(1, true_items.unsqueeze(1))
    not_true = torch.ones_like(allowed)
    not_true.scatter_(1, true_items.unsqueeze(1), False)
    ahead = ((s > true_score) | ((s == true_score) & not_true)) & allowed
    return ahead.sum(dim=1)


def rank_metrics(
    scores: torch.Tensor,
    true_items: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    exclude: Sequence[Sequence[int]] | None = None,
) -> dict[str, float]:
    """HR@k and NDCG@k of a recommender's catalogue scores (one relevant item per user).

    ``HR@k = mean(rank < k)``, ``NDCG@k = mean(1/log2(rank + 2) if rank < k else 0)`` with
    the pessimistic ranks of :func:`true_item_ranks`. Also returns ``"mrr"``.

    Returns:
        ``{"hr@1": ..., "ndcg@1": ..., ..., "mrr": ...}`` floats (NaN when U == 0).
    """
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"rank_metrics: ks must be positive ints, got {ks!r}")
    ranks = true_item_ranks(scores, true_items, exclude).double()
    out: dict[str, float] = {}
    if ranks.numel() == 0:
        for k in ks:
            out[f"hr@{k}"] = out[f"ndcg@{k}"] = float("nan")
        out["mrr"] = float("nan")
        return out
    gains = 1.0 / torch.log2(ranks + 2.0)
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.double().mean())
        out[f"ndcg@{k}"] = float(torch.where(hit, gains, torch.zeros_like(gains)).mean())
    out["mrr"] = float((1.0 / (ranks + 1.0)).mean())
    return out


def generation_rank_metrics(
    gen_embeds: torch.Tensor,
    gen_user: torch.Tensor,
    catalogue_embeds: torch.Tensor,
    true_items: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    exclude: Sequence[Sequence[int]] | None = None,
    agg: str = "max",
) -> dict[str, float]:
    """Next-item ranking for generation: :func:`generated_item_scores` then :func:`rank_metrics`."""
    scores = generated_item_scores(gen_embeds, gen_user, catalogue_embeds, int(true_items.shape[0]), agg)
    return rank_metrics(scores, true_items, ks, exclude)


def user_id_ranks(gen_embeds: torch.Tensor, gen_user: torch.Tensor, history_embeds: Sequence[torch.Tensor]
                  ) -> torch.Tensor:
    """1-based rank of each image's true user among all users, ``[N]``.

    A user's score for an image is the mean cosine of the image to that user's history
    window items; ties rank pessimistically (a tie with another user counts above).
    """
    e = F.normalize(gen_embeds.float(), dim=-1)
    H = torch.stack([F.normalize(h.float(), dim=-1).mean(0) for h in history_embeds])  # [U, D]
    out = torch.empty(e.shape[0], dtype=torch.long)
    # in row chunks: the whole [N, U] score matrix and its masks are ~7 GB at 10k users x 10 images
    step = max(1, CHUNK_ELEMENTS // max(1, H.shape[0]))
    for i in range(0, e.shape[0], step):
        s = e[i:i + step] @ H.T  # [n, U]
        gu = gen_user[i:i + step].view(-1, 1)
        true = s.gather(1, gu)
        other = torch.ones_like(s, dtype=torch.bool).scatter_(1, gu, False)
        out[i:i + step] = ((s > true) | ((s == true) & other)).sum(1) + 1
    return out


def user_diversity(gen_embeds: torch.Tensor, gen_user: torch.Tensor, num_users: int) -> torch.Tensor:
    """Per-user diversity ``1 - mean pairwise cosine`` over the user's generated images.

    Returns float32 ``[U]`` in [0, 2]; NaN for users with fewer than two images.
    """
    e = _embeds(gen_embeds, "gen_embeds")
    users = _users(gen_user, e.shape[0], num_users).to(e.device)
    same = users.unsqueeze(0) == users.unsqueeze(1)
    same.fill_diagonal_(False)
    pair_sum = torch.zeros(num_users, dtype=torch.float32, device=e.device).index_add_(0, users, ((e @ e.T) * same).sum(1))
    pairs = torch.zeros(num_users, dtype=torch.float32, device=e.device).index_add_(0, users, same.sum(1).float())
    div = (1.0 - pair_sum / pairs.clamp(min=1)).clamp(0.0, 2.0)  # float rounding of cos(x, x) = 1 gave -1e-7
    return torch.where(pairs > 0, div, torch.full_like(pairs, float("nan"))).cpu()


def novelty(gen_embeds: torch.Tensor, catalogue_embeds: torch.Tensor) -> torch.Tensor:
    """Per image ``1 - max cosine`` to any catalogue item: float32 ``[N]`` in [0, 2]."""
    sims = cosine_matrix(gen_embeds, catalogue_embeds)
    if sims.shape[1] == 0:
        raise ValueError("novelty: catalogue_embeds is empty")
    return (1.0 - sims.amax(dim=1)).clamp(0.0, 2.0).cpu()  # a catalogue item's own cosine may round past 1


def attribute_accuracy(
    pred: torch.Tensor, target: torch.Tensor, names: Sequence[str] | None = None
) -> dict[str, float]:
    """Accuracy of attribute read-outs against ground truth (synthetic data).

    Args:
        pred: integer ``[N, A]`` read-outs of generated images.
        target: integer ``[N, A]`` ground truth (current or future preference); entries < 0
            are unknown and skipped.
        names: A attribute names for the keys (default ``attr0``...).
    Returns:
        ``{name: accuracy, ..., "mean": mean over attributes with any known target,
        "all": fraction of images with every known attribute right}``; NaN where undefined.
    """
    for t, n in ((pred, "pred"), (target, "target")):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.is_floating_point():
            raise ValueError(f"attribute_accuracy: {n} must be an integer tensor [N, A], got {getattr(t, 'shape', type(t))}")
    if pred.shape != target.shape:
        raise ValueError(f"attribute_accuracy: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    a = pred.shape[1]
    names = [f"attr{i}" for i in range(a)] if names is None else list(names)
    if len(names) != a:
        raise ValueError(f"attribute_accuracy: {len(names)} names for {a} attributes")
    if set(names) & {"mean", "all"} or len(set(names)) != a:
        raise ValueError(f"attribute_accuracy: names must be unique and not 'mean'/'all', got {names}")
    target = target.to(pred.device)
    valid = target >= 0
    hit = (pred == target) & valid
    n_valid = valid.sum(0)
    out: dict[str, float] = {}
    accs = []
    for i, name in enumerate(names):
        if int(n_valid[i]) == 0:
            out[name] = float("nan")
        else:
            out[name] = float(hit[:, i].sum()) / float(n_valid[i])
            accs.append(out[name])
    out["mean"] = sum(accs) / len(accs) if accs else float("nan")
    rows = valid.any(1)
    out["all"] = float(((hit == valid).all(1) & rows).sum()) / float(rows.sum()) if bool(rows.any()) else float("nan")
    return out


def nanmean(x: torch.Tensor) -> float:
    """Mean over the non-NaN entries (NaN if there are none)."""
    x = x.detach().double().flatten()
    keep = ~torch.isnan(x)
    return float(x[keep].mean()) if bool(keep.any()) else float("nan")
