"""`raysweep reproduce NAME`: one paper's central finding at small scale. Each study trains its
variants (search_spaces/reproduce/NAME.yaml, or --study FILE: e.g. the fair protocol's
jacobian_ensembles_fair.yaml) as Ray tasks, re-evaluates the key ones under a stronger evaluation (the
checks), and writes a markdown report and its plots to docs/results/<study file's name>/."""
from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

from raysweep import presets
from raysweep.errors import UserError

STUDIES = {  # command name -> module in this package (and study file search_spaces/reproduce/<module>.yaml)
    "jacobian-ensembles": "jacobian_ensembles",
    "robust-ensembles": "robust_ensembles",
    "ensemble-adv": "ensemble_adv",
    "pdd-deg": "pdd_deg",
    "je-sweep": "je_sweep",
}


def study_file(module: str) -> Path:
    return presets.ROOT / "search_spaces" / "reproduce" / f"{module}.yaml"


def _where(name: str, study_path: str | None, out: str | None) -> tuple[Path, Path]:
    if name not in STUDIES:
        raise UserError(f"unknown study {name!r}; choose one of: {', '.join(STUDIES)}")
    path = presets.resolve(study_path) if study_path else study_file(STUDIES[name])
    # Named after the study file: another file for the same paper (a fair protocol) keeps its own runs.
    return path, Path(out or Path("runs") / "reproduce" / path.stem).resolve()


def plan(name: str, study_path: str | None = None, out: str | None = None) -> dict:
    """`--dry-run`: the study file validated (every variant's config) and what a run would do: each
    variant and whether `out` holds its finished run already (reused, not re-trained). The checks
    (stronger re-evaluations of the best variants) are chosen from the results, after training."""
    from raysweep.reproduce.study import PARTIAL, _cached, check_job, kept_progress, load_study
    from raysweep.sweeps.space import load_search_space

    path, out_dir = _where(name, study_path, out)
    if name == "je-sweep":  # a search space, not a study of variants
        space = load_search_space(path)
        return {"study": name, "file": str(path), "out": str(out_dir), "samples": space.search.samples,
                "points": space.preview(space.search.samples)}
    study = load_study(path)
    runs = []
    for job in study.jobs():  # one per variant and seed
        run = job.key.removeprefix("variants/")
        done = _cached(out_dir / job.key, job.cfg) is not None
        runs.append({"name": run, "group": study.variant(run.split("@")[0]).group, "done": done,
                     "kept": None if done else kept_progress(out_dir, job.key, job.cfg)})
    # checks cut off mid-evaluation (the checks themselves are chosen from the results, after training)
    checks, overrides = {}, study.spec.get("checks")
    names = {v.name for v in study.variants}
    for folder in sorted((out_dir / PARTIAL / "checks").glob("*")) if overrides else []:
        if folder.name in names:
            job = check_job(study, folder.name, folder.name, overrides, out_dir)
            if kept := kept_progress(out_dir, job.key, job.cfg, Path(job.checkpoint)):
                checks[folder.name] = kept
    return {"study": name, "file": str(path), "out": str(out_dir), "checks": bool(study.spec.get("checks")),
            "variants": runs, "checks_kept": checks}


def reproduce(name: str, out: str | None = None, docs: str | None = None, study_path: str | None = None,
              tracking: str | None = None, experiment: str | None = None, address: str | None = None,
              log=print, report_only: bool = False) -> dict:
    """Train what the study misses, run its checks, write its report. `report_only`: write the report
    from the runs finished so far and train nothing (a study running in the background goes on
    undisturbed); runs not finished yet show as not run."""
    path, out_dir = _where(name, study_path, out)
    module = importlib.import_module(f".{STUDIES[name]}", __name__)
    docs_dir = Path(docs or Path("docs") / "results" / path.stem).resolve()
    if report_only:
        from raysweep.reproduce.study import finished_runs, load_study

        if name == "je-sweep":
            raise UserError("--report-only: je-sweep is a sweep, not a study of variants; its summary is written "
                            "as its trials end")
        study = load_study(path)
        results = finished_runs(study, out_dir)
        log(f"{study.name}: {sum(k.startswith('variants/') for k in results)} of {len(study.jobs())} runs finished "
            f"in {out_dir}; the report covers those")
        _write_report(module, path, results, docs_dir)
        log(f"wrote {docs_dir / 'report.md'}")
        return results
    from raysweep.training.ray import check_address

    check_address(address)  # before the folders and the store: a mistyped address leaves nothing behind
    docs_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    experiment = experiment or f"reproduce-{name}"
    if tracking == "none":
        uri = None
    else:
        from raysweep.tracking.runs import experiment_id, tracking_uri

        uri = tracking_uri(tracking)
        experiment_id(experiment, uri)  # create store and experiment once, before the tasks race to
    t0 = time.perf_counter()
    results = module.run(path, out_dir, uri=uri, experiment=experiment, address=address, log=log)
    seconds = time.perf_counter() - t0
    report = _write_report(module, path, results, docs_dir)
    log(report)
    log(f"\nwrote {docs_dir / 'report.md'} ({seconds:.0f} s; runs under {out_dir})")
    failed = sorted(k for k, r in results.items() if isinstance(r, dict) and "error" in r)
    if failed:
        raise UserError(f"{len(failed)} run(s) failed: {', '.join(failed)} (their rows say so; re-run to retry only them)")
    return results


def _write_report(module, path: Path, results: dict, docs_dir: Path) -> str:
    """The study's report (ending with the compute its runs took) and results.json, into docs_dir."""
    from raysweep.reproduce.tables import compute_line

    docs_dir.mkdir(parents=True, exist_ok=True)
    report, line = module.report(path, results, docs_dir), compute_line(results)
    if line:
        report = f"{report.rstrip()}\n\n{line}\n"
    (docs_dir / "report.md").write_text(report)
    (docs_dir / "results.json").write_text(json.dumps(_compact(results), indent=1, default=str))
    return report


def _compact(results: dict) -> dict:
    """Per run: its metrics without the per-epoch history (that stays in metrics.json and MLflow)."""
    out = {}
    for k, r in results.items():
        if isinstance(r, dict):
            r = dict(r)
            if isinstance(r.get("train"), dict):
                r["train"] = {k2: v for k2, v in r["train"].items() if k2 != "history"}
        out[k] = r
    return out
