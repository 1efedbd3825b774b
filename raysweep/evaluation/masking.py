"""eval.masking_checks: signs that an evaluation overestimates robustness (gradient masking), run
after every other evaluation and raised as flags in the report, metrics.json, the MLflow run's tags
and the CLI summary. A flagged number is not to be trusted until a stronger attack explains it.

  vanishing_gradients           the input gradient of the ensemble's loss is (near) zero on more than
                                `max_share` of the checked images: gradient attacks see nothing
  above_chance_at_large_eps     PGD at `large_eps` (l_inf; at 0.5 every image can be painted grey)
                                leaves accuracy above chance beyond noise
  rises_with_eps:<attack>       an attack's accuracy rises with eps beyond noise
  not_converged:<attack>/<eps>  step doubling stopped at max_steps with accuracy still falling
  transfer_beats_whitebox:<n>/<eps>  a black-box transfer attack beat every white-box attack at the
                                same norm and eps beyond noise

"Beyond noise": more than two binomial standard errors (sqrt(p (1 - p) / n), at the larger p).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from pydantic import Field

from raysweep.attacks.pgd import AttackConfig, robust_accuracy
from raysweep.core.objectives import ce_prob
from raysweep.core.sections import Section
from raysweep.evaluation.base import Evaluation, register
from raysweep.evaluation.report import eps_key


class MaskingConfig(Section):
    samples: int = Field(200, ge=1, description="first test images for the gradient and large-eps checks")
    vanishing: float = Field(1e-8, ge=0, description="an input gradient with a smaller l2 norm counts as vanished")
    max_share: float = Field(0.1, ge=0, le=1, description="share of vanished gradients that raises the flag")
    large_eps: float = Field(0.5, gt=0, le=1, description="l_inf eps at which no classifier beats chance")
    steps: int = Field(20, ge=1, description="PGD steps of the large-eps check")


def beyond_noise(low: float, high: float, n: int) -> bool:
    """high exceeds low by more than two binomial standard errors of n images."""
    p = max(low, high)
    return high - low > 2 * math.sqrt(max(p * (1 - p), 1 / n) / n)


def curve_flags(details: dict, images: int) -> dict[str, str]:
    """Flags from the attack curves and step-doubling histories already in the report's details."""
    flags = {}
    for name, curve in details.get("robust_acc", {}).items():
        points = sorted((float(e), a) for e, a in curve.items())
        for (e0, a0), (e1, a1) in zip(points, points[1:]):
            if beyond_noise(a0, a1, images):
                flags[f"rises_with_eps:{name}"] = f"accuracy {a0:.4f} at eps {e0:g} but {a1:.4f} at eps {e1:g}"
    for name, attack in details.get("attacks", {}).items():
        for eps, r in attack.get("per_eps", {}).items():
            if r.get("converged") is False:
                steps, acc = r["history"][-1]
                flags[f"not_converged:{name}/{eps}"] = f"accuracy still falling at {steps} steps ({acc:.4f})"
    return flags


def transfer_flags(results: dict) -> dict[str, str]:
    """A transfer accuracy below every white-box robust accuracy at the same norm and eps."""
    flags = {}
    for t in (r for r in results.values() if r.name.startswith("transfer_acc/")):
        white = [r for r in results.values() if r.name.startswith("robust_acc/") and (r.norm, r.eps) == (t.norm, t.eps)]
        if white:
            best = min(white, key=lambda r: r.value)
            if beyond_noise(t.value, best.value, min(t.images, best.images)):
                flags[f"transfer_beats_whitebox:{t.attack.split(':', 1)[-1]}/{eps_key(t.eps)}"] = (
                    f"transfer {t.value:.4f} < white-box {best.name} {best.value:.4f}")
    return flags


@register
class MaskingChecks(Evaluation):
    key, Config = "masking_checks", Optional[MaskingConfig]

    def run(self, ctx, report) -> None:
        c = self.cfg
        split = ctx.data.test.head(c.samples)
        x, y = split.batch(torch.arange(len(split)), ctx.device)
        x = x.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(ce_prob(ctx.stacked_fn(x), y, ctx.weights).sum(), x)
        vanished = (grad.flatten(1).norm(dim=1) < c.vanishing).float().mean().item()
        flags = {}
        if vanished > c.max_share:
            flags["vanishing_gradients"] = (f"{vanished:.0%} of {len(y)} images have an input gradient below "
                                            f"{c.vanishing:g}")
        attack = AttackConfig(name="masking_large_eps", eps=[c.large_eps], steps=c.steps)
        acc = robust_accuracy(ctx.stacked_fn, split, attack, c.large_eps, ctx.weights, ctx.how, ctx.cfg.eval.batch_size,
                              ctx.device, ctx.cfg.seed)[0]
        chance = 1 / ctx.data.num_classes
        if beyond_noise(chance, acc, len(y)):
            flags["above_chance_at_large_eps"] = (f"PGD-{c.steps} at l_inf eps {c.large_eps:g}: {acc:.4f} > chance "
                                                  f"{chance:.4f}")
        flags |= curve_flags(report.details, len(ctx.data.test)) | transfer_flags(report.results)
        for name, why in flags.items():
            report.flag(name, why)
        report.details["masking_checks"] = {"vanished_gradient_share": vanished, "large_eps_acc": acc,
                                            "chance": chance, "samples": len(y), "flags": sorted(flags)}
