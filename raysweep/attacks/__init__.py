"""Attacks on the ensemble. Each takes `stacked_fn(x) -> [K,B,C]` and a named objective from
raysweep.attack_objectives, so the attack sees exactly the ensemble-level loss it names."""
from raysweep.attacks.pgd import attack_batch, robust_accuracy
from raysweep.attacks.uap import evaluate_uap, sgd_uap

__all__ = ["attack_batch", "robust_accuracy", "sgd_uap", "evaluate_uap"]
