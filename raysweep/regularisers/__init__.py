"""Ensemble-level training terms over stacked member outputs, one file each, registered in
base.REGULARISERS: Jacobian regularisation, DEG, ADP, and PDD (a transform of the members' last
hidden features). Importing this package registers the built-in ones, in this order (the order
of their random draws)."""
# The order of registration is the order of the terms and of their random draws.
# isort: off
from raysweep.regularisers import jacobian, deg, adp, pdd  # noqa: F401
# isort: on
from raysweep.regularisers.base import (
    REGULARISERS,
    Regulariser,
    StepOutputs,
    active,
    register,
)

__all__ = ["REGULARISERS", "Regulariser", "StepOutputs", "active", "register"]
