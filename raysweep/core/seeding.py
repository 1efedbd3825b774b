"""Seeded random streams. Every random draw in raysweep (data orders, initial perturbations, JR
projections, PDD dropout) comes from a generator keyed by (seed, purpose, ...), so runs repeat
exactly and every executor consumes the same numbers in the same order."""
from __future__ import annotations

import numpy as np
import torch


def generator(*key, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded from a tuple key (ints and strings)."""
    words = [k if isinstance(k, int) else int.from_bytes(str(k).encode()[:8].ljust(8, b"\0"), "little") for k in key]
    seed = int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


class Repeated:
    """N identical random streams held as one: a draw of shape [N*M, ...] is one draw of [M, ...] from
    `base`, repeated N times along dim 0. N trials of one seed packed into one step of N x M members
    (training/pack.py) so draw exactly what each draws alone."""

    def __init__(self, base: torch.Generator, n: int):
        self.base, self.n = base, n

    @property
    def device(self) -> torch.device:
        return self.base.device


def _draw(fn, like: torch.Tensor, gen, shape) -> torch.Tensor:
    shape = tuple(shape or like.shape)
    if isinstance(gen, Repeated):
        if shape[0] % gen.n:
            raise ValueError(f"a draw of {shape[0]} rows cannot be split among {gen.n} packed trials")
        one = _draw(fn, like, gen.base, (shape[0] // gen.n, *shape[1:]))
        return one.repeat(gen.n, *[1] * (len(shape) - 1))
    device = gen.device if gen is not None else like.device
    return fn(shape, generator=gen, device=device).to(like)


def rand_like(like: torch.Tensor, gen: torch.Generator | Repeated | None, shape=None) -> torch.Tensor:
    """Uniform [0,1) of like's dtype and device, drawn on the generator's device (no host copy
    when the generator lives with the members)."""
    return _draw(torch.rand, like, gen, shape)


def randn_like(like: torch.Tensor, gen: torch.Generator | Repeated | None, shape=None) -> torch.Tensor:
    return _draw(torch.randn, like, gen, shape)
