"""A sweep on a real two-node Ray cluster on this machine (ray.cluster_utils: the head and the
worker node are separate raylet processes, told apart by custom resources). Run by
test_multinode.py in its own process, so its Ray instance never meets the suite's.

usage: python tests/multinode_sweep.py WORKDIR   -> prints one JSON line, {part: what it saw}

One cluster for three parts, since a cluster's start is most of a part's time on this CPU:
  plain     a sweep whose trials land on both nodes;
  kill      the worker node removed while it runs a trial;
  isolated  a second worker node keeps its session (trial folders) in its own temp dir, which is deleted
            with the node after the first part of the sweep, as a real node's disk would be out of reach.
"""
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import ray
import yaml
from mlflow import MlflowClient
from ray.cluster_utils import Cluster

from raysweep.sweeps.tune import run_sweep
from raysweep.tracking.runs import tracking_uri

SPACE = {
    "name": "multinode", "seed": 0,
    "data": {"dataset": "synthetic", "train_size": 512, "test_size": 128, "batch_size": 64,
             "synthetic": {"num_classes": 4, "image_shape": [1, 28, 28], "noise": 0.3}},
    "ensemble": {"k": 2, "method": "independent"},
    "train": {"epochs": 4, "optimizer": "adam", "lr": 0.001},
    "eval": {"uap": None, "jacobian_samples": 0, "diversity_samples": 0},
    "search": {"objective": "clean_acc", "samples": 4, "seed": 0, "trial_cpus": 1, "max_failures": 2,
               "champion": {"top": 1, "protocol": {"level": "quick", "eps": [0.1], "samples": 32}},
               "params": {"train.lr": {"loguniform": [0.0005, 0.005]}}},
}


def runs(uri):
    client = MlflowClient(tracking_uri(uri))  # through raysweep: the store is created once, under its lock
    exp = client.get_experiment_by_name("raysweep")
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("raysweep.kind") == "trial"]


def isolated(cluster, worker, worker_tmp: Path, workdir: Path, uri: str, out: dict) -> None:
    """Interrupt the sweep once a trial of the worker node has finished, remove that node and delete its
    temp dir, then resume: the rest runs on the head, and the summary and the registered champion
    (maybe trained on the dead node) come from storage and MLflow."""
    records = workdir / "sweep" / "trials"
    (workdir / "space.yaml").write_text(yaml.safe_dump(SPACE))

    def interrupt_after_a_worker_trial():
        deadline = time.time() + 400
        while time.time() < deadline:
            recs = [json.loads(p.read_text()) for p in records.glob("*.json")]
            if any(r.get("node_id") == worker.node_id for r in recs):
                os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: Tune stops the trials, the sweep is resumable
                return
            time.sleep(0.2)

    threading.Thread(target=interrupt_after_a_worker_trial, daemon=True).start()
    first = run_sweep(str(workdir / "space.yaml"), out=str(workdir / "sweep"), tracking=uri, progress=False,
                      register="mn-ens")
    out["first"] = {k: first[k] for k in ("status", "finished")}
    cluster.remove_node(worker, allow_graceful=False)
    shutil.rmtree(worker_tmp)
    out["worker_tmp_gone"] = not worker_tmp.exists()
    summary = run_sweep(None, out=str(workdir / "sweep"), resume=True, progress=False)
    out["summary"] = {k: summary[k] for k in ("status", "trials", "finished", "failed")}
    out["registered"] = summary["registered"]
    recs = [json.loads(p.read_text()) for p in records.glob("*.json")]
    out["dead_node_runs"] = [r["mlflow_run_id"] for r in recs if r.get("node_id") == worker.node_id]
    out["storage"] = [t["storage"] for t in summary["finished_trials"]]


def sweep_on_two_nodes(cluster, worker, workdir: Path, mode: str, out: dict) -> None:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    # kill: longer trials, so the kill lands while a trial runs on the worker node (a 4-epoch trial's
    # run is open for only a couple of seconds on this CPU); packed two to a Tune trial, trained together
    # (they differ only in lr), so the node dies with both; four Tune trials, so the worker node gets a second.
    space = ({**SPACE, "train": {**SPACE["train"], "epochs": 10},
              "search": {**SPACE["search"], "samples": 8, "pack": 2}} if mode == "kill" else SPACE)
    (workdir / "space.yaml").write_text(yaml.safe_dump(space))
    if mode == "kill":
        def read_runs():
            while True:
                try:
                    return runs(uri)
                except Exception as err:  # e.g. the store busy with the trials' writes: read again
                    out.setdefault("watch_errors", []).append(f"{type(err).__name__}: {err}"[:300])
                    time.sleep(0.2)

        def kill_worker_node():
            """Remove the worker node while its trial is in the first half of its run (the shortest
            finished run so far sets the scale): a kill at the end could miss a run that finishes
            between the read and the kill, and a node cannot be added back from this thread."""
            deadline = time.time() + 300
            while time.time() < deadline:
                rs = read_runs()
                done = [r for r in rs if r.info.status == "FINISHED"]
                shortest = min((r.info.end_time - r.info.start_time for r in done), default=0)
                young = [r for r in rs if r.info.status == "RUNNING"
                         and r.data.tags["raysweep.node_id"] == worker.node_id
                         and time.time() * 1000 - r.info.start_time < shortest / 2]
                if young:
                    cluster.remove_node(worker, allow_graceful=False)
                    # What died is what the dead node left unfinished once its processes are gone
                    # (RUNNING, or FAILED once Tune noticed): a worker outlives its raylet by a moment.
                    time.sleep(3)
                    died = [r.info.run_id for r in read_runs()
                            if r.data.tags["raysweep.node_id"] == worker.node_id and r.info.status != "FINISHED"]
                    out.update(killed=died, dead_node=worker.node_id,
                               finished_before_kill=sorted(r.info.run_id for r in done))
                    return
                time.sleep(0.2)

        def watch():  # whatever stops the watcher is in the test's failure message
            try:
                kill_worker_node()
            except Exception:
                out.setdefault("watch_errors", []).append(traceback.format_exc()[-1500:])

        threading.Thread(target=watch, daemon=True).start()
    summary = run_sweep(str(workdir / "space.yaml"), out=str(workdir / "sweep"), tracking=uri, progress=False)
    out["summary"] = {k: summary[k] for k in ("trials", "finished", "failed")}
    out["runs"] = [{"id": r.info.run_id, "status": r.info.status, "node": r.data.tags["raysweep.node_id"],
                    "trial": r.data.tags["raysweep.trial_id"], "clean_acc": r.data.metrics.get("clean_acc")}
                   for r in runs(uri)]


def main(workdir: Path) -> None:
    """The three parts on one cluster, each in its own folder and MLflow store: plain and kill on a first
    worker node (kill removes it), isolated on a second one, added afterwards with its own temp dir."""
    with socket.socket() as s:  # a free dashboard port: Ray's default 8265 may be another instance's
        s.bind(("127.0.0.1", 0))
        dashboard_port = s.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head_node": 1},
                                                            "dashboard_port": dashboard_port})
    temps, results = [], {}
    try:
        ray.init(address=cluster.address, logging_level="warning")
        worker = cluster.add_node(num_cpus=1, resources={"worker_node": 1})
        for mode in MODES:
            if mode == "isolated":
                temps.append(Path(tempfile.mkdtemp(prefix="rsw", dir="/tmp")))  # short: socket paths fit 107 bytes
                worker = cluster.add_node(num_cpus=1, resources={"worker_node": 1}, temp_dir=str(temps[-1]))
            out = results[mode] = {"head": cluster.head_node.node_id, "worker": worker.node_id}
            (workdir / mode).mkdir()
            try:
                if mode == "isolated":
                    isolated(cluster, worker, temps[-1], workdir / mode, f"sqlite:///{workdir / mode / 'mlflow.db'}",
                             out)
                else:
                    sweep_on_two_nodes(cluster, worker, workdir / mode, mode, out)
            except Exception:  # the other parts still run; this one's test fails with the traceback
                out["error"] = traceback.format_exc()[-3000:]
    finally:
        ray.shutdown()
        cluster.shutdown()
        for tmp in temps:
            shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps(results))


MODES = ("plain", "kill", "isolated")  # kill removes the first worker node; isolated adds its own

if __name__ == "__main__":
    main(Path(sys.argv[1]))
