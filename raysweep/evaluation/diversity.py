"""eval.diversity_samples: the diversity metrics of the PDD + DEG paper on the first test images, each
a function of stacked member outputs. Results diversity/<metric> (ensembles of K >= 2)."""
from __future__ import annotations

import math

import torch

from raysweep.evaluation.base import Evaluation, register
from raysweep.regularisers.deg import member_input_grads, pairwise_cosines


def output_ambiguity(stacked: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample min(l, K - l) / (K - ceil(K/2)), l = members classifying correctly; 0 when all agree."""
    k = stacked.shape[0]
    if k < 2:
        raise ValueError("output ambiguity needs K >= 2 members")
    correct = (stacked.argmax(-1) == y).sum(0)
    return torch.minimum(correct, k - correct).float() / (k - math.ceil(k / 2))


def discrimination_score(features: torch.Tensor) -> torch.Tensor:
    """Per-sample sum_{i<j} (mu_i - mu_j)^2 / (sigma_i^2 + sigma_j^2) over members' activated (> 0)
    last hidden values [K,B,D]; a member with no activated unit has mu = sigma^2 = 0."""
    on = (features > 0).to(features.dtype)
    n = on.sum(-1).clamp_min(1)
    mu = (features * on).sum(-1) / n
    var = (((features - mu.unsqueeze(-1)) ** 2) * on).sum(-1) / n
    i, j = torch.triu_indices(features.shape[0], features.shape[0], offset=1)
    return ((mu[i] - mu[j]) ** 2 / (var[i] + var[j]).clamp_min(1e-12)).sum(0)


def gradient_angles(stacked_fn_per_member, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Angles in degrees [P,B] between the K members' CE input gradients, for every pair P;
    stacked_fn_per_member maps [K,B,...] (member k on row k) to logits [K,B,C]."""
    xs = x.detach().expand(k, *x.shape).clone().requires_grad_(True)
    logits = stacked_fn_per_member(xs)
    g = member_input_grads(logits, xs, y.expand(k, -1), create_graph=False)
    return torch.rad2deg(torch.arccos(pairwise_cosines(g).clamp(-1, 1)))


def diversity_metrics(ex, split, samples: int, device) -> dict:
    x, y = split.batch(torch.arange(min(samples, len(split))), device)
    with torch.no_grad():
        feats = ex.stacked_logits(x, part="features")
        logits = ex.stacked_logits(feats, per_member=True, part="head")
    with torch.enable_grad():
        angles = gradient_angles(lambda xs: ex.stacked_logits(xs, per_member=True), x, y, ex.k)
    return {"output_ambiguity": output_ambiguity(logits, y).mean().item(),
            "discrimination_score": discrimination_score(feats).mean().item(),
            "mean_gradient_angle_deg": angles.mean().item(), "samples": x.shape[0]}


METRICS = ("output_ambiguity", "discrimination_score", "mean_gradient_angle_deg")


@register
class Diversity(Evaluation):
    key, Config, default = "diversity_samples", int, 500

    @classmethod
    def names(cls, samples, eval_cfg, k) -> list[str]:
        return [f"diversity/{m}" for m in METRICS] if k > 1 else []

    def run(self, ctx, report) -> None:
        if ctx.ensemble.k < 2:
            return
        out = diversity_metrics(ctx.executor, ctx.data.test, self.cfg, ctx.device)
        for m in METRICS:
            report.add(f"diversity/{m}", out[m], images=out["samples"])
        report.details["diversity"] = out
