"""Screenshots of what a user sees in the MLflow UI after a sweep: the experiment's runs table, the
latest sweep's parent run and its best trial's run, taken with headless Chromium (Debian:
`apt install chromium`). Look at them after changing what raysweep logs.

usage: .venv/bin/python tools/mlflow_screenshots.py [--tracking-uri sqlite:///mlflow.db] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow import MlflowClient

from raysweep.terminal import quiet


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--experiment", default="raysweep")
    p.add_argument("--out", default="runs/screenshots")
    args = p.parse_args()
    quiet()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("no chromium on PATH (Debian: apt install chromium)", file=sys.stderr)
        return 2
    client = MlflowClient(args.tracking_uri)
    exp = client.get_experiment_by_name(args.experiment)
    sweeps = exp and client.search_runs([exp.experiment_id], "tags.`raysweep.kind` = 'sweep'",
                                        order_by=["attributes.start_time DESC"], max_results=1)
    if not sweeps:
        print(f"no sweep in experiment {args.experiment!r} of {args.tracking_uri}", file=sys.stderr)
        return 2
    parent = sweeps[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    best = json.loads(Path(client.download_artifacts(parent.info.run_id, "summary.json")).read_text()).get("best")
    child = next((c for c in children if best and c.info.run_id == best["mlflow_run_id"]), children[0])
    port, out = _free_port(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", args.tracking_uri,
                               "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        # workflowType: MLflow 3 opens an experiment on its GenAI traces view unless told otherwise
        base, view = f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}", "?workflowType=machine_learning"
        pages = {"experiment.png": f"{base}/runs{view}", "parent_run.png": f"{base}/runs/{parent.info.run_id}{view}",
                 "trial_run.png": f"{base}/runs/{child.info.run_id}{view}"}
        for name, url in pages.items():
            subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                            "--hide-scrollbars", "--window-size=1600,1400", "--virtual-time-budget=20000",
                            f"--screenshot={out / name}", url], capture_output=True, timeout=120)
            print(f"{out / name}  ({url})")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
