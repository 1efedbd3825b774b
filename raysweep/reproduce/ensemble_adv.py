"""Ensemble-Adv: is an ensemble adversarially trained as one model (Ensemble2Adv)
more robust than its members trained alone (Separate2Adv) or one model of the same size (DoubleAdv),
under every attack objective and with the attack run to convergence?"""
from __future__ import annotations

from pathlib import Path

from raysweep.plots import plt, save  # plots selects the Agg backend
from raysweep.reproduce.common import run_variants_then_checks, variant_results
from raysweep.reproduce.study import load_study
from raysweep.reproduce.tables import attack_results, claims_table, failed_cell, md_table, seed_table, worst_case

# The paper's findings, as (finding, A, B, metric, sign of A - B), on the worst case over the attacks at
# the largest eps; decided over seeds when the study has them (ensemble_adv_fair.yaml).
CLAIMS = [
    ("training the ensemble as one beats training its members apart", "ensemble2_adv", "separate2_adv", "worst", 1),
    ("the adversarially trained ensemble beats one model of its size", "ensemble2_adv", "double_adv", "worst", 1),
    ("the adversarially trained ensemble beats one member-sized model", "ensemble2_adv", "single_adv", "worst", 1),
]


def run(path, out, *, uri, experiment, address, log):
    return run_variants_then_checks(path, out, lambda s, r: [], uri=uri, experiment=experiment, address=address,
                                    log=log)


def _members_alone(m, eps):
    """Worst member attacked alone through its own loss, over the attacks."""
    accs = [min(r["member_robust_acc"][k]) for r in m.get("attacks", {}).values()
            for k in r.get("member_robust_acc", {}) if abs(float(k) - eps) < 1e-9]
    return min(accs) if accs else None


def report(path, results, docs: Path) -> str:
    study = load_study(path)
    vr = variant_results(study, results)
    ev = study.variants[0].cfg.eval
    eps_list = ev.attacks[0].eps
    names = [a.name for a in ev.attacks]
    lines = []
    for eps in eps_list:
        headers = ["variant", "K", "clean"] + names + ["AutoAttack", "worst", "worst attack", "member alone (min)"]
        rows = []
        for v in study.variants:
            m = vr[v.name]
            if "error" in m:
                rows.append([v.group, v.cfg.ensemble.k, failed_cell(m)] + [None] * (len(headers) - 3))
                continue
            aa = m.get("autoattack", {}).get("per_eps", {}).get(str(eps), {}).get("acc")
            w, wname = worst_case(m, eps)
            rows.append([v.group, v.cfg.ensemble.k, m["clean_acc"]]
                        + [m["robust_acc"][n].get(str(eps)) for n in names] + [aa, w, wname, _members_alone(m, eps)])
        lines += [f"### l_inf eps = {eps:g}", "", md_table(headers, rows), ""]
    steps = {}
    for v in study.variants:
        m = vr[v.name]
        if "error" not in m:
            r = m["attacks"]["pgd_long"]["per_eps"].get(str(eps_list[-1]), {})
            steps[v.group] = r.get("history")
    lines += [f"Long PGD at eps {eps_list[-1]:g} (sign steps, CE + CW objectives, per image worst): accuracy as the "
              "steps double (stops when accuracy no longer falls):", "",
              md_table(["variant", "steps: accuracy"],
                       [[g, ", ".join(f"{s}: {a:.3f}" for s, a in h) if h else "–"] for g, h in steps.items()]), ""]
    if study.seeds:
        eps = eps_list[-1]
        metrics = {"clean": lambda m: m["clean_acc"], "worst": lambda m: worst_case(m, eps)[0]}
        lines += [f"### Over seeds {study.seeds}: mean ± 95% interval (worst: over the attacks at eps {eps:g})", "",
                  seed_table(study, results, metrics), ""]
        table = claims_table(study, results, CLAIMS, metrics)
        lines += ["### The paper's findings, decided over seeds", "", table, ""] if table else []
    _bars(study, vr, eps_list[-1], docs / "attacks.png")
    lines += ["![accuracy under each attack](attacks.png)", ""]
    return "\n".join(lines)


def _bars(study, vr, eps, path):
    vs = [v for v in study.variants if "error" not in vr[v.name]]
    if not vs:
        return
    attacks = list(attack_results(vr[vs[0].name], eps))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(vs)
    for i, v in enumerate(vs):
        res = attack_results(vr[v.name], eps)
        ax.bar([j + i * width for j in range(len(attacks))], [res.get(a, 0) for a in attacks], width, label=v.group)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(attacks))])
    ax.set_xticklabels([a.split(" (")[0] for a in attacks], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="accuracy", title=f"Ensemble-Adv variants under each attack, l_inf eps = {eps:g}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=3)
    save(fig, path)
