"""Snapshot ensembles (the Jacobian Ensembles paper): one network trained with a cyclic cosine learning rate;
the weights at the end of each of the K cycles are the K members."""
from __future__ import annotations

import math

from raysweep.errors import ConfigError
from raysweep.methods.base import EnsembleMethod, register


def snapshot_lr(t: int, total: int, k: int, lr0: float) -> float:
    """lr(t) = lr0/2 * (cos(pi * ((t-1) mod ceil(T/K)) / ceil(T/K)) + 1), t = 1..T."""
    cycle = math.ceil(total / k)
    return lr0 / 2 * (math.cos(math.pi * ((t - 1) % cycle) / cycle) + 1)


def snapshot_steps(total: int, k: int) -> list[int]:
    """The iterations after which a snapshot is kept: the end of each of the K cycles."""
    cycle = math.ceil(total / k)
    ends = sorted({min(c * cycle, total) for c in range(1, k + 1)})
    if len(ends) < k:
        raise ConfigError(f"ensemble.k = {k} snapshots need at least {k} training steps with distinct cycle ends, "
                          f"got {total} steps: raise train.epochs or data.train_size, or lower data.batch_size")
    return ends


@register
class Snapshot(EnsembleMethod):
    name, batches = "snapshot", "shared"
    description = "one network, cyclic cosine learning rate, one snapshot per cycle (train.schedule is ignored)"

    def __init__(self, k: int, total_steps: int):
        super().__init__(k, total_steps)
        self.keep_at = snapshot_steps(total_steps, k)
        self.snapshots: list[dict] = []  # state dicts on the CPU

    @classmethod
    def trained_networks(cls, k: int) -> int:
        return 1

    @classmethod
    def check(cls, cfg) -> None:
        adv = cfg.train.adversarial
        if adv is not None and adv.mode == "ensemble":
            raise ValueError("snapshot ensembles train one network: train.adversarial.mode must be member")

    def lr(self, t: int, lr0: float, schedule: str) -> float:
        return snapshot_lr(t, self.total_steps, self.k, lr0)

    def after_step(self, step, export) -> None:
        if step in self.keep_at:
            self.snapshots.append({n: t.detach().cpu().clone() for n, t in export()[0].state_dict().items()})

    def ensemble_state(self, trained: list[dict]) -> list[dict]:
        return list(self.snapshots)

    def state_dict(self) -> dict:
        return {"snapshots": self.snapshots}

    def load_state_dict(self, sd) -> None:
        self.snapshots = list(sd["snapshots"])
