"""A pack: the members of N trials (each its own local executor, K members) run as one executor of
N x K members, trial n's members in slots n*K .. n*K+K-1. Vmapped trials run as one vmapped call over
all N x K members, their stacked parameters concatenated on the fly, so each trial keeps its own
parameter leaves (and its own optimiser); looped ones run one member after another.
"""
from __future__ import annotations

import torch

from raysweep.members.local import LoopedMembers, VmappedMembers


class PackedMembers:
    def __init__(self, trials: list):
        kinds = {type(t) for t in trials}
        if len(kinds) != 1 or not kinds <= {LoopedMembers, VmappedMembers}:
            raise ValueError(f"a pack needs one kind of local executor for all its trials, got {kinds}")
        self.trials, self.vmapped = trials, kinds == {VmappedMembers}
        self.device = trials[0].device

    @property
    def k(self) -> int:
        return sum(t.k for t in self.trials)

    def parameters(self) -> list[torch.Tensor]:
        return [p for t in self.trials for p in t.parameters()]

    def train(self, mode: bool = True):
        for t in self.trials:
            t.train(mode)

    def stacked_logits(self, x: torch.Tensor, per_member: bool = False, part: str = "logits") -> torch.Tensor:
        """x [B,...] seen by every member, or [N*K,B,...] with member j on x[j] (per_member)."""
        if self.vmapped:
            params = {name: torch.cat([t.params[name] for t in self.trials]) for name in self.trials[0].params}
            buffers = {name: torch.cat([t.buffers[name] for t in self.trials]) for name in self.trials[0].buffers}
            return self.trials[0]._vmapped(per_member, part)(params, buffers, x)
        outs, start = [], 0
        for t in self.trials:
            outs.append(t.stacked_logits(x[start:start + t.k] if per_member else x, per_member, part))
            start += t.k
        return torch.cat(outs)

    def sync(self, stacked: torch.Tensor) -> torch.Tensor:
        return stacked
