"""eval.uap: the Jacobian Ensembles protocol: accuracy under the worst of `seeds` SGD-UAPs per eps
(attacks/uap.py), their mean and the weighted accuracy w * clean + (1 - w) * mean UAP accuracy.
Results uap_acc/<eps>, mean_uap_acc, weighted_acc; the chosen UAPs go to the report's artifacts."""
from __future__ import annotations

import time
from typing import Optional

import torch
from tqdm.auto import tqdm

from raysweep.attacks.uap import UAPConfig, evaluate_uap
from raysweep.evaluation.base import Evaluation, register
from raysweep.evaluation.metrics import mean, weighted_accuracy
from raysweep.evaluation.report import eps_key
from raysweep.evaluation.resume import load_part, save_part

SAVE_EVERY_S = 60.0  # how often the eps under way is saved: a minute of work at most is lost to a kill


@register
class UniversalPerturbations(Evaluation):
    key, Config, default = "uap", Optional[UAPConfig], UAPConfig()

    @classmethod
    def names(cls, u, eval_cfg, k) -> list[str]:
        return [f"uap_acc/{eps_key(e)}" for e in u.eps] + ["mean_uap_acc", "weighted_acc"]

    def run(self, ctx, report) -> None:
        u, ev, data = self.cfg, ctx.cfg.eval, ctx.data
        craft = data.train if u.craft_on == "train" else data.test
        # Each eps takes up to hours for a large ensemble: keep each as it ends (eps_<eps>.pt), and the
        # one under way every SAVE_EVERY_S (eps_<eps>.running.pt: its iteration, deltas and generator).
        kept = ctx.kept(self.key)
        part = lambda eps, what="": kept / f"eps_{eps_key(eps)}{what}.pt"  # noqa: E731
        parts = {} if kept is None else {e: p for e in u.eps if (p := load_part(part(e)))}
        running = {} if kept is None else {e: r for e in u.eps if e not in parts
                                           and (r := load_part(part(e, ".running")))}
        done = {e: (p["acc"], p["delta"]) for e, p in parts.items()}
        # older parts recorded no seconds
        ctx.kept_seconds[self.key] = sum(p.get("seconds", 0.0) for p in [*parts.values(), *running.values()])
        last = {"start": time.perf_counter(), "saved": time.perf_counter()}  # when this eps began, last save
        before = lambda eps: running[eps]["seconds"] if eps in running else 0.0  # noqa: E731 - earlier processes

        def on_state(eps, get_state):
            now = time.perf_counter()
            if kept is not None and now - last["saved"] >= SAVE_EVERY_S:  # the state is built only then
                save_part(part(eps, ".running"), {**get_state(), "seconds": before(eps) + now - last["start"]})
                last["saved"] = now

        def on_eps(eps, acc, delta):
            now = time.perf_counter()
            seconds = before(eps) + now - last["start"]
            if kept is not None:
                save_part(part(eps), {"acc": acc, "delta": delta, "seconds": seconds})
                part(eps, ".running").unlink(missing_ok=True)
            if ctx.log is not None:
                ctx.log(f"evaluation: uap eps {eps}: accuracy {acc:.4f} ({seconds:.0f} s)")
            last["start"] = now

        with tqdm(total=u.iterations * len(u.eps), desc="UAP", unit="it", disable=not ctx.progress, leave=False,
                  mininterval=1.0) as bar:
            res = evaluate_uap(ctx.stacked_fn, craft, data.test, u, ctx.weights, ctx.how, ev.batch_size, ctx.device,
                               ctx.cfg.seed, bar, done, on_eps, running, on_state)
        meta = {"attack": "uap", "objective": u.objective, "norm": "linf", "images": len(data.test),
                "steps": u.iterations, "seeds": u.seeds}
        for e, acc in res["acc"].items():
            report.add(f"uap_acc/{eps_key(e)}", acc, eps=e, **meta)
        clean = report.results["clean_acc"].value
        report.add("mean_uap_acc", mean(res["acc"].values()), **meta)
        report.add("weighted_acc", weighted_accuracy(clean, res["acc"], ev.weighted_acc_w), **meta)
        report.details.update(
            uap_acc={eps_key(e): a for e, a in res["acc"].items()}, mean_uap_acc=report.results["mean_uap_acc"].value,
            weighted_acc=report.results["weighted_acc"].value, weighted_acc_w=ev.weighted_acc_w,
            uap_protocol={"seeds": u.seeds, "iterations": u.iterations, "batch_size": u.batch_size,
                          "craft_on": u.craft_on, "selection_size": min(u.selection_size, len(craft)),
                          "objective": u.objective, "step_rule": u.step_rule,
                          "step": {eps_key(e): u.step(e) for e in u.eps},
                          **({"resumed_eps": sorted(done)} if done else {}),  # computed by an interrupted process
                          **({"continued_eps": {eps_key(e): r["iteration"] for e, r in running.items()}}
                             if running else {})})  # begun by one: eps -> the iteration it went on from
        report.artifacts["uap_deltas"] = res["deltas"]
        report.artifacts["uap_example"] = data.test.batch(torch.tensor([0]))[0][0]  # for the picture
