"""raysweep: train and evaluate adversarially robust deep ensembles, locally or on Ray."""
from raysweep.core.checkpoint import load
from raysweep.core.ensemble import Ensemble

__version__ = "0.1.0"
__all__ = ["load", "Ensemble", "__version__"]
