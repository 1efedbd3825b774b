"""raysweep.terminal: what it drops is exactly what it names; everything else still reaches the user."""
import logging
import subprocess
import sys

from raysweep.terminal import NOISE, WARNINGS, quiet


def test_named_library_log_lines_are_dropped_and_others_kept(caplog):
    quiet()
    quiet()  # twice: idempotent, no second filter
    caplog.set_level(logging.DEBUG)
    for name, prefix, _ in NOISE:
        logger = logging.getLogger(name)
        logger.info(f"{prefix}dropped" if prefix else "an INFO line, dropped")
        logger.warning(f"{name} has a real problem")  # a different message, or a warning: kept
    kept = [r.getMessage() for r in caplog.records]
    assert kept == [f"{name} has a real problem" for name, _, _ in NOISE], kept


def test_named_library_warnings_are_dropped_and_others_kept():
    """In a process of its own: pytest records warnings itself, a user's terminal shows them."""
    code = "\n".join([
        "import warnings",
        "from raysweep.terminal import WARNINGS, quiet",
        "quiet(); quiet()",
        "for category, text, _ in WARNINGS:",
        "    with warnings.catch_warnings():  # as MLflow raises them: its own 'once' filter in front of ours",
        "        warnings.simplefilter('once', category=UserWarning)",
        "        warnings.warn(f'\\x1b[33m{text} to enable something\\x1b[0m', category)",
        "        warnings.warn('another warning of the same library', category)",
    ])
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stderr
    assert err.count("another warning of the same library") == len(WARNINGS), err
    assert not any(text in err for _, text, _ in WARNINGS), err
