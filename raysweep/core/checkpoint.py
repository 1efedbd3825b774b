"""Ensemble checkpoints: member weights in safetensors plus a JSON manifest. Loading executes no
pickled code."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

from raysweep.core.composite import Composite, rebuild_composite
from raysweep.core.ensemble import Ensemble
from raysweep.core.models import ARCHS, build_member
from raysweep.errors import ConfigError, UserError

FORMAT = 1
WEIGHTS_FILE, MANIFEST_FILE = "members.safetensors", "ensemble.json"


def save_checkpoint(path: str | Path, ensemble: Ensemble, cfg: BaseModel, image_shape, num_classes, mean, std) -> Path:
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


MANIFEST_KEYS = {"arch": str, "width": (int, float), "k": int, "weights": list, "combine": str, "image_shape": list,
                 "num_classes": int, "mean": list, "std": list, "config": dict}


def read_manifest(path: str | Path) -> dict:
    """The manifest, checked field by field and against the stored config: a damaged or edited
    checkpoint is a UserError saying what is wrong, never a traceback."""
    path = Path(path)
    if not (path / MANIFEST_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise UserError(f"{path} is not a raysweep checkpoint: expected {MANIFEST_FILE} and {WEIGHTS_FILE} in it")
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path / MANIFEST_FILE}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise UserError(f"{path}: checkpoint format {got} is not supported (expected {FORMAT})")
    for key, kind in MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            what = getattr(kind, "__name__", "number")
            raise UserError(f"{path / MANIFEST_FILE}: field {key!r} is missing or not a {what} (got {manifest.get(key)!r})")
    if manifest["arch"] != "composite" and manifest["arch"] not in ARCHS:
        raise UserError(f"{path / MANIFEST_FILE}: arch {manifest['arch']!r} is unknown; known: "
                        f"{', '.join([*ARCHS, 'composite'])}")
    if manifest["k"] < 1 or len(manifest["weights"]) != manifest["k"]:
        raise UserError(f"{path / MANIFEST_FILE}: k {manifest['k']} does not match its {len(manifest['weights'])} "
                        "member weights")
    stored = manifest["config"].get("model", {})
    if (stored.get("arch"), stored.get("width", 1.0)) != (manifest["arch"], manifest["width"]):
        raise UserError(f"{path / MANIFEST_FILE}: the manifest's model ({manifest['arch']}, width {manifest['width']}) "
                        f"disagrees with its stored config's ({stored.get('arch')}, width {stored.get('width', 1.0)})")
    return manifest


def load(path: str | Path, device: str | torch.device = "cpu") -> Ensemble:
    """The ensemble saved in the checkpoint folder `path`, as a torch.nn.Module in eval mode (see
    core.ensemble.Ensemble). Registry and run URIs are resolved by raysweep.load, not here: loading
    a checkpoint never imports MLflow."""
    m = read_manifest(path)
    try:
        tensors = load_file(str(Path(path) / WEIGHTS_FILE), device=str(device))
    except Exception as err:  # safetensors raises its own SafetensorError (truncated, garbage header)
        raise UserError(f"{Path(path) / WEIGHTS_FILE}: not a readable safetensors file ({err})") from None
    found = {name.split(".", 1)[0] for name in tensors}
    if found != {f"member{k}" for k in range(m["k"])}:
        raise UserError(f"{Path(path) / WEIGHTS_FILE}: holds tensors of {sorted(found)}, the manifest says "
                        f"k = {m['k']}")
    members = []
    for k in range(m["k"]):
        if m["arch"] == "composite":
            member = rebuild_composite(m["composite"], m["image_shape"], m["num_classes"], m["mean"], m["std"])
        else:
            member = build_member(m["arch"], m["image_shape"], m["num_classes"], m["mean"], m["std"], m["width"])
        prefix = f"member{k}."
        try:
            member.load_state_dict({n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)})
        except RuntimeError as err:  # names or shapes that are not this architecture's
            raise UserError(f"{path}: member {k}'s tensors do not fit a {m['arch']} of the manifest's shape: "
                            f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}") from None
        members.append(member)
    return Ensemble(members, torch.tensor(m["weights"]), m["combine"]).to(device).eval()


def composite_members(robust_path: str, natural_path: str, k: int, image_shape, num_classes: int) -> list[Composite]:
    """Meta-composite members: composite i pairs member i of the robust checkpoint with member i of the natural."""
    robust, natural = load(robust_path), load(natural_path)
    spec = {}
    for name, path, ens in (("robust", robust_path, robust), ("natural", natural_path, natural)):
        if ens.k < k:
            raise ConfigError(f"model.composite.{name} has {ens.k} members but ensemble.k = {k}: composite i "
                              f"pairs member i of each")
        m = read_manifest(path)
        spec[name] = {"arch": m["arch"], "width": m["width"]}
        if m["num_classes"] != num_classes or tuple(m["image_shape"]) != tuple(image_shape):
            raise ConfigError(f"model.composite.{name} ({path}) was trained on {m['num_classes']} classes of "
                              f"{tuple(m['image_shape'])} images; this run's data has {num_classes} classes of "
                              f"{tuple(image_shape)}")
    return [Composite(robust.members[i], natural.members[i], num_classes, spec) for i in range(k)]
