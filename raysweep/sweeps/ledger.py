"""The sweep directory: how the sweep was started (sweep.json), one record per ended trial
(trials/ID.json, written by the driver-side Tune callback `_TrialLedger`), and the reconciliation
with MLflow after an interruption (open runs closed, finished runs adopted, running ones re-queued)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import optuna
import pyarrow.fs
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric
from optuna.trial import TrialState
from ray.tune import Callback

from raysweep.core.files import atomic_write
from raysweep.sweeps.space import SearchSpace, describe
from raysweep.sweeps.trial import _objectives, member_id
from raysweep.tracking.runs import (
    experiment_id,
)

STATE_FILE = "sweep.json"


SPACE_COPY = "search_space.yaml"


OPTUNA_DB = "optuna.db"


TRIALS = "trials"


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
    atomic_write(records / f"{rec['trial_id']}.json", json.dumps(rec, indent=2, default=str))


COMPLETE = ("finished", "infeasible")  # record statuses of points whose runs end FINISHED


class _TrialLedger(Callback):
    """Driver-side Tune callback: writes one record per sampled point that ended (the summary and
    `--resume` read these, not Tune's state), and closes the MLflow runs of a Tune trial that died
    (retried), errored or was stopped early (ASHA), which could not close their own: FAILED or KILLED,
    keeping what they logged. A point's record is written from its last report, as it ends: a pack
    (search.pack) records each of its points when that point is done. With `log` (print), one line per
    point started and ended: the sweep's progress on the terminal (Tune's own tables are off)."""

    def __init__(self, uri: str, experiment: str, keys: list[str], records: Path, storage: str,
                 log=None, done: int = 0, total: int = 0, pack: int = 1, groups=None):
        self.uri, self.experiment, self.keys, self.records, self.storage = uri, experiment, keys, records, storage
        self.log, self.done, self.total, self.pack = log, done, total, pack
        # points -> the groups of them a Tune trial trains together (SearchSpace.pack_groups); default: one by one
        self.groups = groups or (lambda points: [[j] for j in range(len(points))])
        self._ended: dict[str, set[int]] = {}  # Tune trial id -> its points recorded so far
        self._last: dict[str, dict] = {}  # Tune trial id -> its latest record, which its checkpoint completes
        self._complete: set[str] = set()  # points recorded finished or infeasible: their runs end FINISHED

    def _say(self, what: str, trial_id: str, params: dict, detail: str = "") -> None:
        if self.log is not None:
            self.log(f"  [{self.done}/{self.total}] {what:<13} {trial_id}  {describe(params)}"
                     + (f"  {detail}" if detail else ""))

    def on_trial_start(self, iteration, trials, trial, **info):
        points, ended = trial.config["pack"], self._ended.get(trial.trial_id, set())
        left = [[j for j in group if j not in ended] for group in self.groups(points)]
        left = [group for group in left if group]
        for n, group in enumerate(left):  # the first group trains now (several points: together)
            for j in group:
                self._say("started" if n == 0 else "queued", member_id(trial.trial_id, j, self.pack), points[j],
                          f"together with {len(group) - 1} more" if n == 0 and len(group) > 1 else "")

    def _close(self, trial, status):
        """Close the Tune trial's open MLflow runs (_close_runs)."""
        client = MlflowClient(self.uri)
        runs = client.search_runs([experiment_id(self.experiment, self.uri)],
                                  f"tags.`raysweep.tune_trial_id` = '{trial.trial_id}'")
        _close_runs(client, runs, self._complete, status)

    def _record(self, trial, j: int, status: str, m: dict, **extra) -> None:
        trial_id, params = member_id(trial.trial_id, j, self.pack), trial.config["pack"][j]
        rec = {"trial_id": trial_id, "status": status, "params": params,
               "mlflow_run_id": m.get("mlflow_run_id"), **extra}
        if status == "finished":
            rec.update(_finished_fields(m["mlflow_run_id"], {k: m[k] for k in self.keys},
                                        json.loads(m["metrics_json"]), m.get("node_id")))
        _write_record(self.records, rec)
        self._ended.setdefault(trial.trial_id, set()).add(j)
        self._last[trial.trial_id] = rec
        if status in COMPLETE:
            self._complete.add(trial_id)
        self.done += 1
        if status == "finished":
            detail = "  ".join(f"{k} {m[k]:.4f}" for k in dict.fromkeys([*self.keys, "clean_acc"]))
            detail += f"  ({rec['metrics'].get('total_seconds', 0):.0f} s)"
        elif status == "stopped_early":
            detail = f"by ASHA after epoch {m.get('epoch', '?')}"
        elif status == "infeasible":
            detail = m.get("infeasible_why", "")
        else:  # failed: the error's last line
            detail = "".join(str(extra.get("error") or "").strip().splitlines()[-1:])[:200]
        self._say(status.replace("_", " "), trial_id, params, detail)

    def _record_rest(self, trial, status: str, **extra) -> None:
        """The trial's points that sent no last report (its process died, ASHA stopped it). The first was
        running, with the MLflow run of its epoch reports; a pack's later points never started, but those
        trained together with it (SearchSpace.pack_groups), which were running too."""
        last = trial.last_result or {}
        points, ended = trial.config["pack"], self._ended.get(trial.trial_id, set())
        # in the order the trial takes them (SearchSpace.pack_groups), so rest[0] is the point that was running
        left = [[j for j in group if j not in ended] for group in self.groups(points)]
        rest = [j for group in left for j in group]
        together = next((group for group in left if rest and rest[0] in group), [])
        # the last report is the running point's epoch, or the previous point's end (its run, not this one's);
        # points trained together report their epochs in turn, so theirs may be another point's run
        mine = "pack_member" not in last and len(together) <= 1
        running = {**last, "mlflow_run_id": last.get("mlflow_run_id") if mine else None}
        for n, j in enumerate(rest):
            if n == 0:
                self._record(trial, j, status, running, **extra)
            else:
                first = member_id(trial.trial_id, rest[0], self.pack)
                why = (f"trained together with point {first}, which ended it" if j in together
                       else f"not run: point {first} of its pack ended it")
                self._record(trial, j, status, {}, **{**extra, **({"error": why} if "error" in extra else {})})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "pack_member" in result:  # a point's last report: its record
            j = int(result["pack_member"])
            if j not in self._ended.get(trial.trial_id, set()):
                status = ("failed" if "error" in result else "infeasible" if result.get("infeasible")
                          else "finished")
                self._record(trial, j, status, result, **({"error": result["error"]} if "error" in result else {}))
            return
        # An epoch of a running point: its row goes to the point's MLflow run now, in one batch.
        rows = [Metric(k, v, int(time.time() * 1000), int(result["epoch"]) - 1) for k, v in result.items()
                if k.startswith("train/")]  # MLflow steps are the history's 0-based epochs
        if rows:  # epoch_metrics puts the run id in every epoch's result
            MlflowClient(self.uri).log_batch(result["mlflow_run_id"], metrics=rows)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        """A point's run directory reached the sweep's storage: its record says where."""
        rec = self._last.get(trial.trial_id)
        if rec is not None and rec["status"] == "finished" and "storage" not in rec:
            rec["storage"] = _storage_uri(self.storage, checkpoint)
            _write_record(self.records, rec)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED")  # its process or node died; Tune retries it as a new run

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED")
        self._record_rest(trial, "failed", error=str(trial.get_error())[-5000:])

    def on_trial_complete(self, iteration, trials, trial, **info):
        m = trial.last_result or {}
        if "pack_member" in m and int(m["pack_member"]) not in self._ended.get(trial.trial_id, set()):
            self.on_trial_result(iteration, trials, trial, m)  # its last report came as the trial ended
        stopped = self.pack == 1 and 0 not in self._ended.get(trial.trial_id, set())  # by ASHA, mid-training
        # A point closes its own run after its last report, but Tune may end the process at that report
        # (ASHA stops every trial that reaches max_t) before it has: the driver closes it FINISHED.
        self._close(trial, "KILLED" if stopped else None)
        if stopped:
            self._record_rest(trial, "stopped_early")
        # A pack (never under ASHA) that ends with points not run was stopped by an interruption: those
        # points stay unrecorded, running in Optuna, and --resume samples them again.


def _optuna_storage(sweep_dir: Path) -> str:
    return f"sqlite:///{sweep_dir / OPTUNA_DB}"


def _write_state(sweep_dir: Path, state: dict) -> None:
    atomic_write(sweep_dir / STATE_FILE, json.dumps(state, indent=2))


def _records(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((sweep_dir / TRIALS).glob("*.json"))]


def _close_open_runs(client: MlflowClient, state: dict, sweep_dir: Path) -> int:
    """Close the trial runs a stopped sweep left RUNNING; returns how many were cut off. A trial reports
    its result after logging everything and before closing its run FINISHED (trial.py), so a sweep killed
    between the two has the trial's record and a RUNNING run: that run is closed FINISHED, as it is (an
    infeasible point's run too; a failed trial closes its own FAILED before it reports).
    Every other open run was cut off mid-trial: KILLED, keeping what it logged."""
    finished = {r["trial_id"] for r in _records(sweep_dir) if r["status"] in COMPLETE}
    runs = client.search_runs([experiment_id(state["experiment"], state["tracking_uri"])],
                              f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'")
    return _close_runs(client, runs, finished, "KILLED")


def _close_runs(client: MlflowClient, runs, complete: set[str], status: str | None) -> int:
    """Close the RUNNING ones of `runs`: a point in `complete` (recorded finished or infeasible: it logged
    everything before its last report) FINISHED, any other `status`, or left open if None. Returns how
    many were closed `status`."""
    cut = 0
    for run in (r for r in runs if r.info.status == "RUNNING"):
        done = run.data.tags.get("raysweep.trial_id") in complete
        if done or status is not None:
            client.set_terminated(run.info.run_id, "FINISHED" if done else status)
            cut += not done
    return cut


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
    Optuna and enqueue the same point again, so the resumed sweep re-runs them first. A trial cut
    while Optuna was still sampling it (it never reached Tune: no tune_trial_id) holds only part of a
    point and never ran: it is closed, and the resumed sweep samples afresh."""
    try:
        study = optuna.load_study(study_name=state["study_name"], storage=state["optuna_storage"])
    except KeyError:
        return  # interrupted before Optuna asked for any point
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        if "tune_trial_id" in t.user_attrs:
            study.enqueue_trial(t.params, user_attrs={"raysweep_rerun_of": t.number})
