import math

import torch
import torch.nn.functional as F

from raysweep.regularisers.adp import (
    adp_regulariser,
    ensemble_entropy,
    log_det_diversity,
)
from raysweep.regularisers.deg import deg_penalty, member_input_grads, pairwise_cosines
from raysweep.regularisers.pdd import PriorityDropout, keep_rates, pdd_statistics


def test_pdd_by_hand():
    acts = torch.tensor([[[0.0, 0.5, 1.5, 3.9]], [[0.0, 0.1, 2.5, 4.0]]])  # K=2, B=1, D=4
    stats = pdd_statistics(acts, m=4)  # [0,4] in unit intervals
    assert (stats.lo.item(), stats.hi.item()) == (0.0, 4.0)
    assert stats.counts.tolist() == [[[2, 1, 0, 1], [2, 0, 1, 1]]]  # one group: the whole batch
    # totals [4, 1, 1, 2] -> order 0, 3, 1, 2: member 0 gets interval 0, member 1 interval 3
    assert stats.priority.tolist() == [[0, 3]]
    rates = keep_rates(acts, stats, alpha=0.9, beta=0.1)
    expected = [[0.9, 0.9, 0.1 * (1 - 1 / 4), 0.1 * (1 - 1 / 4)],
                [0.1 * (1 - 2 / 4), 0.1 * (1 - 2 / 4), 0.1 * (1 - 1 / 4), 0.9]]
    assert torch.allclose(rates[:, 0], torch.tensor(expected))
    dropped = PriorityDropout(0.9, 0.1, 4)(acts, torch.full_like(acts, 0.08))  # keep iff rate > 0.08
    assert torch.equal(dropped, acts * torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 1]]]))
    assert torch.is_tensor(stats.priority) and stats.counts.device == acts.device  # stays on device


def test_pdd_priorities_all_different_and_period():
    torch.manual_seed(0)
    acts = torch.rand(5, 32, 16).pow(3)
    assert len(set(pdd_statistics(acts, m=20).priority[0].tolist())) == 5
    assert all(len(set(p.tolist())) == 5 for p in pdd_statistics(acts, m=20, per_sample=True).priority)
    pdd = PriorityDropout(0.9, 0.1, 8, period=2)
    a1, a2, a3 = torch.rand(3, 3, 4, 6).unbind(0)
    first = pdd.statistics(a1)  # first period: own statistics
    assert torch.equal(first.counts, pdd_statistics(a1, 8).counts)
    pdd.statistics(a2)  # closes the period a1+a2
    pooled = pdd_statistics(torch.cat([a1.flatten(1), a2.flatten(1)], 1), 8)
    assert torch.equal(pdd.statistics(a3).counts, pooled.counts)  # serves the next period


def test_pdd_per_sample_scope_is_the_batch_rule_on_each_image_alone():
    """scope: sample gives every image the rates the batch rule gives that image as a batch of one, so a
    large activation in one image moves no other image's intervals (it does with scope: batch)."""
    torch.manual_seed(0)
    acts = torch.rand(3, 6, 20).pow(2) * 5
    acts[1, 2, 7] = 400.0  # one outlier, in image 2 of member 1
    stats = pdd_statistics(acts, m=10, per_sample=True)
    assert stats.counts.shape == (6, 3, 10) and stats.priority.shape == (6, 3)
    rates = keep_rates(acts, stats, alpha=0.9, beta=0.1)
    for b in range(6):
        alone = acts[:, b:b + 1]
        assert torch.equal(rates[:, b:b + 1], keep_rates(alone, pdd_statistics(alone, m=10), 0.9, 0.1))
    batch_rates = keep_rates(acts, pdd_statistics(acts, m=10), 0.9, 0.1)
    assert not torch.equal(batch_rates[:, 0], rates[:, 0])  # the outlier stretched every image's range
    pdd = PriorityDropout(0.9, 0.1, 10, per_sample=True)
    u = torch.rand_like(acts)
    assert torch.equal(pdd(acts, u), acts * (u < rates))


def test_pdd_statistics_saved_without_the_group_dimension_still_load():
    """A checkpoint written before the statistics had a group dimension (period > 1 keeps them) resumes
    with the same rates."""
    a1, a2, a3 = torch.rand(3, 3, 4, 6).unbind(0)
    pdd = PriorityDropout(0.9, 0.1, 8, period=2)
    pdd.statistics(a1), pdd.statistics(a2)
    sd = pdd.state_dict()
    old = {**sd, "stats": {"lo": sd["stats"]["lo"].reshape(()), "hi": sd["stats"]["hi"].reshape(()),
                           "counts": sd["stats"]["counts"][0], "priority": sd["stats"]["priority"][0]}}
    resumed = PriorityDropout(0.9, 0.1, 8, period=2)
    resumed.load_state_dict(old, torch.device("cpu"))
    u = torch.rand_like(a3)
    assert torch.equal(resumed(a3, u), pdd(a3, u))


def test_deg_by_hand_and_identical_members():
    g = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [-1.0, -1.0]]])  # K=3,B=2,D=2
    c = 1 / math.sqrt(2)
    # pairs (0,1), (0,2), (1,2); sample 0: 0, c, c; sample 1: 1, -1, -1
    assert torch.allclose(pairwise_cosines(g), torch.tensor([[0.0, 1.0], [c, -1.0], [c, -1.0]]))
    assert torch.allclose(deg_penalty(g), torch.tensor(((0 + 2 * c) + (1 - 2)) / 2))
    same = torch.randn(1, 4, 10).expand(4, 4, 10)
    assert torch.allclose(deg_penalty(same), torch.tensor(6.0))  # K=4: 6 pairs


def test_deg_gradient_reaches_every_member():
    torch.manual_seed(0)
    members = [torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)) for _ in range(3)]
    x = torch.randn(5, 6).expand(3, 5, 6).clone().requires_grad_(True)
    y = torch.randint(0, 3, (3, 5))
    logits = torch.stack([m(x[k]) for k, m in enumerate(members)])
    g = member_input_grads(logits, x, y)
    for k, m in enumerate(members):  # g_k is member k's own CE gradient
        (ref,) = torch.autograd.grad(F.cross_entropy(m(x[k]), y[k], reduction="sum"), x, retain_graph=True)
        assert torch.allclose(g[k], ref[k].flatten(1), atol=1e-6)
    deg_penalty(g).backward()
    for m in members:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_adp_by_hand():
    # K=2, B=1, C=3, true class 0; probabilities from log-probabilities given as logits.
    p = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]])
    stacked, y = p.log().unsqueeze(1), torch.tensor([0])
    mean = p.mean(0)
    h = -(mean * mean.log()).sum()
    a = torch.tensor([0.3, 0.2]) / math.hypot(0.3, 0.2)
    b = torch.tensor([0.1, 0.3]) / math.hypot(0.1, 0.3)
    cos, o = (a @ b), 1e-6
    log_det = torch.log((1 + o) ** 2 - cos ** 2)
    assert torch.allclose(ensemble_entropy(stacked), h.view(1))
    assert torch.allclose(log_det_diversity(stacked, y, o), log_det.view(1), atol=1e-5)
    assert torch.allclose(adp_regulariser(stacked, y, 2.0, 0.5, o), -2.0 * h - 0.5 * log_det, atol=1e-5)


def test_adp_log_det_finite_for_collinear_members():
    stacked = torch.randn(1, 8, 10).expand(3, 8, 10).clone().requires_grad_(True)
    val = log_det_diversity(stacked, torch.randint(0, 10, (8,)))
    assert torch.isfinite(val).all() and (val < -20).all()  # ~ log of offset^2: very negative, finite
    val.sum().backward()
    assert torch.isfinite(stacked.grad).all()
