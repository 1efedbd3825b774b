"""raysweep: train and evaluate adversarially robust deep ensembles, locally or on Ray.

The Python API does what the commands do, with the same arguments:
- `train(config)`: train and evaluate one ensemble (`raysweep train`); returns its metrics;
- `sweep(space)`: a Ray Tune + Optuna search, every trial in MLflow (`raysweep sweep`); its summary;
- `evaluate(target)`: re-evaluate a saved ensemble (`raysweep evaluate`); its metrics;
- `results(sweep_dir)`: a finished (or interrupted) sweep's trials as a pandas DataFrame;
- `load(path)`: a saved ensemble as a torch.nn.Module (`Ensemble`).
A config or space is a YAML path (or the name of one that ships with raysweep: `raysweep configs`) or,
for `train`, a dict; `overrides` are `--set` strings ("train.epochs=2").
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas
    import torch

    from raysweep.core.ensemble import Ensemble

__version__ = "0.1.0"
__all__ = ["train", "sweep", "evaluate", "results", "load", "Ensemble", "__version__"]


def train(config: str | Path | dict, *, overrides: list[str] = (), out: str | Path | None = None,
          mlflow: bool = True, tracking_uri: str | None = None, experiment: str | None = None,
          progress: bool = True) -> dict:
    """Train and evaluate one ensemble into `out` (default runs/<name>), recorded as one MLflow run
    (default store $MLFLOW_TRACKING_URI, else ./mlflow.db) unless mlflow=False. Returns the metrics
    written to out/metrics.json, plus `mlflow_run_id` and `tracking_uri` when recorded."""
    from raysweep.config import apply_overrides, load_config, validate_config
    from raysweep.run import train_recorded

    if isinstance(config, dict):
        cfg = validate_config(apply_overrides(config, list(overrides)), "the config given to raysweep.train")
    else:
        cfg = load_config(config, list(overrides))
    return train_recorded(cfg, Path(out or Path("runs") / cfg.name), mlflow=mlflow, tracking=tracking_uri,
                          experiment=experiment, progress=progress)


def sweep(space: str | Path | None, *, overrides: list[str] = (), samples: int | None = None,
          out: str | Path | None = None, resume: bool = False, register: str | None = None,
          tracking_uri: str | None = None, experiment: str | None = None, address: str | None = None,
          storage: str | None = None, progress: bool = True) -> dict:
    """Run (or, resume=True with `out`, continue) a sweep; returns its summary (summary.json's content:
    `status` finished, interrupted or failed; `best`, `finished_trials`, `registered`, ...). Starts a
    local Ray unless `address` or $RAY_ADDRESS names a cluster."""
    from raysweep.sweeps.tune import run_sweep

    return run_sweep(str(space) if space is not None else None, list(overrides), samples=samples,
                     out=str(out) if out else None, resume=resume, register=register, tracking=tracking_uri,
                     experiment=experiment, address=address, progress=progress, storage=storage)


def evaluate(target: str | Path, *, config: str | Path | None = None, overrides: list[str] = (),
             out: str | Path | None = None, tracking_uri: str | None = None, progress: bool = True) -> dict:
    """Re-evaluate a saved ensemble (a checkpoint folder or the run folder holding it, models:/NAME@ALIAS,
    models:/NAME/VERSION, runs:/RUN_ID/checkpoint) under its stored config; the sections of the YAML
    `config` (e.g. eval:) replace the stored ones. Returns the metrics written to out/metrics.json."""
    from raysweep.run import evaluate_saved

    return evaluate_saved(str(target), config=config, overrides=list(overrides), out=out, tracking=tracking_uri,
                          progress=progress)[0]


def results(sweep_dir: str | Path) -> pandas.DataFrame:
    """A sweep's trials, one row each: trial_id, status, the searched values (a column per parameter
    path), every named result (clean_acc, weighted_acc, robust_acc/pgd/0.1, ...), mlflow_run_id,
    checkpoint (a runs:/ URI that `load` and `evaluate` take) and error."""
    from raysweep.sweeps.summary import trials_table

    return trials_table(sweep_dir)


def load(path: str | Path, device: str | torch.device = "cpu") -> Ensemble:
    """A saved ensemble as a torch.nn.Module in eval mode (see raysweep.Ensemble). `path` is a
    checkpoint folder, a registry URI (models:/NAME@champion, models:/NAME/3) or a run's artifact URI
    (runs:/RUN_ID/checkpoint, as a sweep's summary.json names it); only URIs import MLflow."""
    from raysweep.core import checkpoint

    if str(path).startswith(("models:/", "runs:/")):
        from raysweep.tracking.registry import resolve_checkpoint

        path = resolve_checkpoint(str(path))
    return checkpoint.load(path, device)


def __getattr__(name: str) -> Any:
    # Importing the package imports no torch: every Ray worker of a raysweep job imports
    # raysweep.terminal at start (its setup hook), and most of them never train.
    if name == "Ensemble":
        from raysweep.core.ensemble import Ensemble

        return Ensemble
    raise AttributeError(f"module 'raysweep' has no attribute {name!r}")
