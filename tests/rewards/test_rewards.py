"""Rewards: hand-computed values, brute-force agreement on random ragged inputs, composite wiring, errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pgen_engine.rewards import (
    AttributeMatchReward,
    CompositeReward,
    DiversityReward,
    FutureInterestReward,
    NoveltyPenalty,
    PixelStatsEmbedder,
    PreferenceReward,
    Reward,
    RewardContext,
    reward_stats,
)

E = torch.eye(3)


def _imgs(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 9, 11, 3), dtype=torch.uint8)


def _hand_ctx(**kw) -> RewardContext:
    """3 images, 2 users; image embeddings given directly so values are exact."""
    img = torch.stack([E[0], F.normalize(E[0] + E[2], dim=0), -E[1]])
    base = dict(
        user_index=torch.tensor([0, 1, 0]),
        group_index=torch.tensor([0, 1, 0]),
        history_embeds=[torch.stack([E[0], E[1]]), E[2:3]],
        future_embeds=[E[1:2], torch.zeros(0, 3)],
        catalogue_embeds=torch.stack([E[0], E[1], E[2]]),
        image_embeds=img,
    )
    base.update(kw)
    return RewardContext(**base)


def test_preference_hand_values():
    ctx, imgs = _hand_ctx(), _imgs(3)
    torch.testing.assert_close(PreferenceReward("mean")(imgs, ctx), torch.tensor([0.5, 1 / math.sqrt(2), -0.5]))
    torch.testing.assert_close(PreferenceReward("max")(imgs, ctx), torch.tensor([1.0, 1 / math.sqrt(2), 0.0]))


def test_future_interest_hand_values_and_empty_future_is_zero():
    ctx, imgs = _hand_ctx(), _imgs(3)
    torch.testing.assert_close(FutureInterestReward("max")(imgs, ctx), torch.tensor([0.0, 0.0, -1.0]))
    with pytest.raises(ValueError, match="future_embeds is None"):
        FutureInterestReward()(imgs, _hand_ctx(future_embeds=None))


def test_future_interest_snap_scores_the_nearest_catalogue_item_minus_its_distance():
    fut = F.normalize(E[1] + E[2], dim=0)  # not a catalogue item
    img = torch.stack([torch.tensor([0.6, 0.8, 0.0]), E[2], torch.tensor([0.6, 0.8, 0.0])])
    ctx = _hand_ctx(image_embeds=img, future_embeds=[fut[None], torch.zeros(0, 3)])
    torch.testing.assert_close(FutureInterestReward("max")(_imgs(3), ctx),
                               torch.tensor([0.8 / math.sqrt(2), 0.0, 0.8 / math.sqrt(2)]))
    # snapped: image 0 depicts e1 (cos 0.8): cos(e1, fut) - (1 - 0.8); user 1 has no future items: 0
    r = FutureInterestReward("max", snap=True)
    assert r.needs_catalogue
    torch.testing.assert_close(r(_imgs(3), ctx), torch.tensor([1 / math.sqrt(2) - 0.2, 0.0, 1 / math.sqrt(2) - 0.2]))
    with pytest.raises(ValueError, match="catalogue_embeds is None"):
        r(_imgs(3), _hand_ctx(image_embeds=img, catalogue_embeds=None))
    with pytest.raises(ValueError, match="snap must be"):
        FutureInterestReward("max", snap="yes")


def test_novelty_penalty_hand_values():
    # user 0's history holds e0, e1; the catalogue holds e0, e1, e2 (e0 copied exactly)
    img = torch.stack([E[0], torch.tensor([0.75, 0.0, math.sqrt(1 - 0.75**2)]), -E[1]])
    ctx = _hand_ctx(image_embeds=img)
    pen = NoveltyPenalty(threshold=0.5)(_imgs(3), ctx)
    torch.testing.assert_close(pen, torch.tensor([-1.0, -0.5, 0.0]))
    # history only: user 1's history is e2 only, image 1 has cos sqrt(1-0.5625) to it
    hist_only = NoveltyPenalty(threshold=0.5, against="history")(_imgs(3), ctx)
    c = math.sqrt(1 - 0.75**2)
    torch.testing.assert_close(hist_only, torch.tensor([-1.0, -max(0.0, c - 0.5) / 0.5, 0.0]))
    with pytest.raises(ValueError, match="catalogue_embeds is None"):
        NoveltyPenalty(0.5, against="catalogue")(_imgs(3), _hand_ctx(catalogue_embeds=None))
    for bad in (1.0, -2, True, "0.5"):
        with pytest.raises(ValueError, match="threshold"):
            NoveltyPenalty(bad)


def test_diversity_hand_values():
    img = torch.stack([E[0], E[0], E[1], E[2], F.normalize(E[0] + E[1], dim=0)])
    ctx = RewardContext(
        user_index=torch.zeros(5, dtype=torch.long), group_index=torch.tensor([0, 0, 1, 1, 2]),
        history_embeds=[E[:1]], image_embeds=img,
    )
    torch.testing.assert_close(DiversityReward()(_imgs(5), ctx), torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0]))


def _random_ctx(n_users=4, per_user=(3, 0, 5, 2), future=(2, 0, 1, 4), n=11, d=7, c=13, groups=4) -> tuple[RewardContext, torch.Tensor]:
    hist = [torch.randn(max(h, 1), d) for h in per_user]
    fut = [torch.randn(f, d) for f in future]
    ctx = RewardContext(
        user_index=torch.randint(0, n_users, (n,)), group_index=torch.randint(0, groups, (n,)),
        history_embeds=hist, future_embeds=fut, catalogue_embeds=torch.randn(c, d), image_embeds=torch.randn(n, d),
    )
    return ctx, _imgs(n)


def test_embedding_rewards_match_brute_force_loops():
    ctx, imgs = _random_ctx()
    e = F.normalize(ctx.image_embeds, dim=-1)
    cos = lambda a, b: float(F.normalize(a, dim=0) @ F.normalize(b, dim=0))
    for agg in ("mean", "max"):
        pref = PreferenceReward(agg)(imgs, ctx)
        fut = FutureInterestReward(agg)(imgs, ctx)
        for i, u in enumerate(ctx.user_index.tolist()):
            hs = [cos(e[i], h) for h in ctx.history_embeds[u]]
            fs = [cos(e[i], f) for f in ctx.future_embeds[u]]
            red = (lambda xs: sum(xs) / len(xs)) if agg == "mean" else max
            assert float(pref[i]) == pytest.approx(red(hs), abs=1e-5)
            assert float(fut[i]) == pytest.approx(red(fs) if fs else 0.0, abs=1e-5)
    div = DiversityReward()(imgs, ctx)
    nov = NoveltyPenalty(0.3)(imgs, ctx)
    g = ctx.group_index.tolist()
    for i in range(len(g)):
        others = [j for j in range(len(g)) if g[j] == g[i] and j != i]
        want = 1 - sum(cos(e[i], e[j]) for j in others) / len(others) if others else 0.0
        assert float(div[i]) == pytest.approx(want, abs=1e-5)
        u = int(ctx.user_index[i])
        best = max([cos(e[i], h) for h in ctx.history_embeds[u]] + [cos(e[i], c) for c in ctx.catalogue_embeds])
        assert float(nov[i]) == pytest.approx(-max(0.0, best - 0.3) / 0.7, abs=1e-5)


def test_preference_rejects_empty_history():
    ctx = _hand_ctx(history_embeds=[torch.stack([E[0], E[1]]), torch.zeros(0, 3)])
    with pytest.raises(ValueError, match=r"users \[1\] have an empty history"):
        PreferenceReward()(_imgs(3), ctx)


def test_attribute_match_with_fake_readout():
    imgs = _imgs(4)
    read = lambda x: (x[:, 0, :4, 0].long() % 3)  # noqa: E731 - a fake read-out: 4 "attributes" from pixels
    truth = read(imgs)
    target = truth.clone()
    target[1, 0] = (target[1, 0] + 1) % 3  # one wrong of 4
    target[2] = (target[2] + 1) % 3  # all wrong
    target[3, :2] = -1  # two unknown, two right
    ctx = RewardContext(user_index=torch.zeros(4, dtype=torch.long), group_index=torch.arange(4),
                        history_embeds=[E[:1]], target_attributes=target, read_attributes=read)
    torch.testing.assert_close(AttributeMatchReward()(imgs, ctx), torch.tensor([1.0, 0.75, 0.0, 1.0]))
    bad = RewardContext(user_index=torch.zeros(4, dtype=torch.long), group_index=torch.arange(4),
                        history_embeds=[E[:1]], target_attributes=target, read_attributes=lambda x: read(x)[:, :3])
    with pytest.raises(ValueError, match="read_attributes returned"):
        AttributeMatchReward()(imgs, bad)
    with pytest.raises(ValueError, match="required"):
        AttributeMatchReward()(imgs, _hand_ctx(image_embeds=None, user_index=torch.zeros(4, dtype=torch.long), group_index=torch.arange(4)))


class _CountingEmbedder(PixelStatsEmbedder):
    calls = 0

    def embed(self, images):
        type(self).calls += 1
        return super().embed(images)


def test_composite_weighted_sum_and_single_embedding_pass():
    emb = _CountingEmbedder(grid=2, bins=4)
    n = 6
    imgs = _imgs(n)
    read = lambda x: x[:, 0, :3, 1].long() % 2  # noqa: E731
    ctx = RewardContext(
        user_index=torch.tensor([0, 0, 1, 1, 2, 2]), group_index=torch.tensor([0, 0, 1, 1, 2, 2]),
        history_embeds=[emb.embed(_imgs(k)) for k in (2, 3, 1)], future_embeds=[emb.embed(_imgs(k)) for k in (1, 0, 2)],
        catalogue_embeds=emb.embed(_imgs(5)), target_attributes=torch.randint(0, 2, (n, 3)), read_attributes=read,
    )
    cfg = {
        "preference": {"weight": 1.0, "agg": "mean"},
        "future_interest": {"weight": 0.5, "agg": "max"},
        "novelty": {"weight": 0.25, "threshold": 0.8, "against": ["history", "catalogue"]},
        "diversity": {"weight": 0.1},
        "attribute_match": {"weight": 2},
    }
    comp = CompositeReward.from_config(cfg, emb)
    _CountingEmbedder.calls = 0
    total, parts = comp(imgs, ctx)
    assert _CountingEmbedder.calls == 1
    assert list(parts) == list(cfg) and all(v.shape == (n,) for v in parts.values())
    want = sum(cfg[k]["weight"] * parts[k] for k in cfg)
    torch.testing.assert_close(total, want)
    # each component equals the standalone reward computed with its own embedder
    torch.testing.assert_close(parts["preference"], PreferenceReward("mean", embedder=emb)(imgs, ctx))
    torch.testing.assert_close(parts["attribute_match"], AttributeMatchReward()(imgs, ctx))
    assert ctx.image_embeds is None  # the caller's context is not mutated
    stats = reward_stats({"total": total, **parts})
    assert stats["reward/diversity/mean"] == pytest.approx(float(parts["diversity"].mean()), abs=1e-6)
    assert stats["reward/total/max"] == pytest.approx(float(total.max()), abs=1e-6)
    assert stats["reward/preference/std"] == pytest.approx(float(parts["preference"].std(unbiased=False)), abs=1e-6)
    assert len(stats) == 4 * 6


def test_composite_config_errors():
    emb = PixelStatsEmbedder(grid=2, bins=2)
    with pytest.raises(ValueError, match="unknown component 'prefrence'"):
        CompositeReward.from_config({"prefrence": {"weight": 1.0}}, emb)
    for w in (float("nan"), float("inf"), "1.0", True, None):
        with pytest.raises(ValueError, match="weight must be a finite number"):
            CompositeReward.from_config({"preference": {"weight": w}}, emb)
    with pytest.raises(ValueError, match="missing 'weight'"):
        CompositeReward.from_config({"diversity": {}}, emb)
    with pytest.raises(ValueError, match="bad option"):
        CompositeReward.from_config({"diversity": {"weight": 1.0, "agg": "max"}}, emb)
    with pytest.raises(ValueError, match="agg must be"):
        CompositeReward.from_config({"preference": {"weight": 1.0, "agg": "median"}}, emb)
    with pytest.raises(ValueError, match="non-empty"):
        CompositeReward.from_config({}, emb)


class _NaNReward(Reward):
    def __call__(self, images, ctx):
        out = torch.zeros(ctx.num_images)
        out[1] = float("nan")
        return out


def test_composite_rejects_nan_component_and_count_mismatch():
    ctx = _hand_ctx()
    comp = CompositeReward({"preference": (1.0, PreferenceReward()), "broken": (0.5, _NaNReward())})
    with pytest.raises(ValueError, match=r"'broken' produced non-finite values at images \[1\]"):
        comp(_imgs(3), ctx)
    with pytest.raises(ValueError, match="got 2 images but ctx describes 3"):
        comp(_imgs(2), ctx)


def test_context_validation():
    with pytest.raises(ValueError, match=r"user_index values must be in \[0, 2\)"):
        _hand_ctx(user_index=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="group_index has 2 entries"):
        _hand_ctx(group_index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="user_index: expected an integer"):
        _hand_ctx(user_index=torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="future_embeds has 1 users"):
        _hand_ctx(future_embeds=[E[:1]])
    with pytest.raises(ValueError, match=r"history_embeds\[1\]"):
        _hand_ctx(history_embeds=[E[:1], torch.zeros(3)])
    with pytest.raises(ValueError, match="target_attributes"):
        _hand_ctx(target_attributes=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="width mismatch"):
        PreferenceReward()(_imgs(3), _hand_ctx(image_embeds=torch.randn(3, 5)))


def test_future_interest_when_no_user_has_future_items():
    """Valid/test prompts have no train-split future: the reward is 0, never a shape error."""
    from pgen_engine.rewards import FutureInterestReward, PixelStatsEmbedder, RewardContext

    emb = PixelStatsEmbedder()
    imgs = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    ctx = RewardContext(user_index=torch.tensor([0, 0, 1, 1]), group_index=torch.tensor([0, 0, 1, 1]),
                        history_embeds=[emb.embed(imgs[:1]), emb.embed(imgs[1:2])],
                        future_embeds=[torch.zeros(0, emb.dim), torch.zeros(0, emb.dim)])
    out = FutureInterestReward(embedder=emb)(imgs, ctx)
    assert torch.equal(out, torch.zeros(4))
