"""Markdown tables and the worst-case robust accuracy over every attack a run faced."""
from __future__ import annotations

import math

from raysweep.reproduce.common import NOT_RUN, seed_results
from raysweep.reproduce.stats import TEST, compare, estimate


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def failed_cell(m: dict) -> str:
    """What a table shows for a run without results."""
    return "not run yet" if m["error"] == NOT_RUN else f"FAILED: {m['error']}"


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _at(curve: dict, eps: float):
    return next((a for e, a in curve.items() if math.isclose(float(e), eps)), None)


def attack_label(metrics: dict, name: str, eps: float) -> str:
    """The attack's name, with the steps it ended at when step doubling ran."""
    per_eps = metrics.get("attacks", {}).get(name, {}).get("per_eps", {})
    r = _at(per_eps, eps) or {}
    if r.get("history"):
        return f"{name} ({r['history'][-1][0]} steps{'' if r.get('converged') else ', cap'})"
    return name


def attack_results(metrics: dict, eps: float) -> dict[str, float]:
    """Robust accuracy at eps under each attack (white-box PGD/BIM/FGSM and AutoAttack)."""
    out = {}
    for name, curve in metrics.get("robust_acc", {}).items():
        a = _at(curve, eps)
        if a is not None:
            out[attack_label(metrics, name, eps)] = a
    aa = metrics.get("autoattack")
    if aa:
        r = _at(aa["per_eps"], eps)
        if r is not None:
            out[f"AutoAttack ({'+'.join(r['after'])}, {aa['samples']} img)"] = r["acc"]
    return out


def worst_case(metrics: dict, eps: float) -> tuple[float | None, str]:
    """Lowest accuracy over the attacks at eps, and which attack gave it. A minimum of accuracies, not
    a per-image union: an upper bound on the true worst case."""
    res = attack_results(metrics, eps)
    if not res:
        return None, "–"
    name = min(res, key=res.get)
    return res[name], name


def seed_table(study, results: dict, metrics: dict) -> str:
    """Each variant over its seeds: mean ± 95% interval of every `metrics` {label: fn(metrics.json)}."""
    per_seed, rows = seed_results(study, results), []
    for v in study.variants:
        runs = per_seed[v.name]
        cells = [str(estimate([fn(m) for m in runs])) if runs else "–" for fn in metrics.values()]
        rows.append([v.name, v.group, len(runs), *cells])
    return md_table(["variant", "group", "seeds", *metrics], rows)


def claims_table(study, results: dict, claims: list[tuple[str, str, str, str, int]], metrics: dict) -> str:
    """The paper's findings, each decided by the interval of a difference over seeds (reproduce/stats.py).
    A claim is (finding, variant A, variant B, metric label, paper's sign of A - B); claims naming a
    variant the study does not have are left out."""
    names = {v.name for v in study.variants}
    per_seed = seed_results(study, results)
    rows = []
    for finding, a, b, label, sign in claims:
        if a not in names or b not in names or not per_seed[a] or not per_seed[b]:
            continue
        xa, xb = [metrics[label](m) for m in per_seed[a]], [metrics[label](m) for m in per_seed[b]]
        c = compare(xa, xb, sign)
        interval = "–" if math.isnan(c.low) else f"[{c.low:+.3f}, {c.high:+.3f}]"
        rows.append([finding, f"{a} vs {b}", label, str(estimate(xa)), str(estimate(xb)), f"{c.diff:+.3f}",
                     interval, c.verdict])
    if not rows:
        return ""
    return md_table(["paper's finding", "A vs B", "metric", "A", "B", "A - B", f"95% interval ({TEST})", "verdict"],
                    rows)


def compute_line(results: dict) -> str:
    """What the study's runs cost: core-hours of training (every epoch, an interrupted variant's earlier
    ones included) and of evaluation, one core per run."""
    runs = [m for m in results.values() if isinstance(m, dict) and "eval_seconds" in m]
    if not runs:
        return ""
    train = sum((m.get("train") or {}).get("seconds", 0) for m in runs) / 3600
    evaluation = sum(m["eval_seconds"] for m in runs) / 3600
    return (f"Compute: {len(runs)} runs, {train + evaluation:.1f} core-hours ({train:.1f} training, "
            f"{evaluation:.1f} evaluation; one core per run).")
