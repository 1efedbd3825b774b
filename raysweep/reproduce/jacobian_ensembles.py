"""Jacobian Ensembles: does JR + ensembling beat either alone on weighted accuracy,
and does the ensemble's mean ||J||_F^2 fall as K grows?"""
from __future__ import annotations

from pathlib import Path

from raysweep.plots import plt, save  # plots selects the Agg backend
from raysweep.reproduce.common import best_by, run_variants_then_checks, seed_results, variant_results
from raysweep.reproduce.stats import estimate
from raysweep.reproduce.study import load_study
from raysweep.reproduce.tables import attack_results, claims_table, failed_cell, md_table, seed_table, worst_case

GROUPS = ["standard", "JR only", "ensemble only", "Jacobian Ensemble"]
SEED_METRICS = {"clean": lambda m: m["clean_acc"], "mean UAP": lambda m: m["mean_uap_acc"],
                "weighted": lambda m: m["weighted_acc"]}
# The paper's findings (Fashion-MNIST LeNet-5: its best, Bagging-9 at lambda_JR 0.05, 63.5% weighted),
# as (finding, A, B, metric, sign of A - B); a study decides those whose variants it has.
CLAIMS = [
    ("JR + bagging beats bagging alone", "je_bagging_k9_0.05", "bagging_k9", "weighted", 1),
    ("JR + bagging beats JR alone", "je_bagging_k9_0.05", "jr_0.05", "weighted", 1),
    ("JR + bagging beats standard training", "je_bagging_k9_0.05", "standard", "weighted", 1),
    ("JR + soft voting beats soft voting alone", "je_voting_k9_0.05", "voting_k9", "weighted", 1),
    ("JR raises UAP accuracy", "jr_0.05", "standard", "mean UAP", 1),
    ("bagging raises UAP accuracy", "bagging_k9", "standard", "mean UAP", 1),
]


def _weighted(m):
    return m["weighted_acc"]


def _best_per_group(study, results):
    return [best_by(study, results, _weighted, g) for g in GROUPS]


def run(path, out, *, uri, experiment, address, log):
    return run_variants_then_checks(path, out, _best_per_group, uri=uri, experiment=experiment, address=address,
                                    log=log)


def _row(v, m):
    c = v.cfg
    if "error" in m:
        return [v.name, v.group, c.ensemble.method, c.ensemble.k, c.train.jr.lambda_jr, failed_cell(m)] + [None] * 9
    j = m.get("jacobian_sq_norm", {})
    return [v.name, v.group, "soft voting" if c.ensemble.method == "independent" else c.ensemble.method,
            c.ensemble.k, c.train.jr.lambda_jr, m["clean_acc"], *m["uap_acc"].values(), m["mean_uap_acc"],
            m["weighted_acc"], j.get("members_mean"), j.get("ensemble"), round(m["train"]["seconds"])]


def report(path, results, docs: Path) -> str:
    study = load_study(path)
    vr = variant_results(study, results)
    eps = study.variants[0].cfg.eval.uap.eps
    headers = ["variant", "group", "method", "K", "λ_JR", "clean"] + [f"UAP {e:g}" for e in eps] + [
        "mean UAP", "weighted", "‖J‖² members", "‖J‖² ensemble", "train s"]
    best = _best_per_group(study, results)
    lines = ["### Best of each group (by weighted accuracy, w = 0.5)", "",
             md_table(headers, [_row(study.variant(n), vr[n]) for n in best if n]), "",
             "### Every variant", "", md_table(headers, [_row(v, vr[v.name]) for v in study.variants]), ""]

    if study.seeds:
        per_eps = {f"UAP {e:g}": (lambda m, e=e: next(a for k, a in m["uap_acc"].items() if float(k) == e))
                   for e in eps}
        columns = {"clean": SEED_METRICS["clean"], **per_eps, "mean UAP": SEED_METRICS["mean UAP"],
                   "weighted": SEED_METRICS["weighted"]}
        lines += [f"### Over seeds {study.seeds}: mean ± 95% interval", "",
                  seed_table(study, results, columns), ""]
        claims = claims_table(study, results, CLAIMS, SEED_METRICS)
        if claims:
            lines += ["### The paper's findings, decided over seeds", "", claims, ""]
    lines += _seed_noise(study, vr)
    rows = []
    for n in best:
        m, c = vr.get(n) or {}, results.get(f"checks/{n}")
        if not n or not c or "error" in c:
            continue
        w, name = worst_case(c, 0.05)
        per = attack_results(c, 0.02)
        rows.append([n, m["mean_uap_acc"], c["mean_uap_acc"], m["weighted_acc"], c["weighted_acc"],
                     min(per.values()) if per else None, w, name])
        strong = c["uap_protocol"]  # what the checks ran, as their evaluation recorded it
    if rows:
        p, uap = study.spec["checks"], study.variants[0].cfg.eval.uap
        lines += ["### Checks: the best of each group under a stronger evaluation", "",
                  f"UAP with {strong['seeds']} seeds x {strong['iterations']} iterations (the table above: "
                  f"{uap.seeds} x {uap.iterations}); per-image "
                  "l_inf PGD with steps doubled until accuracy stops falling, and AutoAttack (APGD-CE, APGD-DLR) on "
                  f"{p['eval.autoattack']['samples']} test images.", "",
                  md_table(["variant", "mean UAP", "mean UAP (strong)", "weighted", "weighted (strong)",
                            "worst per-image acc, eps 0.02", "worst per-image acc, eps 0.05", "worst attack at 0.05"],
                           rows), ""]
    # Over seeds where the study has them (one run each without): means with 95% intervals as error bars
    _scatter(study, seed_results(study, results), docs / "tradeoff.png")
    _jacobian_vs_k(study, vr, docs / "jacobian_vs_k.png")
    lines += ["![accuracy vs robustness](tradeoff.png)", "", "![mean ||J||_F^2 vs K](jacobian_vs_k.png)", ""]
    return "\n".join(lines)


def _seed_noise(study, vr) -> list[str]:
    """Variants `NAME_seedS` against NAME (seed 0): the spread of each metric over seeds."""
    groups: dict[str, list[str]] = {}
    for v in study.variants:
        if v.group == "seed noise":
            groups.setdefault(v.name.rsplit("_seed", 1)[0], [v.name.rsplit("_seed", 1)[0]]).append(v.name)
    rows = []
    for base, names in groups.items():
        ms = [vr[n] for n in names if "error" not in vr[n]]
        if len(ms) < 2:
            continue
        row = [base, len(ms)]
        for key in ("clean_acc", "mean_uap_acc", "weighted_acc"):
            xs = [m[key] for m in ms]
            mu = sum(xs) / len(xs)
            sd = (sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
            row += [f"{mu:.3f} ± {sd:.3f}", max(xs) - min(xs)]
        rows.append(row)
    if not rows:
        return []
    return ["### Seed noise (seeds 0, 1, 2: mean ± sample std, and max - min)", "",
            md_table(["variant", "seeds", "clean", "clean spread", "mean UAP", "mean UAP spread", "weighted",
                      "weighted spread"], rows), ""]


def _scatter(study, runs, path):
    """Clean accuracy against mean UAP accuracy: each variant's mean over its runs (seeds), 95% intervals as
    error bars (none with one run)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    seeds = set()
    for g, marker in zip(GROUPS, "s^oD"):
        vs = [v for v in study.variants if v.group == g and runs.get(v.name)]
        if not vs:
            continue
        xs = [estimate([m["clean_acc"] for m in runs[v.name]]) for v in vs]
        ys = [estimate([m["mean_uap_acc"] for m in runs[v.name]]) for v in vs]
        seeds |= {len(runs[v.name]) for v in vs}
        ax.errorbar([x.mean for x in xs], [y.mean for y in ys], xerr=[x.bar for x in xs], yerr=[y.bar for y in ys],
                    fmt=marker, ms=6, capsize=3, label=g, mec="k", mew=0.4, zorder=3)
        for v, x, y in zip(vs, xs, ys):
            ax.annotate(f"λ={v.cfg.train.jr.lambda_jr:g}, K={v.cfg.ensemble.k}", (x.mean, y.mean), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
    over = f"; mean ± 95% interval over {seeds.pop()} seeds" if len(seeds) == 1 and max(seeds, default=1) > 1 else ""
    ax.set(xlabel="clean accuracy", ylabel="mean UAP accuracy (eps 0.10-0.25)",
           title=f"Jacobian Ensembles: accuracy vs robustness\n(labels: λ_JR, K{over})")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    save(fig, path)


def _jacobian_vs_k(study, vr, path):
    fig, ax = plt.subplots(figsize=(6, 4.2))
    std = vr.get("standard", {})
    base = std.get("jacobian_sq_norm", {}).get("ensemble") if "error" not in std else None
    for (method, label), color in zip((("bagging", "bagging"), ("snapshot", "snapshot"),
                                       ("independent", "soft voting")), ("C0", "C3", "C2")):
        for lam, style in ((0.0, "-"), (0.05, "--"), (0.2, ":")):
            vs = sorted((v for v in study.variants if v.group in GROUPS and v.cfg.ensemble.method == method
                         and v.cfg.ensemble.k > 1
                         and v.cfg.train.jr.lambda_jr == lam and "error" not in vr[v.name]
                         and "jacobian_sq_norm" in vr[v.name]), key=lambda v: v.cfg.ensemble.k)
            if not vs:
                continue
            ks = [v.cfg.ensemble.k for v in vs]
            ys = [vr[v.name]["jacobian_sq_norm"]["ensemble"] for v in vs]
            single = base if lam == 0.0 else next(
                (vr[v.name]["jacobian_sq_norm"]["ensemble"] for v in study.variants if v.group == "JR only"
                 and v.cfg.train.jr.lambda_jr == lam and "jacobian_sq_norm" in vr[v.name]), None)
            if single is not None:  # K = 1: the single model with the same lambda
                ks, ys = [1] + ks, [single] + ys
            ax.plot(ks, ys, style, color=color, marker="o", label=f"{label}, λ={lam:g}")
    ax.set(xlabel="K (members; K = 1: the single model)", ylabel="mean ||J||_F^2 of the ensemble (200 test images)",
           yscale="log", title="Ensemble Jacobian norm vs K")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:  # no ensemble variant finished yet: an empty plot, no legend
        ax.legend(fontsize=7, ncol=2)
    save(fig, path)

