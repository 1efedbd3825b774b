"""Sweep objectives: which results of the evaluation report (evaluation/report.py) a sweep maximises,
named whole (`robust_acc/pgd20/0.1`, `worst_acc/linf/0.1`) or by parts, and the check, before any
trial runs, that the run config's evaluations produce them."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from raysweep.config import RunConfig
from raysweep.core.sections import Section
from raysweep.errors import ConfigError
from raysweep.evaluation import EVALUATIONS
from raysweep.evaluation.report import MAXIMISED, eps_key, maximised, scalars_of

# Where each objective family comes from, for the error when a run config does not produce it.
_SOURCE = {"weighted_acc": "eval.uap", "mean_uap_acc": "eval.uap", "uap_acc": "eval.uap", "auc": "eval.auc",
           "robust_acc": "eval.attacks", "autoattack_acc": "eval.autoattack", "transfer_acc": "eval.transfer",
           "cw_l2_acc": "eval.cw_l2", "jsma_acc": "eval.jsma", "worst_acc": "an attack at that norm and eps",
           "protocol_acc": "eval.protocol", "minnorm_acc": "eval.min_norm", "minnorm_auc": "eval.min_norm"}


class Objective(Section):
    """A result to maximise, by its name in the evaluation report: either whole
    (`robust_acc/pgd20/0.1`, `worst_acc/linf/0.1`) or as its parts. Accuracies only (a family named
    `*_acc`, a plug-in's included, or `auc`): a failed or infeasible trial scores 0."""
    metric: str
    attack: Optional[str] = Field(None, description="robust_acc, transfer_acc: the eval.attacks / eval.transfer name")
    norm: Optional[Literal["linf", "l2"]] = Field(None, description="worst_acc: the threat model (default linf)")
    eps: Optional[float] = Field(None, description="robust_acc, uap_acc, autoattack_acc, transfer_acc, worst_acc")

    @property
    def key(self) -> str:
        parts = [self.metric] + ([self.attack] if self.attack else [])
        if self.metric == "worst_acc":
            parts.append(self.norm or "linf")
        return "/".join(parts + ([eps_key(self.eps)] if self.eps is not None else []))

    @field_validator("metric")
    @classmethod
    def _an_accuracy(cls, metric: str) -> str:
        if not maximised(metric):
            raise ValueError(f"{metric!r} is not an accuracy to maximise (a *_acc result or auc), e.g. "
                             f"{', '.join(MAXIMISED)}")
        return metric

    def value(self, metrics: dict) -> float:
        return scalars_of(metrics)[self.key]


def objective_from_name(name: str) -> dict:
    """`robust_acc/pgd20/0.1` -> {metric, attack, eps}; `worst_acc/l2/0.5` -> {metric, norm, eps}."""
    metric, *rest = name.split("/")
    out: dict = {"metric": metric}
    if rest:
        try:
            out["eps"] = float(rest[-1])
            rest = rest[:-1]
        except ValueError:
            pass
    if rest:
        out["norm" if metric == "worst_acc" else "attack"] = "/".join(rest)
    return out


def produced_results(cfg: RunConfig) -> list[str]:
    """The result names an evaluation of cfg reports (evaluation/report.py), before anything runs."""
    names, flagged = ["clean_acc"], set()
    for key, evaluation in EVALUATIONS.items():
        section = getattr(cfg.eval, key)
        if evaluation.enabled(section):
            names += evaluation.names(section, cfg.eval, cfg.ensemble.k)
            flagged |= evaluation.flagged(section)
    return names + [f"worst_acc/{norm}/{eps_key(eps)}" for norm, eps in sorted(flagged)]


def check_objective(o: Objective, cfg: RunConfig) -> None:
    produced = produced_results(cfg)
    if o.key not in produced:
        family = [n for n in produced if n.split("/", 1)[0] == o.metric]
        raise ConfigError(f"search.objective {o.key!r} is not a result of this run config: it needs "
                          f"{_SOURCE.get(o.metric, o.metric)} in the run config"
                          + (f" (it produces {', '.join(family)})" if family else ""))
