"""The embedded MLflow store survives a kill during its creation, and several first commands at once."""
import os
import signal
import subprocess
import sys
import time

from mlflow import MlflowClient

# One command's first use of a store: resolve the URI (creates the store), then record a run.
FIRST_USE = ("import os, sys, time, pathlib; from raysweep.tracking.runs import tracking_uri, experiment_id; "
             "from mlflow import MlflowClient; pathlib.Path(sys.argv[2] + f'.ready-{os.getpid()}').touch(); "
             "[time.sleep(0.02) for _ in range(3000) if pathlib.Path(sys.argv[2]).exists()]; "  # wait for the go
             "uri = tracking_uri(sys.argv[1]); MlflowClient(uri).create_run(experiment_id('raysweep', uri))")


def _first_use(tmp_path, db, hold=None):
    return subprocess.Popen([sys.executable, "-c", FIRST_USE, f"sqlite:///{db}", str(hold or tmp_path / "no-hold")],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True)


def test_four_first_commands_at_once_all_succeed(tmp_path):
    db, hold = tmp_path / "mlflow.db", tmp_path / "hold"
    hold.touch()
    procs = [_first_use(tmp_path, db, hold) for _ in range(4)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("hold.ready-*"))) < 4 and time.time() < deadline:
        time.sleep(0.05)  # until every process has imported MLflow and waits at the same line
    hold.unlink()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    assert len(client.search_runs([client.get_experiment_by_name("raysweep").experiment_id])) == 4


def test_a_kill_during_store_creation_leaves_a_store_the_next_command_uses(tmp_path):
    db = tmp_path / "mlflow.db"
    proc = _first_use(tmp_path, db)
    deadline = time.time() + 120
    while time.time() < deadline:  # the store (or its temporary file) is being written
        if db.exists() or list(tmp_path.glob(".mlflow.db.creating-*")):
            break
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    time.sleep(0.3)  # well inside the seconds MLflow's migrations take
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = _first_use(tmp_path, db)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    assert len(client.search_runs([client.get_experiment_by_name("raysweep").experiment_id])) == 1
    assert not list(tmp_path.glob(".mlflow.db.creating-*"))
