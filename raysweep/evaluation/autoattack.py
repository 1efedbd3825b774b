"""eval.autoattack: APGD-CE and APGD-DLR (native, attacks/apgd.py) and Square (through ART), each on
the images the previous ones left robust (attacks/library.py). Results autoattack_acc/<eps>, with per-image flags."""
from __future__ import annotations

from typing import Optional

from raysweep.attacks.library import AutoAttackConfig
from raysweep.evaluation.base import Evaluation, register
from raysweep.evaluation.report import eps_key


@register
class AutoAttack(Evaluation):
    key, Config = "autoattack", Optional[AutoAttackConfig]

    @classmethod
    def names(cls, a, eval_cfg, k) -> list[str]:
        return [f"autoattack_acc/{eps_key(e)}" for e in a.eps]

    @classmethod
    def flagged(cls, a) -> set[tuple[str, float]]:
        return {(a.norm, float(e)) for e in a.eps}

    def run(self, ctx, report) -> None:
        from raysweep.attacks import library  # ART is imported only when asked for

        a = self.cfg
        out, flags = library.autoattack(ctx.model, ctx.data.test, a, ctx.data.num_classes, ctx.cfg.eval.batch_size,
                                        ctx.device, ctx.cfg.seed)
        for e in a.eps:
            report.add(f"autoattack_acc/{eps_key(e)}", out["per_eps"][eps_key(e)]["acc"], attack="autoattack",
                       objective="+".join(a.attacks), norm=a.norm, eps=e, images=out["samples"], steps=a.max_iter)
            report.robust_flags(a.norm, e, "autoattack", flags[eps_key(e)])
        report.details["autoattack"] = out
