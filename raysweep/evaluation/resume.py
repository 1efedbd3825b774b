"""Evaluation that outlives its process. An evaluation of a large ensemble takes hours here (the UAP
stage of a 9-member LeNet-5 ensemble at the paper's protocol with 20 starts: 71 min on one core; its
PGD ladder at 10 000 images: a single model's 750 s per eps, nine times over), so a run cut off
mid-evaluation (a killed process, a machine handed back) keeps what it finished: each evaluation
stage's share of the report is saved as the stage ends, and a stage may keep parts of its own (the
UAP stage, each eps, and every minute the eps under way; the attacks stage, each finished run of each
eps's step-doubling ladder, and with eval.attack_members each member's accuracy at each eps).
Everything is kept under a folder named after a digest of the run's identity (its config without
`executor` and `name`: config.run_identity) and the members' weights, so a saved part is only ever read back for
the very ensemble and evaluation that made it; the folders of other digests are removed when a new
one is made. The folder also holds the identity's text: a field added to the schema since (with its
default) changes the text but not what the evaluation computes, so a folder whose saved identity, read
under today's schema, gives today's digest is taken over rather than removed.

Files are torch.save'd dicts of tensors and plain values, read back with weights_only=True: a saved
part is data, never code.
"""
from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import torch

from raysweep.core.files import atomic_write


def digest(ensemble, config_text: str) -> str:
    """The name of the folder an evaluation of this ensemble under this run identity keeps its parts in."""
    h = hashlib.sha256(config_text.encode())
    for tensor in [ensemble.weights] + [t for m in ensemble.members for _, t in sorted(m.state_dict().items())]:
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


IDENTITY_FILE = "identity.yaml"


def find(root: Path, ensemble, config_text: str, current=None) -> Path | None:
    """The folder under root that an evaluation of this ensemble under this run identity kept, if any:
    root/<digest>, or one whose saved identity, read under today's schema by `current`
    (config.current_identity), gives that digest."""
    return _find(Path(root), digest(ensemble, config_text), ensemble, current)


def _find(root: Path, name: str, ensemble, current) -> Path | None:
    if (root / name).is_dir():
        return root / name
    if current is None or not root.is_dir():
        return None
    for other in sorted(root.iterdir()):
        saved = other / IDENTITY_FILE
        if saved.is_file() and (text := current(saved.read_text())) is not None and digest(ensemble, text) == name:
            return other
    return None


def folder_for(root: Path, ensemble, config_text: str, current=None) -> Path:
    """root/<digest of the run's identity (config.run_identity) and the ensemble's weights>, made, kept, or
    taken over from an earlier schema's name (find); the folders of other digests are removed."""
    root = Path(root)
    folder = root / digest(ensemble, config_text)
    found = _find(root, folder.name, ensemble, current)
    if found is not None and found != folder:
        found.rename(folder)
    if root.is_dir():
        for other in root.iterdir():
            if other.is_dir() and other != folder:
                shutil.rmtree(other, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / IDENTITY_FILE).is_file() or (folder / IDENTITY_FILE).read_text() != config_text:
        atomic_write(folder / IDENTITY_FILE, config_text)
    return folder


def save_part(path: Path, part: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(part, tmp))


def load_part(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: compute that part again
        print(f"raysweep: ignoring the unreadable evaluation part {path} ({type(err).__name__}); computing it again",
              file=sys.stderr)
        return None
