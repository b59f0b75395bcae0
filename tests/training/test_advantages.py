"""RL advantages: GRPO group normalisation and PPO whitening vs hand-computed values.

The 2-rank whitening (one all-reduce through distributed.py) is checked in test_distributed.py.
"""
import math

import pytest
import torch

from pgen_engine.training import advantages as A


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 4.0, 4.0])
    a = A.group_advantages(r, 2, eps=0.0)
    # groups (1,2) (3,5) (4,4): means 1.5, 4, 4; population stds 0.5, 1, 0 -> 0/0 guarded by eps only
    assert torch.allclose(a[:4], torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    a = A.group_advantages(r, 2, eps=1e-6)
    assert torch.equal(a[4:], torch.zeros(2))  # all-equal group: exactly zero advantage
    assert torch.allclose(a[:4], torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5)
    # G = 3: (1,2,3) mean 2 std sqrt(2/3)
    a3 = A.group_advantages(r, 3, eps=0.0)
    s = math.sqrt(2 / 3)
    assert torch.allclose(a3[:3], torch.tensor([-1 / s, 0.0, 1 / s]))
    # mean-centred variant
    assert torch.allclose(A.group_advantages(r, 2, scale_by_std=False), torch.tensor([-.5, .5, -1., 1., 0., 0.]))


def test_group_advantages_random_properties():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    G = 5
    r = torch.randn(7 * G, generator=g)
    a = A.group_advantages(r, G).reshape(7, G)
    assert torch.allclose(a.mean(1), torch.zeros(7), atol=1e-5)
    assert torch.allclose(a.std(1, unbiased=False), torch.ones(7), atol=1e-4)
    b = A.batch_advantages(r)
    assert abs(float(b.mean())) < 1e-5 and abs(float(b.std(unbiased=False)) - 1) < 1e-4


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="whole number of groups"):
        A.group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="float tensor"):
        A.group_advantages(torch.zeros(4, dtype=torch.long), 2)


def test_compute_advantages_dispatch_and_one_rank_whitening():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert torch.equal(A.compute_advantages(r, "ppo", 2), A.batch_advantages(r))
    assert torch.equal(A.global_batch_advantages(r), A.batch_advantages(r))  # no process group: one rank
    assert torch.equal(A.compute_advantages(r, "grpo", 2, scale_by_std=False), torch.tensor([-.5, .5, -1.5, 1.5]))
    with pytest.raises(ValueError, match="algorithm must be"):
        A.compute_advantages(r, "reinforce", 2)


def test_global_batch_advantages_keeps_every_tensor_on_the_rewards_device(monkeypatch):
    """With several ranks the sums are stacked on the rewards' device (CUDA on a GPU run): a CPU
    count beside CUDA sums made torch.stack raise. A meta tensor stands in for the CUDA one."""
    monkeypatch.setattr(A, "world_size", lambda: 2)
    seen = []

    def fake_all_reduce(t, op="sum"):
        seen.append(t.device)
        return t * 2

    monkeypatch.setattr(A, "all_reduce", fake_all_reduce)
    out = A.global_batch_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0], device="meta"))
    assert out.device.type == "meta" and seen == [torch.device("meta")]
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])  # doubled sums and count: the same mean and std as one rank
    assert torch.allclose(A.global_batch_advantages(r), A.batch_advantages(r), atol=1e-6)


@pytest.mark.parametrize("G", [3, 5, 7, 8])
def test_equal_rewards_give_exactly_zero_advantages(G):
    # A float32 mean of G equal rewards can miss them by an ulp; (r - mean) / (0 + eps) then blew
    # that up: reward 100.7 in a group of 3 gave advantages 0.88 (PPO whitening: -0.88), pushing
    # every sample of a zero-information group the same way.
    v = torch.tensor([100.7, 0.1, -3.3, 12345.678])
    r = v.repeat_interleave(G)
    assert torch.equal(A.group_advantages(r, G), torch.zeros_like(r))
    assert torch.equal(A.group_advantages(r, G, scale_by_std=False), torch.zeros_like(r))
    for x in v:
        same = torch.full((G,), float(x))
        assert torch.equal(A.batch_advantages(same), torch.zeros(G))
        assert torch.equal(A.global_batch_advantages(same), torch.zeros(G))
    assert A.group_advantages(r, G).dtype == torch.float32 and A.batch_advantages(r).dtype == torch.float32
