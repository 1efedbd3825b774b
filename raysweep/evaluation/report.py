"""The typed evaluation report. Every number an evaluation produces is a named `Result` (what was
measured, by which attack, objective, norm, eps, on how many images, with how many steps and
restarts or seeds); `scalars()` gives them under one flat name each (`robust_acc/pgd/0.1`,
`worst_acc/linf/0.1`, `autoattack_acc/0.03`, ...), and the CLI summary, MLflow metrics, Tune
objectives and the registry all read those names. Per-image robust flags that evaluations hand in
give the worst case over every attack at an eps (`worst_acc/<norm>/<eps>`).

metrics.json (schema 2) keeps the protocol details at the top level, as schema 1 had them, and adds
`schema` and `results`. Files without `schema` (written before it existed) still load: their
scalars are read from the details (`scalars_of`).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from raysweep.errors import UserError

SCHEMA = 2
# The built-in results a sweep may maximise: accuracies (families named *_acc) and AUC. The rest
# (norms, ECE, NLL, seconds) are reported, not searched.
MAXIMISED = ("clean_acc", "weighted_acc", "mean_uap_acc", "auc", "robust_acc", "uap_acc", "worst_acc",
             "autoattack_acc", "transfer_acc", "cw_l2_acc", "jsma_acc", "protocol_acc", "minnorm_acc", "minnorm_auc")


def maximised(family: str) -> bool:
    return family.endswith(("_acc", "_auc")) or family == "auc"


def eps_key(eps: float) -> str:
    """How an eps appears in a result name: str(float), as metrics.json's eps keys always have."""
    return str(float(eps))


@dataclass
class Result:
    name: str
    value: float
    attack: Optional[str] = None
    objective: Optional[str] = None
    norm: Optional[str] = None
    eps: Optional[float] = None
    images: Optional[int] = None
    steps: Optional[int] = None
    seeds: Optional[int] = None  # restarts of an attack, or UAP random starts


@dataclass
class EvalReport:
    results: dict[str, Result] = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # the protocol, per evaluation, JSON-ready
    artifacts: dict = field(default_factory=dict)  # tensors for pictures and files (the chosen UAPs)
    masking: dict[str, str] = field(default_factory=dict)  # flag -> why (evaluation/masking.py)
    _flags: dict = field(default_factory=dict)  # (norm, eps) -> [(source, robust flags of the first N test images)]

    def add(self, name: str, value: float, **meta) -> None:
        if name in self.results:
            raise ValueError(f"evaluation result {name!r} reported twice")
        self.results[name] = Result(name, float(value), **meta)

    def flag(self, name: str, why: str) -> None:
        """A sign that the evaluation overestimates robustness (gradient masking)."""
        self.masking[name] = why

    def robust_flags(self, norm: str, eps: float, source: str, flags: torch.Tensor) -> None:
        """Per-image robustness of the first len(flags) test images under `source` at (norm, eps)."""
        self._flags.setdefault((norm, float(eps)), []).append((source, flags.bool().cpu()))

    def add_worst_case(self) -> None:
        """worst_acc/<norm>/<eps>: an image counts only if it survived every attack at that eps (on the
        test images all of them saw), with the attacks that were combined."""
        for (norm, eps), entries in sorted(self._flags.items()):
            n = min(len(f) for _, f in entries)
            robust = torch.stack([f[:n] for _, f in entries]).all(0)
            self.add(f"worst_acc/{norm}/{eps_key(eps)}", robust.sum().item() / n, norm=norm, eps=eps,
                     attack="+".join(source for source, _ in entries), images=n)

    def mark(self) -> dict:
        """Where the report stands, for `since`: what one evaluation stage then adds is its share."""
        return {"results": set(self.results), "details": copy.deepcopy(self.details), "artifacts": set(self.artifacts),
                "masking": set(self.masking), "flags": {k: len(v) for k, v in self._flags.items()}}

    def since(self, mark: dict) -> dict:
        """What was added or changed after `mark`, in the plain types `torch.load(weights_only=True)` reads.
        A details entry counts when its value changed, so a stage that extends another's dict in place
        (the protocol's curve in robust_acc) carries the whole entry."""
        return {"results": [asdict(r) for n, r in self.results.items() if n not in mark["results"]],
                "details": {k: v for k, v in self.details.items() if mark["details"].get(k, ...) != v},
                "artifacts": {k: v for k, v in self.artifacts.items() if k not in mark["artifacts"]},
                "masking": {k: v for k, v in self.masking.items() if k not in mark["masking"]},
                "flags": [[norm, eps, source, f] for (norm, eps), entries in self._flags.items()
                          for source, f in entries[mark["flags"].get((norm, eps), 0):]]}

    def merge(self, part: dict) -> None:
        """Add a stage's share (from `since`, saved by an earlier process) as if the stage had run here."""
        for r in part["results"]:
            self.add(**r)
        self.details.update(part["details"])
        self.artifacts.update(part["artifacts"])
        self.masking.update(part["masking"])
        for norm, eps, source, f in part["flags"]:
            self.robust_flags(norm, eps, source, f)

    def scalars(self) -> dict[str, float]:
        return {name: r.value for name, r in self.results.items()}

    def to_json(self) -> dict:
        return {"schema": SCHEMA, **self.details, "masking_flags": dict(self.masking),
                "results": {name: {k: v for k, v in asdict(r).items() if k != "name" and v is not None}
                            for name, r in self.results.items()}}


def scalars_of(metrics: dict) -> dict[str, float]:
    """The named scalar results of a metrics.json, of any schema raysweep has written."""
    schema = metrics.get("schema", 1)
    if schema == SCHEMA:
        return {name: float(r["value"]) for name, r in metrics["results"].items()}
    if schema == 1:
        return _schema1_scalars(metrics)
    raise UserError(f"metrics.json has schema {schema!r}; this raysweep reads schemas 1 and {SCHEMA} (a newer "
                    "raysweep wrote it: upgrade)")


def masking_flags_of(metrics: dict) -> dict[str, str]:
    """The masking flags of a metrics.json (none before schema 2)."""
    return dict(metrics.get("masking_flags") or {})


def weak_members(metrics: dict) -> list[int]:
    """Members (numbered from 1) whose clean accuracy is under half the ensemble's: they learned little, and
    the ensemble's accuracy is mostly the other members'. Causes seen: PDD's dropout with rescaled kept
    units silences members (docs/RESULTS.md); a short snapshot ensemble's first snapshots come early in
    training. Not a masking flag: nothing is overestimated, but the ensemble is not what it seems."""
    clean, members = metrics.get("clean_acc"), metrics.get("member_clean_acc") or []
    if clean is None or len(members) < 2:
        return []
    return [k + 1 for k, a in enumerate(members) if a < clean / 2]


def _schema1_scalars(metrics: dict) -> dict[str, float]:
    """Schema 1 named its scalars by where they sat in the details."""
    out = {k: float(metrics[k]) for k in ("clean_acc", "mean_uap_acc", "weighted_acc") if k in metrics}
    for attack, curve in metrics.get("robust_acc", {}).items():
        out.update({f"robust_acc/{attack}/{eps}": float(a) for eps, a in curve.items()})
    out.update({f"uap_acc/{eps}": float(a) for eps, a in metrics.get("uap_acc", {}).items()})
    if "auc" in metrics:
        out["auc"] = float(metrics["auc"]["value"])
    for section in ("diversity", "jacobian_sq_norm"):
        out.update({f"{section}/{name}": float(v) for name, v in metrics.get(section, {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and name != "samples"})
    return out
