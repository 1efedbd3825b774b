"""Sweeps stopped from outside (SIGKILL, SIGINT, a Ray head that never answers) through the CLI, each
in its own process with its own Ray: what is left, and how `--resume` continues."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import optuna
import pytest
from mlflow import MlflowClient
from sweep_helpers import BASE, write_space

from raysweep.sweeps.ledger import _records
from raysweep.sweeps.trial import PARTIAL
from raysweep.terminal import NOISE
from raysweep.training.trainer import EPOCH_STATE


def _start_sweep(tmp_path, cmd):
    """The sweep CLI in its own process group, once one trial has ended (its record is written)."""
    # Its own Ray: without an address, ray.init joins the machine's latest cluster, which may be another
    # test worker's two-node cluster (ray.cluster_utils writes /tmp/ray/ray_current_cluster).
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline:
        if list((tmp_path / "out" / "trials").glob("*.json")):
            return proc, env
        if proc.poll() is not None:
            with contextlib.suppress(ProcessLookupError):  # what it started, if any of it is left
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the sweep ended (exit {proc.returncode}) before it was interrupted: "
                        f"{proc.stderr.read()[-3000:]}")
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("no trial finished in time")


def _trial_runs(client):
    exp = client.get_experiment_by_name("raysweep").experiment_id
    return [r for r in client.search_runs([exp]) if r.data.tags.get("raysweep.kind") == "trial"]


def test_killed_sweep_resumes_exactly_as_it_was_started(tmp_path, mlflow_store):
    """SIGKILL of the whole sweep after one trial; --resume with no --set keeps the original override
    (every trial's MLflow params say so), re-runs none of the finished trials, and the Optuna study
    on disk holds every trial."""
    path = write_space(tmp_path, {"samples": 3, "max_concurrent": 1})
    uri = mlflow_store(tmp_path)
    cmd = [sys.executable, "-m", "raysweep", "sweep", str(path), "--out", str(tmp_path / "out"), "--tracking-uri",
           uri, "--quiet"]
    proc, env = _start_sweep(tmp_path, cmd + ["--set", "data.train_size=192"])
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the Ray instance it started
    proc.wait()
    client = MlflowClient(uri)
    # Finished at the kill: recorded by the sweep (the kill may land before the trial closed its run
    # FINISHED), or closed FINISHED in MLflow (the kill may land before the sweep recorded it).
    before = {r.data.tags["raysweep.trial_id"] for r in _trial_runs(client) if r.info.status == "FINISHED"} | {
        r["trial_id"] for r in _records(tmp_path / "out") if r["status"] == "finished"}
    assert 1 <= len(before) < 3
    changed = subprocess.run(cmd + ["--resume", "--set", "data.train_size=100"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2 and "differs from the sweep's overrides" in changed.stderr
    assert "Traceback" not in changed.stderr
    edited = write_space(tmp_path, {"samples": 3, "max_concurrent": 1, "seed": 8}, name="edited.yaml")
    res = subprocess.run([*cmd[:4], str(edited), *cmd[5:], "--resume"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "differs from the search space this sweep started with" in res.stderr
    res = subprocess.run([sys.executable, "-m", "raysweep", "sweep", "--resume", "--out", str(tmp_path / "out")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # The terminal: raysweep's progress line per trial, none of Tune's tables, none of the library
    # messages raysweep.terminal names (here Ray's token notice and each trial's checkpoint line).
    assert "[3/3] finished" in res.stdout and "Trial status" not in res.stdout, res.stdout[-3000:]
    for _, prefix, _ in NOISE:
        assert not prefix or prefix not in res.stdout + res.stderr, (prefix, res.stderr[-3000:])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["finished"] == 3
    runs = _trial_runs(client)
    for trial_id in before:  # a finished trial ran once, and its run says FINISHED
        assert [r.info.status for r in runs if r.data.tags["raysweep.trial_id"] == trial_id] == ["FINISHED"]
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)  # the interrupted trial's run is closed
    assert all(r.data.params["data.train_size"] == "192" for r in runs)
    study = optuna.load_study(study_name=summary["study_name"], storage=summary["optuna_storage"])
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    assert sorted(t.value for t in complete) == pytest.approx(sorted(r["weighted_acc"]
                                                                     for r in summary["finished_trials"]))
    # Running in Tune at the kill (one cut while Optuna was still sampling it never ran: not re-run).
    cut = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL and "tune_trial_id" in t.user_attrs]
    reruns = [t for t in complete if "raysweep_rerun_of" in t.user_attrs]
    assert len(reruns) == len(cut) and all(t.params == study.trials[t.user_attrs["raysweep_rerun_of"]].params
                                           for t in reruns)


def test_a_trial_cut_off_mid_training_continues_from_its_saved_epochs(tmp_path, mlflow_store):
    """A fair study's trial trains for hours: SIGKILL of the sweep once the trial has saved an epoch in
    the sweep's storage, then --resume. The trial run again at its point starts after the saved epochs
    (its run says after which), its run's curves still hold every epoch, and the saved state is gone
    once the run holds everything."""
    path = write_space(tmp_path, {"samples": 1, "max_concurrent": 1}, train={**BASE["train"], "epochs": 6},
                       data={**BASE["data"], "train_size": 512})
    uri = mlflow_store(tmp_path)
    cmd = [sys.executable, "-m", "raysweep", "sweep", str(path), "--out", str(tmp_path / "out"), "--tracking-uri",
           uri, "--quiet"]
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    partial = tmp_path / "out" / PARTIAL
    deadline = time.time() + 400
    while not list(partial.glob(f"*/{EPOCH_STATE}")):
        if proc.poll() is not None or time.time() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no epoch was saved before the sweep ended (exit {proc.poll()}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not _records(tmp_path / "out"), "the trial finished before the kill; nothing to resume"
    res = subprocess.run([sys.executable, "-m", "raysweep", "sweep", "--resume", "--out", str(tmp_path / "out")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(uri)
    rerun = [r for r in _trial_runs(client) if r.info.status == "FINISHED"]
    assert len(rerun) == 1
    resumed_after = int(rerun[0].data.tags["raysweep.resumed_after_epoch"])
    assert 1 <= resumed_after <= 6
    steps = [m.step for m in client.get_metric_history(rerun[0].info.run_id, "train/loss")]
    assert sorted(steps) == list(range(6)), steps  # every epoch: those before the cut reported again
    assert not any(partial.iterdir())


def test_a_stopped_sweeps_open_runs_are_closed_as_what_they_are(tmp_path, mlflow_store):
    """A trial reports its result, then closes its run FINISHED: a sweep killed in between leaves a
    recorded trial with a RUNNING run, which resume closes FINISHED; a run cut off mid-trial, KILLED."""
    from raysweep.sweeps.ledger import TRIALS, _close_open_runs, _write_record

    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    exp = client.create_experiment("raysweep")
    parent = client.create_run(exp).info.run_id
    runs = {t: client.create_run(exp, tags={"mlflow.parentRunId": parent, "raysweep.trial_id": t}).info.run_id
            for t in ("recorded", "cut", "failed")}
    _write_record(tmp_path / TRIALS, {"trial_id": "recorded", "status": "finished", "params": {}})
    _write_record(tmp_path / TRIALS, {"trial_id": "failed", "status": "failed", "params": {}})
    state = {"experiment": "raysweep", "tracking_uri": uri, "parent_run_id": parent}
    assert _close_open_runs(client, state, tmp_path) == 2
    assert {t: client.get_run(r).info.status for t, r in runs.items()} == {
        "recorded": "FINISHED", "cut": "KILLED", "failed": "KILLED"}


def test_a_packed_point_left_paused_is_closed_killed_not_failed(tmp_path, mlflow_store):
    """A pack's points wait, each in its open run, while the pack trains. When Tune stops the trial at an
    earlier point's report, the points still waiting are closed (generator close, as the sweep's trial
    does in its finally): their runs end KILLED, as a stopped trial's do, not FAILED as after an error;
    and a point that raised ends FAILED."""
    from raysweep.tracking.runs import tracked_run

    uri = mlflow_store(tmp_path)

    def point(name):  # the shape of sweeps.trial._point: open the run, pause before training
        with tracked_run(uri, "raysweep", name, {"train": {"lr": 0.1}}) as (_, run_id):
            yield run_id

    waiting, broken = point("waiting"), point("broken")
    runs = {"waiting": next(waiting), "broken": next(broken)}
    waiting.close()
    with pytest.raises(RuntimeError):
        broken.throw(RuntimeError("the pack's training failed"))
    client = MlflowClient(uri)
    assert {name: client.get_run(run_id).info.status for name, run_id in runs.items()} == {
        "waiting": "KILLED", "broken": "FAILED"}


def test_a_start_killed_before_ray_answers_leaves_nothing_in_the_way(tmp_path, mlflow_store):
    """SIGKILL of a sweep while it reaches Ray (a head that accepts the connection and never answers):
    the same command, run again against a working Ray, runs the whole sweep."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    path = write_space(tmp_path, {"samples": 1})
    cmd = [sys.executable, "-m", "raysweep", "sweep", str(path), "--out", str(tmp_path / "out"), "--tracking-uri",
           mlflow_store(tmp_path), "--quiet"]
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.Popen(cmd + ["--address", f"127.0.0.1:{silent.getsockname()[1]}"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "out").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)  # the sweep folder is made just before Ray is reached
        time.sleep(2)
        assert proc.poll() is None, f"the start ended before the kill: {proc.stderr.read()[-2000:]}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        silent.close()
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["finished"] == 1


def test_sigint_ends_the_sweep_as_interrupted(tmp_path, mlflow_store):
    path = write_space(tmp_path, {"samples": 3, "max_concurrent": 1})
    uri = mlflow_store(tmp_path)
    cmd = [sys.executable, "-m", "raysweep", "sweep", str(path), "--out", str(tmp_path / "out"), "--tracking-uri",
           uri, "--quiet"]
    proc, _ = _start_sweep(tmp_path, cmd)
    try:
        os.kill(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr[-3000:]
    assert "--resume --out" in stderr and "Traceback" not in stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 1 <= summary["finished"] < 3
    client = MlflowClient(uri)
    parent = client.get_run(summary["mlflow_parent_run_id"])
    assert parent.info.status == "KILLED"
    statuses = [r.info.status for r in _trial_runs(client)]
    assert "RUNNING" not in statuses and statuses.count("FINISHED") == summary["finished"]


QUIET_WORKER = """
import time, ray
from raysweep.training.ray import connect

@ray.remote
def finalize(error):  # defined here, pickled by value: the worker runs no raysweep code of its own
    class Held:
        def __del__(self):
            raise error("raised in a finalizer")
    Held()
    return 1

connect()
ray.get([finalize.remote(SystemExit), finalize.remote(KeyboardInterrupt), finalize.remote(ValueError)])
time.sleep(3)  # worker output reaches the driver through Ray's log monitor
ray.shutdown()
"""


def test_ray_workers_print_no_interrupt_tracebacks(tmp_path):
    """An interrupted sweep's workers die with SystemExit or KeyboardInterrupt wherever they are, a
    finalizer included, even in a worker that has not yet run any raysweep code: nothing of it reaches
    the user's terminal; any other error still does."""
    res = subprocess.run([sys.executable, "-c", QUIET_WORKER], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "RAY_ADDRESS": "local"})
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "ValueError: raised in a finalizer" in out, out[-3000:]  # the worker's output did reach us
    assert "SystemExit" not in out and "KeyboardInterrupt" not in out, out[-3000:]
