"""APGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML'20), over raysweep's stacked member logits, batched, in PyTorch: no
numpy round trip (ART's version copies every batch to numpy and back at each iteration).

Per image: sign steps (l_inf) or normalised steps (l2) of size eta, starting at 2 eps, with momentum
0.75 toward the previous iterate; at checkpoints w_j (a fraction of the iterations that starts at
0.22 and grows by at least 0.06) eta halves and the iterate restarts from the best point so far
when fewer than 75% of the steps since the last checkpoint raised the loss, or when neither eta nor
the best loss changed over that span. Losses on the ensemble's combine scores: `ce` (cross-entropy,
on the averaged probabilities for the default combine) or `dlr` (difference of logits ratio,
-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), unchanged by a per-image shift or scale of the scores).
As everywhere in raysweep's evaluation, an image counts as fooled as soon as any iterate fools it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raysweep.attacks.steps import Ascent, project, random_start
from raysweep.core.ensemble import combine
from raysweep.core.objectives import dlr


def dlr_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DLR of the ensemble's combine scores z [B,C]."""
    if z.shape[1] < 3:
        raise ValueError("the DLR loss needs at least 3 classes")
    return dlr(z[None], y)[0]


def checkpoints(iterations: int) -> list[int]:
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(round(q * iterations, 6)) for q in p[1:] if q < 1})  # round: 0.57 is 0.5700...01


def apgd(stacked_fn, x: torch.Tensor, y: torch.Tensor, weights, how: str = "probability", loss: str = "ce",
         eps: float = 0.1, norm: str = "linf", iterations: int = 100, generator=None) -> torch.Tensor:
    """Which images [B] some iterate of APGD fooled (the ensemble misclassified)."""
    x = x.detach()

    def loss_and_grad(delta):
        delta = delta.detach().requires_grad_(True)
        z = combine(stacked_fn(x + delta), weights, how)
        per = F.cross_entropy(z, y, reduction="none") if loss == "ce" else dlr_loss(z, y)
        (grad,) = torch.autograd.grad(per.sum(), delta)
        return per.detach(), grad, z.detach().argmax(1) != y

    b = len(y)
    eta = torch.full((b,), 2.0 * eps, device=x.device)
    delta = project(random_start(x, eps, norm, generator), x, eps, norm)
    f, grad, fooled = loss_and_grad(delta)
    best_f, best_delta = f.clone(), delta.clone()
    prev = delta
    marks, last_mark = checkpoints(iterations), 0
    raised = torch.zeros(b, device=x.device)
    eta_at_mark, best_at_mark = eta.clone(), best_f.clone()
    for k in range(iterations):
        z = project(Ascent("sign", norm, eta.view(-1, *[1] * (x.dim() - 1)))(delta, grad), x, eps, norm)
        alpha = 1.0 if k == 0 else 0.75
        new = project(delta + alpha * (z - delta) + (1 - alpha) * (delta - prev), x, eps, norm)
        prev, delta = delta, new
        f_new, grad, now = loss_and_grad(delta)
        fooled |= now
        raised += (f_new > f).float()
        f = f_new
        better = f > best_f
        best_f = torch.where(better, f, best_f)
        best_delta[better] = delta[better]
        if k + 1 in marks:
            span = k + 1 - last_mark
            stalled = (raised < 0.75 * span) | ((eta_at_mark == eta) & (best_at_mark == best_f))
            eta = torch.where(stalled, eta / 2, eta)
            delta = torch.where(stalled.view(-1, *[1] * (x.dim() - 1)), best_delta, delta)
            prev = torch.where(stalled.view(-1, *[1] * (x.dim() - 1)), delta, prev)  # no momentum across a restart
            if stalled.any():  # restarted images need the gradient at their best point
                f_best, g_best, _ = loss_and_grad(delta)
                grad = torch.where(stalled.view(-1, *[1] * (x.dim() - 1)), g_best, grad)
                f = torch.where(stalled, f_best, f)
            raised.zero_()
            eta_at_mark, best_at_mark, last_mark = eta.clone(), best_f.clone(), k + 1
    return fooled
