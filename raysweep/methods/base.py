"""The ensemble-method plug-in point: how the members are trained around the one training step.
An ensemble method owns its batch order (each member's own shuffle, bootstrap samples, or one
shared mini-batch), its learning-rate schedule, how many networks it trains, and how the
ensemble is assembled from them (snapshots, for instance). One file per method, `@register`ed:
config validation (`ensemble.method`), the trainer and the Ray launcher then run it unedited.
"""
from __future__ import annotations

import math
from typing import Callable, ClassVar, Optional

import torch

from raysweep.core.registry import Registry

METHODS = Registry("ensemble method", "name")
register = METHODS.register  # class decorator: `cls.name` becomes a value of ensemble.method


class EnsembleMethod:
    name: ClassVar[str]
    description: ClassVar[str]
    batches: ClassVar[str]  # core.data.member_batches mode: "independent", "bootstrap" or "shared"
    joint: ClassVar[bool] = False  # all K members train together on one mini-batch, so terms may couple them

    def __init__(self, k: int, total_steps: int):
        self.k, self.total_steps = k, total_steps

    @classmethod
    def trained_networks(cls, k: int) -> int:
        """How many networks train side by side for an ensemble of k members."""
        return k

    @classmethod
    def check(cls, cfg) -> None:
        """Rules tying the method to the rest of a RunConfig; raise ValueError."""

    def lr(self, t: int, lr0: float, schedule: str) -> float:
        """Learning rate of iteration t (1-based) of total_steps."""
        if schedule == "cosine":
            return lr0 / 2 * (math.cos(math.pi * (t - 1) / self.total_steps) + 1)
        return lr0

    def after_step(self, step: int, export: Callable[[], list[torch.nn.Module]]) -> None:
        """Called after every optimiser step; `export()` gives the trained networks (it may copy)."""

    def ensemble_state(self, trained: list[dict]) -> list[dict]:
        """The ensemble members' state dicts, from the trained networks' state dicts."""
        return trained

    def state_dict(self) -> Optional[dict]:
        """State carried across epochs (tensors and plain containers), for resumable runs."""
        return None

    def load_state_dict(self, sd: Optional[dict]) -> None:
        pass
