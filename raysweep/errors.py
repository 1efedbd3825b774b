"""User-facing errors: the CLI prints these as one clear message and exits non-zero, no traceback."""


class UserError(Exception):
    """Something the user can fix: a config field, a path, a missing dataset."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


def quiet_interrupts() -> None:
    """Install in this process a sys.unraisablehook that drops interrupts (Ray runs it at the start of
    every worker of a raysweep job: connect() names it as the job's worker_process_setup_hook).
    A sweep stopped by Ctrl-C or SIGTERM interrupts its workers wherever they are, in a finalizer or a
    weakref callback too, and even while one is still starting: a KeyboardInterrupt, or the SystemExit
    that Ray's SIGTERM handler raises in a worker it stops. Python would print either there as an
    'Exception ignored' traceback on the user's terminal."""
    import sys

    def hook(unraisable) -> None:
        if not issubclass(unraisable.exc_type, (KeyboardInterrupt, SystemExit)):
            sys.__unraisablehook__(unraisable)

    sys.unraisablehook = hook
