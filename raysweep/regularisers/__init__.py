"""Ensemble-level training terms over stacked member outputs: Jacobian regularisation, DEG, ADP,
and PDD (a transform of the members' last hidden features)."""
