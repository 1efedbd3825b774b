"""Config files and overrides: YAML in and out, `--set a.b=value` (applied to the raw YAML before
validation, so overrides are checked the same way), paths made absolute, and validation errors
that name the field path, the value and what is allowed."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from raysweep import presets
from raysweep.config.schema import RunBase, run_config_model
from raysweep.core.checkpoint import read_manifest
from raysweep.errors import ConfigError


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:" if source else "invalid config:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "literal_error":
            msg = f"got {e['input']!r}; {msg.lower()}"
        elif "input" in e and e["type"] not in ("value_error", "missing"):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value (e.g. train.epochs=3), got {text!r}")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set key {key!r} is not a dotted field path")
    try:
        return key.split("."), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({problem})") from None


def set_path(raw: dict, path: list[str], value, what: str = "") -> dict:
    """Set a dotted path in a raw config, creating sections; a number indexes a list."""
    what = what or ".".join(path)
    node = raw
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{what}: {part!r} is not an index of a list of {len(node)}")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"{what}: {'.'.join(path[:i])!r} is not a section")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set` overrides: dotted paths; a number indexes a list (eval.attacks.0.steps=20)."""
    for text in overrides:
        path, value = parse_override(text)
        set_path(raw, path, value, f"--set {text!r}")
    return raw


def absolute_paths(raw: dict, root: Path) -> dict:
    """A raw config with its file paths made absolute against `root`: Ray workers and Tune trials do
    not run in the launching directory."""
    raw = copy.deepcopy(raw)
    data, comp = raw.get("data") or {}, (raw.get("model") or {}).get("composite") or {}
    if data.get("data_dir"):
        data["data_dir"] = str((root / Path(data["data_dir"]).expanduser()).resolve())
    for key in ("robust", "natural"):
        if comp.get(key):
            comp[key] = str((root / comp[key]).resolve())
    return raw


def validate_config(raw: dict, source: str = "") -> RunBase:
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return run_config_model().model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def read_yaml(path: str | Path, what: str = "config") -> dict:
    """A YAML file as a dict; a path not on disk may name a file that ships with raysweep (presets)."""
    path = presets.resolve(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path} (`raysweep configs` lists the ones that ship with raysweep)")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunBase:
    raw = read_yaml(path) if path is not None else {}
    return validate_config(apply_overrides(raw, list(overrides)), str(path or "(defaults)"))


def dump_config(cfg: RunBase) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def run_identity(cfg: RunBase, training: bool = False) -> str:
    """What a run computes, as text: its config without `executor` and `name`. Every executor gives the
    same numbers (to float rounding; tests hold them to 1e-5), so the run's identity leaves out where and
    how its members are computed (local or Ray, loop or vmap, NCHW or NHWC, eager or compiled); the name
    is a label (a sweep's trial cut off and run again at its point gets a new one). `training`: what its
    training computes, without `eval` too (training never reads it)."""
    raw = cfg.model_dump(mode="json")
    raw.pop("executor", None)
    raw.pop("name", None)
    if training:
        raw.pop("eval", None)
    return yaml.safe_dump(raw, sort_keys=False)


def current_identity(saved: str, training: bool = False) -> str | None:
    """The run identity of a config saved with earlier work (a config.yaml, or a run_identity text), read
    under today's schema: a field added since takes its default, so the identity is today's text for the
    same run. None when it no longer validates (a field since removed or renamed, or a damaged file)."""
    try:
        return run_identity(validate_config(yaml.safe_load(saved), "saved with earlier work"), training)
    except (ConfigError, yaml.YAMLError):
        return None


def same_run(saved: str, cfg: RunBase, training: bool = False) -> bool:
    """Whether a config saved with earlier work (a finished run's config.yaml, saved epochs) describes the
    run `cfg`, so that work is reused (current_identity: a change of executor settings alone keeps the
    work). `training`: the work is training alone (saved epochs), which a change of `eval` keeps too."""
    earlier = current_identity(saved, training)
    return earlier is not None and earlier == run_identity(cfg, training)


def checkpoint_config(path: str | Path) -> RunBase:
    """The run config stored in a checkpoint's manifest."""
    return validate_config(read_manifest(path)["config"], f"stored in checkpoint {path}")
