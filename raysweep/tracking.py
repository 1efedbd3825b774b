"""MLflow tracking: where runs go, and what a run records.

Default store: `sqlite:///<cwd>/mlflow.db` (the model registry works with no server), artifacts in
`<cwd>/mlartifacts`; `--tracking-uri` or MLFLOW_TRACKING_URI for a real server. URIs are made
absolute once, in the launching process: Tune trials run in their own directories.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from .config import RunConfig

DEFAULT_EXPERIMENT = "raysweep"


def tracking_uri(explicit: str | None = None) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    elif "://" not in uri:  # a bare path: a file store
        uri = Path(uri).resolve().as_uri()
    return uri


def experiment_id(name: str, uri: str) -> str:
    """Get or create; a local store gets an absolute artifact location next to the database."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def flat_params(raw: dict, prefix: str = "") -> dict[str, str]:
    """A config as dotted params (MLflow params are strings of at most 6000 characters)."""
    out: dict[str, str] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = json.dumps(value)[:6000] if isinstance(value, (list, type(None))) else str(value)
    return out


def flat_metrics(metrics: dict) -> dict[str, float]:
    """The scalar results of metrics.json under stable names (robust_acc/<attack>/<eps>, ...)."""
    out = {k: float(metrics[k]) for k in ("clean_acc", "mean_uap_acc", "weighted_acc", "eval_seconds",
                                          "total_seconds") if k in metrics}
    for attack, curve in metrics.get("robust_acc", {}).items():
        out.update({f"robust_acc/{attack}/{eps}": float(a) for eps, a in curve.items()})
    out.update({f"uap_acc/{eps}": float(a) for eps, a in metrics.get("uap_acc", {}).items()})
    if "auc" in metrics:
        out["auc"] = float(metrics["auc"]["value"])
    for name, value in metrics.get("diversity", {}).items():
        if isinstance(value, (int, float)):
            out[f"diversity/{name}"] = float(value)
    for name, value in metrics.get("jacobian_sq_norm", {}).items():
        if isinstance(value, (int, float)):
            out[f"jacobian_sq_norm/{name}"] = float(value)
    if "train" in metrics:
        out["train_seconds"] = float(metrics["train"]["seconds"])
    return out


def log_results(client, run_id: str, out: Path, metrics: dict) -> None:
    """Per-epoch history, final metrics and the run directory's files (checkpoint included)."""
    now = int(time.time() * 1000)
    rows = metrics.get("train", {}).get("history", [])
    history = [Metric(f"train/{k}", float(v), now, int(row["epoch"])) for row in rows
               for k, v in row.items() if k != "epoch"]
    final = [Metric(k, v, now, 0) for k, v in flat_metrics(metrics).items()]
    client.log_batch(run_id, metrics=history + final)
    for name in ("metrics.json", "config.yaml", "acc_vs_eps.png", "uap.png"):
        if (out / name).is_file():
            client.log_artifact(run_id, str(out / name))
    if (out / "checkpoint").is_dir():
        client.log_artifacts(run_id, str(out / "checkpoint"), "checkpoint")


@contextmanager
def tracked_run(uri: str, experiment: str, run_name: str, cfg_raw: dict, tags: dict | None = None):
    """An MLflow run for the block: params up front; FAILED (keeping what was logged) if the block
    raises, FINISHED otherwise. Yields (client, run_id)."""
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(experiment, uri), run_name=run_name, tags=tags or {})
    run_id = run.info.run_id
    try:
        params = flat_params(cfg_raw)
        items = list(params.items())
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        yield client, run_id
    except SystemExit:
        client.set_terminated(run_id, "KILLED")  # Tune ends a stopped trial (ASHA) with SystemExit(0)
        raise
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def log_train_run(cfg: RunConfig, out: Path, uri: str, experiment: str, train, tags: dict | None = None):
    """`raysweep train` (or a reproduce task) as one MLflow run: `train()` returns metrics written under `out`."""
    with tracked_run(uri, experiment, cfg.name, cfg.model_dump(mode="json"),
                     tags or {"raysweep.kind": "train"}) as (c, rid):
        metrics = train()
        log_results(c, rid, out, metrics)
        return metrics, rid
