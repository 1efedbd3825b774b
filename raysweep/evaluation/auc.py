"""eval.auc: the robust-ensembles summary (1/eps_target) * integral_0^eps_target A(eps) d eps of one
attack's accuracy curve (metrics.auc), with A(0) the clean accuracy. Result `auc`."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from raysweep.core.sections import Section
from raysweep.evaluation.base import Evaluation, register
from raysweep.evaluation.metrics import auc


class AUCConfig(Section):
    attack: str
    eps_target: float = Field(..., gt=0)


@register
class AreaUnderCurve(Evaluation):
    key, Config = "auc", Optional[AUCConfig]
    results = ("auc",)

    @classmethod
    def check(cls, a, eval_cfg) -> None:
        attacks = {x.name: x for x in eval_cfg.attacks}
        if a.attack not in attacks:
            raise ValueError(f"auc.attack '{a.attack}' is not one of the attacks {list(attacks)}")
        if a.eps_target not in attacks[a.attack].eps:
            raise ValueError(f"auc.eps_target {a.eps_target} must be in attack '{a.attack}' eps grid "
                             f"{attacks[a.attack].eps}")


    def run(self, ctx, report) -> None:
        a = self.cfg
        curve = {float(e): acc for e, acc in report.details["robust_acc"][a.attack].items()}
        value = auc(curve, a.eps_target, report.results["clean_acc"].value)
        report.add("auc", value, attack=a.attack, eps=a.eps_target, images=len(ctx.data.test))
        report.details["auc"] = {"attack": a.attack, "eps_target": a.eps_target, "value": value}
