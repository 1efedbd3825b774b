"""The MLflow model registry: ensembles as pyfunc models, the `champion` alias, `models:/` URIs.

A registered version holds the raysweep checkpoint (safetensors + manifest) as an artifact and the
pyfunc wrapper as code (pyfunc_model.py; nothing pickled), whose predict returns ensemble
probabilities; `raysweep.load("models:/NAME@champion")` gives the torch module back.

A version's tags hold the sweep's objective and its value and, when the sweep re-evaluated its
candidates (sweeps/champion.py), the strong protocol's figure (`strong_objective`, `strong_value`)
and the masking flags raised (`masking_flags`, "" for none). The alias is ranked by the strong
figure when there is one, else by the objective (same name; accuracies, higher is better), and
it never moves to a flagged version.
"""
from __future__ import annotations

import io
import os
import time
from contextlib import contextmanager, redirect_stderr
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


@contextmanager
def _using(uri: str):
    """MLflow's fluent calls (log_model, register_model, download_artifacts) read process-wide URIs, and
    setting them also sets the MLFLOW_*_URI environment variables. Set them for one call and put back
    what was there, so a raysweep call leaves the caller's MLflow settings as it found them (MLflow is
    pinned; its module-level URIs are the only way to restore 'not set')."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    old_tracking, old_registry = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_tracking)
        registry_utils._registry_uri = old_registry
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def log_model(run_id: str, checkpoint: Path, uri: str) -> str:
    """Log the checkpoint as a pyfunc model in run_id; returns the model URI."""
    m = read_manifest(checkpoint)
    # The output only: an input TensorSpec makes MLflow refuse float64 and uint8 images, which the
    # model converts (its input rule: pyfunc_model.py, also in the model's metadata).
    signature = ModelSignature(outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, m["num_classes"]))]))
    rule = (f"images [B, {', '.join(map(str, m['image_shape']))}]: float in [0, 1] (any precision) or uint8 in "
            "[0, 255] (divided by 255)")
    with _using(uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            # Models-from-code: the model is this small file, run against the installed raysweep at load
            # time; no pickled Python object and no bundled copy of raysweep (pyfunc_model.py).
            name=MODEL_NAME, python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={"checkpoint": str(checkpoint)}, signature=signature, metadata={"input": rule},
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


def _ranking(tags: dict) -> tuple[str, str]:
    """(the tag naming what a version is ranked by, the tag holding its value)."""
    return ("strong_objective", "strong_value") if "strong_objective" in tags else ("objective", "objective_value")


def _settle_champion(client: MlflowClient, name: str, tags: dict, rounds: int = 10) -> int | None:
    """Point `champion` at the best unflagged version ranked as `tags` are (ties: the earlier version)
    and re-read until it stays there; None when every such version is flagged. Two sweeps registering
    at once each settle after registering, so whichever writes last sees both versions: the alias
    never rests on the worse one."""
    key, value = _ranking(tags)
    clash = None
    for _ in range(rounds):
        scored = [(float(v.tags[value]), -int(v.version)) for v in client.search_model_versions(f"name = '{name}'")
                  if v.tags.get(key) == tags[key] and value in v.tags and not v.tags.get("masking_flags")]
        if not scored:
            return None
        best = -max(scored)[1]
        champ = _champion(client, name)
        if champ is not None and int(champ.version) == best:
            return best
        try:
            client.set_registered_model_alias(name, CHAMPION, str(best))
            clash = None
        except MlflowException as err:
            # MLflow's SQL store creates an alias by reading, then inserting: two writers creating it at once
            # both read "none" and the second insert breaks the unique key. The first write stands; re-read.
            if not _unique_clash(err):
                raise
            clash = err
        time.sleep(0.2)  # let a concurrent writer's move land before re-reading
    if clash is not None:
        champ = _champion(client, name)
        if champ is None or int(champ.version) != best:  # still clashing in the last round: not a race that settles
            raise clash
    return best


def _unique_clash(err: MlflowException) -> bool:
    """A unique-key violation: from a SQL store directly (SQLAlchemy's IntegrityError as the cause), or as the
    message a tracking server passes on (SQLite, Postgres and MySQL wordings)."""
    from sqlalchemy.exc import IntegrityError

    return isinstance(err.__cause__, IntegrityError) or any(
        s in str(err) for s in ("UNIQUE constraint", "unique constraint", "Duplicate entry"))


def register(name: str, checkpoint: str | Path, run_id: str, uri: str, objective: str, value: float,
             strong: dict | None = None) -> dict:
    """New version of `name` from run_id's checkpoint (a local directory, or a runs:/ or models:/ URI,
    fetched from MLflow: the node that trained it may be gone); move `champion` to it if it is better
    and unflagged. `strong`: {strong_objective, strong_value, masking_flags} of a re-evaluation."""
    client = MlflowClient(uri)
    if str(checkpoint).startswith(("runs:/", "models:/")):
        checkpoint = resolve_checkpoint(str(checkpoint), uri)
    model_uri = log_model(run_id, Path(checkpoint), uri)
    tags = {"objective": objective, "objective_value": str(value)}
    if strong is not None:
        tags.update(strong_objective=strong["strong_objective"], strong_value=str(strong["strong_value"]),
                    masking_flags=",".join(strong["masking_flags"]))
    # MLflow prints "Successfully registered model" and "Created version" straight to stderr; the
    # caller reports the registration itself (and any error still raises).
    with _using(uri), redirect_stderr(io.StringIO()):
        version = mlflow.register_model(model_uri, name, tags=tags)
    key, value_tag = _ranking(tags)
    champ = _champion(client, name)
    out = {"name": name, "version": int(version.version), "model_uri": model_uri, "champion": False, **tags}
    if champ is not None and champ.tags.get(key) != tags[key]:
        return {**out, "reason": f"champion v{champ.version} was chosen by {champ.tags.get(key)!r}, not {tags[key]!r}"}
    if tags.get("masking_flags"):
        _settle_champion(client, name, tags)
        return {**out, "reason": f"masking flags raised ({tags['masking_flags']}): a flagged version is never champion"}
    final = _settle_champion(client, name, tags)
    move = final == int(version.version)
    mine = float(tags[value_tag])
    if champ is None:
        reason = "first version" if move else f"v{final} registered meanwhile is better"
    else:
        old = float(champ.tags[value_tag])
        reason = f"{tags[key]} {mine:.4f} {'>' if mine > old else '<='} champion v{champ.version}'s {old:.4f}"
        if not move and mine > old:
            reason += f"; v{final}, registered meanwhile, is better still"
    return {**out, "champion": move, "reason": reason}


def resolve_checkpoint(uri: str, tracking: str | None = None) -> Path:
    """models:/NAME@alias, models:/NAME/VERSION or runs:/RUN_ID/PATH -> a local raysweep checkpoint directory."""
    try:
        with _using(tracking_uri(tracking)):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as err:  # MLflow raises several types for unknown names/aliases
        raise UserError(f"cannot load {uri} from the registry at {tracking_uri(tracking)}: {err}") from None
    found = sorted(p.parent for p in local.rglob("ensemble.json"))
    if not found:
        raise UserError(f"{uri} holds no raysweep checkpoint (no ensemble.json under {local})")
    return found[0]
