"""`raysweep sweep`, the driver: Ray Tune + Optuna over a search space, every trial an MLflow child
run. This module runs in the process that starts the sweep (the head, on a cluster): it starts or
reopens the sweep, hands Tune the trials, stops them on Ctrl-C/SIGTERM, settles what an
interruption left behind and writes the summary. The pieces:
  trial.py    what runs inside each Tune trial (possibly on another node)
  ledger.py   the sweep directory: start state, one record per ended trial, MLflow reconciliation
  summary.py  summary.json, best.yaml and the trade-off plot

One Tune function trainable (trial._trial) per Tune trial. It trains one sampled point, or a pack of
search.pack points (together where training/pack.py can step them as one, else one after another); for
each, it builds the config from the values Optuna sampled, trains and evaluates it exactly as
`raysweep train` does (local or Ray executor), and reports the
objectives with its run directory as a Tune checkpoint, so checkpoint, metrics.json and pictures
land in the sweep's storage (and in the point's MLflow run), never only on the node that trained it.

The sweep directory (on the machine running the sweep: the head on a cluster) holds what a resume
needs and nothing a node holds alone:
  sweep.json          how the sweep was started (space, overrides, samples, storage, MLflow, ...)
  search_space.yaml   a copy of the space file as given
  optuna.db           the Optuna study (open it with optuna.load_study or optuna-dashboard)
  trials/ID.json      one record per trial that ended: finished, infeasible, stopped early or failed
  summary.json, best.yaml, tradeoff.png
`--resume` rebuilds the sweep from these, not from the command line and not from Tune's pickled
state: finished trials stay finished, trials that were running are sampled again at the same point,
and continue from the epochs and evaluation stages that point kept in the storage (trial.resume_dir).
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from pathlib import Path

import optuna
import pyarrow.fs
import ray
import ray.tune
from mlflow import MlflowClient
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from raysweep import presets
from raysweep.errors import ConfigError, UserError
from raysweep.sweeps.ledger import (
    SPACE_COPY,
    STATE_FILE,
    TRIALS,
    _adopt_finished,
    _close_open_runs,
    _optuna_storage,
    _records,
    _requeue_interrupted,
    _TrialLedger,
    _write_state,
)
from raysweep.sweeps.space import SearchSpace, load_search_space
from raysweep.sweeps.summary import _summarise
from raysweep.sweeps.trial import TrialContext, _trial, member_id
from raysweep.terminal import on_sigterm
from raysweep.tracking.runs import (
    DEFAULT_EXPERIMENT,
    check_tracking,
    context_tags,
    experiment_id,
    flat_params,
    tracking_uri,
)
from raysweep.training.ray import (
    check_address,
    connect,
    num_workers,
    storage_path,
    warn_if_local_storage,
)

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _reuse_actors(space: SearchSpace) -> bool:
    """Whether one trial process runs the sweep's trials one after another, paying its imports (torch,
    MLflow: ~5 CPU-s a process) once. A trial stopped early (ASHA) waits blocked in its report until the
    next trial's reset ends it with SystemExit, which closes its run KILLED as the driver already did.
    Not for Ray executor trials: a stopped one tears its Ray Train workers down past Tune's reset
    timeout, and a reset that times out fails the next trial."""
    return space.base_cfg.executor.kind == "local"


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


class _SweepSearch(OptunaSearch):
    """OptunaSearch that hands each Tune trial a pack of `pack` points ({"pack": [values, ...]}, search.pack)
    and learns from finished evaluations only: every point is its own Optuna trial, told as its last
    report arrives (a pack's first points are told while its later ones train). Per-epoch reports carry
    the training accuracy for ASHA, not the objective (which exists only after evaluation). `total`:
    the points this Tuner may ask for; the last pack may be smaller."""

    def __init__(self, *args, pack: int = 1, total: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.pack, self.left = pack, total
        self._points: dict[str, list[str]] = {}  # Tune trial id -> its points' ids

    def suggest(self, trial_id):
        if self.left <= 0:
            return Searcher.FINISHED
        ids = [member_id(trial_id, j, self.pack) for j in range(min(self.pack, self.left))]
        points = []
        for point in ids:  # define-by-run: OptunaSearch always returns a point
            points.append(super().suggest(point))
            # The point's id (user attribute `tune_trial_id`, as MLflow's raysweep.trial_id): lets
            # _adopt_finished and _requeue_interrupted find it after an interruption.
            self._ot_trials[point].set_user_attr("tune_trial_id", point)
        self.left -= len(points)
        self._points[trial_id] = ids
        return {"pack": points}

    def on_trial_result(self, trial_id, result):
        if "pack_member" in result:  # a point's last report
            point = self._points[trial_id][int(result["pack_member"])]
            if point not in self._completed_trials:
                # A failed point is FAIL (given its result, a multi-objective study would get [None, ...]
                # and keep it RUNNING)
                super().on_trial_complete(point, None if "error" in result else result, error="error" in result)

    def on_trial_complete(self, trial_id, result=None, error=False):
        if result and "pack_member" in result:
            self.on_trial_result(trial_id, result)  # its last report came as the trial ended
        for point in self._points.pop(trial_id, []):
            # Points without a last report: the trial's process failed (FAIL), ASHA stopped it (PRUNED);
            # a pack's points not reached when an interruption stopped it stay running for --resume.
            if point not in self._completed_trials and (error or self.pack == 1):
                super().on_trial_complete(point, result, error=error)


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


def _start(space_path: str, overrides: list[str], samples: int | None, sweep_dir: Path, storage: str | None,
           register: str | None, tracking: str | None, experiment: str | None, address: str | None) -> dict:
    """A new sweep: validate everything and reach Ray, MLflow and storage, then write the state a resume
    rebuilds it from (a start that fails before leaves nothing that stops a plain re-run)."""
    space_path = str(presets.resolve(space_path))  # a file that ships with raysweep, named from anywhere
    space = load_search_space(space_path, overrides)  # a malformed space fails here, before any side effect
    state_file = sweep_dir / STATE_FILE
    if state_file.exists():
        raise UserError(f"{sweep_dir} already holds a sweep: continue it with --resume, or pass another --out")
    if samples is not None and samples < 1:
        raise UserError(f"--samples {samples}: a sweep needs at least 1 trial")
    if register is not None and not MODEL_NAME.match(register):
        raise UserError(f"--register {register!r}: a registered model name is letters, digits, '.', '_' and '-', "
                        "starting with a letter or digit (it becomes models:/NAME@champion)")
    check_address(address)
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


def _tune(space: SearchSpace, state: dict, sweep_dir: Path, done: int, remaining: int, address: str | None,
          progress: bool) -> bool:
    """Run `remaining` trials with a fresh Tuner; True when interrupted (SIGINT, SIGTERM)."""
    s, uri, keys = space.search, state["tracking_uri"], [o.key for o in space.search.objective]
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # epoch reports carry no objective yet
    # The ledger prints the sweep's progress: Tune's newer output engine prints its experiment header
    # (and a TensorBoard hint) even at verbose=0, the older one nothing.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    connect(address)
    warn_if_local_storage(state["storage"], "--storage")
    ctx = TrialContext(space, uri, state["experiment"], state["parent_run_id"], state["storage"], state["run_tags"])
    trainable = ray.tune.with_resources(ray.tune.with_parameters(_trial, ctx=ctx),
                                        {"CPU": s.trial_cpus, "GPU": s.trial_gpus})
    # A fresh Tuner on every attempt, built from the stored state (Tuner.restore would unpickle Tune's
    # state and, in Ray 2.60, drop max_concurrent_trials); the study in optuna.db carries the history.
    sampler = space.sampler(offset=done)
    searcher = _SweepSearch(
        space=space.define_by_run, metric=keys if s.multi else keys[0],
        mode=["max"] * len(keys) if s.multi else "max", sampler=sampler, study_name=state["study_name"],
        storage=optuna.storages.RDBStorage(state["optuna_storage"]), pack=s.pack, total=remaining)
    scheduler = None
    if s.asha is not None:
        scheduler = ASHAScheduler(metric=s.asha.metric, mode="max", time_attr="epoch",
                                  max_t=space.base_cfg.train.epochs, grace_period=s.asha.grace_period,
                                  reduction_factor=s.asha.reduction_factor)
    ledger = _TrialLedger(uri, state["experiment"], keys, sweep_dir / TRIALS, state["storage"],
                          log=print if progress else None, done=done, total=state["samples"], pack=s.pack,
                          groups=space.pack_groups)
    # Named after the sweep: the Tune experiment (its folder in storage) and each trial (its folder: the id).
    tuner = ray.tune.Tuner(trainable, run_config=ray.tune.RunConfig(
        name=f"{space.name}-{state['attempts']}", storage_path=state["storage"], callbacks=[ledger],
        failure_config=ray.tune.FailureConfig(max_failures=s.max_failures), verbose=0),
        tune_config=ray.tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                        num_samples=math.ceil(remaining / s.pack),
                                        max_concurrent_trials=_max_concurrent(space),
                                        reuse_actors=_reuse_actors(space),
                                        trial_name_creator=lambda t: f"{space.name}-{t.trial_id}",
                                        trial_dirname_creator=lambda t: t.trial_id))
    if progress:
        packs = f" in packs of {s.pack} per Tune trial" if s.pack > 1 else ""
        print(f"sweep {space.name}: {remaining} of {state['samples']} trials to run{packs}, up to "
              f"{_max_concurrent(space)} Tune trials at a time, maximising {', '.join(keys)}; MLflow {uri} "
              f"(experiment {state['experiment']})")
    try:
        # SIGTERM stops the sweep as Ctrl-C does: Tune's SIGINT handler ends the trials and saves state
        with on_sigterm(lambda: os.kill(os.getpid(), signal.SIGINT)):
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
        _close_open_runs(client, state, sweep_dir)  # runs of trials cut off last time; their points are re-run below
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
        closed = _close_open_runs(client, state, sweep_dir)
        _adopt_finished(client, state, space, sweep_dir)
        records = _records(sweep_dir)
    interrupted = len(records) < state["samples"]
    return _summarise(space, state, records, sweep_dir, client, keys, time.perf_counter() - t0, interrupted, closed)
