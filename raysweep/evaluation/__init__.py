"""What a trained ensemble is worth. Each evaluation is one file, registered in base.EVALUATIONS
with its config section eval.<key>; they run in this order (AUC reads the attacks' curves) and add
named results to the typed EvalReport (report.py). The protocol that runs them is in raysweep/run.py."""
# The order of registration is the order in which they run.
# isort: off
from raysweep.evaluation import robust, uap, auc, transfer, cw, autoattack, jsma, diversity, jacobian  # noqa: F401
from raysweep.evaluation import calibration, minnorm, protocol, masking  # noqa: F401
# isort: on
from raysweep.evaluation.base import EVALUATIONS, EvalContext, Evaluation, register
from raysweep.evaluation.report import EvalReport, Result, scalars_of

__all__ = ["EVALUATIONS", "EvalContext", "EvalReport", "Evaluation", "Result", "register", "scalars_of"]
