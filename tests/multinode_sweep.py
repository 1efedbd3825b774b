"""A sweep on a real two-node Ray cluster on this machine (ray.cluster_utils: the head and the
worker node are separate raylet processes, told apart by custom resources). Run by
test_multinode.py in its own process, so its Ray instance never meets the suite's.

usage: python tests/multinode_sweep.py WORKDIR plain|kill   -> prints one JSON line
"""
import json
import sys
import threading
import time
from pathlib import Path

import ray
import yaml
from mlflow import MlflowClient
from ray.cluster_utils import Cluster

from raysweep.sweep import run_sweep

SPACE = {
    "name": "multinode", "seed": 0,
    "data": {"dataset": "synthetic", "train_size": 512, "test_size": 128, "batch_size": 64,
             "synthetic": {"num_classes": 4, "image_shape": [1, 28, 28], "noise": 0.3}},
    "ensemble": {"k": 2, "method": "independent"},
    "train": {"epochs": 4, "optimizer": "adam", "lr": 0.001},
    "eval": {"uap": None, "jacobian_samples": 0, "diversity_samples": 0},
    "search": {"objective": "clean_acc", "samples": 4, "seed": 0, "trial_cpus": 1, "max_failures": 2,
               "params": {"train.lr": {"loguniform": [0.0005, 0.005]}}},
}


def runs(uri):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("raysweep")
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("raysweep.kind") == "trial"]


def main(workdir: Path, mode: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head_node": 1}})
    worker = cluster.add_node(num_cpus=1, resources={"worker_node": 1})
    out = {"head": cluster.head_node.node_id, "worker": worker.node_id}
    try:
        ray.init(address=cluster.address, logging_level="warning")
        uri = f"sqlite:///{workdir / 'mlflow.db'}"
        (workdir / "space.yaml").write_text(yaml.safe_dump(SPACE))
        if mode == "kill":
            def kill_worker_node():
                node, deadline = worker, time.time() + 300
                while time.time() < deadline:  # a trial is running on the worker node, one has finished
                    rs = runs(uri)
                    if any(r.info.status == "RUNNING" and r.data.tags["raysweep.node_id"] == node.node_id
                           for r in rs) and any(r.info.status == "FINISHED" for r in rs):
                        finished = sorted(r.info.run_id for r in rs if r.info.status == "FINISHED")
                        cluster.remove_node(node, allow_graceful=False)
                        # The run seen RUNNING may have finished between that read and the kill: what died
                        # is what the dead node left unfinished (RUNNING, or FAILED once Tune noticed).
                        died = [r.info.run_id for r in runs(uri)
                                if r.data.tags["raysweep.node_id"] == node.node_id and r.info.status != "FINISHED"]
                        if died:
                            out.update(killed=died, dead_node=node.node_id, finished_before_kill=finished)
                            return
                        node = cluster.add_node(num_cpus=1, resources={"worker_node": 1})  # missed: again
                    time.sleep(0.2)

            threading.Thread(target=kill_worker_node, daemon=True).start()
        summary = run_sweep(str(workdir / "space.yaml"), out=str(workdir / "sweep"), tracking=uri, progress=False)
        out["summary"] = {k: summary[k] for k in ("trials", "finished", "failed")}
        out["runs"] = [{"id": r.info.run_id, "status": r.info.status, "node": r.data.tags["raysweep.node_id"],
                        "trial": r.data.tags["raysweep.trial_id"], "clean_acc": r.data.metrics.get("clean_acc")}
                       for r in runs(uri)]
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
