"""Scalar metrics of the Jacobian Ensembles and robust-ensembles papers, as plain functions of accuracies."""
from __future__ import annotations

from typing import Mapping


def weighted_accuracy(clean: float, uap_accs: Mapping[float, float], w: float = 0.5) -> float:
    """w * clean + (1 - w) * mean UAP accuracy over the eps grid."""
    return w * clean + (1 - w) * mean(uap_accs.values())


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def auc(curve: Mapping[float, float], eps_target: float, clean: float | None = None) -> float:
    """(1/eps_target) * integral_0^eps_target A(eps) d eps by the trapezoid rule on the curve's eps
    grid up to eps_target; A(0) is the clean accuracy when the grid lacks 0."""
    points = {e: a for e, a in curve.items() if e <= eps_target}
    if 0.0 not in points:
        if clean is None:
            raise ValueError("AUC needs A(0): put 0 in the eps grid or pass the clean accuracy")
        points[0.0] = clean
    if eps_target not in points:
        raise ValueError(f"AUC needs the accuracy at eps_target={eps_target}; grid has {sorted(curve)}")
    xs = sorted(points)
    area = sum((b - a) * (points[a] + points[b]) / 2 for a, b in zip(xs, xs[1:]))
    return area / eps_target
