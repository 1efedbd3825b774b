"""`raysweep sweep`: Ray Tune + Optuna over a search space, every trial an MLflow child run.

One Tune function trainable per trial (`_trial`): it builds the trial's config from the values
Optuna sampled, trains and evaluates it exactly as `raysweep train` does (local or Ray executor),
and reports the objectives with its run directory as a Tune checkpoint, so checkpoint, metrics.json
and pictures land in the sweep's storage (and in the trial's MLflow run), never only on the node
that trained it.

The sweep directory (on the machine running the sweep: the head on a cluster) holds what a resume
needs and nothing a node holds alone:
  sweep.json          how the sweep was started (space, overrides, samples, storage, MLflow, ...)
  search_space.yaml   a copy of the space file as given
  optuna.db           the Optuna study (open it with optuna.load_study or optuna-dashboard)
  trials/ID.json      one record per trial that ended: finished, infeasible, stopped early or failed
  summary.json, best.yaml, tradeoff.png
`--resume` rebuilds the sweep from these, not from the command line and not from Tune's pickled
state: finished trials stay finished, trials that were running are sampled again at the same point.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
import pyarrow.fs
import ray
import ray.tune
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric
from optuna.samplers import NSGAIISampler, TPESampler
from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from raysweep import plots
from raysweep.config.schema import dump_config, validate_config
from raysweep.errors import ConfigError, UserError
from raysweep.training.ray import connect, num_workers, storage_path, warn_if_local_storage
from raysweep.tracking.registry import register as register_model
from raysweep.run import train_and_evaluate
from raysweep.sweep.space import SearchSpace, load_search_space
from raysweep.tracking.runs import (DEFAULT_EXPERIMENT, check_tracking, context_tags, experiment_id, flat_metrics, flat_params,
                       log_results, tracked_run, tracking_uri)

STATE_FILE = "sweep.json"
SPACE_COPY = "search_space.yaml"
OPTUNA_DB = "optuna.db"
TRIALS = "trials"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class TrialContext:
    space: SearchSpace
    uri: str
    experiment: str
    parent_run_id: str
    storage: str  # the sweep's storage: Ray executor trials keep their Ray Train checkpoints under it
    run_tags: dict  # user, source, git commit: resolved in the driver


def _objectives(space: SearchSpace, metrics: dict | None) -> dict:
    # Infeasible points score 0: every objective is an accuracy to maximise.
    return {o.key: (o.value(metrics) if metrics is not None else 0.0) for o in space.search.objective}


def _last_report(metrics: dict, checkpoint_dir: Path | None = None) -> None:
    checkpoint = ray.tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    try:
        ray.tune.report(metrics, checkpoint=checkpoint)  # Tune copies the directory to the sweep's storage
    except SystemExit:
        pass  # Tune may end the trial's thread at its last report; everything is logged: the run is complete


def _quiet_interrupts(unraisable) -> None:
    """A sweep stopped by Ctrl-C or SIGTERM interrupts its trials wherever they are, finalizers included;
    Python would print that KeyboardInterrupt as an 'Exception ignored' traceback on the user's terminal."""
    if not issubclass(unraisable.exc_type, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


def _trial(values: dict, ctx: TrialContext) -> None:
    sys.unraisablehook = _quiet_interrupts
    trial = ray.tune.get_context()
    trial_id = trial.get_trial_id()
    raw = ctx.space.trial_config(values)
    raw["name"] = f"{ctx.space.name}-{trial_id}"
    node = ray.get_runtime_context().get_node_id()
    tags = {**ctx.run_tags, "mlflow.parentRunId": ctx.parent_run_id, "raysweep.trial_id": trial_id,
            "raysweep.kind": "trial", "raysweep.node_id": node}
    # An interrupted sweep marks its parent run KILLED before it settles its trials' runs (run_sweep); a
    # trial still running in its stopping actor then ends KILLED, as the sweep will count it, not FINISHED.
    sweep_running = lambda: MlflowClient(ctx.uri).get_run(ctx.parent_run_id).info.status == "RUNNING"  # noqa: E731
    with tracked_run(ctx.uri, ctx.experiment, raw["name"], raw, tags, still_wanted=sweep_running) as (client, run_id):
        for name, value in values.items():  # the whole config is in the params; the sampled values also as tags
            client.set_tag(run_id, f"searched.{name}", str(value))
        try:
            cfg = validate_config(raw, f"trial {trial_id}")
        except ConfigError as err:
            client.set_tag(run_id, "raysweep.infeasible", str(err)[:5000])
            _last_report({**_objectives(ctx.space, None), "infeasible": 1, "mlflow_run_id": run_id})
            return
        # Scratch space on this node; what outlives the trial goes to storage and MLflow below.
        out = Path(trial.get_trial_dir()) / "run"

        relay = functools.partial(epoch_metrics, epochs=cfg.train.epochs, run_id=run_id)

        def report_epoch(event, state):  # local executor; a Ray executor run relays from its rank 0
            if event == "epoch" and (m := relay(state.history[-1])) is not None:
                ray.tune.report(m)

        try:
            metrics = train_and_evaluate(cfg, out, progress=False, callbacks=(report_epoch,),
                                         ray_storage=f"{ctx.storage.rstrip('/')}/ray-train", epoch_metrics=relay)
        except Exception as err:
            # A Python error of this trial (its config, its data): the same on every retry, so the trial
            # ends here, FAILED in MLflow with its error and traceback (the epochs it finished are logged
            # already). Tune's max_failures is left for what a retry can fix: a dead process or node.
            error = f"{type(err).__name__}: {err}"
            client.set_tag(run_id, "raysweep.error", error[:5000])
            client.log_text(run_id, traceback.format_exc(), "error.txt")
            client.set_terminated(run_id, "FAILED")
            _last_report({"error": error[:2000], "mlflow_run_id": run_id})
            return
        log_results(client, run_id, out, metrics, logged_epochs=cfg.train.epochs - 1)  # the driver logged those
        objectives = _objectives(ctx.space, metrics)
        final = {**objectives, "clean_acc": metrics["clean_acc"], "infeasible": 0, "epoch": cfg.train.epochs,
                 "node_id": node,
                 "train_acc": metrics["train"]["history"][-1]["train_acc"], "mlflow_run_id": run_id,
                 "metrics_json": json.dumps(metrics, default=str)}
        _last_report(final, out)


def epoch_metrics(row: dict, epochs: int, run_id: str) -> dict | None:
    """What a trial reports to Tune as an epoch ends: ASHA's metric (the objectives exist only after
    evaluation) and the row for MLflow, which the driver logs live. The last epoch is reported with the
    objectives instead: ASHA stops a trial reaching max_t, which would cut its evaluation off."""
    n = row["epoch"] + 1  # history rows count epochs from 0; Tune's `epoch` from 1 (ASHA's time attribute)
    if n >= epochs:
        return None
    return {"epoch": n, "train_acc": row["train_acc"], "train_loss": row["loss"], "mlflow_run_id": run_id,
            **({"probe_acc": row["probe_acc"]} if "probe_acc" in row else {}),
            **{f"train/{k}": float(v) for k, v in row.items() if k != "epoch"}}


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
    fits = [math.floor(have.get("CPU", 0) / cpus + 1e-9)]
    if gpus:
        fits.append(math.floor(have.get("GPU", 0) / gpus + 1e-9))
    if min(fits) < 1:
        raise ConfigError(f"one trial needs {cpus:g} CPUs and {gpus:g} GPUs (search.trial_cpus/trial_gpus plus its "
                          f"Ray workers), but the Ray cluster has {have.get('CPU', 0):g} CPUs and "
                          f"{have.get('GPU', 0):g} GPUs")
    return min(fits)


class _FinalOnlyOptunaSearch(OptunaSearch):
    """OptunaSearch that learns from finished evaluations only: per-epoch reports carry the training
    accuracy for ASHA, not the objective (which exists only after evaluation)."""

    def on_trial_result(self, trial_id, result):
        pass

    def suggest(self, trial_id):
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:  # lets _adopt_finished find the Optuna trial of a Tune trial
            self._ot_trials[trial_id].set_user_attr("tune_trial_id", trial_id)
        return config


def _storage_uri(storage: str, checkpoint) -> str:
    """Where Tune put a trial's checkpoint, as a path (local storage) or a URI of the storage's scheme."""
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem) and "://" not in storage:
        return checkpoint.path
    return f"{storage.split('://', 1)[0]}://{checkpoint.path}"


def _finished_fields(run_id: str, objectives: dict, metrics: dict, node_id: str | None) -> dict:
    """What a finished trial's record holds beyond its id, status and params (the ledger's and adopted ones)."""
    return {"mlflow_run_id": run_id, **objectives, "clean_acc": metrics["clean_acc"], "node_id": node_id,
            "checkpoint": f"runs:/{run_id}/checkpoint", "metrics": metrics}


def _write_record(records: Path, rec: dict) -> None:
    records.mkdir(parents=True, exist_ok=True)
    tmp = records / f".{rec['trial_id']}.json"
    tmp.write_text(json.dumps(rec, indent=2, default=str))
    tmp.replace(records / f"{rec['trial_id']}.json")  # whole or absent, even if the sweep is killed here


class _TrialLedger(Callback):
    """Driver-side Tune callback: writes one record per trial that ended (the summary and `--resume`
    read these, not Tune's state), and closes the MLflow run of a trial that died (retried), errored or
    was stopped early (ASHA), which could not close its own: FAILED or KILLED, keeping what it logged."""

    def __init__(self, uri: str, experiment: str, keys: list[str], records: Path, storage: str):
        self.uri, self.experiment, self.keys, self.records, self.storage = uri, experiment, keys, records, storage

    def _close(self, trial, status):
        client = MlflowClient(self.uri)
        runs = client.search_runs([experiment_id(self.experiment, self.uri)],
                                  f"tags.`raysweep.trial_id` = '{trial.trial_id}'")
        for run in runs:
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status)

    def _record(self, trial, status: str, **extra) -> None:
        m = trial.last_result or {}
        rec = {"trial_id": trial.trial_id, "status": status, "params": dict(trial.config),
               "mlflow_run_id": m.get("mlflow_run_id"), **extra}
        if status == "finished":
            rec.update(_finished_fields(m["mlflow_run_id"], {k: m[k] for k in self.keys},
                                        json.loads(m["metrics_json"]), m.get("node_id")))
            if trial.checkpoint is not None:
                rec["storage"] = _storage_uri(self.storage, trial.checkpoint)
        _write_record(self.records, rec)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        """An epoch of a running trial: its row goes to the trial's MLflow run now, in one batch."""
        rows = [Metric(k, v, int(time.time() * 1000), int(result["epoch"]) - 1) for k, v in result.items()
                if k.startswith("train/")]  # MLflow steps are the history's 0-based epochs
        if rows:  # epoch_metrics puts the run id in every epoch's result
            MlflowClient(self.uri).log_batch(result["mlflow_run_id"], metrics=rows)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED")  # its process or node died; Tune retries it as a new run

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED")
        self._record(trial, "failed", error=str(trial.get_error())[-5000:])

    def on_trial_complete(self, iteration, trials, trial, **info):
        m = trial.last_result or {}
        if "error" in m:  # the trial caught its own error and closed its run FAILED (see _trial)
            self._record(trial, "failed", error=m["error"])
            return
        status = ("infeasible" if m.get("infeasible") else "finished" if all(k in m for k in self.keys)
                  else "stopped_early")
        if status == "stopped_early":  # ASHA ended it mid-training; a finished trial closes its own run
            self._close(trial, "KILLED")
        self._record(trial, status)


def _pareto(rows: list[dict], keys: list[str]) -> list[dict]:
    return [r for r in rows if not any(all(o[k] >= r[k] for k in keys) and any(o[k] > r[k] for k in keys)
                                       for o in rows)]


def _check_storage(storage: str) -> None:
    """Fail before any trial when storage cannot be written (a typo'd bucket, a read-only path)."""
    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(storage if "://" in storage else Path(storage).as_uri())
        fs.create_dir(path, recursive=True)
        probe = f"{path}/.raysweep-write-check"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as err:  # pyarrow raises OSError, ArrowInvalid, ... depending on the scheme
        raise UserError(f"--storage {storage}: cannot write there ({type(err).__name__}: {err}); give a path or a "
                        f"pyarrow URI (file://, s3://, gs://, hdfs://) every node can write") from None


def _optuna_storage(sweep_dir: Path) -> str:
    return f"sqlite:///{sweep_dir / OPTUNA_DB}"


def _start(space_path: str, overrides: list[str], samples: int | None, sweep_dir: Path, storage: str | None,
           register: str | None, tracking: str | None, experiment: str | None, address: str | None) -> dict:
    """A new sweep: validate everything and reach Ray, MLflow and storage, then write the state a resume
    rebuilds it from (a start that fails before leaves nothing that stops a plain re-run)."""
    space = load_search_space(space_path, overrides)  # a malformed space fails here, before any side effect
    state_file = sweep_dir / STATE_FILE
    if state_file.exists():
        raise UserError(f"{sweep_dir} already holds a sweep: continue it with --resume, or pass another --out")
    if samples is not None and samples < 1:
        raise UserError(f"--samples {samples}: a sweep needs at least 1 trial")
    if register is not None and not MODEL_NAME.match(register):
        raise UserError(f"--register {register!r}: a registered model name is letters, digits, '.', '_' and '-', "
                        "starting with a letter or digit (it becomes models:/NAME@champion)")
    uri, experiment = tracking_uri(tracking), experiment or DEFAULT_EXPERIMENT
    check_tracking(uri)
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {sweep_dir}: cannot create the sweep directory ({err.strerror})") from None
    storage = storage_path(storage or sweep_dir)
    _check_storage(storage)
    connect(address)
    client = MlflowClient(uri)
    run_tags = context_tags()
    parent = client.create_run(experiment_id(experiment, uri), run_name=f"sweep {space.name}",
                               tags={**run_tags, "raysweep.kind": "sweep", "raysweep.space": str(space_path)})
    (sweep_dir / SPACE_COPY).write_text(Path(space_path).read_text())
    state = {"space_file": str(Path(space_path).resolve()), "root": str(Path.cwd()), "overrides": list(overrides),
             "samples": samples if samples is not None else space.search.samples, "storage": storage,
             "register": register, "tracking_uri": uri, "experiment": experiment,
             "parent_run_id": parent.info.run_id, "optuna_storage": _optuna_storage(sweep_dir),
             "study_name": space.name, "objectives": [o.key for o in space.search.objective],
             "run_tags": run_tags, "started": time.time(), "attempts": 0}
    _write_state(sweep_dir, state)
    client.log_text(parent.info.run_id, Path(space_path).read_text(), "search_space.yaml")
    for key, value in flat_params(space.search.model_dump(mode="json"), "search.").items():
        client.log_param(parent.info.run_id, key, value)
    client.log_param(parent.info.run_id, "overrides", json.dumps(list(overrides)))
    return state


def _write_state(sweep_dir: Path, state: dict) -> None:
    tmp = sweep_dir / f".{STATE_FILE}"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(sweep_dir / STATE_FILE)  # whole or absent, even if the sweep is killed here


def _reopen(sweep_dir: Path, space_path: str | None, overrides: list[str], given: dict) -> dict:
    """A resumed sweep runs exactly as it was started: what the command line repeats must match."""
    state_file = sweep_dir / STATE_FILE
    if not state_file.is_file():
        raise UserError(f"--resume: no sweep in {sweep_dir} ({STATE_FILE} missing); start one without --resume")
    state = json.loads(state_file.read_text())
    stored_text = (sweep_dir / SPACE_COPY).read_text()
    if space_path is not None and Path(space_path).is_file() and Path(space_path).read_text() != stored_text:
        raise UserError(f"--resume: {space_path} differs from the search space this sweep started with "
                        f"({sweep_dir / SPACE_COPY}); resume without changing it, or start a new sweep with "
                        "another --out")
    if overrides and list(overrides) != state["overrides"]:
        raise UserError(f"--resume: --set {list(overrides)} differs from the sweep's overrides {state['overrides']}; "
                        "a resumed sweep keeps its own: drop --set, or start a new sweep with another --out")
    for name, value in given.items():
        if value is not None and value != state[name]:
            raise UserError(f"--resume: --{name.replace('_', '-')} {value} differs from the sweep's "
                            f"{state[name]}; drop it, or start a new sweep with another --out")
    check_tracking(state["tracking_uri"])
    return state


def _records(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((sweep_dir / TRIALS).glob("*.json"))]


def _close_open_runs(client: MlflowClient, state: dict, status: str = "KILLED") -> int:
    runs = client.search_runs([experiment_id(state["experiment"], state["tracking_uri"])],
                              f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'")
    open_runs = [r for r in runs if r.info.status == "RUNNING"]
    for run in open_runs:
        client.set_terminated(run.info.run_id, status)
    return len(open_runs)


def _adopt_finished(client: MlflowClient, state: dict, space: SearchSpace, sweep_dir: Path) -> int:
    """A trial can end its MLflow run FINISHED, everything logged, just as the sweep is interrupted and
    before Tune hands its last result to the driver: the ledger never sees it and Optuna holds it as
    running, so a resume would train it again. Its record and its Optuna value come from its run."""
    recorded = {r["trial_id"] for r in _records(sweep_dir)}
    runs = [r for r in client.search_runs([experiment_id(state["experiment"], state["tracking_uri"])],
                                          f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'")
            if r.info.status == "FINISHED" and r.data.tags.get("raysweep.trial_id") not in recorded
            and "raysweep.infeasible" not in r.data.tags]
    if not runs:
        return 0
    study = optuna.load_study(study_name=state["study_name"], storage=state["optuna_storage"])
    running = {t.user_attrs.get("tune_trial_id"): t for t in study.get_trials(deepcopy=False,
                                                                              states=(TrialState.RUNNING,))}
    keys = [o.key for o in space.search.objective]
    for run in runs:
        trial_id, run_id = run.data.tags["raysweep.trial_id"], run.info.run_id
        metrics = json.loads(Path(client.download_artifacts(run_id, "metrics.json")).read_text())
        values = _objectives(space, metrics)
        ot = running.get(trial_id)
        params = ot.params if ot is not None else {k[len("searched."):]: yaml.safe_load(v) for k, v in
                                                   run.data.tags.items() if k.startswith("searched.")}
        _write_record(sweep_dir / TRIALS, {
            "trial_id": trial_id, "status": "finished", "params": params,
            **_finished_fields(run_id, values, metrics, run.data.tags.get("raysweep.node_id")),
            "adopted_from_mlflow": True})
        if ot is not None:
            study.tell(ot.number, [values[k] for k in keys] if space.search.multi else values[keys[0]])
    return len(runs)


def _requeue_interrupted(state: dict) -> None:
    """Trials the study holds as running were cut off by the interruption: close them as failed in
    Optuna and enqueue the same point again, so the resumed sweep re-runs them first."""
    try:
        study = optuna.load_study(study_name=state["study_name"], storage=state["optuna_storage"])
    except KeyError:
        return  # interrupted before Optuna asked for any point
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"raysweep_rerun_of": t.number})


@contextmanager
def _sigterm_as_sigint():
    """SIGTERM (a scheduler, `ray job stop`, kill) stops the sweep the way Ctrl-C does: Tune's SIGINT
    handler ends the trials and saves state, and the sweep is summarised as interrupted."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread: a sweep run from another thread keeps the default
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _tune(space: SearchSpace, state: dict, sweep_dir: Path, done: int, remaining: int, address: str | None,
          progress: bool) -> bool:
    """Run `remaining` trials with a fresh Tuner; True when interrupted (SIGINT, SIGTERM)."""
    s, uri, keys = space.search, state["tracking_uri"], [o.key for o in space.search.objective]
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # epoch reports carry no objective yet
    connect(address)
    warn_if_local_storage(state["storage"], "--storage")
    ctx = TrialContext(space, uri, state["experiment"], state["parent_run_id"], state["storage"], state["run_tags"])
    trainable = ray.tune.with_resources(ray.tune.with_parameters(_trial, ctx=ctx),
                                        {"CPU": s.trial_cpus, "GPU": s.trial_gpus})
    # A fresh Tuner on every attempt, built from the stored state (Tuner.restore would unpickle Tune's
    # state and, in Ray 2.60, drop max_concurrent_trials); the study in optuna.db carries the history.
    sampler = NSGAIISampler(seed=s.seed + done) if s.multi else TPESampler(seed=s.seed + done)
    searcher = _FinalOnlyOptunaSearch(
        space=space.define_by_run, metric=keys if s.multi else keys[0],
        mode=["max"] * len(keys) if s.multi else "max", sampler=sampler, study_name=state["study_name"],
        storage=optuna.storages.RDBStorage(state["optuna_storage"]))
    scheduler = None
    if s.asha is not None:
        scheduler = ASHAScheduler(metric=s.asha.metric, mode="max", time_attr="epoch",
                                  max_t=space.base_cfg.train.epochs, grace_period=s.asha.grace_period,
                                  reduction_factor=s.asha.reduction_factor)
    ledger = _TrialLedger(uri, state["experiment"], keys, sweep_dir / TRIALS, state["storage"])
    tuner = ray.tune.Tuner(trainable, run_config=ray.tune.RunConfig(
        name=f"tune-{state['attempts']}", storage_path=state["storage"], callbacks=[ledger],
        failure_config=ray.tune.FailureConfig(max_failures=s.max_failures), verbose=1 if progress else 0),
        tune_config=ray.tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=remaining,
                                        max_concurrent_trials=_max_concurrent(space)))
    try:
        with _sigterm_as_sigint():
            tuner.fit()
    except KeyboardInterrupt:  # a second Ctrl-C skips Tune's graceful stop
        return True
    return False


def run_sweep(space_path: str | None, overrides: list[str] = (), samples: int | None = None, out: str | None = None,
              resume: bool = False, register: str | None = None, tracking: str | None = None,
              experiment: str | None = None, address: str | None = None, progress: bool = True,
              storage: str | None = None) -> dict:
    """Run (or resume) a sweep; returns its summary, whose `status` is `finished`, `interrupted` (SIGINT
    or SIGTERM: resume it) or `failed` (no trial finished).

    `out`: the sweep directory (state, summary, plots) on this machine. `storage`: where trials'
    checkpoints, metrics and pictures and Tune's state go, a path every node sees or a pyarrow URI
    (s3://, gs://, file://); default `out`."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if space_path is None and not (resume and out):
        raise UserError("give a search space file, or --resume --out DIR of an earlier sweep")
    if out:
        sweep_dir = Path(out).expanduser().resolve()
    else:
        sweep_dir = (Path("runs") / "sweeps" / load_search_space(space_path, list(overrides)).name).resolve()
    if resume:
        state = _reopen(sweep_dir, space_path, list(overrides), {
            "samples": samples, "register": register, "experiment": experiment,
            "storage": storage and storage_path(storage),
            "tracking_uri": tracking and tracking_uri(tracking)})
    else:
        state = _start(space_path, list(overrides), samples, sweep_dir, storage, register, tracking, experiment,
                       address)
    space = load_search_space(sweep_dir / SPACE_COPY, state["overrides"], root=state["root"])
    uri, keys = state["tracking_uri"], [o.key for o in space.search.objective]
    client = MlflowClient(uri)
    if resume:
        _adopt_finished(client, state, space, sweep_dir)
        _close_open_runs(client, state)  # runs of trials cut off last time; their points are re-run below
        _requeue_interrupted(state)
        client.update_run(state["parent_run_id"], status="RUNNING")  # KILLED or FAILED when it stopped
    done = len(_records(sweep_dir))
    remaining = state["samples"] - done
    state["attempts"] += 1
    _write_state(sweep_dir, state)
    t0 = time.perf_counter()
    try:
        interrupted = remaining > 0 and _tune(space, state, sweep_dir, done, remaining, address, progress)
    except BaseException as err:  # the parent run is not left RUNNING; --resume can continue the sweep
        client.set_terminated(state["parent_run_id"], "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    records, closed = _records(sweep_dir), 0
    if interrupted or len(records) < state["samples"]:  # Tune returns normally from a graceful Ctrl-C
        # Trials may still be finishing in their stopping actors. In this order: the parent KILLED (a trial
        # ending after this closes its own run KILLED), open runs KILLED, then runs that FINISHED already are
        # adopted (counted, not re-run).
        client.set_terminated(state["parent_run_id"], "KILLED")
        closed = _close_open_runs(client, state)
        _adopt_finished(client, state, space, sweep_dir)
        records = _records(sweep_dir)
    interrupted = len(records) < state["samples"]
    return _summarise(space, state, records, sweep_dir, client, keys, time.perf_counter() - t0, interrupted, closed)


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
                                    "storage": r.get("storage"), "seconds": r["metrics"].get("total_seconds")}
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
                                                   "checkpoint")}, "storage": best.get("storage")}
        (sweep_dir / "best.yaml").write_text(
            f"# best trial {best['trial_id']}: checkpoint {best['checkpoint']}"
            + (f", also at {best['storage']}" if best.get("storage") else "") + "\n" + dump_config(best_cfg))
        _tradeoff(s, keys, rows, sweep_dir)
        for name in ("tradeoff.png", "best.yaml"):
            client.log_artifact(parent_id, str(sweep_dir / name))
        client.log_metric(parent_id, f"best/{keys[0]}", best[keys[0]])
    client.log_metric(parent_id, "trials_finished", len(rows))
    if rows and state["register"] and not interrupted:  # the checkpoint comes from MLflow, not from a node
        summary["registered"] = register_model(state["register"], best["checkpoint"], best["mlflow_run_id"],
                                               state["tracking_uri"], keys[0], best[keys[0]])
    if interrupted:
        summary["closed_runs"] = closed
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    client.log_artifact(parent_id, str(sweep_dir / "summary.json"))
    client.set_terminated(parent_id, {"interrupted": "KILLED", "failed": "FAILED"}.get(summary["status"], "FINISHED"))
    return summary


def _tradeoff(s, keys, rows, sweep_dir) -> None:
    color = s.color_by or s.params and next(iter(s.params))
    robust_key = keys[1] if s.multi else {"weighted_acc": "mean_uap_acc"}.get(keys[0], keys[0])
    points = [{"clean": r["clean_acc"], "robust": _metric(r, robust_key), "color": _color(r["params"], color),
               "objective": r[keys[0]]} for r in rows]
    front = [(r["clean_acc"], _metric(r, robust_key)) for r in _pareto(
        [{**r, robust_key: _metric(r, robust_key)} for r in rows], ["clean_acc", robust_key])]
    plots.tradeoff(points, robust_key, color, sweep_dir / "tradeoff.png", front)


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
