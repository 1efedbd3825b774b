"""Ensemble methods, one file each, registered in base.METHODS: independent, bagging, joint and
snapshot. Importing this package registers the built-in ones."""
from raysweep.methods import bagging, independent, joint, snapshot  # noqa: F401  (registration)
from raysweep.methods.base import METHODS, EnsembleMethod, register

__all__ = ["METHODS", "EnsembleMethod", "register"]
