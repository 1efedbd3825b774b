"""MLflow tracking: where runs go, and what a run records.

Default store: `sqlite:///<cwd>/mlflow.db` (the model registry works with no server), artifacts in
`<cwd>/mlartifacts`; `--tracking-uri` or MLFLOW_TRACKING_URI for a real server. URIs are made
absolute once, in the launching process: Tune trials run in their own directories.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from raysweep.config import RunConfig
from raysweep.errors import UserError
from raysweep.evaluation.report import masking_flags_of, scalars_of, weak_members

DEFAULT_EXPERIMENT = "raysweep"


def tracking_uri(explicit: str | None = None) -> str:
    """The absolute tracking URI; an embedded SQLite store is created here, once, atomically."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    elif "://" not in uri:  # a bare path: a file store
        uri = Path(uri).resolve().as_uri()
    if uri.startswith("sqlite:///"):
        _ensure_sqlite_store(Path(uri.removeprefix("sqlite:///")))
    return uri


def _ensure_sqlite_store(db: Path) -> None:
    """MLflow creates and migrates a SQLite store in place, over seconds: a command killed meanwhile
    leaves a half-migrated file no MLflow command repairs, and two first commands race. So the store
    is made under a lock (`<db>.lock`, kept), in a temporary file moved into place when complete."""
    if db.exists() or not db.parent.is_dir():
        return  # a missing folder is check_tracking's error to report
    with open(db.parent / f"{db.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if db.exists():
            return  # another process made it while this one waited
        for stale in db.parent.glob(f".{db.name}.creating-*"):  # left by a killed creator
            stale.unlink()
        tmp = db.parent / f".{db.name}.creating-{os.getpid()}"
        MlflowClient(f"sqlite:///{tmp}").search_experiments(max_results=1)  # creates every table, registry's too
        try:
            os.link(tmp, db)  # into place, never over a store some other MLflow client made meanwhile
        except FileExistsError:
            pass
        tmp.unlink()


def context_tags() -> dict[str, str]:
    """User, source and git commit tags, as mlflow.start_run would set them for this process. A sweep
    resolves them once in its driver and gives them to every trial (a trial's own process is a Ray worker)."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = {k: str(v) for k, v in resolve_tags().items() if k.startswith("mlflow.")}
    if "mlflow.source.git.commit" not in tags:  # MLflow looks beside the entry script; raysweep's own clone
        try:
            tags["mlflow.source.git.commit"] = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass  # installed from a wheel: no commit to name
    return tags


def check_tracking(uri: str) -> None:
    """Fail fast, naming the URI, when the store cannot be reached: MLflow's client retries an
    unreachable server for minutes, and would do so in every trial."""
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=10)
        except requests.RequestException as err:
            raise UserError(f"--tracking-uri {uri}: cannot reach an MLflow server there ({type(err).__name__}); "
                            "start it (mlflow server ...) or give another URI") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UserError(f"--tracking-uri {uri}: the folder {folder} does not exist or is not writable")


def experiment_id(name: str, uri: str) -> str:
    """Get or create; a local store gets an absolute artifact location next to the database."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    try:
        # A model-training experiment: MLflow 3's UI opens its runs table, not the GenAI traces overview.
        return client.create_experiment(name, artifact_location=location,
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except MlflowException:  # created by another process since the lookup
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


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


def log_resolved_params(client, run_id: str, raw: dict, cfg) -> None:
    """Log the validated config's values that the raw one (already logged) left to their defaults, so
    every run's params show the whole config it ran with."""
    logged = flat_params(raw)
    extra = [Param(k, v) for k, v in flat_params(cfg.model_dump(mode="json")).items() if k not in logged]
    for i in range(0, len(extra), 100):  # log_batch takes at most 100 params
        client.log_batch(run_id, params=extra[i:i + 100])


def flat_metrics(metrics: dict) -> dict[str, float]:
    """A metrics.json's named results (evaluation/report.py) and the run's seconds, as MLflow metrics."""
    out = scalars_of(metrics)
    out.update({k: float(metrics[k]) for k in ("eval_seconds", "total_seconds") if k in metrics})
    if "train" in metrics:
        out["train_seconds"] = float(metrics["train"]["seconds"])
    return out


def log_results(client, run_id: str, out: Path, metrics: dict, logged_epochs: int = 0) -> None:
    """Per-epoch history (but its first `logged_epochs` rows, logged live), final metrics and the run
    directory's files (checkpoint included)."""
    now = int(time.time() * 1000)
    rows = [r for r in metrics.get("train", {}).get("history", []) if r["epoch"] >= logged_epochs]
    history = [Metric(f"train/{k}", float(v), now, int(row["epoch"])) for row in rows
               for k, v in row.items() if k != "epoch"]
    final = [Metric(k, v, now, 0) for k, v in flat_metrics(metrics).items()]
    flags = masking_flags_of(metrics)  # shown in the runs table: a flagged number is not to be trusted
    tags = [RunTag("raysweep.masking", ", ".join(sorted(flags)) or "none")] if "masking_checks" in metrics else []
    tags += [RunTag(f"raysweep.masking.{name}"[:250], why[:5000]) for name, why in flags.items()]
    if weak := weak_members(metrics):  # the runs table shows it: a clean accuracy that is mostly one member's
        tags.append(RunTag("raysweep.weak_members", ", ".join(map(str, weak))))
    client.log_batch(run_id, metrics=history + final, tags=tags)
    for name in ("metrics.json", "config.yaml", "acc_vs_eps.png", "uap.png"):
        if (out / name).is_file():
            client.log_artifact(run_id, str(out / name))
    if (out / "checkpoint").is_dir():
        client.log_artifacts(run_id, str(out / "checkpoint"), "checkpoint")


@contextmanager
def tracked_run(uri: str, experiment: str, run_name: str, cfg_raw: dict, tags: dict | None = None,
                still_wanted=None):
    """An MLflow run for the block: params up front; FAILED (keeping what was logged) if the block
    raises, FINISHED otherwise unless the block closed the run itself, or KILLED if `still_wanted()`
    says no at the end (a sweep's trial that outlived its interrupted sweep). Yields (client, run_id)."""
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(experiment, uri), run_name=run_name, tags=tags or {})
    run_id = run.info.run_id
    try:
        params = flat_params(cfg_raw)
        items = list(params.items())
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        yield client, run_id
    except (SystemExit, GeneratorExit):
        # Tune ends a stopped trial (ASHA) with SystemExit(0); a sweep's packed point is closed unfinished
        # (GeneratorExit) when Tune stopped its trial at an earlier point's report.
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "FINISHED" if still_wanted is None or still_wanted() else "KILLED")


def log_train_run(cfg: RunConfig, out: Path, uri: str, experiment: str, train, tags: dict | None = None):
    """`raysweep train` (or a reproduce task) as one MLflow run: `train()` returns metrics written under `out`."""
    with tracked_run(uri, experiment, cfg.name, cfg.model_dump(mode="json"),
                     {**context_tags(), **(tags or {"raysweep.kind": "train"})}) as (c, rid):
        metrics = train()
        log_results(c, rid, out, metrics)
        e = cfg.ensemble
        c.set_tag(rid, "mlflow.note.content", (  # the run page's description
            f"**{cfg.name}**: {e.method} ensemble of K={e.k} {cfg.model.arch}, {cfg.train.epochs} epochs on "
            f"{cfg.data.dataset}: " + ", ".join(f"{k} **{v:.4f}**" for k, v in list(scalars_of(metrics).items())[:6])
            + f". Every result: metrics.json; re-evaluate: `raysweep evaluate runs:/{rid}/checkpoint`."))
        return metrics, rid
