"""What most studies do: train every variant, then re-evaluate the best of each group under the
study's `checks:` evaluation."""
from __future__ import annotations

from pathlib import Path

from raysweep.reproduce.study import Study, check_job, load_study, run_jobs


def run_variants_then_checks(path: Path, out: Path, pick_checked, *, uri, experiment, address, log) -> dict:
    """`pick_checked(study, results) -> [variant names]`: the variants whose claims the checks test."""
    study = load_study(path)
    results = run_jobs(study.jobs(), out, study.name, uri=uri, experiment=experiment, address=address, log=log)
    overrides = study.spec.get("checks")
    if overrides:
        names = [n for n in pick_checked(study, results) if "error" not in results.get(f"variants/{n}", {"error": 1})]
        checks = [check_job(study, n, n, overrides, out) for n in dict.fromkeys(names)]
        results.update(run_jobs(checks, out, study.name, uri=uri, experiment=experiment, address=address, log=log))
    return results


NOT_RUN = "not run"  # a variant without a finished run yet (--report-only of a study still running)


def variant_results(study: Study, results: dict) -> dict[str, dict]:
    """Each variant's run at its (first) seed."""
    return {v.name: results.get(f"variants/{v.name}", {"error": NOT_RUN}) for v in study.variants}


def seed_results(study: Study, results: dict) -> dict[str, list[dict]]:
    """Each variant's finished runs, one per seed (failed or missing seeds left out)."""
    return {v.name: [m for key, _ in study.seed_runs(v) if "error" not in (m := results.get(key, {"error": 1}))]
            for v in study.variants}


def best_by(study: Study, results: dict, key, group: str | None = None) -> str | None:
    """The variant (of `group`) with the highest key(metrics)."""
    vr = variant_results(study, results)
    cands = [v.name for v in study.variants if (group is None or v.group == group) and "error" not in vr[v.name]]
    return max(cands, key=lambda n: key(vr[n]), default=None)
