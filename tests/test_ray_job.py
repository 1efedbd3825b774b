"""`ray job submit` as cluster/README.md documents it, against a real `ray start --head` on loopback
(its own temp dir, token authentication as Ray 2.60 enables it by default): the code travels as the
job's working_dir, the sweep's trials land in MLflow, and the cluster is stopped at the end, also
when the test fails."""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import repo_root
from mlflow import MlflowClient
from multinode_sweep import SPACE as MULTINODE_SPACE

# The multi-node test's space, two one-epoch trials.
SPACE = {**MULTINODE_SPACE, "name": "jobtest", "train": {**MULTINODE_SPACE["train"], "epochs": 1},
         "search": {**MULTINODE_SPACE["search"], "samples": 2}}
# What `ray job submit --working-dir .` leaves behind (cluster/README.md uses the same list).
EXCLUDES = [".git", ".venv", ".tools", "runs", "mlartifacts", "*.db", ".whl", ".ruff_cache"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(head: subprocess.Popen) -> None:
    if head.poll() is None:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def test_ray_job_submit_runs_a_sweep(tmp_path, mlflow_store):
    temp = Path(tempfile.mkdtemp(prefix="rsj", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    bin_dir = Path(sys.executable).parent
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    dash = _free_port()
    # Every port its own: the suite's local Ray instance holds Ray's defaults (a second job agent on the
    # default port never starts, and the job API answers "No available agent").
    ports = [f"--{name}={_free_port()}" for name in (
        "port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port")]
    head = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", *ports, f"--dashboard-port={dash}",
                             "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                             f"--temp-dir={temp}", "--include-dashboard=true", "--disable-usage-stats"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while time.time() < deadline:  # the job API answers (401 without the token) once the dashboard is up
            assert head.poll() is None, head.stderr.read()[-3000:]
            try:
                requests.get(f"{address}/api/version", timeout=2)
                break
            except requests.RequestException:
                time.sleep(1)
        else:
            pytest.fail("the head's dashboard never answered")
        (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
        uri = mlflow_store(tmp_path)
        t0 = time.perf_counter()
        for _ in range(30):  # the dashboard can answer before the job agent is up: nothing ran, try again
            res = subprocess.run([str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir",
                                  str(repo_root()), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
                                  "--", "python", "-m", "raysweep", "sweep", str(tmp_path / "space.yaml"), "--quiet",
                                  "--tracking-uri", uri, "--out", str(tmp_path / "sweep")],
                                 env=env, capture_output=True, text=True, timeout=480, cwd=tmp_path)
            if "No available agent to submit job" not in res.stdout + res.stderr:
                break
            time.sleep(2)
        print(f"ray job submit: {time.perf_counter() - t0:.1f} s")
        assert res.returncode == 0 and "succeeded" in res.stdout + res.stderr, (res.stdout + res.stderr)[-4000:]
    finally:
        _stop(head)
        shutil.rmtree(temp, ignore_errors=True)
    assert head.returncode is not None
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["finished"] == 2
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("raysweep").experiment_id],
                              "tags.`raysweep.kind` = 'trial'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" and "clean_acc" in r.data.metrics for r in runs)
