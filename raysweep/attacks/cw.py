"""Carlini & Wagner L2 (2017), untargeted, against the ensemble's scores.

Minimise ||x' - x||_2^2 + c * max(Z_y - max_{i != y} Z_i, -kappa) over x' = (tanh(w) + 1) / 2
(always in [0,1]) with Adam, and binary-search c per sample; keep each sample's smallest
successful perturbation. Z are the ensemble's scores (log of averaged probabilities, or averaged
logits), as in the cw_margin objective. Written here because ART's implementation took minutes
per 100 images on 2 CPU cores; this one is batched.
"""
from __future__ import annotations

import torch
from pydantic import Field

from raysweep.core.data import Split, eval_batches
from raysweep.core.ensemble import combine
from raysweep.core.objectives import cw_margin
from raysweep.core.sections import Section


class CWL2Config(Section):
    """Carlini & Wagner L2 (attacks/cw.py); the PDD + DEG paper: learning rate 0.001, 1000 steps."""
    learning_rate: float = Field(0.001, gt=0)
    max_iter: int = Field(1000, ge=1)
    binary_search_steps: int = Field(5, ge=1)
    initial_const: float = Field(0.01, gt=0)
    confidence: float = Field(0.0, ge=0)
    samples: int = Field(200, ge=1)


def cw_l2_batch(stacked_fn, x, y, weights, how, cfg: CWL2Config):
    """(x_adv, success [B], l2 [B]) with x_adv = x where the attack failed."""
    b = len(y)
    w0 = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))
    const = torch.full((b,), cfg.initial_const, device=x.device)
    lower, upper = torch.zeros(b, device=x.device), torch.full((b,), 1e10, device=x.device)
    best_l2 = torch.full((b,), float("inf"), device=x.device)
    best = x.clone()
    for _ in range(cfg.binary_search_steps):
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=cfg.learning_rate)
        found = torch.zeros(b, dtype=torch.bool, device=x.device)
        for _ in range(cfg.max_iter):
            x_adv = (torch.tanh(w) + 1) / 2
            stacked = stacked_fn(x_adv)
            l2 = (x_adv - x).flatten(1).pow(2).sum(1)
            # cw_margin is max_{i != y} Z_i - Z_y: C&W minimises its negative, floored at -kappa
            f = (-cw_margin(stacked, y, weights, how)).clamp_min(-cfg.confidence)
            loss = (l2 + const * f).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                wrong = combine(stacked, weights, how).argmax(1) != y
                better = wrong & (l2 < best_l2)
                best_l2 = torch.where(better, l2, best_l2)
                best[better] = x_adv[better].detach()
                found |= wrong
        # success: try a smaller c; failure: a larger one
        upper = torch.where(found, torch.minimum(upper, const), upper)
        lower = torch.where(found, lower, torch.maximum(lower, const))
        const = torch.where(upper < 1e9, (lower + upper) / 2, const * 10)
    success = torch.isfinite(best_l2)
    return best, success, best_l2.sqrt()


def cw_l2(stacked_fn, split: Split, cfg: CWL2Config, weights, how: str, batch_size: int, device) -> dict:
    split = split.head(cfg.samples)
    n = len(split)
    correct, dists = 0, []
    for x, y in eval_batches(split, batch_size, device):
        with torch.no_grad():
            clean_ok = combine(stacked_fn(x), weights, how).argmax(1) == y
        _, success, l2 = cw_l2_batch(stacked_fn, x, y, weights, how, cfg)
        correct += (clean_ok & ~success).sum().item()
        dists.append(l2[success & clean_ok].cpu())
    dists = torch.cat(dists)
    return {"acc": correct / n, "mean_l2_of_successes": dists.mean().item() if len(dists) else None,
            "samples": n, "implementation": "raysweep (batched)"}
