"""Adversarial examples for training (the robust-ensembles and Ensemble-Adv papers).

ensemble_examples: Ensemble-Adv. Start at x + N(0, sigma^2 I), then N steps on the loss of the
    AVERAGED ensemble, CE(y, (1/K) sum_k softmax(m_k(x~))), projected to the eps ball around x
    and [0,1]. Every member sees the same adversarial input.
member_examples: Madry PGD against each member alone, with its own eps (per-member eps for
    robust ensembles); members never see each other (SeparateAdv).
Both run the one PGD loop of attacks/pgd.py, with the members in eval mode and gradients w.r.t.
the input only.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field

from raysweep.attacks.pgd import ascend, default_step_size, start_delta
from raysweep.core.objectives import ce_prob
from raysweep.core.sections import Section, nonneg_eps


class AdversarialTrainingConfig(Section):
    """member: each member trained on PGD examples against itself alone (Madry; SeparateAdv), with
    one eps or a per-member list; ensemble: Ensemble-Adv, examples against the averaged ensemble."""
    mode: Literal["member", "ensemble"]
    eps: Annotated[float | list[float], AfterValidator(nonneg_eps)]
    norm: Literal["linf", "l2"] = "linf"
    steps: int = Field(7, ge=1)
    step_size: Optional[float] = Field(None, gt=0, description="null: 2.5 * eps / steps")
    step_rule: Literal["sign", "adam"] = Field("sign", description="sign = IFGSM/PGD sign steps; adam = Adam steps")
    start: Optional[Literal["none", "uniform", "gaussian"]] = Field(
        None, description="null: gaussian for mode ensemble (the Ensemble-Adv paper), uniform for member")
    sigma: Optional[float] = Field(None, ge=0, description="std of the gaussian start; null: eps / 2")
    clean: Optional[bool] = Field(None, description="add the clean loss; null: true for ensemble, false for member")
    rho: float = Field(1.0, ge=0, description="weight of the adversarial loss")


def eps_list(cfg: AdversarialTrainingConfig, k: int) -> list[float]:
    return list(cfg.eps) if isinstance(cfg.eps, list) else [cfg.eps] * k


def ensemble_examples(stacked_fn, x, y, weights, cfg: AdversarialTrainingConfig, generator=None) -> torch.Tensor:
    """x [B,...] -> x~ [B,...] against the probability-averaged ensemble."""
    eps = float(cfg.eps)
    delta = start_delta(x, eps, cfg.norm, cfg.start or "gaussian", generator, cfg.sigma)
    return ascend(stacked_fn, lambda stacked: ce_prob(stacked, y, weights).sum(), x, delta, eps, cfg.norm, cfg.steps,
                  cfg.step_size or default_step_size(eps, cfg.steps), cfg.step_rule)


def member_examples(per_member_fn, x, y, cfg: AdversarialTrainingConfig, generator=None) -> torch.Tensor:
    """x [K,B,...] -> x~ [K,B,...], member k attacked alone at its own eps_k."""
    k, b = y.shape
    eps = torch.tensor(eps_list(cfg, k), dtype=x.dtype, device=x.device).repeat_interleave(b).view(-1, 1, 1, 1)
    step = cfg.step_size * torch.ones_like(eps) if cfg.step_size else default_step_size(eps, cfg.steps)
    flat = x.flatten(0, 1)  # per-sample projections need one row per (member, sample)
    delta = start_delta(flat, eps, cfg.norm, cfg.start or "uniform", generator, cfg.sigma)
    return ascend(lambda z: per_member_fn(z.view_as(x)), lambda logits: F.cross_entropy(
        logits.flatten(0, 1), y.reshape(-1), reduction="sum"), flat, delta, eps, cfg.norm, cfg.steps, step,
        cfg.step_rule).view_as(x)
