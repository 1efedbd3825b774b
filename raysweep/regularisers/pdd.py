"""Priority Diversified Dropout (the PDD + DEG paper), on the last hidden layer, during training only.

From all K members' activations over the statistics period: the range [u, v] split into M equal
intervals; N[k, m] = member k's values in interval m; intervals sorted by their total count
(descending, ties to the lower interval); member k gets the k-th as its priority interval t_k.
A unit of member k whose activation lies in interval m is kept with rate
    alpha if m == t_k, else beta * (1 - N[k, m] / C_k).
Kept units are not rescaled unless `rescale` (choice left open by the paper; docs/methods.md).
Everything stays on the members' device: no host round trip per step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from pydantic import Field

from raysweep.core.sections import Section
from raysweep.core.seeding import rand_like
from raysweep.regularisers.base import Regulariser, register


class PDDConfig(Section):
    alpha: float = Field(0.9, gt=0, le=1)
    beta: float = Field(0.1, ge=0, le=1)
    m: int = Field(10, ge=2, description="number of intervals; must exceed ensemble.k")
    period: int = Field(1, ge=1, description="steps per statistics period; 1 = the current mini-batch")
    rescale: bool = Field(False, description="divide kept units by their keep rate (inverted dropout)")


@dataclass
class PDDStats:
    lo: torch.Tensor  # u, scalar
    hi: torch.Tensor  # v, scalar
    counts: torch.Tensor  # N [K, M]
    priority: torch.Tensor  # t [K]


def interval_index(a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, m: int) -> torch.Tensor:
    scaled = (a - lo) / (hi - lo).clamp_min(1e-12) * m
    return scaled.floor().long().clamp_(0, m - 1)


def pdd_statistics(acts: torch.Tensor, m: int) -> PDDStats:
    """Statistics of activations [K, ...] (every sample and unit of each member)."""
    k = acts.shape[0]
    flat = acts.detach().reshape(k, -1)
    lo, hi = flat.min(), flat.max()
    idx = interval_index(flat, lo, hi, m)
    counts = torch.zeros(k, m, device=acts.device, dtype=flat.dtype).scatter_add_(1, idx, torch.ones_like(flat))
    order = torch.sort(-counts.sum(0), stable=True).indices
    return PDDStats(lo, hi, counts, order[:k])


def keep_rates(acts: torch.Tensor, stats: PDDStats, alpha: float, beta: float) -> torch.Tensor:
    """Keep rate of every unit, same shape as acts [K, B, D]."""
    k, m = stats.counts.shape
    idx = interval_index(acts.detach(), stats.lo, stats.hi, m).reshape(k, -1)
    share = stats.counts / stats.counts.sum(1, keepdim=True)  # N[k,m] / C_k
    rates = beta * (1 - share.gather(1, idx))
    rates = torch.where(idx == stats.priority.view(k, 1), torch.full_like(rates, alpha), rates)
    return rates.view_as(acts)


class PriorityDropout:
    """Holds the statistics period. period = 1: statistics of the current mini-batch. period = P:
    the activations of P steps are pooled, and the statistics of one period serve the next (the
    first period uses each step's own)."""

    def __init__(self, alpha: float, beta: float, m: int, period: int = 1, rescale: bool = False):
        self.alpha, self.beta, self.m, self.period, self.rescale = alpha, beta, m, period, rescale
        self._pool: list[torch.Tensor] = []
        self._stats: PDDStats | None = None

    def statistics(self, acts: torch.Tensor) -> PDDStats:
        if self.period == 1:
            return pdd_statistics(acts, self.m)
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
        self._stats = None if sd["stats"] is None else PDDStats(**{n: t.to(device) for n, t in sd["stats"].items()})

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
        self.dropout = PriorityDropout(cfg.alpha, cfg.beta, cfg.m, cfg.period, cfg.rescale)

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
