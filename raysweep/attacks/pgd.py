"""PGD: the one projected-gradient-ascent loop of raysweep (`ascend`), its random starts and its
default step size, used by the evaluation attacks here (FGSM, BIM/IFGSM and PGD against an
ensemble, l_inf or l2, with restarts) and by adversarial training (attacks/adversarial.py:
Ensemble-Adv, Madry, meta-composites). UAP (uap.py) optimises one perturbation over many batches
and shares only the steps and projections (steps.py).

In evaluation a sample counts as broken as soon as any iterate of any restart of any objective is
misclassified (every iterate is a valid adversarial example), so robust accuracy never rises
with more steps or restarts under the same seed: AutoAttack's per-sample robust flags.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field

from raysweep.attacks.steps import Ascent, project, random_start
from raysweep.core.data import eval_batches
from raysweep.core.ensemble import combine
from raysweep.core.objectives import OBJECTIVES, get_objective
from raysweep.core.sections import EpsGrid, Section
from raysweep.core.seeding import generator, randn_like


class AttackConfig(Section):
    name: str
    kind: Literal["fgsm", "bim", "pgd"] = "pgd"
    norm: Literal["linf", "l2"] = "linf"
    eps: EpsGrid
    steps: int = Field(10, ge=1)
    step_size: Optional[float] = Field(None, gt=0, description="null: 2.5*eps/steps for pgd, eps/steps for bim")
    restarts: int = Field(1, ge=1)
    random_start: Optional[bool] = Field(None, description="null: true for pgd, false for fgsm/bim")
    step_rule: Literal["sign", "adam"] = "sign"
    objectives: list[Literal[tuple(OBJECTIVES)]] = Field(["ce_prob"], min_length=1)
    double_steps: bool = Field(False, description="double the steps until robust accuracy stops falling "
                               "(Grefenstette et al.'s rule against false robustness); reports convergence")
    max_steps: int = Field(640, ge=1, description="cap for double_steps")


def default_step_size(eps, steps: int):
    """2.5 * eps / steps (Madry et al.): enough to cross the ball and come back; eps may be a tensor."""
    return 2.5 * eps / steps


def start_delta(x: torch.Tensor, eps, norm: str, kind: str, generator: torch.Generator | None,
                sigma: float | None = None) -> torch.Tensor:
    """The first perturbation: none (zeros), uniform (in the eps ball and the image box), or gaussian
    N(0, sigma^2 I), sigma = eps / 2 by default, left unprojected: Ensemble-Adv's x~0 = x + N(0, sigma^2 I),
    which the first step's projection brings into the ball."""
    if kind == "gaussian":
        return (sigma if sigma is not None else eps / 2) * randn_like(x, generator)
    if kind == "uniform":
        return project(random_start(x, eps, norm, generator), x, eps, norm)
    return torch.zeros_like(x)


def ascend(forward, loss, x: torch.Tensor, delta: torch.Tensor, eps, norm: str, steps: int, step_size,
           rule: str = "sign", watch=None) -> torch.Tensor:
    """`steps` projected ascent steps on loss(forward(x + delta)) from `delta`; returns the last
    iterate x + delta. Each step is a sign (l_inf) / normalised (l2) or Adam step, projected onto the
    eps ball (eps may be a per-sample tensor [N,1,...]) and the image box [0,1]. `watch(x_adv, out)`
    sees every iterate, the start and the last included, with the forward output it was scored by
    (per-sample robust flags); without it the last iterate is not scored (one forward saved)."""
    ascent = Ascent(rule, norm, step_size)
    for it in range(steps + 1):
        if it == steps and watch is None:
            break
        delta = delta.detach().requires_grad_(True)
        out = forward(x + delta)
        if watch is not None:
            watch((x + delta).detach(), out.detach())
        if it == steps:
            break
        (grad,) = torch.autograd.grad(loss(out), delta)
        delta = project(ascent(delta.detach(), grad), x, eps, norm)
    return (x + delta).detach()


def attack_params(cfg: AttackConfig, eps: float) -> tuple[int, float, bool]:
    """(steps, step size, random start) of an attack kind, with the usual defaults."""
    if cfg.kind == "fgsm":
        return 1, cfg.step_size or eps, bool(cfg.random_start)
    default_step = eps / cfg.steps if cfg.kind == "bim" else default_step_size(eps, cfg.steps)
    start = cfg.random_start if cfg.random_start is not None else cfg.kind == "pgd"
    return cfg.steps, cfg.step_size or default_step, start


def attack_batch(stacked_fn, x, y, weights, objective: str, eps: float, norm: str = "linf", steps: int = 10,
                 step_size: float | None = None, start: bool = True, step_rule: str = "sign",
                 how: str = "probability", generator: torch.Generator | None = None, keep_last: bool = False):
    """One attack run. Returns (x_adv, fooled [B]): x_adv holds, per sample, the first iterate
    that fooled the ensemble, or the last iterate when none did (always the last with keep_last,
    which transfers better: it is pushed further past the decision boundary)."""
    loss_fn = get_objective(objective)
    x = x.detach()
    delta = start_delta(x, eps, norm, "uniform" if start and eps > 0 else "none", generator)
    fooled = torch.zeros(len(y), dtype=torch.bool, device=x.device)
    best = x.clone()

    def watch(x_adv, stacked):
        wrong = combine(stacked, weights, how).argmax(1) != y
        newly = wrong & ~fooled
        best[newly] = x_adv[newly]
        fooled.logical_or_(wrong)

    last_iterate = ascend(stacked_fn, lambda stacked: loss_fn(stacked, y, weights, how).sum(), x, delta, eps, norm,
                          steps if eps > 0 else 0, step_size if step_size is not None else
                          default_step_size(eps, steps), step_rule, watch)
    last = ~fooled if not keep_last else torch.ones_like(fooled)
    best[last] = last_iterate[last]
    return best, fooled


@torch.no_grad()
def predict(stacked_fn, x, weights, how):
    return combine(stacked_fn(x), weights, how).argmax(1)


def robust_accuracy(stacked_fn, split, cfg: AttackConfig, eps: float, weights, how: str, batch_size: int,
                    device, seed: int = 0, progress=None) -> tuple[float, torch.Tensor]:
    """Accuracy under the attack at eps; a sample is robust only if it is classified correctly
    and survives every restart of every objective. Returns (accuracy, robust flags [N])."""
    steps, step_size, start = attack_params(cfg, eps)
    gen = generator(seed, "attack", cfg.name, str(eps))
    flags = []
    for x, y in eval_batches(split, batch_size, device):
        robust = predict(stacked_fn, x, weights, how) == y
        for objective in cfg.objectives:
            for _ in range(cfg.restarts):
                idx = robust.nonzero().squeeze(1)
                if len(idx) == 0 or eps == 0:
                    break
                _, fooled = attack_batch(stacked_fn, x[idx], y[idx], weights, objective, eps, cfg.norm, steps,
                                         step_size, start, cfg.step_rule, how, gen)
                robust[idx[fooled]] = False
        flags.append(robust.cpu())
        if progress is not None:
            progress.update(len(y))
    flags = torch.cat(flags)
    return flags.sum().item() / len(flags), flags
