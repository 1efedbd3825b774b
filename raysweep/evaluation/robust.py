"""eval.attacks: robust accuracy under FGSM, BIM and PGD (attacks/pgd.py) per attack and eps,
with step doubling against false robustness, and (eval.attack_members) each member attacked alone.
Results robust_acc/<attack>/<eps>; every eps hands its per-image flags to the worst case."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from raysweep.attacks.pgd import AttackConfig, attack_params, robust_accuracy
from raysweep.core.data import Split, eval_batches
from raysweep.core.ensemble import combine
from raysweep.evaluation.base import Evaluation, register
from raysweep.evaluation.report import eps_key


@torch.no_grad()
def accuracies(stacked_fn, split: Split, weights, how, batch_size, device) -> tuple[float, list[float]]:
    """(ensemble accuracy, each member's accuracy)."""
    correct, member_correct = 0, None
    for x, y in eval_batches(split, batch_size, device):
        stacked = stacked_fn(x)
        correct += (combine(stacked, weights, how).argmax(1) == y).sum().item()
        mc = (stacked.argmax(-1) == y).sum(1)
        member_correct = mc if member_correct is None else member_correct + mc
    return correct / len(split), [c / len(split) for c in member_correct.tolist()]


def member_fn(ex, m: int):
    """stacked_fn of member m alone, [1,B,C]: the member attacked through its own loss."""
    return lambda x: ex.stacked_logits(x)[m:m + 1]


def attack_until_converged(stacked_fn, split, a: AttackConfig, eps, weights, how, batch_size, device, seed, bar):
    """(report, per-image robust flags) at eps; with a.double_steps, the steps double until accuracy
    stops falling (or max_steps), and the report says whether it converged. The flags are those of
    every run together: an image is robust only if no run broke it."""
    steps, step_size, start = attack_params(a, eps)
    acc, flags = robust_accuracy(stacked_fn, split, a, eps, weights, how, batch_size, device, seed, bar)
    report = {"steps": steps, "step_size": step_size, "random_start": start, "acc": acc}
    if not a.double_steps or a.kind == "fgsm" or eps == 0:
        return report, flags
    history = [[steps, acc]]  # acc stays the lowest accuracy seen
    converged = False
    while steps * 2 <= a.max_steps:
        steps *= 2
        longer = a.model_copy(update={"steps": steps})
        new, new_flags = robust_accuracy(stacked_fn, split, longer, eps, weights, how, batch_size, device, seed, bar)
        flags &= new_flags
        history.append([steps, new])
        if new >= acc:
            converged = True
            break
        acc = new
    report.update(acc=acc, converged=converged, history=history)
    return report, flags


@register
class RobustAccuracy(Evaluation):
    key, Config, default = "attacks", list[AttackConfig], []

    @classmethod
    def check(cls, attacks, eval_cfg) -> None:
        names = [a.name for a in attacks]
        if len(set(names)) != len(names):
            raise ValueError(f"attack names must be unique, got {names}")

    @classmethod
    def names(cls, attacks, eval_cfg, k) -> list[str]:
        return [f"robust_acc/{a.name}/{eps_key(e)}" for a in attacks for e in a.eps]

    @classmethod
    def flagged(cls, attacks) -> set[tuple[str, float]]:
        return {(a.norm, float(e)) for a in attacks for e in a.eps}

    def run(self, ctx, report) -> None:
        ev, test = ctx.cfg.eval, ctx.data.test
        robust = {}
        for a in self.cfg:
            details = {"kind": a.kind, "norm": a.norm, "objectives": a.objectives, "restarts": a.restarts}
            with tqdm(desc=f"attack {a.name}", unit="img", disable=not ctx.progress, leave=False,
                      mininterval=1.0) as bar:
                results = {eps_key(e): attack_until_converged(ctx.stacked_fn, test, a, e, ctx.weights, ctx.how,
                                                              ev.batch_size, ctx.device, ctx.cfg.seed, bar)
                           for e in a.eps}
            for e in a.eps:
                r, flags = results[eps_key(e)]
                report.add(f"robust_acc/{a.name}/{eps_key(e)}", r["acc"], attack=a.name,
                           objective="+".join(a.objectives), norm=a.norm, eps=e, images=len(test),
                           steps=r["steps"] if "history" not in r else r["history"][-1][0], seeds=a.restarts)
                report.robust_flags(a.norm, e, a.name, flags)
            robust[a.name] = {e: r["acc"] for e, (r, _) in results.items()}
            details["per_eps"] = {e: {k: v for k, v in r.items() if k != "acc"} for e, (r, _) in results.items()}
            if ev.attack_members and ctx.ensemble.k > 1:
                one = torch.ones(1, device=ctx.device)
                details["member_robust_acc"] = {
                    eps_key(e): [robust_accuracy(member_fn(ctx.executor, m), test, a, e, one, ctx.how, ev.batch_size,
                                                 ctx.device, ctx.cfg.seed)[0] for m in range(ctx.ensemble.k)]
                    for e in a.eps}
            report.details.setdefault("attacks", {})[a.name] = details
        report.details["robust_acc"] = robust
