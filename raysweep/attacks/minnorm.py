"""Minimum-norm attack: per image, the smallest l_inf or l2 perturbation found that fools the
ensemble, so one run gives the accuracy at every eps at once (the accuracy-vs-eps curve, and AUC
without a fixed grid): accuracy(eps) = share of images whose smallest perturbation exceeds eps.

FMN (Pintor et al., "Fast Minimum-norm Adversarial Attacks through Adaptive Norm Constraints",
NeurIPS'21), written over raysweep's stacked member logits: gradient steps on the ensemble's
logit margin z_y - max_{j != y} z_j (of its own combine scores), projected onto an eps ball that
adapts per image: shrunk by (1 - gamma) while the image is fooled, grown by (1 + gamma) once an
adversarial is known but the current iterate is not one, and set to a linear estimate of the
boundary distance ||delta|| + |margin| / ||grad||_dual before any is found. The step size alpha and
gamma anneal on a cosine. adv-lib (the reference implementation) does not install beside the pinned
stack (its visdom dependency fails to build), hence this one.
"""
from __future__ import annotations

import math

import torch

from raysweep.attacks.steps import project
from raysweep.core.ensemble import combine
from raysweep.core.objectives import cw_margin


def _norm(t: torch.Tensor, p: float) -> torch.Tensor:
    return t.flatten(1).norm(p=p, dim=1)


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *[1] * (like.dim() - 1))


def fmn(stacked_fn, x: torch.Tensor, y: torch.Tensor, weights, how: str = "probability", norm: str = "linf",
        steps: int = 100, alpha_init: float | None = None, gamma_init: float = 0.05,
        gamma_final: float = 0.001) -> torch.Tensor:
    """The smallest perturbation norm [B] found per image: 0 for images the ensemble already
    misclassifies, inf where no adversarial was found."""
    p, dual = (math.inf, 1.0) if norm == "linf" else (2.0, 2.0)
    alpha_init = 1.0 if alpha_init is None else alpha_init  # the paper's value for l_inf and l2
    alpha_final = alpha_init / 100
    x = x.detach()
    b = len(y)
    delta = torch.zeros_like(x)
    eps = torch.full((b,), math.inf, device=x.device)
    worst = _norm(torch.maximum(x, 1 - x), p)  # no perturbation needs more than reaching the box's far corner
    best = torch.full((b,), math.inf, device=x.device)
    found = torch.zeros(b, dtype=torch.bool, device=x.device)
    for i in range(steps + 1):
        cosine = (1 + math.cos(math.pi * min(i, steps) / steps)) / 2
        alpha = alpha_final + (alpha_init - alpha_final) * cosine
        gamma = gamma_final + (gamma_init - gamma_final) * cosine
        delta.requires_grad_(True)
        stacked = stacked_fn(x + delta)
        margin = -cw_margin(stacked, y, weights, how)  # z_y - max other: below 0 is fooled
        fooled = combine(stacked.detach(), weights, how).argmax(1) != y
        size = _norm(delta.detach(), p)
        better = fooled & (size < best)
        best = torch.where(better, size, best)
        found |= fooled
        if i == steps:
            break
        (grad,) = torch.autograd.grad(margin.sum(), delta)
        delta = delta.detach()
        boundary = size + margin.detach().abs() / _norm(grad, dual).clamp_min(1e-12)
        eps = torch.where(fooled, torch.minimum(eps * (1 - gamma), best),
                          torch.where(found, eps * (1 + gamma), boundary))
        eps = torch.minimum(eps, worst)
        delta = project(delta - alpha * grad / _view(_norm(grad, 2).clamp_min(1e-12), grad), x, _view(eps, x), norm)
    return best


def accuracy_at(norms: torch.Tensor, eps: float) -> float:
    """Share of images whose smallest adversarial perturbation is larger than eps."""
    return (norms > eps).float().mean().item()
