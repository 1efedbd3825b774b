"""Joint (simultaneous) training: all members see the same mini-batch, so ensemble-level terms
(Ensemble-Adv, an ensemble loss, PDD, DEG, ADP) can couple them."""
from raysweep.methods.base import EnsembleMethod, register


@register
class Joint(EnsembleMethod):
    name, batches, joint = "joint", "shared", True
    description = "all members see the same mini-batch (simultaneous training)"
