"""eval.protocol: an escalation ladder of attacks, each attacking only the images every earlier one
left robust (per-image flags), so its figure is the per-image worst case over all of them, and
every image broken is charged to the stage that broke it first.

  quick     pgd        PGD-20 on the averaged probabilities (ce_prob)
  standard  pgd        PGD-50 (ce_prob)
            cw         PGD-50 on the margin of the ensemble's own combine scores (hard vote, median)
            mora       PGD-50, ensemble-adaptive: members re-weighted per image (core/objectives.py)
            minmax     PGD-50, ensemble-adaptive: soft minimum of the members' losses
            member-dlr PGD-50, ensemble-adaptive: each member's DLR loss on its own logits (scale-free:
                       members whose softmax saturates still have a gradient)
            apgd-ce    APGD-CE, 100 iterations (attacks/apgd.py)
            apgd-dlr   APGD-DLR, 100 iterations (scale-free: sees through saturated softmaxes)
  strong    the standard stages, then
            pgd-long   PGD-200 (ce_prob) on the survivors: do more steps still break images?
            fmn        minimum-norm FMN-100 (attacks/minnorm.py), once for every eps
            square     Square, query-only (attacks/square.py for l_inf; ART's for l2)
            transfer   PGD-50 crafted on the plain average of the same members (uniform weights;
                       the logit average when the target is the plain probability average)

Results protocol_acc/<level>/<eps> (a sweep may maximise them). The details hold, per eps, the
accuracy after each stage, the images each stage broke, its seconds and its forward passes (images;
`with_grad` counts those that recorded a graph for a backward), and per image the index of the
stage that broke it (-1: robust, -2: misclassified clean).

The strong level also checks for gradient masking: the masking checks (evaluation/masking.py) run
after it with their defaults when eval.masking_checks is off, and a query-only or transfer stage
that breaks more images than noise allows after every white-box stage raises
blackbox_beats_whitebox:<stage>/<eps>; pgd-long doing the same raises not_converged:protocol/<eps>.
"""
from __future__ import annotations

import time
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from raysweep.attacks.apgd import apgd
from raysweep.attacks.minnorm import fmn
from raysweep.attacks.pgd import attack_batch, default_step_size, predict
from raysweep.attacks.square import square_linf
from raysweep.core.ensemble import uniform_weights
from raysweep.core.sections import EpsGrid, Section
from raysweep.core.seeding import generator
from raysweep.evaluation.base import Evaluation, register
from raysweep.evaluation.masking import MaskingChecks, MaskingConfig, beyond_noise
from raysweep.evaluation.report import eps_key

_STANDARD = ["pgd", "cw", "mora", "minmax", "member-dlr", "apgd-ce", "apgd-dlr"]
LEVELS = {"quick": ["pgd"], "standard": _STANDARD, "strong": _STANDARD + ["pgd-long", "fmn", "square", "transfer"]}
BLACK_BOX = ("square", "transfer")
PGD_OBJECTIVE = {"pgd": "ce_prob", "pgd-long": "ce_prob", "cw": "cw_margin", "mora": "mora", "minmax": "minmax_ce",
                 "member-dlr": "member_dlr"}


class ProtocolConfig(Section):
    level: Literal[tuple(LEVELS)] = "standard"
    eps: EpsGrid
    norm: Literal["linf", "l2"] = "linf"
    samples: Optional[int] = Field(1000, ge=1, description="first N test images; null = all")
    steps: Optional[int] = Field(None, ge=1, description="PGD steps per stage; null = 20 quick, 50 otherwise "
                                 "(pgd-long: 4x)")
    square_queries: int = Field(1000, ge=1)
    fmn_steps: int = Field(100, ge=1)
    apgd_iterations: int = Field(100, ge=1)


class Passes:
    """Forward passes in images, and those that recorded a graph (each followed by one backward)."""

    def __init__(self):
        self.forward, self.with_grad = 0, 0

    def count(self, x: torch.Tensor, out: torch.Tensor) -> None:
        self.forward += len(x)
        self.with_grad += len(x) if out.requires_grad else 0


def _stage(name, c: ProtocolConfig, ctx, x, y, eps, steps, gen, counted_fn, art) -> torch.Tensor:
    """Which of the images (x, y) stage `name` fools at eps [B]."""
    if name in PGD_OBJECTIVE:
        n = steps * 4 if name == "pgd-long" else steps
        return attack_batch(counted_fn, x, y, ctx.weights, PGD_OBJECTIVE[name], eps, c.norm, n,
                            default_step_size(eps, n), True, "sign", ctx.how, gen)[1]
    if name == "transfer":
        k = ctx.weights.numel()
        plain = uniform_weights(k).to(ctx.device)
        source = "logit" if ctx.how == "probability" and torch.allclose(ctx.weights, plain) else "probability"
        x_adv, _ = attack_batch(counted_fn, x, y, plain, "ce_prob" if source == "probability" else "ce_logit", eps,
                                c.norm, steps, default_step_size(eps, steps), True, "sign", source, gen,
                                keep_last=True)
        return predict(counted_fn, x_adv, ctx.weights, ctx.how) != y
    if name in ("apgd-ce", "apgd-dlr"):
        if name == "apgd-dlr" and ctx.data.num_classes < 3:  # DLR needs a third class
            return torch.zeros_like(y, dtype=torch.bool)
        return apgd(counted_fn, x, y, ctx.weights, ctx.how, name[5:], eps, c.norm, c.apgd_iterations, gen)
    if c.norm == "linf":  # square
        return square_linf(counted_fn, x, y, ctx.weights, ctx.how, eps, c.square_queries, generator=gen)
    from raysweep.attacks.library import AutoAttackConfig, make_attack  # ART's Square for l2

    clf, cfg = art, AutoAttackConfig(eps=[eps], norm=c.norm, square_queries=c.square_queries)
    x_adv = make_attack(name, clf, eps, cfg, len(y)).generate(x.cpu().numpy(), y=y.cpu().numpy())
    return torch.from_numpy(clf.predict(x_adv, batch_size=len(y)).argmax(1) != y.cpu().numpy()).to(y.device)


@register
class Protocol(Evaluation):
    key, Config = "protocol", Optional[ProtocolConfig]

    @classmethod
    def names(cls, c, eval_cfg, k) -> list[str]:
        return [f"protocol_acc/{c.level}/{eps_key(e)}" for e in c.eps]

    @classmethod
    def flagged(cls, c) -> set[tuple[str, float]]:
        return {(c.norm, float(e)) for e in c.eps}

    def run(self, ctx, report) -> None:
        c, bs = self.cfg, ctx.cfg.eval.batch_size
        split = ctx.data.test.head(c.samples)
        x_all, y_all = split.batch(torch.arange(len(split)), ctx.device)
        steps = c.steps or (20 if c.level == "quick" else 50)
        stages = LEVELS[c.level]
        passes = {s: Passes() for s in stages}
        clean = torch.cat([predict(ctx.stacked_fn, x_all[i:i + bs], ctx.weights, ctx.how) == y_all[i:i + bs]
                           for i in range(0, len(y_all), bs)])
        broken_by = {e: torch.where(clean, -1, -2) for e in c.eps}  # per image: the stage that broke it
        seconds = {e: {} for e in c.eps}
        art, hook = _art(ctx, passes) if "square" in stages and c.norm == "l2" else (None, None)
        total = len(stages) * len(c.eps)
        with tqdm(total=total, desc=f"protocol {c.level}", unit="stage", disable=not ctx.progress, leave=False) as bar:
            for i, name in enumerate(stages):
                if art is not None:
                    art.stage = name

                def counted_fn(x, _p=passes[name]):
                    out = ctx.stacked_fn(x)
                    _p.count(x, out)
                    return out

                if name == "fmn":  # one run gives every eps: attack the images robust at any of them
                    t0 = time.perf_counter()
                    idx = torch.stack([broken_by[e] == -1 for e in c.eps]).any(0).nonzero().squeeze(1)
                    norms = torch.cat([fmn(counted_fn, x_all[j], y_all[j], ctx.weights, ctx.how, c.norm, c.fmn_steps)
                                       for j in idx.split(bs)]) if len(idx) else torch.zeros(0)
                    share = (time.perf_counter() - t0) / len(c.eps)  # one run, charged equally to every eps
                    for e in c.eps:
                        hit = idx[(norms <= e) & (broken_by[e][idx] == -1)]
                        broken_by[e][hit] = i
                        seconds[e][name] = share
                    bar.update(len(c.eps))
                    continue
                for e in c.eps:
                    t0 = time.perf_counter()
                    idx = (broken_by[e] == -1).nonzero().squeeze(1)
                    if e > 0 and len(idx):
                        gen = generator(ctx.cfg.seed, "protocol", name, str(e))
                        fooled = torch.cat([_stage(name, c, ctx, x_all[j], y_all[j], e, steps, gen, counted_fn, art)
                                            for j in idx.split(bs)])
                        broken_by[e][idx[fooled]] = i
                    seconds[e][name] = time.perf_counter() - t0
                    bar.update(1)
        if hook is not None:
            hook.remove()
        self._report(ctx, report, c, stages, broken_by, seconds, passes, len(y_all))

    def _report(self, ctx, report, c, stages, broken_by, seconds, passes, n) -> None:
        per_eps, flags, curve = {}, {}, {}
        white = [s for s in stages if s not in BLACK_BOX]
        for e in c.eps:
            b = broken_by[e]
            after, left = {}, (b == -1) | (b >= 0)  # robust before stage i: clean and not yet broken
            for i, s in enumerate(stages):
                left = left & (b != i)
                after[s] = left.sum().item() / n
            robust = b == -1
            acc = robust.sum().item() / n
            curve[eps_key(e)] = acc
            report.add(f"protocol_acc/{c.level}/{eps_key(e)}", acc, attack=f"protocol:{c.level}",
                       objective="+".join(stages), norm=c.norm, eps=e, images=n)
            report.robust_flags(c.norm, e, f"protocol:{c.level}", robust.cpu())
            per_eps[eps_key(e)] = {"acc": acc, "after": after, "seconds": seconds[e],
                                   "broken": {s: int((b == i).sum()) for i, s in enumerate(stages)},
                                   "image_broken_by": b.tolist()}
            if c.level == "strong":
                white_acc = after[white[-1]]
                for s in BLACK_BOX:
                    if s in after and beyond_noise(after[s], white_acc, n):
                        flags[f"blackbox_beats_whitebox:{s}/{eps_key(e)}"] = (
                            f"{s} broke {per_eps[eps_key(e)]['broken'][s]} of the images every white-box stage "
                            f"left robust ({white_acc:.4f} -> {after[s]:.4f})")
                before = after[stages[stages.index("pgd-long") - 1]]
                if beyond_noise(after["pgd-long"], before, n):
                    flags[f"not_converged:protocol/{eps_key(e)}"] = (
                        f"PGD with 4x the steps broke {per_eps[eps_key(e)]['broken']['pgd-long']} more images")
        for name, why in flags.items():
            report.flag(name, why)
        report.details.setdefault("robust_acc", {})[f"protocol:{c.level}"] = curve
        report.details["protocol"] = {
            "level": c.level, "norm": c.norm, "stages": stages, "images": n, "per_eps": per_eps,
            "passes": {s: {"forward": p.forward, "with_grad": p.with_grad} for s, p in passes.items()}}
        if c.level == "strong" and not ctx.cfg.eval.masking_checks:
            MaskingChecks(MaskingConfig()).run(ctx, report)


def _art(ctx, passes):
    """ART's classifier over the ensemble module, its forward passes charged to the running stage."""
    from raysweep.attacks.library import art_classifier

    clf = art_classifier(ctx.model, ctx.data.image_shape, ctx.data.num_classes, ctx.device)
    clf.stage = None
    hook = ctx.model.register_forward_hook(lambda m, inp, out: passes[clf.stage].count(inp[0], out)
                                           if clf.stage in passes else None)
    np.random.seed(ctx.cfg.seed)  # ART draws its random starts from numpy's global stream
    return clf, hook
