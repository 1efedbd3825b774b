"""Named objectives an attacker maximises, each a per-sample loss [B] of stacked logits [K,B,C].

ce_prob         CE on the probability-averaged output, -log(sum_k c_k softmax(f_k))_y
ce_logit        CE on the logit-averaged output ("remove softmax")
cw_margin       max_{i != y} Z_i - Z_y on the ensemble's own scores Z (see ensemble.combine)
mean_member_ce  sum_k c_k CE(f_k, y): every member attacked through its own loss
mora            ensemble-adaptive: CE of a per-sample re-weighting of the members, the weight moved
                each iteration to the members that still classify the sample correctly, nearest
                their decision boundary first (after MORA, Yu et al. NeurIPS'22), mixed with ce_prob
member_dlr      ensemble-adaptive: sum_k c_k of each member's DLR loss on its own logits (Croce & Hein's
                difference of logits ratio, -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)): scale-free, so
                a member whose softmax saturates (gradient masking by large logits) still has a
                gradient, and each member is pushed over its own boundary, not only the likeliest one
minmax_ce       ensemble-adaptive: a soft minimum over members of their CE, i.e. the loss under the
                member weighting least favourable to the attacker, so the attack cannot stop at
                fooling the easy members (a min-max objective over members, as in TAMOO)

The last four see the members, not only the combined output: they are how a hard vote (whose
counts have no gradient) or a median is attacked, besides cw_margin on the combine's own scores.
"""
from __future__ import annotations

import torch
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
    return (weights.to(stacked).view(-1, 1) * _member_ce(stacked, y)).sum(0)


# mora mixes the re-weighted members' CE with the ensemble's own CE (MORA's default share, 0.9).
MORA_MEMBER_SHARE = 0.9
MINMAX_TEMPERATURE = 1.0  # of the soft minimum, in units of CE


def _member_ce(stacked, y):
    k, b, c = stacked.shape
    return F.cross_entropy(stacked.reshape(k * b, c), y.repeat(k), reduction="none").view(k, b)


def _margins(stacked, y):
    """Per member and sample: logit of the true class minus the largest other logit [K,B]."""
    true = stacked.gather(2, y.view(1, -1, 1).expand(stacked.shape[0], -1, 1)).squeeze(2)
    other = stacked.masked_fill(F.one_hot(y, stacked.shape[2]).bool(), float("-inf")).amax(2)
    return true - other


def mora(stacked, y, weights, how="probability"):
    log_p = F.log_softmax(stacked, dim=-1)
    with torch.no_grad():  # the weighting is chosen, not differentiated: it moves between iterations
        margin = _margins(log_p, y)
        near = torch.sigmoid(margin) * torch.sigmoid(-margin)  # sigma'(m): largest at the boundary
        w = weights.to(stacked).view(-1, 1) * near * (margin > 0)  # only members still correct
        w = torch.where(w.sum(0, keepdim=True) > 0, w, weights.to(stacked).view(-1, 1).expand_as(w))
        w = w / w.sum(0, keepdim=True)
    reweighted = -(w * log_p.gather(2, y.view(1, -1, 1).expand(stacked.shape[0], -1, 1)).squeeze(2)).sum(0)
    return MORA_MEMBER_SHARE * reweighted + (1 - MORA_MEMBER_SHARE) * ce_prob(stacked, y, weights)


def minmax_ce(stacked, y, weights, how="probability"):
    t = MINMAX_TEMPERATURE
    return -t * torch.logsumexp(-_member_ce(stacked, y) / t + weights.to(stacked).view(-1, 1).log(), dim=0)


def dlr(stacked, y):
    """Croce & Hein's DLR loss of each member [K,B]: -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)."""
    top = stacked.sort(dim=-1, descending=True).values
    return -_margins(stacked, y) / (top[..., 0] - top[..., 2]).clamp_min(1e-12)


def member_dlr(stacked, y, weights, how="probability"):
    w = weights.to(stacked).view(-1, 1)
    if stacked.shape[-1] < 3:  # DLR needs a third class; with two, the margin alone (CW's loss)
        return (w * -_margins(stacked, y)).sum(0)
    return (w * dlr(stacked, y)).sum(0)


OBJECTIVES = {"ce_prob": ce_prob, "ce_logit": ce_logit, "cw_margin": cw_margin, "mean_member_ce": mean_member_ce,
              "mora": mora, "minmax_ce": minmax_ce, "member_dlr": member_dlr}


def get_objective(name: str):
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown attack objective {name!r}; known: {sorted(OBJECTIVES)}") from None
