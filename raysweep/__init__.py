"""raysweep: train and evaluate adversarially robust deep ensembles, locally or on Ray."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from raysweep.core.ensemble import Ensemble

__version__ = "0.1.0"
__all__ = ["load", "Ensemble", "__version__"]


def load(path: str | Path, device: str | torch.device = "cpu") -> Ensemble:
    """A saved ensemble as a torch.nn.Module in eval mode (see raysweep.Ensemble). `path` is a
    checkpoint folder, a registry URI (models:/NAME@champion, models:/NAME/3) or a run's artifact URI
    (runs:/RUN_ID/checkpoint, as a sweep's summary.json names it); only URIs import MLflow."""
    from raysweep.core import checkpoint

    if str(path).startswith(("models:/", "runs:/")):
        from raysweep.tracking.registry import resolve_checkpoint

        path = resolve_checkpoint(str(path))
    return checkpoint.load(path, device)


def __getattr__(name: str):
    # Importing the package imports no torch: every Ray worker of a raysweep job imports
    # raysweep.errors at start (its setup hook), and most of them never train.
    if name == "Ensemble":
        from raysweep.core.ensemble import Ensemble

        return Ensemble
    raise AttributeError(f"module 'raysweep' has no attribute {name!r}")
