"""Bagging: each member trains on its own bootstrap sample of the training set."""
from raysweep.methods.base import EnsembleMethod, register


@register
class Bagging(EnsembleMethod):
    name, batches = "bagging", "bootstrap"
    description = "own bootstrap samples"
