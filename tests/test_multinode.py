"""A real two-node Ray cluster on this machine: trials land on both nodes and in MLflow; killing the
worker node mid-sweep retries its trial elsewhere and loses no finished trial.
The cluster lives in a child process (tests/multinode_sweep.py) that runs the three tests' sweeps on
it one after another; it is stopped there in a finally and, should that process hang or die, by
killing its process group here."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import repo_root


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """{part: what it saw} from one run of the script: its three parts share one cluster."""
    workdir = tmp_path_factory.mktemp("multinode")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, str(repo_root() / "tests" / "multinode_sweep.py"), str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=workdir,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    return workdir, json.loads(stdout.strip().splitlines()[-1])


def _part(parts, mode):
    workdir, results = parts
    out = results[mode]
    assert "error" not in out, out["error"]
    return workdir / mode, out


def test_sweep_places_trials_on_both_nodes(parts):
    _, out = _part(parts, "plain")
    assert out["summary"] == {"trials": 4, "finished": 4, "failed": 0}
    assert {r["node"] for r in out["runs"]} == {out["head"], out["worker"]}
    assert all(r["status"] == "FINISHED" and r["clean_acc"] is not None for r in out["runs"])


def test_killing_the_worker_node_retries_its_trial_and_keeps_finished_ones(parts):
    _, out = _part(parts, "kill")
    if "killed" not in out:
        pytest.fail("the worker node never ran a trial in the first half of its run once another had finished; "
                    f"what stopped the watcher: {out.get('watch_errors')}")
    assert out["killed"], "the worker node was removed but left no unfinished run"
    assert out["summary"] == {"trials": 8, "finished": 8, "failed": 0}
    runs = {r["id"]: r for r in out["runs"]}
    for run_id in out["finished_before_kill"]:  # results finished before the kill are all still there
        assert runs[run_id]["status"] == "FINISHED" and runs[run_id]["clean_acc"] is not None
    finished = [r for r in out["runs"] if r["status"] == "FINISHED"]
    assert len({r["trial"] for r in finished}) == 8
    # The runs that died with the node (a pack's two points, trained together) are FAILED, and their
    # trials finished elsewhere.
    assert len({runs[run_id]["trial"] for run_id in out["killed"]}) == len(out["killed"])
    for run_id in out["killed"]:
        r = runs[run_id]
        assert r["status"] == "FAILED" and r["node"] == out["dead_node"]
        assert any(f["trial"] == r["trial"] and f["node"] != out["dead_node"] for f in finished)


def test_sweep_needs_no_node_local_folder(parts):
    """The worker node's session folder (where its trials ran) is deleted with the node mid-sweep; the
    resumed sweep's summary, its registered champion and `raysweep evaluate` of a run the dead node
    trained all work from storage and MLflow."""
    workdir, out = _part(parts, "isolated")
    assert out["first"]["status"] == "interrupted" and out["worker_tmp_gone"]
    assert out["summary"] == {"status": "finished", "trials": 4, "finished": 4, "failed": 0}
    assert out["registered"]["champion"] and out["dead_node_runs"]
    # A trial that finished just as the sweep was interrupted is adopted from MLflow (its checkpoint is
    # there) and has no storage path on record; every other finished trial's copy is in storage.
    stored = [p for p in out["storage"] if p is not None]
    assert stored and all(Path(p, "checkpoint", "ensemble.json").is_file() for p in stored)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    for target in ("models:/mn-ens@champion", f"runs:/{out['dead_node_runs'][0]}/checkpoint"):
        res = subprocess.run([sys.executable, "-m", "raysweep", "evaluate", target, "--tracking-uri", uri, "--quiet",
                              "--out", str(workdir / "ev")], capture_output=True, text=True, timeout=300,
                             cwd=workdir)
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
        assert json.loads((workdir / "ev" / "metrics.json").read_text())["clean_acc"] > 0.2
