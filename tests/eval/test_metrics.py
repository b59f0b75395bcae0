"""Eval metrics: hand-computed small cases, invariances, pessimistic ties, empty futures, shape errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pgen_engine.eval.metrics import (
    attribute_accuracy,
    cosine_matrix,
    future_alignment,
    generated_item_scores,
    generation_rank_metrics,
    history_alignment,
    nanmean,
    novelty,
    rank_metrics,
    true_item_ranks,
    user_diversity,
)

E = torch.eye(4)
R2 = 1 / math.sqrt(2)

# 3 users, 5 items
SCORES = torch.tensor([
    [0.9, 0.1, 0.5, 0.5, 0.2],  # true 2: one item above, one tied -> rank 2
    [0.3, 0.3, 0.3, 0.3, 0.3],  # true 4: everything tied -> rank 4
    [0.1, 0.8, 0.2, 0.7, 0.6],  # true 1: best -> rank 0
])
TRUE = torch.tensor([2, 4, 1])


def test_true_item_ranks_hand_values_and_exclusion():
    assert true_item_ranks(SCORES, TRUE).tolist() == [2, 4, 0]
    assert true_item_ranks(SCORES, TRUE, exclude=[[0], [], [3]]).tolist() == [1, 4, 0]
    assert true_item_ranks(SCORES, TRUE, exclude=[[3, 0], [0, 1, 2, 3], []]).tolist() == [0, 0, 0]


def test_rank_metrics_hand_values():
    m = rank_metrics(SCORES, TRUE, ks=(1, 2, 3, 5))
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["hr@2"] == pytest.approx(1 / 3)
    assert m["hr@3"] == pytest.approx(2 / 3)
    assert m["hr@5"] == pytest.approx(1.0)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(4) + 1) / 3)
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(6) + 1) / 3)
    assert m["mrr"] == pytest.approx((1 / 3 + 1 / 5 + 1) / 3)
    ex = rank_metrics(SCORES, TRUE, ks=(1, 2), exclude=[[0], [], [3]])
    assert ex["hr@2"] == pytest.approx(2 / 3) and ex["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1) / 3)
    assert set(rank_metrics(SCORES, TRUE)) == {f"{m}@{k}" for m in ("hr", "ndcg") for k in (1, 5, 10, 20)} | {"mrr"}


def test_rank_metrics_invariant_to_catalogue_permutation():
    u, c = 7, 23
    scores = torch.randn(u, c).round(decimals=1)  # rounding creates ties on purpose
    true = torch.randint(0, c, (u,))
    exclude = [[i for i in torch.randperm(c)[:3].tolist() if i != int(true[k])] for k in range(u)]
    perm = torch.randperm(c)  # new position p holds old item perm[p]
    inv = torch.argsort(perm)
    m1 = rank_metrics(scores, true, exclude=exclude)
    m2 = rank_metrics(scores[:, perm], inv[true], exclude=[[int(inv[i]) for i in ex] for ex in exclude])
    assert m1 == pytest.approx(m2)


def test_constant_scorer_is_pessimistic_and_ranks_bounded():
    u, c = 5, 9
    m = rank_metrics(torch.zeros(u, c), torch.randint(0, c, (u,)), ks=(1, 8, 9))
    assert m["hr@1"] == 0.0 and m["hr@8"] == 0.0 and m["hr@9"] == 1.0
    r = true_item_ranks(torch.randn(u, c), torch.randint(0, c, (u,)))
    assert bool(((r >= 0) & (r < c)).all())


def test_rank_metrics_errors():
    with pytest.raises(ValueError, match="true_items has 2 users but scores has 3"):
        rank_metrics(SCORES, TRUE[:2])
    with pytest.raises(ValueError, match=r"true_items must be in \[0, 5\)"):
        rank_metrics(SCORES, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="scores contain NaN"):
        rank_metrics(SCORES.clone().fill_(float("nan")), TRUE)
    with pytest.raises(ValueError, match=r"exclude\[1\] contains the user's true item 4"):
        rank_metrics(SCORES, TRUE, exclude=[[], [4], []])
    with pytest.raises(ValueError, match="exclude has 2 users"):
        rank_metrics(SCORES, TRUE, exclude=[[], []])
    with pytest.raises(ValueError, match="ks must be positive"):
        rank_metrics(SCORES, TRUE, ks=(0, 5))
    with pytest.raises(ValueError, match=r"scores: expected a float tensor \[U, C\]"):
        rank_metrics(SCORES[0], TRUE)


def test_generated_item_scores_hand_and_brute_force():
    gen = torch.stack([E[0], E[1], F.normalize(E[0] + E[2], dim=0)])
    users = torch.tensor([0, 0, 1])
    cat = torch.stack([E[0], E[1], E[2], E[3]])
    mx = generated_item_scores(gen, users, cat, num_users=2, agg="max")
    torch.testing.assert_close(mx, torch.tensor([[1.0, 1.0, 0.0, 0.0], [R2, 0.0, R2, 0.0]]))
    mean = generated_item_scores(gen, users, cat, num_users=2, agg="mean")
    torch.testing.assert_close(mean, torch.tensor([[0.5, 0.5, 0.0, 0.0], [R2, 0.0, R2, 0.0]]))
    # random ragged case against a loop
    n, u, c, d = 13, 4, 11, 6
    gen, cat = torch.randn(n, d), torch.randn(c, d)
    users = torch.cat([torch.arange(u), torch.randint(0, u, (n - u,))])
    got = generated_item_scores(gen, users, cat, u, agg="max")
    sims = cosine_matrix(gen, cat)
    for k in range(u):
        torch.testing.assert_close(got[k], sims[users == k].amax(0))
    true = torch.randint(0, c, (u,))
    assert generation_rank_metrics(gen, users, cat, true, ks=(1, 3)) == pytest.approx(rank_metrics(got, true, ks=(1, 3)))
    with pytest.raises(ValueError, match=r"users \[2\] have no generated images"):
        generated_item_scores(gen[:2], torch.tensor([0, 1]), cat, num_users=3)


def test_history_and_future_alignment_hand_values():
    gen = torch.stack([F.normalize(E[0] + E[1], dim=0), E[3], E[2]])
    users = torch.tensor([0, 1, 0])
    hist = [torch.stack([E[0], E[1], E[2]]), torch.stack([E[3], -E[3]])]
    h = history_alignment(gen, users, hist, k=2)
    torch.testing.assert_close(h["max"], torch.tensor([R2, 1.0, 1.0]))
    torch.testing.assert_close(h["top2_mean"], torch.tensor([R2, 0.0, 0.5]))
    h5 = history_alignment(gen, users, hist)  # k=5 > h_u: mean over all history items
    torch.testing.assert_close(h5["top5_mean"], torch.tensor([2 * R2 / 3, 0.0, 1 / 3]))
    fut = future_alignment(gen, users, [torch.stack([E[0], E[2]]), torch.zeros(0, 4)])
    torch.testing.assert_close(fut["max"][[0, 2]], torch.tensor([R2, 1.0]))
    torch.testing.assert_close(fut["mean"][[0, 2]], torch.tensor([R2 / 2, 0.5]))
    assert math.isnan(float(fut["max"][1])) and math.isnan(float(fut["mean"][1]))
    assert nanmean(fut["max"]) == pytest.approx((R2 + 1.0) / 2)


def test_alignment_shape_errors():
    gen = torch.randn(3, 4)
    with pytest.raises(ValueError, match="gen_user has 2 entries but there are 3"):
        history_alignment(gen, torch.tensor([0, 1]), [torch.randn(2, 4)] * 2)
    with pytest.raises(ValueError, match=r"gen_user values must be in \[0, 2\)"):
        history_alignment(gen, torch.tensor([0, 1, 2]), [torch.randn(2, 4)] * 2)
    with pytest.raises(ValueError, match=r"history_embeds\[1\] has D=5"):
        history_alignment(gen, torch.tensor([0, 1, 0]), [torch.randn(2, 4), torch.randn(2, 5)])
    with pytest.raises(ValueError, match="widths differ"):
        novelty(gen, torch.randn(6, 5))
    with pytest.raises(ValueError, match=r"gen_embeds: expected a float tensor \[n, D\]"):
        user_diversity(torch.randn(3), torch.tensor([0, 0, 0]), 1)


def test_user_diversity_and_novelty_hand_values():
    gen = torch.stack([E[0], E[1], E[0], E[2], F.normalize(E[0] + E[1], dim=0)])
    users = torch.tensor([0, 0, 0, 1, 2])
    div = user_diversity(gen, users, num_users=4)
    assert float(div[0]) == pytest.approx(2 / 3)  # pairs: (0,1)=0, (0,0)=1, (1,0)=0
    assert all(math.isnan(float(x)) for x in div[1:])  # one image / none
    div2 = user_diversity(gen, torch.tensor([0, 1, 1, 1, 0]), num_users=2)
    torch.testing.assert_close(div2, torch.tensor([1 - R2, 1.0]))  # user 1: e1, e0, e2 all orthogonal
    nov = novelty(gen, torch.stack([E[0], E[3]]))
    torch.testing.assert_close(nov, torch.tensor([0.0, 1.0, 0.0, 1.0, 1 - R2]))


def test_attribute_accuracy_hand_values():
    pred = torch.tensor([[0, 1, 2], [1, 1, 0], [2, 0, 0], [0, 0, 1]])
    cur = torch.tensor([[0, 1, 2], [1, 0, 0], [0, 0, 1], [0, -1, -1]])
    acc = attribute_accuracy(pred, cur, names=["shape", "color", "bg"])
    assert acc["shape"] == pytest.approx(3 / 4)
    assert acc["color"] == pytest.approx(2 / 3)  # the -1 is skipped
    assert acc["bg"] == pytest.approx(2 / 3)
    assert acc["mean"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    assert acc["all"] == pytest.approx(2 / 4)  # rows 0 and 3 (only its known attribute counts)
    fut = torch.full_like(cur, -1)
    fut[0, 0] = 1
    acc_f = attribute_accuracy(pred, fut)
    assert acc_f["attr0"] == 0.0 and math.isnan(acc_f["attr1"]) and acc_f["mean"] == 0.0
    with pytest.raises(ValueError, match="differ"):
        attribute_accuracy(pred, cur[:, :2])
    with pytest.raises(ValueError, match="2 names for 3"):
        attribute_accuracy(pred, cur, names=["a", "b"])
    with pytest.raises(ValueError, match="integer tensor"):
        attribute_accuracy(pred.float(), cur)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 24])
def test_blockwise_metrics_equal_the_whole_matrix(monkeypatch, chunk):
    """user_id_ranks / generated_item_scores work in blocks of CHUNK_ELEMENTS; any block size gives the same."""
    from pgen_engine.eval import metrics as M

    g = torch.Generator().manual_seed(0)
    U, n, C, D = 5, 3, 11, 6
    e = torch.randn(U * n, D, generator=g)
    e[4] = e[1]  # a tie between two users' scores
    gu = torch.arange(U).repeat_interleave(n)[torch.randperm(U * n, generator=g)]
    hist = [torch.randn(2 + u % 3, D, generator=g) for u in range(U)]
    cat = torch.randn(C, D, generator=g)
    monkeypatch.setattr(M, "CHUNK_ELEMENTS", chunk)
    ranks = M.user_id_ranks(e, gu, hist)
    # the definition, on the whole [N, U] matrix
    en = torch.nn.functional.normalize(e, dim=-1)
    H = torch.stack([torch.nn.functional.normalize(h, dim=-1).mean(0) for h in hist])
    s = en @ H.T
    true = s.gather(1, gu.view(-1, 1))
    ref = ((s > true) | ((s == true) & (torch.arange(U) != gu.view(-1, 1)))).sum(1) + 1
    assert torch.equal(ranks, ref)
    sims = en @ torch.nn.functional.normalize(cat, dim=-1).T
    for agg in ("max", "mean"):
        got = M.generated_item_scores(e, gu, cat, U, agg=agg)
        want = torch.stack([getattr(sims[gu == u], "amax" if agg == "max" else "mean")(0) for u in range(U)])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    fut = M.row_cosines(e, cat[gu % C])
    torch.testing.assert_close(fut, (en * torch.nn.functional.normalize(cat[gu % C], dim=-1)).sum(1))
    with pytest.raises(ValueError, match="shapes differ"):
        M.row_cosines(e, cat)
