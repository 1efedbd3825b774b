import pytest
import torch

from raysweep.core.ensemble import Ensemble, combine
from raysweep.evaluation.metrics import auc, weighted_accuracy


def test_weighted_accuracy_by_hand():
    uap = {0.10: 0.70, 0.15: 0.60, 0.20: 0.50, 0.25: 0.40}  # mean 0.55
    assert weighted_accuracy(0.90, uap) == pytest.approx(0.5 * 0.90 + 0.5 * 0.55)
    assert weighted_accuracy(0.90, uap, w=0.8) == pytest.approx(0.8 * 0.90 + 0.2 * 0.55)


def test_auc_trapezoid_by_hand():
    curve = {0.0: 1.0, 0.05: 0.8, 0.1: 0.4, 0.2: 0.1}
    # (0.05 * (1.0 + 0.8) / 2 + 0.05 * (0.8 + 0.4) / 2) / 0.1 = 0.75; points past eps_target are ignored.
    assert auc(curve, 0.1) == pytest.approx(0.75)
    assert auc({0.05: 0.8, 0.1: 0.4}, 0.1, clean=1.0) == pytest.approx(0.75)
    assert auc({0.0: 0.9, 0.1: 0.9}, 0.1) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="eps_target"):
        auc({0.0: 1.0, 0.05: 0.5}, 0.1)


def test_combine_by_hand():
    stacked = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])  # K=2, B=1, C=2
    w = torch.tensor([0.25, 0.75])
    p = 0.25 * stacked[0].softmax(-1) + 0.75 * stacked[1].softmax(-1)
    assert torch.allclose(combine(stacked, w, "probability"), p.log())
    assert torch.allclose(combine(stacked, w, "logit"), torch.tensor([[0.5, 0.75]]))
    ens = Ensemble([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)], w)
    x = torch.randn(3, 2)
    assert torch.allclose(ens.predict_proba(x).sum(-1), torch.ones(3))
