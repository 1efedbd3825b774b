"""Every shipped cluster file validates offline (Ray's own schema for launcher YAMLs, the v1 CRD
structure for KubeRay); broken copies are rejected with the field named."""
import subprocess
import sys

import pytest
import yaml
from conftest import repo_root

from raysweep.cluster_check import check_file, cluster_files
from raysweep.errors import ConfigError

FILES = cluster_files(repo_root() / "cluster")


def test_every_kind_is_shipped():
    kinds = sorted(check_file(f) for f in FILES)
    assert kinds.count("launcher") >= 3 and "RayCluster" in kinds and "RayJob" in kinds


def _broken(tmp_path, name, edit):
    doc = yaml.safe_load((repo_root() / "cluster" / name).read_text())
    edit(doc)
    path = tmp_path / name.replace("/", "_")
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("name, edit, message", [
    ("aws-gpu.yaml", lambda d: d.update(max_worker=3), "not a valid Ray cluster config"),
    ("gcp-gpu.yaml", lambda d: d["available_node_types"]["gpu_worker"].pop("node_config"),
     "not a valid Ray cluster config"),
    ("onprem.yaml", lambda d: d.update(min_workers="two"), "not a valid Ray cluster config"),
    ("kuberay/raycluster.yaml",
     lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("image"),
     r"workerGroupSpecs\[0\].template.spec.containers\[0\]: missing 'image'"),
    ("kuberay/raycluster.yaml", lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplicas=9),
     "minReplicas 9 > maxReplicas 8"),
    ("kuberay/rayjob.yaml", lambda d: d["spec"].pop("entrypoint"), "missing 'entrypoint'"),
    ("kuberay/rayjob.yaml", lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion must be ray.io/v1"),
])
def test_broken_files_are_rejected(tmp_path, name, edit, message):
    with pytest.raises(ConfigError, match=message):
        check_file(_broken(tmp_path, name, edit))


def test_check_cluster_cli(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "raysweep", "check-cluster"], capture_output=True, text=True,
                        timeout=120, cwd=repo_root())
    assert ok.returncode == 0 and ok.stdout.count("ok ") == len(FILES)
    bad = _broken(tmp_path, "aws-gpu.yaml", lambda d: d.update(max_worker=3))
    res = subprocess.run([sys.executable, "-m", "raysweep", "check-cluster", str(bad)], capture_output=True,
                         text=True, timeout=120, cwd=repo_root())
    assert res.returncode == 2 and "max_worker" in res.stderr + res.stdout
