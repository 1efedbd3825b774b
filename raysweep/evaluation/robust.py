"""eval.attacks: robust accuracy under FGSM, BIM and PGD (attacks/pgd.py) per attack and eps,
with step doubling against false robustness, and (eval.attack_members) each member attacked alone.
Results robust_acc/<attack>/<eps>; every eps hands its per-image flags to the worst case."""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from raysweep.attacks.pgd import AttackConfig, attack_params, robust_accuracy
from raysweep.core.data import Split, eval_batches
from raysweep.core.ensemble import combine
from raysweep.evaluation.base import Evaluation, register
from raysweep.evaluation.report import eps_key
from raysweep.evaluation.resume import load_part, save_part


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


def attack_until_converged(stacked_fn, split, a: AttackConfig, eps, weights, how, batch_size, device, seed, bar,
                           kept: dict | None = None, on_rung=None):
    """(report, per-image robust flags) at eps; with a.double_steps, the steps double until accuracy
    stops falling (or max_steps), and the report says whether it converged. The flags are those of
    every run together: an image is robust only if no run broke it.

    Each run (rung) depends only on its own step count, never on the runs before it, so a ladder may be
    continued in another process: `kept` ({"history": [[steps, acc], ...], "flags"}) holds the rungs an
    interrupted evaluation finished, and `on_rung(history, flags)` is called as each further one ends."""
    steps, step_size, start = attack_params(a, eps)
    ladder = a.double_steps and a.kind != "fgsm" and eps != 0
    history = [list(h) for h in kept["history"]] if kept else []
    flags = kept["flags"].clone() if kept else None

    def finished() -> bool:
        if not history or not ladder:
            return bool(history)
        if len(history) > 1 and history[-1][1] >= history[-2][1]:
            return True  # converged: the last doubling did not lower the accuracy
        return history[-1][0] * 2 > a.max_steps

    while not finished():
        n = history[-1][0] * 2 if history else steps
        acc, new = robust_accuracy(stacked_fn, split, a.model_copy(update={"steps": n}), eps, weights, how,
                                   batch_size, device, seed, bar)
        flags = new if flags is None else flags & new
        history.append([n, acc])
        if on_rung is not None:
            on_rung(history, flags)
    report = {"steps": steps, "step_size": step_size, "random_start": start, "acc": min(h[1] for h in history)}
    if ladder:
        report.update(converged=len(history) > 1 and history[-1][1] >= history[-2][1], history=history)
    if kept:
        report["resumed_rungs"] = len(kept["history"])
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
        # A step-doubling ladder on a large ensemble runs for hours here: each attack and eps keeps its
        # finished rungs (attack i's at kept/<i>_<eps>.pt), so an interrupted evaluation continues its ladder;
        # with attack_members, the members' accuracies too (kept/<i>_<eps>_members.pt).
        kept = ctx.kept(self.key)
        part = lambda i, e: kept / f"{i}_{eps_key(e)}.pt"  # noqa: E731 - names are free text; the index is not
        parts = {} if kept is None else {(i, e): p for i, a in enumerate(self.cfg) for e in a.eps
                                         if (p := load_part(part(i, e)))}
        ctx.kept_seconds[self.key] = sum(p["seconds"] for p in parts.values())
        robust = {}
        for i, a in enumerate(self.cfg):
            details = {"kind": a.kind, "norm": a.norm, "objectives": a.objectives, "restarts": a.restarts}
            with tqdm(desc=f"attack {a.name}", unit="img", disable=not ctx.progress, leave=False,
                      mininterval=1.0) as bar:
                results = {}
                for e in a.eps:
                    earlier = parts.get((i, e))
                    start = time.perf_counter()

                    def on_rung(history, flags, i=i, e=e, earlier=earlier, start=start):
                        seconds = (earlier["seconds"] if earlier else 0.0) + time.perf_counter() - start
                        if kept is not None:
                            save_part(part(i, e), {"history": history, "flags": flags, "seconds": seconds})
                        if ctx.log is not None:
                            ctx.log(f"evaluation: {a.name} eps {e}: {history[-1][0]} steps, accuracy "
                                    f"{history[-1][1]:.4f} ({seconds:.0f} s)")

                    results[eps_key(e)] = attack_until_converged(
                        ctx.stacked_fn, test, a, e, ctx.weights, ctx.how, ev.batch_size, ctx.device, ctx.cfg.seed,
                        bar, earlier, on_rung)
            for e in a.eps:
                r, flags = results[eps_key(e)]
                report.add(f"robust_acc/{a.name}/{eps_key(e)}", r["acc"], attack=a.name,
                           objective="+".join(a.objectives), norm=a.norm, eps=e, images=len(test),
                           steps=r["steps"] if "history" not in r else r["history"][-1][0], seeds=a.restarts)
                report.robust_flags(a.norm, e, a.name, flags)
            robust[a.name] = {e: r["acc"] for e, (r, _) in results.items()}
            details["per_eps"] = {e: {k: v for k, v in r.items() if k != "acc"} for e, (r, _) in results.items()}
            if ev.attack_members and ctx.ensemble.k > 1:
                details["member_robust_acc"] = {
                    eps_key(e): self._members(ctx, a, e, kept and kept / f"{i}_{eps_key(e)}_members.pt") for e in a.eps}
            report.details.setdefault("attacks", {})[a.name] = details
        report.details["robust_acc"] = robust

    def _members(self, ctx, a: AttackConfig, e: float, path) -> list[float]:
        """Each member's robust accuracy under attack a at eps e, each saved at `path` as it ends (K attacks
        of the whole test set: an interrupted evaluation attacks only the members it had not finished)."""
        saved = load_part(path) if path else None
        accs, seconds = (list(saved["accs"]), saved["seconds"]) if saved else ([], 0.0)
        ctx.kept_seconds[self.key] = ctx.kept_seconds.get(self.key, 0.0) + seconds  # the earlier process's time
        one = torch.ones(1, device=ctx.device)
        for m in range(len(accs), ctx.ensemble.k):
            start = time.perf_counter()
            accs.append(robust_accuracy(member_fn(ctx.executor, m), ctx.data.test, a, e, one, ctx.how,
                                        ctx.cfg.eval.batch_size, ctx.device, ctx.cfg.seed)[0])
            seconds += time.perf_counter() - start
            if path:
                save_part(path, {"accs": accs, "seconds": seconds})
            if ctx.log is not None:
                ctx.log(f"evaluation: {a.name} members eps {e}: member {m + 1}/{ctx.ensemble.k} attacked alone "
                        f"({seconds:.0f} s)")
        return accs
