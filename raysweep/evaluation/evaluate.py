"""The evaluation protocol: clean, robust per attack and eps, UAP per eps (Jacobian Ensembles),
weighted accuracy, AUC(eps_target), and the members' and ensemble's Jacobian norms."""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from raysweep.attacks import evaluate_uap, robust_accuracy
from raysweep.attacks.cw import cw_l2
from raysweep.attacks.pgd import AttackConfig, attack_params
from raysweep.config import RunConfig
from raysweep.core.data import Dataset, Split, eval_batches
from raysweep.core.ensemble import Ensemble, combine
from raysweep.evaluation.diversity import (
    discrimination_score,
    gradient_angles,
    output_ambiguity,
)
from raysweep.evaluation.metrics import auc, mean, weighted_accuracy
from raysweep.evaluation.transfer import evaluate_transfer
from raysweep.members import make_local_executor
from raysweep.regularisers.jacobian import ensemble_jacobian_norms


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
    """Robust accuracy at eps; with a.double_steps, the steps double until accuracy stops falling
    (or max_steps), and the report says whether it converged."""
    steps, step_size, start = attack_params(a, eps)
    acc = robust_accuracy(stacked_fn, split, a, eps, weights, how, batch_size, device, seed, bar)[0]
    report = {"steps": steps, "step_size": step_size, "random_start": start, "acc": acc}
    if not a.double_steps or a.kind == "fgsm" or eps == 0:
        return report
    history = [[steps, acc]]  # acc stays the lowest accuracy seen
    converged = False
    while steps * 2 <= a.max_steps:
        steps *= 2
        longer = a.model_copy(update={"steps": steps})
        new = robust_accuracy(stacked_fn, split, longer, eps, weights, how, batch_size, device, seed, bar)[0]
        history.append([steps, new])
        if new >= acc:
            converged = True
            break
        acc = new
    report.update(acc=acc, converged=converged, history=history)
    return report


def diversity_metrics(ex, split: Split, samples: int, device) -> dict:
    x, y = split.batch(torch.arange(min(samples, len(split))), device)
    with torch.no_grad():
        feats = ex.stacked_logits(x, part="features")
        logits = ex.stacked_logits(feats, per_member=True, part="head")

    with torch.enable_grad():
        angles = gradient_angles(lambda xs: ex.stacked_logits(xs, per_member=True), x, y, ex.k)
    return {"output_ambiguity": output_ambiguity(logits, y).mean().item(),
            "discrimination_score": discrimination_score(feats).mean().item(),
            "mean_gradient_angle_deg": angles.mean().item(), "samples": x.shape[0]}


def evaluate(ensemble: Ensemble, data: Dataset, cfg: RunConfig, progress: bool = True) -> tuple[dict, dict]:
    """Returns (metrics, artifacts). metrics is JSON-ready with eps keys as strings; artifacts
    holds tensors (the chosen UAPs) for pictures and files."""
    ev = cfg.eval
    ex = make_local_executor(list(ensemble.members), cfg.executor.vectorize, cfg.executor.device)
    ex.train(False)
    device = ex.device

    def stacked_fn(x):
        return ex.stacked_logits(x)

    weights, how = ensemble.weights.to(device), ensemble.combine_how
    one = torch.ones(1, device=device)
    start = time.perf_counter()
    clean, members = accuracies(stacked_fn, data.test, weights, how, ev.batch_size, device)
    metrics: dict = {"clean_acc": clean, "member_clean_acc": members}

    n = len(data.test)
    robust: dict = {}
    for a in ev.attacks:
        report = {"kind": a.kind, "norm": a.norm, "objectives": a.objectives, "restarts": a.restarts}
        with tqdm(desc=f"attack {a.name}", unit="img", disable=not progress, leave=False, mininterval=1.0) as bar:
            results = {str(e): attack_until_converged(stacked_fn, data.test, a, e, weights, how, ev.batch_size,
                                                      device, cfg.seed, bar) for e in a.eps}
        robust[a.name] = {e: r["acc"] for e, r in results.items()}
        report["per_eps"] = {e: {k: v for k, v in r.items() if k != "acc"} for e, r in results.items()}
        if ev.attack_members and ensemble.k > 1:
            report["member_robust_acc"] = {
                str(e): [robust_accuracy(member_fn(ex, m), data.test, a, e, one, how, ev.batch_size, device,
                                         cfg.seed)[0] for m in range(ensemble.k)] for e in a.eps}
        metrics.setdefault("attacks", {})[a.name] = report
    if robust:
        metrics["robust_acc"] = robust

    artifacts: dict = {}
    if ev.uap is not None:
        u = ev.uap
        craft = data.train if u.craft_on == "train" else data.test
        with tqdm(total=u.iterations * len(u.eps), desc="UAP", unit="it", disable=not progress, leave=False,
                  mininterval=1.0) as bar:
            res = evaluate_uap(stacked_fn, craft, data.test, u, weights, how, ev.batch_size, device, cfg.seed, bar)
        metrics["uap_acc"] = {str(e): a for e, a in res["acc"].items()}
        metrics["mean_uap_acc"] = mean(res["acc"].values())
        metrics["weighted_acc"] = weighted_accuracy(clean, res["acc"], ev.weighted_acc_w)
        metrics["weighted_acc_w"] = ev.weighted_acc_w
        metrics["uap_protocol"] = {"seeds": u.seeds, "iterations": u.iterations, "batch_size": u.batch_size,
                                   "craft_on": u.craft_on, "selection_size": min(u.selection_size, len(craft)),
                                   "objective": u.objective, "step_rule": u.step_rule}
        artifacts["uap_deltas"] = res["deltas"]

    if ev.auc is not None:
        curve = {float(e): a for e, a in robust[ev.auc.attack].items()}
        metrics["auc"] = {"attack": ev.auc.attack, "eps_target": ev.auc.eps_target,
                          "value": auc(curve, ev.auc.eps_target, clean)}

    model = ensemble.to(device).eval()  # the whole ensemble as one module, for transfer and ART
    if ev.transfer:
        metrics["transfer"] = evaluate_transfer(model, data, cfg, device, progress)

    if ev.cw_l2:
        metrics["cw_l2"] = cw_l2(stacked_fn, data.test, ev.cw_l2, weights, how, ev.batch_size, device)

    if ev.autoattack or ev.jsma:
        from raysweep.attacks import library  # ART is imported only when asked for

        if ev.autoattack:
            metrics["autoattack"] = library.autoattack(model, data.test, ev.autoattack, data.num_classes,
                                                       ev.batch_size, device, cfg.seed)
        if ev.jsma:
            metrics["jsma"] = library.jsma(model, data.test, ev.jsma, data.num_classes, ev.batch_size, device,
                                           cfg.seed)

    if ev.diversity_samples > 0 and ensemble.k > 1:
        metrics["diversity"] = diversity_metrics(ex, data.test, ev.diversity_samples, device)

    if ev.jacobian_samples > 0:
        x, _ = data.test.batch(torch.arange(min(ev.jacobian_samples, n)), device)
        with torch.enable_grad():
            member_sq, ens_sq = ensemble_jacobian_norms(stacked_fn, x, weights)
        metrics["jacobian_sq_norm"] = {"members": member_sq.mean(1).tolist(), "members_mean": member_sq.mean().item(),
                                       "ensemble": ens_sq.mean().item(), "samples": x.shape[0],
                                       "ensemble_of": "logit combination sum_k c_k f_k"}
    metrics["eval_seconds"] = time.perf_counter() - start
    return metrics, artifacts
