"""Independent members: each trains on its own shuffle of the whole training set (soft voting)."""
from raysweep.methods.base import EnsembleMethod, register


@register
class Independent(EnsembleMethod):
    name, batches = "independent", "independent"
    description = "own shuffles"
