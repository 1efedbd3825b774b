"""Ensemble-adaptive attack objectives (they see the members) and the vote and median combines."""
import math

import pytest
import torch
import torch.nn.functional as F

from raysweep.attacks.pgd import AttackConfig, robust_accuracy
from raysweep.core.ensemble import COMBINES, combine
from raysweep.core.objectives import MORA_MEMBER_SHARE, OBJECTIVES
from raysweep.evaluation.robust import accuracies


def test_vote_and_median_combines_decide_as_by_hand():
    torch.manual_seed(0)
    stacked, w = torch.randn(5, 64, 4), torch.full((5,), 0.2)
    votes = F.one_hot(stacked.argmax(-1), 4).sum(0)  # [B,C]
    mean_p = stacked.softmax(-1).mean(0)
    by_hand = torch.tensor([max(range(4), key=lambda c: (votes[i, c].item(), mean_p[i, c].item())) for i in range(64)])
    assert torch.equal(combine(stacked, w, "vote").argmax(1), by_hand)
    median = stacked.softmax(-1).median(0).values
    assert torch.allclose(combine(stacked, w, "median").softmax(1), median / median.sum(1, keepdim=True), atol=1e-6)
    for how in set(COMBINES) - {"logit"}:  # log-probabilities (logit gives logits: softmax them)
        assert torch.allclose(combine(stacked, w, how).exp().sum(1), torch.ones(64), atol=1e-5)


def test_mora_weights_the_correct_members_nearest_their_boundary():
    # One sample of class 0; member 0 barely correct, member 1 surely correct, member 2 wrong.
    stacked = torch.tensor([[[1.0, 0.9, 0.0]], [[5.0, 0.0, 0.0]], [[0.0, 3.0, 0.0]]])
    y, w = torch.tensor([0]), torch.full((3,), 1 / 3)
    log_p = stacked.log_softmax(-1)[:, 0]
    margin = log_p[:, 0] - torch.stack([log_p[k, 1:].max() for k in range(3)])
    near = torch.sigmoid(margin) * torch.sigmoid(-margin) * torch.tensor([1.0, 1.0, 0.0])
    by_hand = -(near / near.sum() * log_p[:, 0]).sum()
    ce_prob = OBJECTIVES["ce_prob"](stacked, y, w)
    got = OBJECTIVES["mora"](stacked, y, w)
    assert torch.allclose(got, MORA_MEMBER_SHARE * by_hand + (1 - MORA_MEMBER_SHARE) * ce_prob, atol=1e-6)
    assert near[0] > near[1]  # the weight goes to the member about to flip


def test_minmax_is_a_soft_minimum_over_members():
    torch.manual_seed(1)
    stacked, y, w = torch.randn(3, 8, 5), torch.randint(0, 5, (8,)), torch.full((3,), 1 / 3)
    member_ce = torch.stack([F.cross_entropy(stacked[k], y, reduction="none") for k in range(3)])
    got = OBJECTIVES["minmax_ce"](stacked, y, w)
    assert torch.all(member_ce.min(0).values <= got + 1e-6)
    assert torch.all(got <= member_ce.min(0).values + math.log(3) + 1e-6)
    one = OBJECTIVES["minmax_ce"](stacked[:1], y, torch.ones(1))
    assert torch.allclose(one, member_ce[0], atol=1e-6)


@pytest.mark.parametrize("how", ["vote", "median"])
def test_adaptive_objectives_break_vote_and_median_ensembles(trained_synthetic, how):
    _, data, ens = trained_synthetic
    clean = accuracies(ens.stacked_logits, data.test, ens.weights, how, 100, "cpu")[0]
    assert clean > 0.85
    for objective in ("mora", "minmax_ce"):
        attack = AttackConfig(name=objective, eps=[0.2], steps=10, objectives=[objective])
        acc = robust_accuracy(ens.stacked_logits, data.test, attack, 0.2, ens.weights, how, 100, "cpu")[0]
        assert acc < clean - 0.2, (objective, acc, clean)
