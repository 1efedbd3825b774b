"""What the sweep tests share: a small synthetic search space and how to find a sweep's runs."""
import json
from pathlib import Path

import yaml

BASE = {
    "name": "synth",
    "seed": 0,
    "data": {"dataset": "synthetic", "train_size": 256, "test_size": 128, "batch_size": 64,
             "synthetic": {"num_classes": 4, "image_shape": [1, 28, 28], "noise": 0.3}},
    "ensemble": {"k": 2, "method": "bagging"},
    "train": {"epochs": 2, "optimizer": "adam", "lr": 0.001, "jr": {"lambda_jr": 0.01}},
    "eval": {"uap": {"eps": [0.1, 0.2], "seeds": 2, "iterations": 3, "batch_size": 32, "selection_size": 64},
             "jacobian_samples": 0, "diversity_samples": 0},
}
SEARCH = {"objective": "weighted_acc", "samples": 3, "seed": 7, "color_by": "train.jr.lambda_jr",
          # --register re-evaluates the top two under a cheap protocol (the strong one is test_protocol's)
          "champion": {"top": 2, "protocol": {"level": "quick", "eps": [0.1], "samples": 64}},
          "params": {"train.jr.lambda_jr": {"loguniform": [0.001, 1.0]},
                     "ensemble.method": {"choice": ["bagging", "independent"]}}}


def write_space(tmp_path, search=None, name="space.yaml", **base):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**BASE, **base, "search": {**SEARCH, **(search or {})}}))
    return path


def child_runs(client, summary):
    parent = json.loads((sweep_dir(summary) / "sweep.json").read_text())["parent_run_id"]
    exp = client.get_run(parent).info.experiment_id
    return parent, client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")


def sweep_dir(summary):
    return Path(summary["dir"])
