"""FGSM, BIM (IFGSM) and PGD against an ensemble, l_inf or l2, with restarts.

A sample counts as broken as soon as any iterate of any restart of any objective is
misclassified (every iterate is a valid adversarial example), so robust accuracy never rises
with more steps or restarts under the same seed: AutoAttack's per-sample robust flags.
"""
from __future__ import annotations

import torch

from raysweep.core.objectives import get_objective
from raysweep.config.schema import AttackConfig
from raysweep.core.data import eval_batches
from raysweep.core.seeding import generator
from raysweep.core.ensemble import combine
from raysweep.attacks.steps import Ascent, project, random_start


def attack_params(cfg: AttackConfig, eps: float) -> tuple[int, float, bool]:
    """(steps, step size, random start) of an attack kind, with the usual defaults."""
    if cfg.kind == "fgsm":
        return 1, cfg.step_size or eps, bool(cfg.random_start)
    default_step = eps / cfg.steps if cfg.kind == "bim" else 2.5 * eps / cfg.steps
    start = cfg.random_start if cfg.random_start is not None else cfg.kind == "pgd"
    return cfg.steps, cfg.step_size or default_step, start


def attack_batch(stacked_fn, x, y, weights, objective: str, eps: float, norm: str = "linf", steps: int = 10,
                 step_size: float | None = None, start: bool = True, step_rule: str = "sign",
                 how: str = "probability", generator: torch.Generator | None = None, keep_last: bool = False):
    """One attack run. Returns (x_adv, fooled [B]): x_adv holds, per sample, the first iterate
    that fooled the ensemble, or the last iterate when none did (always the last with keep_last,
    which transfers better: it is pushed further past the decision boundary)."""
    loss_fn = get_objective(objective)
    step_size = step_size if step_size is not None else 2.5 * eps / steps
    x = x.detach()
    delta = random_start(x, eps, norm, generator) if start and eps > 0 else torch.zeros_like(x)
    delta = project(delta, x, eps, norm)
    ascent = Ascent(step_rule, norm, step_size)
    fooled = torch.zeros(len(y), dtype=torch.bool, device=x.device)
    best = x.clone()
    for it in range(steps + 1):
        delta.requires_grad_(True)
        stacked = stacked_fn(x + delta)
        with torch.no_grad():
            wrong = combine(stacked, weights, how).argmax(1) != y
            newly = wrong & ~fooled
            best[newly] = (x + delta)[newly]
            fooled |= wrong
        if it == steps or eps == 0:
            break
        (grad,) = torch.autograd.grad(loss_fn(stacked, y, weights, how).sum(), delta)
        with torch.no_grad():
            delta = project(ascent(delta.detach(), grad), x, eps, norm)
    last = ~fooled if not keep_last else torch.ones_like(fooled)
    best[last] = (x + delta.detach())[last]
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
