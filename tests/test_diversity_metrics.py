import math

import torch

from raysweep.evaluation.diversity import (
    discrimination_score,
    gradient_angles,
    output_ambiguity,
)


def one_hot_logits(preds, c=3):
    return torch.nn.functional.one_hot(torch.tensor(preds), c).float() * 5


def test_output_ambiguity_by_hand():
    y = torch.tensor([0, 1, 2, 0])
    # K=3 members' predictions per sample -> correct counts l = 3, 2, 1, 0
    stacked = one_hot_logits([[0, 1, 2, 1], [0, 1, 0, 2], [0, 0, 1, 1]])
    amb = output_ambiguity(stacked, y)  # min(l, 3 - l) / (3 - 2)
    assert amb.tolist() == [0.0, 1.0, 1.0, 0.0]
    agree = one_hot_logits([[0, 2, 1, 0]] * 4)
    assert output_ambiguity(agree, y).sum() == 0  # all members agree: E = 0
    k4 = one_hot_logits([[0, 1, 2, 0], [0, 1, 2, 1], [1, 1, 2, 1], [1, 0, 0, 1]])  # l = 2, 3, 3, 1
    assert output_ambiguity(k4, y).tolist() == [2 / 2, 1 / 2, 1 / 2, 1 / 2]


def test_discrimination_score_by_hand():
    f = torch.tensor([[[1.0, 3.0, 0.0, -1.0]], [[2.0, 2.0, 2.0, 0.0]], [[0.0, 0.0, 4.0, 0.0]]])  # K=3, B=1
    # activated values: m0 {1,3}: mu 2 var 1; m1 {2,2,2}: mu 2 var 0; m2 {4}: mu 4 var 0
    expected = (2 - 2) ** 2 / (1 + 0) + (2 - 4) ** 2 / (1 + 0) + (2 - 4) ** 2 / 1e-12
    assert math.isclose(discrimination_score(f).item(), expected, rel_tol=1e-5)
    same = torch.rand(1, 5, 8).expand(3, 5, 8)
    assert torch.allclose(discrimination_score(same), torch.zeros(5))


def test_gradient_angles_by_hand():
    w = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # member k: logits [w_k . x, 0]

    def fn(xs):
        return torch.stack([torch.cat([(xs[k] * w[k]).sum(-1, keepdim=True), torch.zeros(len(xs[k]), 1)], 1)
                            for k in range(2)])

    angles = gradient_angles(fn, torch.randn(4, 2), torch.zeros(4, dtype=torch.long), 2)
    assert torch.allclose(angles, torch.full((1, 4), 90.0))  # orthogonal input gradients
