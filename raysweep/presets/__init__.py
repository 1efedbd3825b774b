"""The files that ship with raysweep as package data, so an installed wheel has them too:
- search_spaces/: ready run configs (one per method and paper variant), sweep search spaces, and the
  paper studies `raysweep reproduce` runs (search_spaces/reproduce/);
- cluster/: Ray cluster launcher YAMLs, KubeRay manifests and the cluster image's Dockerfile.
In a clone, search_spaces/ and cluster/ at the top of the repository are links to these folders.

A preset is named by its path under this folder (`search_spaces/pdd_deg/adp.yaml`). Wherever raysweep
reads a YAML file that is not on disk it tries that name here (`resolve`), so the README's commands
work as written from any directory; `raysweep configs` lists the presets and copies one out.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from raysweep.errors import UserError

ROOT = Path(__file__).resolve().parent
FOLDERS = ("search_spaces", "cluster")


@dataclass(frozen=True)
class Preset:
    name: str  # path under ROOT, e.g. search_spaces/pdd_deg/adp.yaml
    kind: str  # run config | search space | study | cluster
    about: str  # the file's first comment line

    @property
    def path(self) -> Path:
        return ROOT / self.name


def _kind(name: str, text: str) -> str:
    if name.startswith("cluster/"):
        return "cluster"
    if name.startswith("search_spaces/reproduce/"):
        return "study"
    return "search space" if "\nsearch:" in f"\n{text}" else "run config"


def _about(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def catalogue() -> list[Preset]:
    """Every preset file, sorted by name."""
    out = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and not path.name.startswith((".", "__")):
                name = path.relative_to(ROOT).as_posix()
                text = path.read_text() if path.suffix in (".yaml", ".yml", ".md", "") else ""
                out.append(Preset(name, _kind(name, text), _about(text)))
    return out


def resolve(path: str | Path) -> Path:
    """`path` itself when it exists; else the preset of that name (its part from search_spaces/ or
    cluster/ on, so ./search_spaces/x.yaml and /elsewhere/cluster/y.yaml are found too); else `path`."""
    p = Path(path)
    if p.exists():
        return p
    parts = p.parts
    for i, part in enumerate(parts):
        if part in FOLDERS:
            candidate = ROOT.joinpath(*parts[i:])
            if candidate.exists():
                return candidate
    return p


def find(name: str) -> Path:
    """The preset (a file or a folder) called `name`, with or without the .yaml and the top folder."""
    clean = name.strip().strip("/")
    for candidate in (clean, f"{clean}.yaml", *(f"{folder}/{clean}" for folder in FOLDERS),
                      *(f"{folder}/{clean}.yaml" for folder in FOLDERS)):
        path = ROOT / candidate
        if path.exists() and ROOT in path.resolve().parents:
            return path
    raise UserError(f"no preset called {name!r}; `raysweep configs` lists them")


def copy_out(name: str, dest: str | Path) -> Path:
    """Copy the preset `name` (a file or a folder) into the folder `dest`; never overwrites."""
    src = find(name)
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--to {dest}: not a folder")
    target = dest / src.name
    if target.exists():
        raise UserError(f"{target} exists already; remove it or copy elsewhere with --to DIR")
    dest.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, target)
    else:
        shutil.copy2(src, target)
    return target
