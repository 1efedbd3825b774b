"""The evaluation plug-in point. An evaluation is one file: its config section (`eval.<key>`, any
type: a section, a list of attacks, a sample count), the rules tying it to the rest of `eval`, the
names of the results it will add (so a sweep objective is checked before any trial runs), and
`run`, which adds named results, details and per-image robust flags to the EvalReport.
`@register` makes the config schema, the evaluation protocol, the CLI summary, MLflow and sweep
objectives see it; evaluations run in registration order (a later one may read an earlier one's
results: AUC reads the attacks' curves).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch

from raysweep.core.data import Dataset
from raysweep.core.ensemble import Ensemble
from raysweep.core.registry import Registry

EVALUATIONS = Registry("evaluation", "key")
register = EVALUATIONS.register  # class decorator: `cls.key` becomes the section eval.<key>


@dataclass
class EvalContext:
    """What every evaluation sees: the ensemble on its device, as stacked logits and as one module."""
    cfg: Any  # the RunConfig
    ensemble: Ensemble
    data: Dataset
    executor: Any  # local members in eval mode: stacked_logits(x) -> [K,B,C]
    train: Callable[[dict], Ensemble]  # trains a raw run config in this process (transfer surrogates)
    progress: bool = True
    keep: Optional[Path] = None  # a folder that outlives the process, for this ensemble and config only:
                                 # a long stage may save finished parts there and skip them when run again

    log: Optional[Callable[[str], None]] = None  # a line per finished part, where no progress bar shows
    # Seconds that earlier processes spent on the parts a stage loaded from `keep`, by stage key: the
    # stage's time counts them, so a resumed evaluation states the compute it took in all.
    kept_seconds: dict[str, float] = field(default_factory=dict)

    def kept(self, key: str) -> Optional[Path]:
        """The evaluation `key`'s own folder under `keep` (None: nothing outlives the process)."""
        return None if self.keep is None else self.keep / key

    @property
    def device(self) -> torch.device:
        return self.executor.device

    @cached_property
    def weights(self) -> torch.Tensor:
        return self.ensemble.weights.to(self.device)

    @property
    def how(self) -> str:
        return self.ensemble.combine_how

    def stacked_fn(self, x: torch.Tensor) -> torch.Tensor:
        return self.executor.stacked_logits(x)

    @cached_property
    def model(self) -> torch.nn.Module:
        """The whole ensemble as one module (attack libraries, transfer)."""
        return self.ensemble.to(self.device).eval()


class Evaluation:
    key: ClassVar[str]
    Config: ClassVar[Any]  # the section's type
    default: ClassVar[Any] = None  # the section when a config has none (None, [], 0: off)
    results: ClassVar[tuple[str, ...]] = ()  # fixed result names, when they do not depend on the section

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return bool(cfg)

    @classmethod
    def check(cls, cfg: Any, eval_cfg: Any) -> None:
        """Rules tying the section to the rest of `eval`; raise ValueError."""

    @classmethod
    def names(cls, cfg: Any, eval_cfg: Any, k: int) -> list[str]:
        """The result names `run` will add for this section, for an ensemble of k members."""
        return list(cls.results)

    @classmethod
    def flagged(cls, cfg: Any) -> set[tuple[str, float]]:
        """The (norm, eps) points at which `run` hands per-image robust flags to the worst case."""
        return set()

    def run(self, ctx: EvalContext, report) -> None:
        raise NotImplementedError(f"evaluation {type(self).__name__} (eval.{self.key}) defines no run()")
