"""SGD-UAP (the Jacobian Ensembles paper): one perturbation for all inputs, many random starts optimised
together as one batch, worst case kept.

All seeds see the same crafting batches and differ by their random start, so the batched run
gives each seed exactly the delta it would get alone (tests check this) at a fraction of the cost.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, model_validator

from raysweep.attacks.steps import Ascent
from raysweep.core.data import Split, eval_batches
from raysweep.core.ensemble import combine
from raysweep.core.objectives import OBJECTIVES, get_objective
from raysweep.core.sections import EpsGrid, Section
from raysweep.core.seeding import generator


class UAPConfig(Section):
    eps: EpsGrid = [0.10, 0.15, 0.20, 0.25]
    seeds: int = Field(50, ge=1)
    iterations: int = Field(100, ge=1)
    batch_size: int = Field(200, ge=1)
    step_size: Optional[float] = Field(None, gt=0, description="the sign step (with step_rule adam: Adam's "
                                       "learning rate), the same at every eps; null: step_fraction * eps, or eps/20 "
                                       "if that is null too")
    # eps/20 crosses the ball in 20 of the 100 iterations. The SGD-UAP code of the Jacobian Ensembles
    # paper's first author (sgd-uap-torch) steps 0.8 eps, which docs/RESULTS.md measured as 0.02 stronger in
    # mean UAP accuracy on this project's Fashion-MNIST LeNets: step_fraction 0.8 takes that step (its
    # start differs: zero there, random points of the ball here).
    step_fraction: Optional[float] = Field(None, gt=0, le=2, description="step = step_fraction * eps at each eps; "
                                           "null: eps / 20")
    step_rule: Literal["sign", "adam"] = "sign"
    objective: Literal[tuple(OBJECTIVES)] = "ce_prob"
    craft_on: Literal["train", "test"] = Field("train", description="which split's batches craft the UAP")
    selection_size: int = Field(1000, ge=1, description="crafting images used to pick the worst-case seed")

    @model_validator(mode="after")
    def _one_step_rule(self):
        if self.step_size is not None and self.step_fraction is not None:
            raise ValueError(f"give step_size ({self.step_size}) or step_fraction ({self.step_fraction}), not both: "
                             "one is a fixed step, the other a fraction of each eps")
        return self

    def step(self, eps: float) -> float:
        """The sign step at eps (eps / 20 is computed as such: runs made before step_fraction stay bit-exact)."""
        if self.step_size is not None:
            return self.step_size
        return eps * self.step_fraction if self.step_fraction is not None else eps / 20


def uap_init(seeds: int, image_shape, eps: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand((seeds, *image_shape), generator=generator) * 2 - 1) * eps


def seeds_per_forward(seeds: int, batch_size: int, device, images: int | None = None) -> int:
    """How many seeds share one forward pass. On CPU a forward over more than a few hundred
    images falls out of cache and costs more per image than several small ones (see
    benchmarks/bench_uap.py), so seeds are chunked there; on CUDA all seeds go at once."""
    if images is None:
        images = 1 << 30 if torch.device(device).type == "cuda" else 256
    return max(1, min(seeds, images // batch_size))


def sgd_uap(stacked_fn, craft: Split, init: torch.Tensor, eps: float, iterations: int, batch_size: int,
            step_size: float, objective: str, weights, how: str, step_rule: str = "sign",
            generator: torch.Generator | None = None, device="cpu", progress=None,
            chunk: int | None = None, state: dict | None = None, on_state=None) -> torch.Tensor:
    """Deltas [S,C,H,W] maximising sum_i L(F(clip(x_i + delta_s, 0, 1)), y_i) for each seed s.
    `chunk` seeds share a forward pass (default: seeds_per_forward).

    `on_state(get_state)` is called after each iteration; get_state() returns everything the loop carries
    (the deltas, the crafting order and position, the generator's state, Adam's moments), built only
    when asked for (the caller saves now and then). Given back as `state`, the loop continues from there
    exactly as if it had not stopped (init is then ignored)."""
    if (state is not None or on_state is not None) and generator is None:
        raise ValueError("sgd_uap: a run that saves or continues its state needs its own generator")
    loss_fn = get_objective(objective)
    ascent = Ascent(step_rule, "linf", step_size)
    if state is None:
        deltas, first = init.to(device).clone(), 0
        order, pos = torch.randperm(len(craft), generator=generator), 0
    else:
        deltas, first = state["deltas"].to(device), state["iteration"]
        order, pos = state["order"], state["pos"]
        generator.set_state(state["generator"])
        ascent.load_state_dict(state.get("ascent", {}), device)
        if progress is not None:
            progress.update(first)
    chunk = chunk or seeds_per_forward(deltas.shape[0], batch_size, device)
    for it in range(first, iterations):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(craft), generator=generator), 0
        x, y = craft.batch(order[pos:pos + batch_size], device)
        pos += batch_size
        grad = torch.empty_like(deltas)
        for c in range(0, deltas.shape[0], chunk):
            d = deltas[c:c + chunk].detach().requires_grad_(True)
            x_adv = (x.unsqueeze(0) + d.unsqueeze(1)).clamp(0, 1).flatten(0, 1)  # [S*B,...]
            loss = loss_fn(stacked_fn(x_adv), y.repeat(d.shape[0]), weights, how).sum()
            (grad[c:c + chunk],) = torch.autograd.grad(loss, d)
        with torch.no_grad():
            deltas = ascent(deltas.detach(), grad).clamp(-eps, eps)
        if progress is not None:
            progress.update(1)
        if on_state is not None and it + 1 < iterations:
            on_state(lambda it=it, deltas=deltas, order=order, pos=pos: {
                "iteration": it + 1, "deltas": deltas.cpu(), "order": order, "pos": pos,
                "generator": generator.get_state(), "ascent": ascent.state_dict()})
    return deltas.detach()


@torch.no_grad()
def uap_accuracy(stacked_fn, split: Split, deltas: torch.Tensor, weights, how: str, batch_size: int,
                 device) -> torch.Tensor:
    """Accuracy of each delta [S] on split."""
    correct = torch.zeros(deltas.shape[0], dtype=torch.long, device=device)
    per = max(1, batch_size // deltas.shape[0])
    for x, y in eval_batches(split, per, device):
        x_adv = (x.unsqueeze(0) + deltas.unsqueeze(1)).clamp(0, 1).flatten(0, 1)
        pred = combine(stacked_fn(x_adv), weights, how).argmax(1).view(deltas.shape[0], -1)
        correct += (pred == y).sum(1)
    return correct.double() / len(split)


def evaluate_uap(stacked_fn, craft: Split, test: Split, cfg: UAPConfig, weights, how: str, batch_size: int,
                 device, seed: int = 0, progress=None, done: dict | None = None, on_eps=None,
                 started: dict | None = None, on_state=None) -> dict:
    """Per eps: craft cfg.seeds UAPs, keep the one with the highest attack success on
    cfg.selection_size crafting images, report its accuracy on the whole test split.
    Each eps draws from its own generator, so an eps may be computed apart from the others: `done`
    ({eps: (acc, delta)}) holds the ones an earlier, interrupted evaluation finished (skipped here), and
    `on_eps(eps, acc, delta)` is called as each of the others ends. Within an eps, `on_state(eps, get_state)`
    passes on sgd_uap's after each iteration, and `started` ({eps: state}) continues from one."""
    acc, chosen = {}, {}
    select = craft.head(cfg.selection_size)
    for eps in cfg.eps:
        if done and eps in done:
            acc[eps], chosen[eps] = done[eps]
            if progress is not None:
                progress.update(cfg.iterations)
            continue
        gen = generator(seed, "uap", str(eps))
        init = uap_init(cfg.seeds, craft.x.shape[1:], eps, gen)
        deltas = sgd_uap(stacked_fn, craft, init, eps, cfg.iterations, cfg.batch_size, cfg.step(eps),
                         cfg.objective, weights, how, cfg.step_rule, gen, device, progress,
                         state=(started or {}).get(eps),
                         on_state=None if on_state is None else lambda get, eps=eps: on_state(eps, get))
        best = uap_accuracy(stacked_fn, select, deltas, weights, how, batch_size, device).argmin()
        chosen[eps] = deltas[best].cpu()
        acc[eps] = uap_accuracy(stacked_fn, test, deltas[best:best + 1], weights, how, batch_size, device).item()
        if on_eps is not None:
            on_eps(eps, acc[eps], chosen[eps])
    return {"acc": acc, "deltas": chosen}
