"""Ensemble-level training terms over stacked member outputs, one file each, registered in
base.REGULARISERS: Jacobian regularisation, DEG, ADP, and PDD (a transform of the members' last
hidden features). Importing this package registers the built-in ones, in this order (the order
of their random draws)."""
from raysweep.regularisers import adp, deg, jacobian, pdd  # noqa: F401  (registration)
from raysweep.regularisers.base import (
    REGULARISERS,
    Regulariser,
    StepOutputs,
    active,
    register,
)

__all__ = ["REGULARISERS", "Regulariser", "StepOutputs", "active", "register"]
