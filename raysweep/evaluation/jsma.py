"""eval.jsma: the Jacobian-based saliency map attack (L0) through ART. Result jsma_acc."""
from __future__ import annotations

from typing import Optional

from raysweep.attacks.library import JSMAConfig
from raysweep.evaluation.base import Evaluation, register


@register
class SaliencyMap(Evaluation):
    key, Config = "jsma", Optional[JSMAConfig]
    results = ("jsma_acc",)

    def run(self, ctx, report) -> None:
        from raysweep.attacks import library  # ART is imported only when asked for

        out = library.jsma(ctx.model, ctx.data.test, self.cfg, ctx.data.num_classes, ctx.cfg.eval.batch_size,
                           ctx.device, ctx.cfg.seed)
        report.add("jsma_acc", out["acc"], attack="jsma", norm="l0", images=out["samples"])
        report.details["jsma"] = out
