"""Priority Diversified Dropout (the PDD + DEG paper), on the last hidden layer, during training only.

From all K members' activations over the statistics period: the range [u, v] split into M equal
intervals; N[k, m] = member k's values in interval m; intervals sorted by their total count
(descending, ties to the lower interval); member k gets the k-th as its priority interval t_k.
A unit of member k whose activation lies in interval m is kept with rate
    alpha if m == t_k, else beta * (1 - N[k, m] / C_k).
`scope: sample` takes these statistics per image instead (over the K members' units of that image
alone), as the authors' public code does; `scope: batch` (the default) pools the mini-batch.
Kept units are not rescaled unless `rescale` (choice left open by the paper; docs/methods.md).
Everything stays on the members' device: no host round trip per step.

The statistics are computed per group: activations [K, B, ...] are viewed as [G, K, N], one group
(G = 1, N = B * units) for the batch scope, one per image (G = B, N = units) for the sample scope.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator

from raysweep.core.sections import Section
from raysweep.core.seeding import rand_like
from raysweep.regularisers.base import Regulariser, register


class PDDConfig(Section):
    alpha: float = Field(0.9, gt=0, le=1)
    beta: float = Field(0.1, ge=0, le=1)
    m: int = Field(10, ge=2, description="number of intervals; must exceed ensemble.k")
    period: int = Field(1, ge=1, description="steps per statistics period; 1 = the current mini-batch")
    rescale: bool = Field(False, description="divide kept units by their keep rate (inverted dropout)")
    scope: Literal["batch", "sample"] = Field(
        "batch", description="batch: range, counts and priority intervals over the whole mini-batch; sample: "
        "per image, over the K members' units of that image (the authors' public code)")

    @model_validator(mode="after")
    def _scope_fits(self):
        if self.scope == "sample" and self.period != 1:
            raise ValueError(f"train.pdd.scope 'sample' takes each image's own statistics, so it cannot pool "
                             f"steps: period must be 1, got {self.period} (or use scope 'batch')")
        return self


@dataclass
class PDDStats:
    """Statistics of G groups (1 for the batch scope, B for the sample scope)."""
    lo: torch.Tensor  # u [G, 1, 1]
    hi: torch.Tensor  # v [G, 1, 1]
    counts: torch.Tensor  # N [G, K, M]
    priority: torch.Tensor  # t [G, K]


def interval_index(a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, m: int) -> torch.Tensor:
    scaled = (a - lo) / (hi - lo).clamp_min(1e-12) * m
    return scaled.floor().long().clamp_(0, m - 1)


def _grouped(acts: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """Activations [K, B, ...] (or [K, N] pooled) as [G, K, N]."""
    k = acts.shape[0]
    return acts.reshape(k, acts.shape[1], -1).transpose(0, 1) if per_sample else acts.reshape(1, k, -1)


def _ungrouped(groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return (groups if groups.shape[0] == 1 else groups.transpose(0, 1)).reshape(like.shape)


def pdd_statistics(acts: torch.Tensor, m: int, per_sample: bool = False) -> PDDStats:
    """Statistics of activations [K, B, ...]: of every image and unit of each member together, or of
    each image's units alone (`per_sample`)."""
    groups = _grouped(acts.detach(), per_sample)
    g, k, _ = groups.shape
    lo, hi = groups.amin(dim=(1, 2), keepdim=True), groups.amax(dim=(1, 2), keepdim=True)
    idx = interval_index(groups, lo, hi, m)
    counts = torch.zeros(g, k, m, device=acts.device, dtype=groups.dtype).scatter_add_(2, idx, torch.ones_like(groups))
    order = torch.sort(-counts.sum(1), dim=1, stable=True).indices
    return PDDStats(lo, hi, counts, order[:, :k])


def intervals(acts: torch.Tensor, stats: PDDStats) -> torch.Tensor:
    """Interval index of every unit, same shape as acts [K, B, ...]."""
    groups = _grouped(acts.detach(), stats.counts.shape[0] > 1)
    return _ungrouped(interval_index(groups, stats.lo, stats.hi, stats.counts.shape[-1]), acts)


def keep_rates(acts: torch.Tensor, stats: PDDStats, alpha: float, beta: float) -> torch.Tensor:
    """Keep rate of every unit, same shape as acts [K, B, ...]."""
    groups = _grouped(acts.detach(), stats.counts.shape[0] > 1)  # one image: both scopes are one group
    idx = interval_index(groups, stats.lo, stats.hi, stats.counts.shape[-1])
    share = stats.counts / stats.counts.sum(2, keepdim=True)  # N[k,m] / C_k
    rates = beta * (1 - share.gather(2, idx))
    rates = torch.where(idx == stats.priority.unsqueeze(2), torch.full_like(rates, alpha), rates)
    return _ungrouped(rates, acts)


class PriorityDropout:
    """Holds the statistics period. period = 1: statistics of the current mini-batch. period = P:
    the activations of P steps are pooled, and the statistics of one period serve the next (the
    first period uses each step's own)."""

    def __init__(self, alpha: float, beta: float, m: int, period: int = 1, rescale: bool = False,
                 per_sample: bool = False):
        self.alpha, self.beta, self.m, self.period, self.rescale = alpha, beta, m, period, rescale
        self.per_sample = per_sample
        self._pool: list[torch.Tensor] = []
        self._stats: PDDStats | None = None

    def statistics(self, acts: torch.Tensor) -> PDDStats:
        if self.period == 1:
            return pdd_statistics(acts, self.m, self.per_sample)
        self._pool.append(acts.detach().flatten(1))
        stats = self._stats or pdd_statistics(acts, self.m)
        if len(self._pool) == self.period:
            self._stats = pdd_statistics(torch.cat(self._pool, 1), self.m)
            self._pool = []
        return stats

    def state_dict(self) -> dict:
        stats = None if self._stats is None else dataclasses.asdict(self._stats)
        return {"pool": [t.cpu() for t in self._pool], "stats": stats}

    def load_state_dict(self, sd: dict, device: torch.device) -> None:
        self._pool = [t.to(device) for t in sd["pool"]]
        st = sd["stats"]
        if st is not None:  # checkpoints from before the group dimension hold one group without it
            k, m = st["counts"].shape[-2:]
            st = {"lo": st["lo"].reshape(-1, 1, 1), "hi": st["hi"].reshape(-1, 1, 1),
                  "counts": st["counts"].reshape(-1, k, m), "priority": st["priority"].reshape(-1, k)}
        self._stats = None if st is None else PDDStats(**{n: t.to(device) for n, t in st.items()})

    def __call__(self, acts: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """Dropped activations; `uniform` [K,B,D] in [0,1) decides each unit (drawn by the caller
        from a seeded stream, so every executor drops the same units)."""
        rates = keep_rates(acts, self.statistics(acts), self.alpha, self.beta)
        keep = uniform < rates
        if self.rescale:
            return torch.where(keep, acts / rates.clamp_min(1e-12), torch.zeros_like(acts))
        return acts * keep


@register
class PriorityDiversifiedDropout(Regulariser):
    """A feature transform, no loss term: the dropout itself is the regulariser."""
    key, Config = "pdd", PDDConfig
    transforms_features = True

    def __init__(self, cfg: PDDConfig, k: int):
        super().__init__(cfg, k)
        self.dropout = PriorityDropout(cfg.alpha, cfg.beta, cfg.m, cfg.period, cfg.rescale, cfg.scope == "sample")

    @classmethod
    def check(cls, cfg: PDDConfig, k: int) -> None:
        if cfg.m <= k:
            raise ValueError(f"train.pdd.m must be > ensemble.k (each member needs its own priority interval), "
                             f"got m = {cfg.m}, k = {k}")

    def features(self, feats, generator):
        return self.dropout(feats, rand_like(feats, generator))

    def state_dict(self) -> dict:
        return self.dropout.state_dict()

    def load_state_dict(self, sd: dict, device) -> None:
        self.dropout.load_state_dict(sd, device)
