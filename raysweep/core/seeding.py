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


def _device(gen: torch.Generator | None, like: torch.Tensor) -> torch.device:
    return gen.device if gen is not None else like.device


def rand_like(like: torch.Tensor, gen: torch.Generator | None, shape=None) -> torch.Tensor:
    """Uniform [0,1) of like's dtype and device, drawn on the generator's device (no host copy
    when the generator lives with the members)."""
    out = torch.rand(shape or like.shape, generator=gen, device=_device(gen, like))
    return out.to(like)


def randn_like(like: torch.Tensor, gen: torch.Generator | None, shape=None) -> torch.Tensor:
    out = torch.randn(shape or like.shape, generator=gen, device=_device(gen, like))
    return out.to(like)
