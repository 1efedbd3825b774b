"""Named objectives an attacker maximises, each a per-sample loss [B] of stacked logits [K,B,C].

ce_prob         CE on the probability-averaged output, -log(sum_k c_k softmax(f_k))_y
ce_logit        CE on the logit-averaged output ("remove softmax")
cw_margin       max_{i != y} Z_i - Z_y on the ensemble's own scores Z (see ensemble.combine)
mean_member_ce  sum_k c_k CE(f_k, y): every member attacked through its own loss
"""
from __future__ import annotations

import torch.nn.functional as F

from raysweep.core.ensemble import combine


def ce_prob(stacked, y, weights, how="probability"):
    return F.nll_loss(combine(stacked, weights, "probability"), y, reduction="none")


def ce_logit(stacked, y, weights, how="probability"):
    return F.cross_entropy(combine(stacked, weights, "logit"), y, reduction="none")


def cw_margin(stacked, y, weights, how="probability"):
    z = combine(stacked, weights, how)
    true = z.gather(1, y[:, None]).squeeze(1)
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def mean_member_ce(stacked, y, weights, how="probability"):
    k, b, c = stacked.shape
    ce = F.cross_entropy(stacked.reshape(k * b, c), y.repeat(k), reduction="none").view(k, b)
    return (weights.to(ce).view(-1, 1) * ce).sum(0)


OBJECTIVES = {"ce_prob": ce_prob, "ce_logit": ce_logit, "cw_margin": cw_margin, "mean_member_ce": mean_member_ce}


def get_objective(name: str):
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown attack objective {name!r}; known: {sorted(OBJECTIVES)}") from None
