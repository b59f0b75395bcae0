"""GRPO/PPO pure functions vs hand-computed values."""
import math

import pytest
import torch

from pgen_engine.training import grpo


def test_clipped_loss_hand_computed():
    old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, ratio, clipped = grpo.clipped_policy_loss(logp, old, adv, clip_eps=0.2)
    assert torch.allclose(ratio.flatten(), torch.tensor([1.5, 1.5, 0.5, 0.5]))
    # -min(r A, clip(r) A): 1.5*1 vs 1.2*1 -> -1.2 ; -1.5 vs -1.2 -> 1.5 ; 0.5 vs 0.8 -> -0.5 ; -0.5 vs -0.8 -> 0.8
    assert torch.allclose(loss.flatten(), torch.tensor([-1.2, 1.5, -0.5, 0.8]))
    assert clipped.flatten().tolist() == [True, False, False, True]
    # clip-higher: upper bound 1 + 0.28
    loss_h, _, _ = grpo.clipped_policy_loss(logp, old, adv, clip_eps=0.2, clip_eps_high=0.28)
    assert torch.allclose(loss_h.flatten(), torch.tensor([-1.28, 1.5, -0.5, 0.8]))


def test_clipped_gradient_zero_when_clipped():
    logp = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_()
    loss, _, _ = grpo.clipped_policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), clip_eps=0.2)
    loss.sum().backward()
    # token 0 is clipped (no gradient), token 1 is inside the trust region: d(-r)/dlogp = -r
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -1.1]]))


def test_k3_hand_computed():
    logp = torch.log(torch.tensor([0.5, 0.25, 0.3]))
    ref = torch.log(torch.tensor([0.25, 0.25, 0.6]))
    kl = grpo.k3_kl(logp, ref)
    expect = torch.tensor([0.5 - math.log(0.5) - 1, 0.0, 2.0 - math.log(2.0) - 1])
    assert torch.allclose(kl, expect, atol=1e-6)
    assert (grpo.k3_kl(torch.randn(50), torch.randn(50)) >= 0).all()


def test_k3_unbiased_for_kl():
    # E_{x~pi}[k3] = KL(pi || ref) on a small categorical
    g = torch.Generator().manual_seed(3)
    pi = torch.softmax(torch.randn(7, generator=g), 0)
    ref = torch.softmax(torch.randn(7, generator=g), 0)
    exact_kl = float((pi * (pi.log() - ref.log())).sum())
    via_k3 = float((pi * grpo.k3_kl(pi.log(), ref.log())).sum())
    assert abs(exact_kl - via_k3) < 1e-6


def test_aggregation_modes():
    x = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert float(grpo.aggregate(x, m, "token")) == pytest.approx((1 + 2 + 3 + 10) / 4)
    assert float(grpo.aggregate(x, m, "sequence")) == pytest.approx((2.0 + 10.0) / 2)
    with pytest.raises(ValueError, match="mode"):
        grpo.aggregate(x, m, "batch")


def test_policy_loss_combines_pg_and_kl():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    N, T = 6, 11
    logp = -torch.rand(N, T, generator=g) - 0.1
    old = logp + 0.05 * torch.randn(N, T, generator=g)
    ref = logp + 0.1 * torch.randn(N, T, generator=g)
    adv = torch.randn(N, generator=g)
    mask = torch.rand(N, T, generator=g) > 0.2
    for agg in ("token", "sequence"):
        loss, st = grpo.policy_loss(logp, old, adv, mask, ref_logp=ref, beta=0.3, aggregation=agg)
        pg, _, _ = grpo.clipped_policy_loss(logp, old, adv)
        expect = grpo.aggregate(pg, mask, agg) + 0.3 * grpo.aggregate(grpo.k3_kl(logp, ref), mask, agg)
        assert torch.allclose(loss, expect)
        assert float(st["kl"]) > 0
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.policy_loss(logp, old, adv, mask, beta=0.1)


def test_logprob_gap():
    a = torch.tensor([[0.0, -1.0], [-2.0, -3.0]])
    b = a + torch.tensor([[1e-3, 0.0], [0.0, -4e-3]])
    mx, mean = grpo.logprob_gap(a, b)
    assert mx == pytest.approx(4e-3, rel=1e-4) and mean == pytest.approx(5e-3 / 4, rel=1e-4)
    mx, _ = grpo.logprob_gap(a, b, torch.tensor([[True, True], [True, False]]))
    assert mx == pytest.approx(1e-3, rel=1e-4)


def test_guided_logprobs_match_manual_cfg_mix():
    g = torch.Generator().manual_seed(0)
    N, T, K = 3, 4, 7
    c, u = torch.randn(N, T, K, generator=g), torch.randn(N, T, K, generator=g)
    tok = torch.randint(0, K, (N, T), generator=g)
    s, temp = 2.5, 0.7
    lp = grpo.guided_logprobs(c, u, tok, s, temp)
    assert lp.shape == (N, T) and lp.dtype == torch.float32
    for n in range(N):
        for t in range(T):
            x = [(float(u[n, t, k]) + s * (float(c[n, t, k]) - float(u[n, t, k]))) / temp for k in range(K)]
            lse = math.log(sum(math.exp(v) for v in x))
            assert abs(float(lp[n, t]) - (x[int(tok[n, t])] - lse)) < 1e-5
    # scale 1 is the conditional distribution; scale 0 the unconditional one
    assert torch.allclose(grpo.guided_logprobs(c, u, tok, 1.0, temp),
                          torch.log_softmax(c / temp, -1).gather(-1, tok[..., None]).squeeze(-1), atol=1e-6)
    assert torch.allclose(grpo.guided_logprobs(c, u, tok, 0.0, temp),
                          torch.log_softmax(u / temp, -1).gather(-1, tok[..., None]).squeeze(-1), atol=1e-6)
    # the gradient reaches both branches: d lp / d c = s * (onehot - p) / T, d lp / d u = (1 - s) * (...)
    cg, ug = c.clone().requires_grad_(), u.clone().requires_grad_()
    grpo.guided_logprobs(cg, ug, tok, s, temp).sum().backward()
    p = torch.softmax((u + s * (c - u)) / temp, -1)
    d = (torch.nn.functional.one_hot(tok, K).float() - p) / temp
    assert torch.allclose(cg.grad, s * d, atol=1e-5) and torch.allclose(ug.grad, (1 - s) * d, atol=1e-5)
    with pytest.raises(ValueError, match="differ in shape"):
        grpo.guided_logprobs(c, u[:, :2], tok, s, temp)
    with pytest.raises(ValueError, match="tokens"):
        grpo.guided_logprobs(c, u, tok[:, :2], s, temp)
