"""Adversarial examples for training (SPEC sections 2-3).

ensemble_examples: Ensemble-Adv. Start at x + N(0, sigma^2 I), then N steps on the loss of the
    AVERAGED ensemble, CE(y, (1/K) sum_k softmax(m_k(x~))), projected to the eps ball around x
    and [0,1]. Every member sees the same adversarial input.
member_examples: Madry PGD against each member alone, with its own eps (per-member eps for
    robust ensembles); members never see each other (SeparateAdv).
The attacks run with the members in eval mode and take gradients w.r.t. the input only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raysweep.core.objectives import ce_prob
from raysweep.attacks.steps import Ascent, project, random_start
from raysweep.config.schema import AdversarialTrainingConfig
from raysweep.core.seeding import randn_like


def _eps_list(cfg: AdversarialTrainingConfig, k: int) -> list[float]:
    return list(cfg.eps) if isinstance(cfg.eps, list) else [cfg.eps] * k


def _start(x, eps, cfg: AdversarialTrainingConfig, default: str, generator):
    kind = cfg.start or default
    if kind == "gaussian":
        sigma = cfg.sigma if cfg.sigma is not None else eps / 2
        # SPEC section 3: x~0 = x + N(0, sigma^2 I); the first step's projection brings it into the ball.
        return sigma * randn_like(x, generator)
    if kind == "uniform":
        return project(random_start(x, eps, cfg.norm, generator), x, eps, cfg.norm)
    return torch.zeros_like(x)


def _ascend(loss_of, x, delta, eps, step, cfg: AdversarialTrainingConfig) -> torch.Tensor:
    """cfg.steps projected ascent steps on loss_of(x + delta); returns x + delta."""
    ascent = Ascent(cfg.step_rule, cfg.norm, step)
    for _ in range(cfg.steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_of(x + delta), delta)
        delta = project(ascent(delta.detach(), grad), x, eps, cfg.norm)
    return (x + delta).detach()


def ensemble_examples(stacked_fn, x, y, weights, cfg: AdversarialTrainingConfig, generator=None) -> torch.Tensor:
    """x [B,...] -> x~ [B,...] against the probability-averaged ensemble."""
    eps = float(cfg.eps)
    return _ascend(lambda z: ce_prob(stacked_fn(z), y, weights).sum(), x, _start(x, eps, cfg, "gaussian", generator),
                   eps, cfg.step_size or 2.5 * eps / cfg.steps, cfg)


def member_examples(per_member_fn, x, y, cfg: AdversarialTrainingConfig, generator=None) -> torch.Tensor:
    """x [K,B,...] -> x~ [K,B,...], member k attacked alone at its own eps_k."""
    k, b = y.shape
    eps = torch.tensor(_eps_list(cfg, k), dtype=x.dtype, device=x.device).repeat_interleave(b).view(-1, 1, 1, 1)
    step = cfg.step_size * torch.ones_like(eps) if cfg.step_size else 2.5 * eps / cfg.steps
    flat = x.flatten(0, 1)  # per-sample projections need one row per (member, sample)

    def loss_of(z):
        return F.cross_entropy(per_member_fn(z.view_as(x)).flatten(0, 1), y.reshape(-1), reduction="sum")

    return _ascend(loss_of, flat, _start(flat, eps, cfg, "uniform", generator), eps, step, cfg).view_as(x)
