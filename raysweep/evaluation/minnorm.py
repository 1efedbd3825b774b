"""eval.min_norm: the minimum-norm attack (attacks/minnorm.py, FMN) once, and from its per-image
smallest perturbations the accuracy at every eps: results minnorm_acc/<norm>/<eps> on the grid,
and minnorm_auc = (1/eps_target) * integral_0^eps_target A(eps) d eps computed exactly from the
per-image norms (mean of min(norm_i, eps_target) / eps_target), with no grid. The details hold the
curve at 50 eps and the passes spent."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from tqdm.auto import tqdm

from raysweep.attacks.minnorm import accuracy_at, fmn
from raysweep.core.sections import EpsGrid, Section
from raysweep.evaluation.base import Evaluation, register
from raysweep.evaluation.report import eps_key


class MinNormConfig(Section):
    norm: Literal["linf", "l2"] = "linf"
    eps: EpsGrid = Field(..., description="where minnorm_acc results are named (the curve covers every eps)")
    eps_target: Optional[float] = Field(None, gt=0, description="minnorm_auc up to this eps; null: none")
    steps: int = Field(100, ge=1)
    samples: Optional[int] = Field(1000, ge=1, description="first N test images; null = all")


def exact_auc(norms: torch.Tensor, eps_target: float) -> float:
    """(1/T) * integral_0^T share(norm_i > e) de = mean(min(norm_i, T)) / T."""
    return (norms.clamp(max=eps_target).mean() / eps_target).item()


@register
class MinNorm(Evaluation):
    key, Config = "min_norm", Optional[MinNormConfig]

    @classmethod
    def names(cls, c, eval_cfg, k) -> list[str]:
        return [f"minnorm_acc/{c.norm}/{eps_key(e)}" for e in c.eps] + (["minnorm_auc"] if c.eps_target else [])

    @classmethod
    def flagged(cls, c) -> set[tuple[str, float]]:
        return {(c.norm, float(e)) for e in c.eps}

    def run(self, ctx, report) -> None:
        c, bs = self.cfg, ctx.cfg.eval.batch_size
        split = ctx.data.test.head(c.samples)
        x, y = split.batch(torch.arange(len(split)), ctx.device)
        images = [0]

        def counted_fn(batch):
            images[0] += len(batch)
            return ctx.stacked_fn(batch)

        norms = []
        for i in tqdm(range(0, len(y), bs), desc="min-norm (FMN)", disable=not ctx.progress, leave=False):
            norms.append(fmn(counted_fn, x[i:i + bs], y[i:i + bs], ctx.weights, ctx.how, c.norm, c.steps))
        norms = torch.cat(norms).cpu()
        for e in c.eps:
            report.add(f"minnorm_acc/{c.norm}/{eps_key(e)}", accuracy_at(norms, e), attack="fmn", norm=c.norm,
                       eps=e, images=len(y), steps=c.steps)
            report.robust_flags(c.norm, e, "fmn", norms > e)
        top = max(c.eps + ([c.eps_target] if c.eps_target else []))
        grid = [top * i / 49 for i in range(50)]
        details = {"norm": c.norm, "steps": c.steps, "images": len(y), "median_norm": norms.median().item(),
                   "curve": {eps_key(e): accuracy_at(norms, e) for e in grid},
                   # FMN spends a forward per image and step, and a backward after all but the last
                   "passes": {"forward": images[0], "backward": images[0] - len(y)}}
        if c.eps_target:
            value = exact_auc(norms, c.eps_target)
            report.add("minnorm_auc", value, attack="fmn", norm=c.norm, eps=c.eps_target, images=len(y))
            details["auc"] = {"eps_target": c.eps_target, "value": value}
        report.details["min_norm"] = details
