"""raysweep: train and evaluate adversarially robust deep ensembles, locally or on Ray."""
from .checkpoint import load
from .ensemble import Ensemble

__version__ = "0.1.0"
__all__ = ["load", "Ensemble", "__version__"]
