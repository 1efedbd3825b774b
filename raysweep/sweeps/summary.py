"""The end of a sweep: summary.json, best.yaml and the trade-off plot (Pareto front marked)."""
from __future__ import annotations

import json
from pathlib import Path

from mlflow import MlflowClient

from raysweep import plots
from raysweep.config import dump_config, validate_config
from raysweep.errors import UserError
from raysweep.evaluation.report import masking_flags_of, scalars_of, weak_members
from raysweep.sweeps.champion import strong_figures
from raysweep.sweeps.ledger import STATE_FILE, _records
from raysweep.sweeps.space import describe
from raysweep.tracking.registry import register as register_model
from raysweep.tracking.registry import resolve_checkpoint
from raysweep.tracking.runs import (
    flat_metrics,
)


def _pareto(rows: list[dict], keys: list[str]) -> list[dict]:
    return [r for r in rows if not any(all(o[k] >= r[k] for k in keys) and any(o[k] > r[k] for k in keys)
                                       for o in rows)]


def _summarise(space, state, records, sweep_dir, client, keys, seconds, interrupted, closed) -> dict:
    s, parent_id = space.search, state["parent_run_id"]
    rows = [r for r in records if r["status"] == "finished"]
    count = lambda status: sum(r["status"] == status for r in records)  # noqa: E731
    summary = {"status": "interrupted" if interrupted else "finished" if rows else "failed",
               "space": state["space_file"], "overrides": state["overrides"], "samples": state["samples"],
               "trials": len(records), "finished": len(rows), "failed": count("failed"),
               "stopped_early": count("stopped_early"), "infeasible": count("infeasible"), "seconds": seconds,
               "objectives": keys, "storage": state["storage"], "optuna_storage": state["optuna_storage"],
               "study_name": state["study_name"], "mlflow_parent_run_id": parent_id, "dir": str(sweep_dir),
               "finished_trials": [{**{k: r[k] for k in (*keys, "clean_acc", "trial_id", "params", "checkpoint")},
                                    "storage": r.get("storage"), "seconds": r["metrics"].get("total_seconds"),
                                    "masking_flags": sorted(masking_flags_of(r["metrics"])),
                                    "weak_members": weak_members(r["metrics"])}
                                   for r in rows]}
    if rows:
        if s.multi:
            front = sorted(_pareto(rows, keys), key=lambda r: r[keys[0]])
            summary["pareto"] = [{k: r[k] for k in (*keys, "trial_id", "mlflow_run_id", "params")} for r in front]
            best = max(front, key=lambda r: r[keys[0]])  # registered: the front's best on the first objective
        else:
            best = max(rows, key=lambda r: r[keys[0]])
        best_cfg = validate_config({**space.trial_config(best["params"]), "name": f"{space.name}-best"})
        summary["best"] = {**{k: best[k] for k in (*keys, "clean_acc", "trial_id", "mlflow_run_id", "params",
                                                   "checkpoint")}, "storage": best.get("storage"),
                           "masking_flags": sorted(masking_flags_of(best["metrics"])),
                           "weak_members": weak_members(best["metrics"])}
        (sweep_dir / "best.yaml").write_text(
            f"# best trial {best['trial_id']}: checkpoint {best['checkpoint']}"
            + (f", also at {best['storage']}" if best.get("storage") else "") + "\n" + dump_config(best_cfg))
        _tradeoff(s, keys, rows, sweep_dir)
        for name in ("tradeoff.png", "pareto.csv", "best.yaml"):
            client.log_artifact(parent_id, str(sweep_dir / name))
        client.log_metric(parent_id, f"best/{keys[0]}", best[keys[0]])
    client.log_metric(parent_id, "trials_finished", len(rows))
    if rows and state["register"] and not interrupted:  # the checkpoint comes from MLflow, not from a node
        summary["champion_candidates"], summary["registered"] = _register(
            space, state, _pareto(rows, keys) if s.multi else rows, keys[0], sweep_dir)
    if interrupted:
        summary["closed_runs"] = closed
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    client.log_artifact(parent_id, str(sweep_dir / "summary.json"))
    client.set_tag(parent_id, "mlflow.note.content", _description(space.name, summary))
    client.set_terminated(parent_id, {"interrupted": "KILLED", "failed": "FAILED"}.get(summary["status"], "FINISHED"))
    return summary


def _description(name: str, s: dict) -> str:
    """The parent run page's description: what the sweep did, its best trial and where things are."""
    text = (f"Sweep **{name}** ({s['status']}): {s['finished']} of {s['samples']} trials finished ({s['failed']} "
            f"failed, {s['stopped_early']} stopped early, {s['infeasible']} infeasible) in {s['seconds']:.0f} s, "
            f"maximising {', '.join(s['objectives'])}. Each trial is a child run.")
    if "best" in s:
        b = s["best"]
        text += (f" Best: trial `{b['trial_id']}`, {describe(b['params'])}: "
                 + ", ".join(f"{k} **{b[k]:.4f}**" for k in dict.fromkeys([*s["objectives"], "clean_acc"]))
                 + ". Artifacts: tradeoff.png (clean vs robust accuracy, Pareto front), pareto.csv (the front's "
                   "trials), best.yaml (the best trial's config), summary.json.")
    if "registered" in s:
        r = s["registered"]
        text += f" Registered as `models:/{r['name']}/{r['version']}`."
    return text


def _register(space, state, rows, key, sweep_dir) -> tuple[list[dict], dict]:
    """Re-evaluate the top candidates under the strong protocol (sweep/champion.py) and register the
    best of them by it, with both figures and its masking flags."""
    uri = state["tracking_uri"]

    def resolve(checkpoint):
        return resolve_checkpoint(checkpoint, uri) if str(checkpoint).startswith(("runs:/", "models:/")) else checkpoint

    table = strong_figures(rows, key, space.search.champion, space.trial_config, sweep_dir / "champion", resolve)
    client = MlflowClient(uri)
    for e, r in table:  # beside the cheap objective in the trial's MLflow run
        client.log_metric(e["mlflow_run_id"], f"champion/{e['strong_objective']}", e["strong_value"])
        client.set_tag(e["mlflow_run_id"], "raysweep.champion_flags", ",".join(e["masking_flags"]) or "none")
    entry, row = table[0]
    registered = register_model(state["register"], row["checkpoint"], row["mlflow_run_id"], uri, key, row[key],
                                strong=entry)
    return [e for e, _ in table], registered


def _tradeoff(s, keys, rows, sweep_dir) -> None:
    """tradeoff.png (clean vs robust accuracy of every finished trial, the Pareto front drawn through)
    and pareto.csv (the front's trials: their figures, searched values and MLflow runs)."""
    import pandas as pd

    color = s.color_by or s.params and next(iter(s.params))
    robust_key = keys[1] if s.multi else {"weighted_acc": "mean_uap_acc"}.get(keys[0], keys[0])
    points = [{"clean": r["clean_acc"], "robust": _metric(r, robust_key), "color": _color(r["params"], color),
               "objective": r[keys[0]]} for r in rows]
    front = sorted(_pareto([{**r, robust_key: _metric(r, robust_key)} for r in rows], ["clean_acc", robust_key]),
                   key=lambda r: r["clean_acc"])
    plots.tradeoff(points, robust_key, color, sweep_dir / "tradeoff.png",
                   [(r["clean_acc"], r[robust_key]) for r in front])
    pd.DataFrame([{"trial_id": r["trial_id"], **{k: r[k] for k in dict.fromkeys(["clean_acc", robust_key, *keys])},
                   **r["params"], "mlflow_run_id": r["mlflow_run_id"]} for r in front]).to_csv(
        sweep_dir / "pareto.csv", index=False)


def _metric(row: dict, key: str) -> float:
    if key in row:
        return row[key]
    return flat_metrics(row["metrics"]).get(key, float("nan"))


def _color(params: dict, name: str | None):
    if not name:
        return None
    if name in params:
        return params[name]
    items = [v for k, v in sorted(params.items()) if k.startswith(name + ".")]  # per-member: their mean
    return sum(items) / len(items) if items else None


def trials_table(sweep_dir: str | Path):
    """A sweep's trials as a pandas DataFrame, one row per trial that ended (finished, failed, infeasible
    or stopped early): trial_id, status, the searched values (one column per parameter, named by its
    path), every named result of a finished trial (robust_acc/pgd/0.1, ...), mlflow_run_id, checkpoint
    and, for a failed one, error. Read from the sweep directory's records (no Ray, no MLflow server)."""
    import pandas as pd


    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / STATE_FILE).is_file():
        raise UserError(f"{sweep_dir}: no sweep there ({STATE_FILE} missing)")
    rows = []
    for rec in _records(sweep_dir):
        rows.append({"trial_id": rec["trial_id"], "status": rec["status"], **rec.get("params", {}),
                     **scalars_of(rec.get("metrics") or {}), "mlflow_run_id": rec.get("mlflow_run_id"),
                     "checkpoint": rec.get("checkpoint"), "error": rec.get("error")})
    return pd.DataFrame(rows)
