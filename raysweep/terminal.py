"""What other libraries may print on a raysweep user's terminal. raysweep's commands (and, through
Ray's worker_process_setup_hook, every Ray worker of their job) call `quiet()` first:

- interrupts: a sweep stopped by Ctrl-C or SIGTERM interrupts its workers wherever they are, in a
  finalizer or a weakref callback too, and even while one is still starting: a KeyboardInterrupt, or
  the SystemExit that Ray's SIGTERM handler raises in a worker it stops. Python would print either
  there as an 'Exception ignored' traceback.
- NOISE: library messages raysweep cannot act on, each named with why. Anything else, every warning
  and error included, still shows.
"""
from __future__ import annotations

import logging
import sys
import warnings

# (logger, start of the message; "" for every record below WARNING), why it is dropped
NOISE = [
    ("mlflow.store.db.utils", "",
     "'Creating initial MLflow database tables' / 'Updating database tables': MLflow's first use of a new "
     "SQLite store, once per run folder or test; nothing to act on"),
    ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled",
     "the local Ray raysweep starts has token authentication on by default, the secure setting; the "
     "warning that it is OFF still shows"),
    ("ray.train._internal.storage", "Checkpoint successfully created",
     "one line per trial and checkpoint; the sweep's own progress lines and summary say where results are"),
    ("ray.train.v2._internal.execution.storage", "Checkpoint successfully created", "as above (Ray Train v2)"),
]
# (category, start of the message, module), why it is dropped
WARNINGS = [
    (UserWarning, "Add type hints to the `predict` method", "mlflow",
     "the registered model checks and converts its input itself (pyfunc_model.py: float or uint8 images), "
     "which type-hint validation would replace"),
    (UserWarning, "An input example was not provided", "mlflow",
     "the model's input rule is in its metadata; an example would store test images in every registered model"),
]


class _Drop(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.prefix:
            return record.levelno >= logging.WARNING
        return not str(record.msg).startswith(self.prefix)


def _ignore_interrupts(unraisable) -> None:
    if not issubclass(unraisable.exc_type, (KeyboardInterrupt, SystemExit)):
        sys.__unraisablehook__(unraisable)


def quiet() -> None:
    """Install the interrupt hook and the NOISE / WARNINGS filters in this process (idempotent)."""
    sys.unraisablehook = _ignore_interrupts
    for name, prefix, _ in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_Drop(prefix))
    for category, message, module, _ in WARNINGS:
        warnings.filterwarnings("ignore", message=f"(?s).*{message}", category=category, module=module)
