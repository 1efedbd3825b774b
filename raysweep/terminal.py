"""What other libraries may print on a raysweep user's terminal. raysweep's commands (and, through
Ray's worker_process_setup_hook, training.worker_setup, every Ray worker of their job) call `quiet()` first:

- interrupts: a sweep stopped by Ctrl-C or SIGTERM interrupts its workers wherever they are, in a
  finalizer or a weakref callback too, and even while one is still starting: a KeyboardInterrupt, or
  the SystemExit that Ray's SIGTERM handler raises in a worker it stops. Python would print either
  there as an 'Exception ignored' traceback.
- SIGTERM (`kill`, a scheduler, `ray job stop`): a long command stops on it as on Ctrl-C
  (`on_sigterm`), with its own summary, instead of Ray's fatal-signal stack dump.
- NOISE, WARNINGS, ENVIRONMENT: library messages raysweep cannot act on, each named with why.
  Anything else, every other warning and error included, still shows.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from typing import Callable

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
    ("mlflow.utils.environment", "Failed to resolve installed pip version",
     "uv-made environments have no pip; the registered model lists its requirements itself"),
    ("mlflow.utils.uv_utils", "",
     "'Detected uv project' / 'Copied uv.lock to model artifacts': MLflow storing the lock beside a registered "
     "model, as it should"),
]
# (category, text in the message), why it is dropped: MLflow's, raised while it logs the registered
# model. Dropped where warnings are shown (warnings.showwarning), not by a filter: MLflow wraps that
# code in its own catch_warnings with a "once" filter in front of every other.
WARNINGS = [
    (UserWarning, "Add type hints to the `predict` method",
     "the registered model checks and converts its input itself (pyfunc_model.py: float or uint8 images), "
     "which type-hint validation would replace"),
    (UserWarning, "An input example was not provided",
     "the model's input rule is in its metadata; an example would store test images in every registered model"),
]
# Environment defaults (a user's own setting wins), why
ENVIRONMENT = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": ("false", "a progress bar per artifact download, e.g. each champion "
                                             "candidate's checkpoint: a few kilobytes each"),
}


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
    if not getattr(warnings.showwarning, "raysweep_quiet", False):
        shown = warnings.showwarning

        def show(message, category, *args, **kwargs):
            if not any(issubclass(category, c) and text in str(message) for c, text, _ in WARNINGS):
                shown(message, category, *args, **kwargs)

        show.raysweep_quiet = True
        warnings.showwarning = show
    for name, (value, _) in ENVIRONMENT.items():
        os.environ.setdefault(name, value)


@contextmanager
def on_sigterm(action: Callable[[], None]):
    """Within the block, SIGTERM runs `action` (raise KeyboardInterrupt, or pass SIGINT on to a library's
    own Ctrl-C handler); the previous handler is back after it. Signal handlers belong to the main
    thread: run from another thread, the block keeps the default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: action())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
