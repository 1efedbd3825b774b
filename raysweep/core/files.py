"""Files written whole or not at all.

Everything raysweep resumes from (a run's epochs, an evaluation's finished stages, a sweep's ledger,
a study's finished runs) is read back by a later process that takes the file as complete. A process
killed mid-write (Ctrl-C, a preempted node, a full disk) must therefore leave the previous file or
none, never a truncated one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, data: bytes | str | Callable[[Path], None]) -> None:
    """Write `data` (bytes, text, or a function that writes the file it is given, e.g. a torch.save)
    to `path`: into a hidden temporary beside it, then renamed over it. A rename within one folder is
    atomic on POSIX filesystems, so readers see the old file or the new one. The temporary's name holds
    the process id, so processes writing the same file at once (trials staging one dataset) do not
    write into each other's temporaries; the last rename wins."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if callable(data):
            data(tmp)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failed write (an exception, not a kill): no stray temporary
