"""Ensemble checkpoints: member weights in safetensors plus a JSON manifest. Loading executes no
pickled code."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import RunConfig, validate_config
from .ensemble import Ensemble
from .errors import UserError
from .composite import rebuild_composite
from .models import build_member

FORMAT = 1
WEIGHTS_FILE, MANIFEST_FILE = "members.safetensors", "ensemble.json"


def save_checkpoint(path: str | Path, ensemble: Ensemble, cfg: RunConfig, image_shape, num_classes, mean, std) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"member{k}.{name}": t.detach().cpu().contiguous()
               for k, m in enumerate(ensemble.members) for name, t in m.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS_FILE))
    manifest = {
        "format": FORMAT, "arch": cfg.model.arch, "width": cfg.model.width, "k": ensemble.k,
        "weights": ensemble.weights.tolist(),
        "combine": ensemble.combine_how, "image_shape": list(image_shape), "num_classes": num_classes,
        "mean": list(mean), "std": list(std), "config": cfg.model_dump(mode="json"),
    }
    if cfg.model.arch == "composite":
        manifest["composite"] = ensemble.members[0].spec
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return path


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not (path / MANIFEST_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise UserError(f"{path} is not a raysweep checkpoint: expected {MANIFEST_FILE} and {WEIGHTS_FILE} in it")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: checkpoint format {manifest.get('format')} is not supported (expected {FORMAT})")
    return manifest


def load(path: str | Path, device: str | torch.device = "cpu") -> Ensemble:
    """The saved ensemble as a torch.nn.Module in eval mode; see raysweep.ensemble.Ensemble. `path`
    may be a registry URI: models:/NAME@champion, models:/NAME/3."""
    if str(path).startswith("models:/"):
        from .registry import resolve_checkpoint

        path = resolve_checkpoint(str(path))
    m = read_manifest(path)
    tensors = load_file(str(Path(path) / WEIGHTS_FILE), device=str(device))
    members = []
    for k in range(m["k"]):
        if m["arch"] == "composite":
            member = rebuild_composite(m["composite"], m["image_shape"], m["num_classes"], m["mean"], m["std"])
        else:
            member = build_member(m["arch"], m["image_shape"], m["num_classes"], m["mean"], m["std"], m["width"])
        prefix = f"member{k}."
        member.load_state_dict({n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)})
        members.append(member)
    return Ensemble(members, torch.tensor(m["weights"]), m["combine"]).to(device).eval()


def checkpoint_config(path: str | Path) -> RunConfig:
    return validate_config(read_manifest(path)["config"], f"stored in checkpoint {path}")
