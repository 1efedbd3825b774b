"""eval.cw_l2: Carlini & Wagner L2 (attacks/cw.py) on the first test images. Result cw_l2_acc."""
from __future__ import annotations

from typing import Optional

from raysweep.attacks.cw import CWL2Config, cw_l2
from raysweep.evaluation.base import Evaluation, register


@register
class CarliniWagnerL2(Evaluation):
    key, Config = "cw_l2", Optional[CWL2Config]
    results = ("cw_l2_acc",)

    def run(self, ctx, report) -> None:
        c = self.cfg
        out = cw_l2(ctx.stacked_fn, ctx.data.test, c, ctx.weights, ctx.how, ctx.cfg.eval.batch_size, ctx.device)
        report.add("cw_l2_acc", out["acc"], attack="cw_l2", objective="cw_margin", norm="l2", images=out["samples"],
                   steps=c.max_iter * c.binary_search_steps)
        report.details["cw_l2"] = out
