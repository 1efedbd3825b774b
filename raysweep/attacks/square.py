"""Square (Andriushchenko et al., "Square Attack: a query-efficient black-box adversarial attack via
random search", ECCV'20), l_inf, over raysweep's stacked member logits, batched in PyTorch: it needs
only the ensemble's scores (no gradient), so gradient masking cannot stop it.

Start from vertical stripes of +-eps (one sign per image, channel and column); then, per query and
per image still robust, redraw a random square window of the perturbation as +-eps per channel and
keep it if the margin z_y - max_{j != y} z_j of the ensemble's combine scores falls. The window's
share of the image starts at p_init and halves on the paper's schedule (at 10, 50, 200, 500, 1000,
2000, 4000, 6000 and 8000 of 10000 queries, rescaled to the budget). An image counts as fooled
as soon as any query fools it.
"""
from __future__ import annotations

import math

import torch

from raysweep.core.ensemble import combine
from raysweep.core.objectives import cw_margin
from raysweep.core.seeding import rand_like

_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def window_share(p_init: float, query: int, queries: int) -> float:
    """The share of the image a window covers at `query` of `queries`."""
    at = query * 10000 / queries
    return p_init / 2 ** sum(at > h for h in _HALVINGS)


@torch.no_grad()
def square_linf(stacked_fn, x: torch.Tensor, y: torch.Tensor, weights, how: str = "probability", eps: float = 0.1,
                queries: int = 1000, p_init: float = 0.8, generator=None) -> torch.Tensor:
    """Which images [B] some query fooled (the ensemble misclassified)."""
    b, c, h, w = x.shape

    def signs(shape):
        return torch.where(rand_like(x, generator, shape) < 0.5, -eps, eps)

    x_adv = (x + signs((b, c, 1, w))).clamp(0, 1)
    margin, fooled = _margin(stacked_fn, x_adv, y, weights, how)
    rows = torch.arange(h, device=x.device).view(1, 1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, 1, w)
    for q in range(queries):
        todo = (~fooled).nonzero().squeeze(1)
        if len(todo) == 0:
            break
        n = len(todo)
        side = min(max(round(math.sqrt(window_share(p_init, q, queries) * h * w)), 1), h - 1)
        top = (rand_like(x, generator, (n,)) * (h - side + 1)).long().clamp(max=h - side).view(n, 1, 1, 1)
        left = (rand_like(x, generator, (n,)) * (w - side + 1)).long().clamp(max=w - side).view(n, 1, 1, 1)
        window = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
        x0, delta = x[todo], x_adv[todo] - x[todo]
        delta = torch.where(window, signs((n, c, 1, 1)), delta)
        candidate = (x0 + delta).clamp(0, 1)
        m, now = _margin(stacked_fn, candidate, y[todo], weights, how)
        better = m < margin[todo]
        x_adv[todo[better]] = candidate[better]
        margin[todo[better]] = m[better]
        fooled[todo[now]] = True
    return fooled


def _margin(stacked_fn, x_adv, y, weights, how):
    """(the margin z_y - max other of the combine scores, whether the image is misclassified)."""
    stacked = stacked_fn(x_adv)
    return -cw_margin(stacked, y, weights, how), combine(stacked, weights, how).argmax(1) != y
