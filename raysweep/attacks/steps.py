"""Ascent steps and projections shared by PGD and UAP."""
from __future__ import annotations

import torch

from raysweep.core.seeding import rand_like, randn_like


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


class Ascent:
    """delta <- delta + step * direction(grad); 'sign' (l_inf sign / l2 normalised gradient) or an
    Adam update on the perturbation (as in Ensemble-Adv's PGD)."""

    def __init__(self, rule: str, norm: str, step: float, betas=(0.9, 0.999)):
        self.rule, self.norm, self.step, self.betas = rule, norm, step, betas
        self.m = self.v = None
        self.t = 0

    def __call__(self, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        if self.rule == "adam":
            b1, b2 = self.betas
            self.t += 1
            if self.m is None:
                self.m, self.v = torch.zeros_like(grad), torch.zeros_like(grad)
            self.m.mul_(b1).add_(grad, alpha=1 - b1)
            self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            direction = (self.m / (1 - b1 ** self.t)) / ((self.v / (1 - b2 ** self.t)).sqrt() + 1e-12)
        elif self.norm == "linf":
            direction = grad.sign()
        else:
            direction = grad / _per_sample_norm(grad)
        return delta + self.step * direction

    def state_dict(self) -> dict:
        """Adam's moments and step count (empty for 'sign'): what a continued run needs to step as before."""
        return {} if self.m is None else {"m": self.m.cpu(), "v": self.v.cpu(), "t": self.t}

    def load_state_dict(self, state: dict, device=None) -> None:
        if state:
            self.m, self.v, self.t = state["m"].to(device), state["v"].to(device), state["t"]


def project(delta: torch.Tensor, x: torch.Tensor, eps, norm: str) -> torch.Tensor:
    """Into the eps ball, then so that x + delta stays in [0,1] (which only shrinks |delta|).
    eps is a float or a per-sample tensor [N,1,...]."""
    if norm == "linf":
        delta = torch.clamp(delta, -eps, eps)
    else:
        delta = delta * (eps / _per_sample_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp(0, 1) - x


def random_start(x: torch.Tensor, eps, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    if norm == "linf":
        return (rand_like(x, generator) * 2 - 1) * eps
    g = randn_like(x, generator)
    r = rand_like(x, generator, shape=(x.shape[0],) + (1,) * (x.dim() - 1))
    return g / _per_sample_norm(g) * eps * r
