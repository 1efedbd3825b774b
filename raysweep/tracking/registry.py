"""The MLflow model registry: ensembles as pyfunc models, the `champion` alias, `models:/` URIs.

A registered version holds the raysweep checkpoint (safetensors + manifest) as an artifact and the
pyfunc wrapper as code (pyfunc_model.py; nothing pickled), whose predict returns ensemble
probabilities; `raysweep.load("models:/NAME@champion")` gives the torch module back. The alias
moves only to a version whose objective beats the current champion's (same objective name;
accuracies, higher is better).
"""
from __future__ import annotations

import time
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from raysweep.core.checkpoint import read_manifest
from raysweep.errors import UserError
from raysweep.tracking.runs import tracking_uri

CHAMPION = "champion"
MODEL_NAME = "ensemble"


def log_model(run_id: str, checkpoint: Path, uri: str) -> str:
    """Log the checkpoint as a pyfunc model in run_id; returns the model URI."""
    m = read_manifest(checkpoint)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *m["image_shape"]))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, m["num_classes"]))]))
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            # Models-from-code: the model is this small file, run against the installed raysweep at load
            # time; no pickled Python object and no bundled copy of raysweep (pyfunc_model.py).
            name=MODEL_NAME, python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={"checkpoint": str(checkpoint)}, signature=signature,
            # Listed, not inferred: inference imports the model in a subprocess (slow, and it guesses).
            # raysweep itself must be installed where the model is loaded (it is not on PyPI).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "safetensors", "pydantic>=2", "pyyaml",
                              "numpy"])
    return info.model_uri


def _champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _settle_champion(client: MlflowClient, name: str, objective: str, rounds: int = 10) -> int:
    """Point `champion` at the best version by `objective` (ties: the earlier version) and re-read until
    it stays there. Two sweeps registering at once each settle after registering, so whichever writes
    last sees both versions: the alias never rests on the worse one."""
    for _ in range(rounds):
        scored = [(float(v.tags["objective_value"]), -int(v.version)) for v in
                  client.search_model_versions(f"name = '{name}'")
                  if v.tags.get("objective") == objective and "objective_value" in v.tags]
        best = -max(scored)[1]
        champ = _champion(client, name)
        if champ is not None and int(champ.version) == best:
            return best
        client.set_registered_model_alias(name, CHAMPION, str(best))
        time.sleep(0.2)  # let a concurrent writer's move land before re-reading
    return best


def register(name: str, checkpoint: str | Path, run_id: str, uri: str, objective: str, value: float) -> dict:
    """New version of `name` from run_id's checkpoint (a local directory, or a runs:/ or models:/ URI,
    fetched from MLflow: the node that trained it may be gone); move `champion` to it if it is better."""
    client = MlflowClient(uri)
    if str(checkpoint).startswith(("runs:/", "models:/")):
        checkpoint = resolve_checkpoint(str(checkpoint), uri)
    model_uri = log_model(run_id, Path(checkpoint), uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    version = mlflow.register_model(model_uri, name, tags={"objective": objective, "objective_value": str(value)})
    champ = _champion(client, name)
    if champ is not None and champ.tags.get("objective") != objective:
        return {"name": name, "version": int(version.version), "champion": False, "model_uri": model_uri,
                "reason": f"champion v{champ.version} was chosen by {champ.tags.get('objective')!r}, not {objective!r}"}
    final = _settle_champion(client, name, objective)
    move = final == int(version.version)
    if champ is None:
        reason = "first version" if move else f"v{final} registered meanwhile is better"
    else:
        old = float(champ.tags["objective_value"])
        reason = f"{objective} {value:.4f} {'>' if value > old else '<='} champion v{champ.version}'s {old:.4f}"
        if not move and value > old:
            reason += f"; v{final}, registered meanwhile, is better still"
    return {"name": name, "version": int(version.version), "champion": move, "reason": reason, "model_uri": model_uri}


def resolve_checkpoint(uri: str, tracking: str | None = None) -> Path:
    """models:/NAME@alias, models:/NAME/VERSION or runs:/RUN_ID/PATH -> a local raysweep checkpoint directory."""
    mlflow.set_tracking_uri(tracking_uri(tracking))
    mlflow.set_registry_uri(tracking_uri(tracking))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as err:  # MLflow raises several types for unknown names/aliases
        raise UserError(f"cannot load {uri} from the registry at {tracking_uri(tracking)}: {err}") from None
    found = sorted(p.parent for p in local.rglob("ensemble.json"))
    if not found:
        raise UserError(f"{uri} holds no raysweep checkpoint (no ensemble.json under {local})")
    return found[0]
