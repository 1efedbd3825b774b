"""Offline checks of the files in cluster/: launcher YAMLs against Ray's own cluster-config schema
(without launching anything) and KubeRay manifests against the structure the v1 CRDs expect.
`raysweep check-cluster [FILES]` runs them; the test suite runs them on every shipped file."""
from __future__ import annotations

from pathlib import Path

import yaml

from raysweep.errors import ConfigError

KUBERAY_KINDS = ("RayCluster", "RayJob")


def check_launcher(cfg: dict, where: str) -> None:
    # Private Ray API (pinned Ray 2.60): the same call `ray up` makes before launching.
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(cfg))
    except Exception as err:  # jsonschema.ValidationError, ValueError: both mean a broken file
        raise ConfigError(f"{where}: not a valid Ray cluster config: {str(err).splitlines()[0]}") from None


def _need(node, key: str, kind, where: str):
    if not isinstance(node, dict) or key not in node:
        raise ConfigError(f"{where}: missing {key!r}")
    if not isinstance(node[key], kind):
        raise ConfigError(f"{where}.{key}: expected {kind.__name__}, got {type(node[key]).__name__}")
    return node[key]


def _check_pod_template(group: dict, where: str) -> None:
    _need(group, "rayStartParams", dict, where)
    spec = _need(_need(group, "template", dict, where), "spec", dict, f"{where}.template")
    containers = _need(spec, "containers", list, f"{where}.template.spec")
    if not containers:
        raise ConfigError(f"{where}.template.spec.containers: empty")
    for i, c in enumerate(containers):
        _need(c, "name", str, f"{where}.template.spec.containers[{i}]")
        _need(c, "image", str, f"{where}.template.spec.containers[{i}]")


def _check_cluster_spec(spec: dict, where: str) -> None:
    _check_pod_template(_need(spec, "headGroupSpec", dict, where), f"{where}.headGroupSpec")
    for i, group in enumerate(_need(spec, "workerGroupSpecs", list, where)):
        w = f"{where}.workerGroupSpecs[{i}]"
        _need(group, "groupName", str, w)
        counts = {k: _need(group, k, int, w) for k in ("minReplicas", "maxReplicas")}
        if counts["minReplicas"] > counts["maxReplicas"]:
            raise ConfigError(f"{w}: minReplicas {counts['minReplicas']} > maxReplicas {counts['maxReplicas']}")
        _check_pod_template(group, w)


def check_kuberay(doc: dict, where: str) -> None:
    if doc.get("apiVersion") != "ray.io/v1":
        raise ConfigError(f"{where}: apiVersion must be ray.io/v1, got {doc.get('apiVersion')!r}")
    _need(_need(doc, "metadata", dict, where), "name", str, f"{where}.metadata")
    spec = _need(doc, "spec", dict, where)
    if doc["kind"] == "RayCluster":
        _check_cluster_spec(spec, f"{where}.spec")
    else:
        _need(spec, "entrypoint", str, f"{where}.spec")
        _check_cluster_spec(_need(spec, "rayClusterSpec", dict, f"{where}.spec"), f"{where}.spec.rayClusterSpec")


def check_file(path: str | Path) -> str:
    """Check one file; returns what it is ('launcher', 'RayCluster', 'RayJob')."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read YAML: {err}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if "kind" in doc:
        if doc["kind"] not in KUBERAY_KINDS:
            raise ConfigError(f"{path}: kind {doc['kind']!r} is not one of {KUBERAY_KINDS}")
        check_kuberay(doc, str(path))
        return doc["kind"]
    check_launcher(doc, str(path))
    return "launcher"


def cluster_files(root: str | Path) -> list[Path]:
    return sorted(Path(root).rglob("*.yaml"))
