"""`raysweep sweep`: Ray Tune + Optuna over a search space, every trial an MLflow child run.

One Tune function trainable per trial (`_trial`): it builds the trial's config from the values
Optuna sampled, trains and evaluates it exactly as `raysweep train` does (local or Ray executor),
and reports the objectives. The sweep directory holds Tune's experiment state (so `--resume`
continues without re-running finished trials) and `sweep.json` (the MLflow parent run).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.tune
from mlflow import MlflowClient
from optuna.samplers import NSGAIISampler, TPESampler
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from . import plots
from .config import dump_config, validate_config
from .errors import ConfigError, UserError
from .executors.ray_train import connect, num_workers
from .registry import register as register_model
from .run import train_and_evaluate
from .search_space import SearchSpace, load_search_space
from .tracking import (DEFAULT_EXPERIMENT, experiment_id, flat_metrics, flat_params, log_results, tracked_run,
                       tracking_uri)

STATE_FILE = "sweep.json"
TUNE_DIR = "tune"


@dataclass
class TrialContext:
    space: SearchSpace
    uri: str
    experiment: str
    parent_run_id: str


def _objectives(space: SearchSpace, metrics: dict | None) -> dict:
    # Infeasible points score 0: every objective is an accuracy to maximise.
    return {o.key: (o.value(metrics) if metrics is not None else 0.0) for o in space.search.objective}


def _last_report(metrics: dict) -> None:
    try:
        ray.tune.report(metrics)
    except SystemExit:
        pass  # Tune may end the trial's thread at its last report; everything is logged: the run is complete


def _trial(values: dict, ctx: TrialContext) -> None:
    trial = ray.tune.get_context()
    trial_id = trial.get_trial_id()
    raw = ctx.space.trial_config(values)
    raw["name"] = f"{ctx.space.name}-{trial_id}"
    node = ray.get_runtime_context().get_node_id()
    tags = {"mlflow.parentRunId": ctx.parent_run_id, "raysweep.trial_id": trial_id, "raysweep.kind": "trial",
            "raysweep.node_id": node}
    with tracked_run(ctx.uri, ctx.experiment, raw["name"], raw, tags) as (client, run_id):
        for name, value in values.items():  # the whole config is in the params; the sampled values also as tags
            client.set_tag(run_id, f"searched.{name}", str(value))
        try:
            cfg = validate_config(raw, f"trial {trial_id}")
        except ConfigError as err:
            client.set_tag(run_id, "raysweep.infeasible", str(err)[:5000])
            _last_report({**_objectives(ctx.space, None), "infeasible": 1, "mlflow_run_id": run_id})
            return
        out = Path(trial.get_trial_dir()) / "run"

        def report_epoch(event, state):
            # ASHA's intermediate metric (the objectives exist only after evaluation). The last epoch is
            # reported with the objectives: ASHA stops a trial reaching max_t, which would cut evaluation off.
            if event == "epoch" and len(state.history) < cfg.train.epochs:
                row = state.history[-1]
                ray.tune.report({"epoch": len(state.history), "train_acc": row["train_acc"],
                                 "train_loss": row["loss"], "mlflow_run_id": run_id})

        metrics = train_and_evaluate(cfg, out, progress=False, callbacks=(report_epoch,))
        log_results(client, run_id, out, metrics)
        objectives = _objectives(ctx.space, metrics)
        final = {**objectives, "clean_acc": metrics["clean_acc"], "infeasible": 0, "epoch": cfg.train.epochs,
                 "node_id": node,
                 "train_acc": metrics["train"]["history"][-1]["train_acc"], "mlflow_run_id": run_id,
                 "checkpoint": str(out / "checkpoint"), "metrics_json": json.dumps(metrics, default=str)}
        _last_report(final)


def _max_concurrent(space: SearchSpace) -> int:
    """Trials at once: the cluster's CPUs (and GPUs) over what one trial holds, its Ray workers included."""
    s, cfg = space.search, space.base_cfg
    if s.max_concurrent:
        return s.max_concurrent
    cpus, gpus = s.trial_cpus, s.trial_gpus
    if cfg.executor.kind == "ray":
        cpus += num_workers(cfg) * cfg.executor.ray.cpus_per_worker
        gpus += num_workers(cfg) * cfg.executor.ray.gpus_per_worker
    have = ray.cluster_resources()
    fits = [math.floor(have.get("CPU", 0) / cpus + 1e-9)] + ([math.floor(have.get("GPU", 0) / gpus + 1e-9)] if gpus else [])
    if min(fits) < 1:
        raise ConfigError(f"one trial needs {cpus:g} CPUs and {gpus:g} GPUs (search.trial_cpus/trial_gpus plus its Ray "
                          f"workers), but the Ray cluster has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs")
    return min(fits)


class _FinalOnlyOptunaSearch(OptunaSearch):
    """OptunaSearch that learns from finished evaluations only: per-epoch reports carry the training
    accuracy for ASHA, not the objective (which exists only after evaluation)."""

    def on_trial_result(self, trial_id, result):
        pass


class _MlflowTrialStatus(Callback):
    """Driver-side Tune callback: a trial that died (and is retried), errored or was stopped early (ASHA)
    could not close its own MLflow run; mark it FAILED or KILLED, keeping what it logged."""

    def __init__(self, uri: str, experiment: str):
        self.uri, self.experiment = uri, experiment

    def _close(self, trial, status):
        client = MlflowClient(self.uri)
        runs = client.search_runs([experiment_id(self.experiment, self.uri)],
                                  f"tags.`raysweep.trial_id` = '{trial.trial_id}'")
        for run in runs:
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED")  # its process or node died; Tune retries it as a new run

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, "KILLED")  # a finished trial already closed its run as FINISHED


def _pareto(rows: list[dict], keys: list[str]) -> list[dict]:
    return [r for r in rows if not any(all(o[k] >= r[k] for k in keys) and any(o[k] > r[k] for k in keys)
                                       for o in rows)]


def run_sweep(space_path: str, overrides: list[str] = (), samples: int | None = None, out: str | None = None,
              resume: bool = False, register: str | None = None, tracking: str | None = None,
              experiment: str | None = None, address: str | None = None, progress: bool = True,
              storage: str | None = None) -> dict:
    """`out`: the local sweep directory (state, summary, plots). `storage`: where Tune keeps its
    experiment and trial state, a path or a pyarrow URI (s3://, gs://, file://); default `out`."""
    space = load_search_space(space_path, list(overrides))
    s = space.search
    if samples is not None:
        s.samples = samples
    sweep_dir = Path(out or Path("runs") / "sweeps" / space.name).resolve()
    state_file = sweep_dir / STATE_FILE
    uri, experiment = tracking_uri(tracking), experiment or DEFAULT_EXPERIMENT
    client = MlflowClient(uri)
    if resume:
        if not state_file.is_file():
            raise UserError(f"--resume: no sweep in {sweep_dir} ({STATE_FILE} missing)")
        state = json.loads(state_file.read_text())
        uri, experiment = state["tracking_uri"], state["experiment"]
        client = MlflowClient(uri)
        # Trials that were running when the sweep died left their runs open; Tune restarts them as new runs.
        for run in client.search_runs([experiment_id(experiment, uri)],
                                      f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'"):
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, "KILLED")
    else:
        if state_file.exists():
            raise UserError(f"{sweep_dir} already holds a sweep: continue it with --resume, or pass another --out")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        parent = client.create_run(experiment_id(experiment, uri), run_name=f"sweep {space.name}",
                                   tags={"raysweep.kind": "sweep", "raysweep.space": str(space_path)})
        state = {"tracking_uri": uri, "experiment": experiment, "parent_run_id": parent.info.run_id,
                 "storage": storage or str(sweep_dir),
                 "space": str(Path(space_path).resolve()), "overrides": list(overrides), "samples": s.samples,
                 "started": time.time()}
        state_file.write_text(json.dumps(state, indent=2))
        client.log_text(parent.info.run_id, Path(space_path).read_text(), "search_space.yaml")
        for key, value in flat_params(s.model_dump(mode="json"), "search.").items():
            client.log_param(parent.info.run_id, key, value)
    parent_id = state["parent_run_id"]
    storage = state["storage"]
    tune_path = f"{storage.rstrip('/')}/{TUNE_DIR}"
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # epoch reports carry no objective yet
    connect(address)
    ctx = TrialContext(space, uri, experiment, parent_id)
    trainable = ray.tune.with_resources(ray.tune.with_parameters(_trial, ctx=ctx),
                                        {"CPU": s.trial_cpus, "GPU": s.trial_gpus})
    keys = [o.key for o in s.objective]
    run_config = ray.tune.RunConfig(name=TUNE_DIR, storage_path=storage,
                                    callbacks=[_MlflowTrialStatus(uri, experiment)],
                                    failure_config=ray.tune.FailureConfig(max_failures=s.max_failures),
                                    verbose=1 if progress else 0)
    t0 = time.perf_counter()
    if resume:
        tuner = ray.tune.Tuner.restore(tune_path, trainable, resume_errored=False,
                                       restart_errored=False)
    else:
        sampler = NSGAIISampler(seed=s.seed) if s.multi else TPESampler(seed=s.seed)
        searcher = _FinalOnlyOptunaSearch(space=space.define_by_run, metric=keys if s.multi else keys[0],
                                mode=["max"] * len(keys) if s.multi else "max", sampler=sampler)
        scheduler = None
        if s.asha is not None:
            scheduler = ASHAScheduler(metric="train_acc", mode="max", time_attr="epoch",
                                      max_t=space.base_cfg.train.epochs, grace_period=s.asha.grace_period,
                                      reduction_factor=s.asha.reduction_factor)
        tuner = ray.tune.Tuner(trainable, run_config=run_config, tune_config=ray.tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=s.samples,
            max_concurrent_trials=_max_concurrent(space)))
    grid = tuner.fit()
    seconds = time.perf_counter() - t0
    return _summarise(space, grid, sweep_dir, client, parent_id, keys, seconds, register, uri, tune_path)


def _summarise(space, grid, sweep_dir, client, parent_id, keys, seconds, register, uri, tune_path) -> dict:
    s = space.search
    rows, failed, stopped, infeasible = [], 0, 0, 0
    for result in grid:
        m = result.metrics or {}
        if result.error is not None:
            failed += 1
        elif m.get("infeasible"):
            infeasible += 1
        elif not all(k in m for k in keys):
            stopped += 1
        else:
            rows.append({**{k: m[k] for k in keys}, "clean_acc": m["clean_acc"], "trial_id": m["trial_id"],
                         "mlflow_run_id": m["mlflow_run_id"], "checkpoint": m["checkpoint"],
                         "params": dict(result.config),
                         "metrics": json.loads(m["metrics_json"])})
    summary = {"space": space.source, "trials": len(grid), "finished": len(rows), "failed": failed,
               "stopped_early": stopped, "infeasible": infeasible, "seconds": seconds, "objectives": keys,
               "finished_trials": [{**{k: r[k] for k in (*keys, "clean_acc", "trial_id", "params")},
                                    "seconds": r["metrics"].get("total_seconds")} for r in rows]}
    if not rows:
        client.set_terminated(parent_id, "FAILED")
        raise UserError(f"no trial of the sweep finished ({failed} failed, {stopped} stopped early, {infeasible} "
                        f"infeasible); Tune's trial logs are under {tune_path}")
    if s.multi:
        front = sorted(_pareto(rows, keys), key=lambda r: r[keys[0]])
        summary["pareto"] = [{k: r[k] for k in (*keys, "trial_id", "mlflow_run_id", "params")} for r in front]
        best = max(front, key=lambda r: r[keys[0]])  # registered: the front's best on the first objective
    else:
        best = max(rows, key=lambda r: r[keys[0]])
    best_cfg = validate_config({**space.trial_config(best["params"]), "name": f"{space.name}-best"})
    summary["best"] = {k: best[k] for k in (*keys, "clean_acc", "trial_id", "mlflow_run_id", "params", "checkpoint")}
    (sweep_dir / "best.yaml").write_text(dump_config(best_cfg))
    color = s.color_by or s.params and next(iter(s.params))
    robust_key = keys[1] if s.multi else {"weighted_acc": "mean_uap_acc"}.get(keys[0], keys[0])
    points = [{"clean": r["clean_acc"], "robust": _metric(r, robust_key), "color": _color(r["params"], color),
               "objective": r[keys[0]]} for r in rows]
    front = [(r["clean_acc"], _metric(r, robust_key)) for r in _pareto(
        [{**r, robust_key: _metric(r, robust_key)} for r in rows], ["clean_acc", robust_key])]
    plots.tradeoff(points, robust_key, color, sweep_dir / "tradeoff.png", front)
    client.log_artifact(parent_id, str(sweep_dir / "tradeoff.png"))
    client.log_artifact(parent_id, str(sweep_dir / "best.yaml"))
    client.log_metric(parent_id, f"best/{keys[0]}", best[keys[0]])
    client.log_metric(parent_id, "trials_finished", len(rows))
    if register:
        summary["registered"] = register_model(register, Path(best["checkpoint"]), best["mlflow_run_id"], uri,
                                               keys[0], best[keys[0]])
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    client.log_artifact(parent_id, str(sweep_dir / "summary.json"))
    client.set_terminated(parent_id, "FINISHED")
    summary["dir"] = str(sweep_dir)
    return summary


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
