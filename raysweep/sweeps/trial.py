"""What runs inside one Tune trial of a sweep: for each point Optuna sampled for it (one, or a pack of
search.pack), its config from the sampled values, one training (with the pack's other points where
they can train together) and evaluation exactly as `raysweep train` does, its MLflow child run, its
report to Tune."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.tune
from mlflow import MlflowClient

from raysweep.config import run_identity, validate_config
from raysweep.core.data import load_dataset
from raysweep.errors import ConfigError
from raysweep.run import train_and_evaluate
from raysweep.sweeps import epochs
from raysweep.sweeps.space import SearchSpace, describe
from raysweep.terminal import quiet
from raysweep.tracking.runs import (
    log_resolved_params,
    log_results,
    tracked_run,
)
from raysweep.training.pack import fit_pack
from raysweep.training.trainer import saved_epochs


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


def _last_report(metrics: dict, out: Path, j: int) -> bool:
    """A point's last report, with its run directory (whatever it holds: a failed point keeps what it
    had) as checkpoint, marked with the point's place in the pack. False when Tune ended the trial."""
    out.mkdir(parents=True, exist_ok=True)
    (out / PACK_FILE).write_text(json.dumps({"member": j}))
    try:
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(str(out)))  # copied to storage
    except SystemExit:
        return False  # Tune may end the trial's thread at its last report; everything is logged: the run is complete
    return True


def run_name(space: SearchSpace, values: dict, trial_id: str) -> str:
    """What the MLflow UI shows for a trial: its sampled values first (the runs table truncates), the
    method and K when they were not searched, the trial id (`lambda_jr=0.0017 bagging k=3 · fa7ad53d`)."""
    base = space.base_cfg.ensemble
    fixed = ([base.method] if "ensemble.method" not in values else []) + (
        [f"k={base.k}"] if "ensemble.k" not in values else [])
    return " ".join([describe(values), *fixed, "·", trial_id])


def member_id(tune_trial_id: str, j: int, pack: int) -> str:
    """The id of the j-th trial of a Tune trial's pack: in MLflow's tags, Optuna's user attributes and
    the sweep's records alike. Unpacked sweeps (search.pack 1) keep Tune's own trial id."""
    return tune_trial_id if pack == 1 else f"{tune_trial_id}-{j}"


PACK_FILE = "pack.json"  # in every trial's reported checkpoint: where a retried pack starts again
PARTIAL = "partial"  # under the sweep's storage: the epochs and evaluation stages of points under way


def resume_dir(storage: str, cfg) -> Path | None:
    """Where a point keeps its epochs and evaluation stages as it goes, so that the same point run again
    continues from them: a resumed sweep runs a trial that was cut off again at its point, and Tune retries
    a trial whose process died. In the sweep's storage, named by the point's run identity (its config
    without the name and the executor). None for object storage (s3://, gs://): the epochs are saved to a
    filesystem, so there a point cut off starts again from its first epoch."""
    if storage.startswith("file://"):
        storage = storage[len("file://"):]
    if "://" in storage:
        return None
    return Path(storage) / PARTIAL / hashlib.sha256(run_identity(cfg).encode()).hexdigest()[:20]


def _trial(config: dict, ctx: TrialContext) -> None:
    """One Tune trial: the pack of points Optuna sampled for it (search.pack; one unless packed). Points
    that training.pack can step together (they differ only in lr, lambda_JR and per-member eps) train as one
    pack of N x K members, then each is evaluated; the others train one after another. Each point ends
    with its own report (its result for Optuna and its record) and checkpoint, so a pack retried after
    its process died starts at the first point it had not finished, and an interrupted pack keeps the
    points it finished."""
    quiet()  # also when Ray was started by the caller, without raysweep's setup hook
    # A reused trial process (_reuse_actors) waits this long for a stopped trial's thread to end before
    # the next trial starts in it; Tune's default, 2 s, can pass while a busy machine closes the run.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "30")
    points = config["pack"]
    groups = ctx.space.pack_groups(points)
    order = [j for group in groups for j in group]  # the points in the order they end; the same on a retry
    done = set()
    if (checkpoint := ray.tune.get_checkpoint()) is not None:
        with checkpoint.as_directory() as d:
            last = json.loads((Path(d) / PACK_FILE).read_text())["member"]
        done = set(order[:order.index(last) + 1])
    datasets = {}  # the pack's data, loaded once per distinct data config and seed
    for group in groups:
        if not _train_together([j for j in group if j not in done], points, ctx, datasets):
            return  # Tune is stopping this trial (the sweep was interrupted)


def _train_together(group: list[int], points: list[dict], ctx: TrialContext, datasets: dict) -> bool:
    """Each point of the group as its own MLflow run (_point), their training as one pack when there are
    several; False when Tune stopped the trial. An error of the pack's training is each point's error."""
    asked = {}  # point -> (its _point generator, its config, its epoch hooks), paused before training
    try:
        for j in group:
            point = _point(points[j], j, ctx, datasets)
            try:
                asked[j] = (point, *next(point))
            except StopIteration as ended:  # infeasible: reported already
                if not ended.value:
                    return False
        trained, failed = {j: None for j in asked}, None  # None: the point trains itself (alone, any executor)
        if len(asked) > 1:
            cfgs = [cfg for _, cfg, _ in asked.values()]
            try:
                data = _dataset(cfgs[0], datasets)
                trained = dict(zip(asked, fit_pack(cfgs, data, progress=False,
                                                   callbacks=[hooks for *_, hooks in asked.values()])))
            except Exception as err:  # noqa: BLE001 - recorded in every point's run, as its own failure
                failed, tb = err, err.__traceback__
        for j, (point, _, _) in asked.items():
            try:
                if failed is not None:  # from the original traceback each time, not after the earlier throws
                    point.throw(failed.with_traceback(tb))
                else:
                    point.send(trained[j])
            except StopIteration as ended:
                if not ended.value:
                    return False
        return True
    finally:
        for point, _, _ in asked.values():
            point.close()  # a point left before its end (Tune stopped the trial, an error escaped): KILLED


def _dataset(cfg, datasets: dict):
    key = (cfg.data.model_dump_json(), cfg.seed)
    if key not in datasets:  # the pack's points mostly share data; keep only the latest in memory
        datasets.clear()
        datasets[key] = load_dataset(cfg.data, cfg.seed)
    return datasets[key]


def _point(values: dict, j: int, ctx: TrialContext, datasets: dict):
    """One sampled point as its own MLflow child run, trained, evaluated and reported: a generator that
    opens the run and yields (its config, its epoch hooks) before training, is sent its TrainResult
    (None: it trains itself) or thrown the error its pack's training raised, and returns False when Tune
    stopped the trial at its report (an infeasible point returns before yielding)."""
    trial = ray.tune.get_context()
    tune_id = trial.get_trial_id()
    trial_id = member_id(tune_id, j, ctx.space.search.pack)
    raw = ctx.space.trial_config(values)
    raw["name"] = f"{ctx.space.name}-{trial_id}"
    node = ray.get_runtime_context().get_node_id()
    tags = {**ctx.run_tags, "mlflow.parentRunId": ctx.parent_run_id, "raysweep.trial_id": trial_id,
            "raysweep.tune_trial_id": tune_id, "raysweep.kind": "trial", "raysweep.node_id": node}
    # Scratch space on this node; what outlives the trial goes to storage and MLflow below.
    out = Path(trial.get_trial_dir()) / ("run" if ctx.space.search.pack == 1 else f"run-{j}")
    ended = {"pack_member": j, "member_id": trial_id}
    # An interrupted sweep marks its parent run KILLED before it settles its trials' runs (run_sweep); a
    # trial still running in its stopping actor then ends KILLED, as the sweep will count it, not FINISHED.
    sweep_running = lambda: MlflowClient(ctx.uri).get_run(ctx.parent_run_id).info.status == "RUNNING"  # noqa: E731
    with tracked_run(ctx.uri, ctx.experiment, run_name(ctx.space, values, trial_id), raw, tags,
                     still_wanted=sweep_running) as (client, run_id):
        for name, value in values.items():  # the whole config is in the params; the sampled values also as tags
            client.set_tag(run_id, f"searched.{name}", str(value))
        try:
            cfg = validate_config(raw, f"trial {trial_id}")
        except ConfigError as err:
            client.set_tag(run_id, "raysweep.infeasible", str(err)[:5000])
            return _last_report({**_objectives(ctx.space, None), **ended, "infeasible": 1, "mlflow_run_id": run_id,
                                 "infeasible_why": str(err).strip().splitlines()[-1].strip()[:300]}, out, j)
        log_resolved_params(client, run_id, raw, cfg)  # the defaults the YAML left out, as params too

        relay = epochs.relay(cfg.train.epochs, run_id)

        def report_row(row):
            if (m := relay(row)) is not None:
                ray.tune.report(m)

        def report_epoch(event, state):  # local executor; a Ray executor run relays from its rank 0
            if event == "epoch":
                report_row(state.history[-1])

        resume = resume_dir(ctx.storage, cfg)
        try:
            trained = yield cfg, (report_epoch,)
            if trained is None and resume is not None and (saved := saved_epochs(resume, cfg)):
                history = saved["trainer"]["train_state"]["history"]
                client.set_tag(run_id, "raysweep.resumed_after_epoch", str(len(history)))
                for row in history:  # the epochs trained before the cut go into this run's curves too
                    report_row(row)
            metrics = train_and_evaluate(cfg, out, progress=False, callbacks=(report_epoch,),
                                         ray_storage=f"{ctx.storage.rstrip('/')}/ray-train", epoch_metrics=relay,
                                         data=_dataset(cfg, datasets), trained=trained, resume_dir=resume)
        except Exception as err:
            # A Python error of this trial (its config, its data): the same on every retry, so the trial
            # ends here, FAILED in MLflow with its error and traceback (the epochs it finished are logged
            # already). Tune's max_failures is left for what a retry can fix: a dead process or node.
            error = f"{type(err).__name__}: {err}"
            client.set_tag(run_id, "raysweep.error", error[:5000])
            client.log_text(run_id, traceback.format_exc(), "error.txt")
            client.set_terminated(run_id, "FAILED")
            return _last_report({**ended, "error": error[:2000], "mlflow_run_id": run_id}, out, j)
        log_results(client, run_id, out, metrics, logged_epochs=cfg.train.epochs - 1)  # the driver logged those
        if resume is not None:  # all of it is in the run now
            shutil.rmtree(resume, ignore_errors=True)
        objectives = _objectives(ctx.space, metrics)
        client.set_tag(run_id, "mlflow.note.content", (  # the run page's description
            f"Trial `{trial_id}` of sweep **{ctx.space.name}**, sampled {describe(values)}: "
            + ", ".join(f"{k} **{v:.4f}**" for k, v in {**objectives, "clean_acc": metrics["clean_acc"]}.items())
            + f". Re-evaluate: `raysweep evaluate runs:/{run_id}/checkpoint`; load: "
              f"`raysweep.load(\"runs:/{run_id}/checkpoint\")`."))
        final = {**objectives, **ended, "clean_acc": metrics["clean_acc"], "infeasible": 0,
                 "epoch": cfg.train.epochs, "node_id": node,
                 "train_acc": metrics["train"]["history"][-1]["train_acc"], "mlflow_run_id": run_id,
                 "metrics_json": json.dumps(metrics, default=str)}
        # Reported before the run closes FINISHED: a point whose process dies or is stopped between the
        # two is recorded finished by the sweep, which closes its run FINISHED (ledger._close); one that
        # dies before its report reaches the sweep is retried, and its run closed FAILED.
        return _last_report(final, out, j)
