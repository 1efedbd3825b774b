"""Combining members, and the Ensemble module users get from `raysweep.load`.

Every ensemble-level quantity is a function of the members' stacked logits [K, B, C]; these
functions do not care where the members ran (one process, vmapped, or one Ray worker each).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def uniform_weights(k: int) -> torch.Tensor:
    return torch.full((k,), 1.0 / k)


COMBINES = ("probability", "logit", "vote", "median")
# A hard vote's counts are piecewise constant: the weighted mean probability, scaled far below one
# vote, breaks ties and gives the score a gradient (the soft vote's) without changing any decision.
_VOTE_TIE_BREAK = 1e-3


def combine(stacked: torch.Tensor, weights: torch.Tensor, how: str = "probability") -> torch.Tensor:
    """Ensemble scores [B, C] from stacked logits [K, B, C]: argmax is the prediction and softmax the
    ensemble's probability vector (the scores are log-probabilities, but for `logit`).

    probability: log(sum_k c_k softmax(f_k)), computed as a logsumexp so it stays finite;
    logit: sum_k c_k f_k (softmax of it is the probability vector);
    vote: log of the weighted share of members voting for each class (a hard vote; ties, and shares
      closer than 1e-3, go to the higher mean probability), plus that tie-break term, which carries
      the soft vote's gradient;
    median: log of the per-class median of the members' probabilities, renormalised (weights unused:
      a median is what a few outlying members cannot move).
    """
    w = weights.to(stacked).view(-1, 1, 1)
    if how == "probability":
        return torch.logsumexp(F.log_softmax(stacked, dim=-1) + w.log(), dim=0)
    if how == "logit":
        return (w * stacked).sum(0)
    probs = stacked.softmax(-1)
    if how == "vote":
        votes = (w * F.one_hot(stacked.argmax(-1), stacked.shape[-1]).to(stacked)).sum(0)
        scores = votes + _VOTE_TIE_BREAK * (w * probs).sum(0)
    elif how == "median":
        scores = probs.median(0).values.clamp_min(1e-12)
    else:
        raise ValueError(f"unknown combine {how!r}: expected one of {', '.join(COMBINES)}")
    return (scores / scores.sum(-1, keepdim=True)).log()


class Ensemble(nn.Module):
    """K members and convex weights. forward(x) maps images in [0,1] to ensemble *scores* (see
    combine): log-probabilities of the weighted mean of member softmaxes (combine='probability', the
    default), the weighted mean of logits (combine='logit'), or a hard vote or median. Attack
    libraries that expect logits can use it as is: softmax(forward(x)) is the ensemble's
    probability vector.
    """

    def __init__(self, members: list[nn.Module], weights: torch.Tensor | None = None, combine: str = "probability"):
        super().__init__()
        self.members = nn.ModuleList(members)
        w = uniform_weights(len(members)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.register_buffer("weights", w)
        self.combine_how = combine

    @property
    def k(self) -> int:
        return len(self.members)

    def stacked_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine(self.stacked_logits(x), self.weights, self.combine_how)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).softmax(-1)
