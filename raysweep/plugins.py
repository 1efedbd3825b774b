"""Plug-ins installed by other packages. A package that adds a regulariser or an ensemble method
names the module that registers it under the entry-point group `raysweep.plugins`:

    [project.entry-points."raysweep.plugins"]
    my_regulariser = "my_package.my_regulariser"

Every process that validates a config (the CLI, Tune trials, Ray Train workers) imports them
before composing the schema, so a plug-in works on a cluster as on a laptop once its package is
installed there. Plug-ins come from installed packages, never from a config or checkpoint: data
names no code to import.
"""
from __future__ import annotations

import importlib.metadata
import sys

GROUP = "raysweep.plugins"


def load_installed_plugins() -> list[str]:
    """Import every module registered under `raysweep.plugins`; returns their names. A plug-in that
    fails to import is reported and skipped: one broken package must not stop every run."""
    loaded = []
    for entry in importlib.metadata.entry_points(group=GROUP):
        try:
            entry.load()
            loaded.append(entry.value)
        except Exception as err:  # noqa: BLE001  (any import-time error of foreign code)
            print(f"raysweep: plug-in {entry.name} ({entry.value}) failed to import and is skipped: "
                  f"{type(err).__name__}: {err}", file=sys.stderr)
    return loaded
