"""What ships with raysweep: the presets (ready configs, search spaces, studies, cluster files) reached by
name from any directory, `raysweep configs`, `--dry-run` / `--json`, and a built wheel installed into a
fresh virtual environment, run from outside the clone."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import repo_root

from raysweep import presets
from raysweep.cli import main


def test_every_preset_ships_in_the_package_and_the_clone_links_to_it():
    names = {p.name for p in presets.catalogue()}
    assert {"search_spaces/jacobian_ensembles_sweep.yaml", "search_spaces/reproduce/pdd_deg.yaml",
            "cluster/aws-gpu.yaml", "cluster/kuberay/rayjob.yaml", "cluster/Dockerfile"} <= names
    for folder in presets.FOLDERS:  # the clone's top-level folders are the package's, not copies
        assert (repo_root() / folder).resolve() == presets.ROOT / folder


def test_configs_lists_and_copies_out(tmp_path, capsys):
    assert main(["configs"]) == 0
    listing = capsys.readouterr().out
    assert "search_spaces/pdd_deg_sweep.yaml" in listing and "cluster/onprem.yaml" in listing
    assert main(["configs", "pdd_deg_sweep", "--to", str(tmp_path)]) == 0
    copied = tmp_path / "pdd_deg_sweep.yaml"
    assert copied.read_text() == (presets.ROOT / "search_spaces" / "pdd_deg_sweep.yaml").read_text()
    assert main(["configs", "cluster/kuberay", "--to", str(tmp_path)]) == 0
    assert (tmp_path / "kuberay" / "rayjob.yaml").is_file()
    capsys.readouterr()
    assert main(["configs", "pdd_deg_sweep", "--to", str(tmp_path)]) == 2  # never overwrites
    assert "exists already" in capsys.readouterr().err
    assert main(["configs", "no_such_thing"]) == 2
    assert "no preset called 'no_such_thing'" in capsys.readouterr().err


def test_dry_runs_validate_and_print_without_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # far from the clone: the named files come from the package
    assert main(["train", "search_spaces/pdd_deg/adp.yaml", "--set", "train.epochs=7", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["config"]["train"]["epochs"] == 7 and plan["config"]["train"]["adp"]["alpha"] == 2
    assert plan["config"]["eval"]["batch_size"] is not None  # defaults filled in
    assert main(["reproduce", "pdd-deg", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [v["name"] for v in plan["variants"]] == ["baseline", "adp", "pdd", "deg", "pdd_deg"]
    assert not any(v["done"] for v in plan["variants"])
    # PDD's M must exceed K: the preview marks such points, as the trial would report itself infeasible
    assert main(["sweep", "search_spaces/pdd_deg_sweep.yaml", "--samples", "8", "--dry-run", "--json"]) == 0
    points = json.loads(capsys.readouterr().out)["points"]
    assert len(points) == 8
    for p in points:
        assert (p["infeasible"] is not None) == (p["params"]["train.pdd.m"] <= 3)
    # Packed 6 to a Tune trial: which points each trains together (those of the same K and method)
    assert main(["sweep", "search_spaces/jacobian_ensembles_sweep.yaml", "--samples", "7", "--set",
                 "search.pack=6", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [sum(map(len, t)) for t in plan["tune_trials"]] == [6, 1]
    assert any(len(g) > 1 for t in plan["tune_trials"] for g in t)  # the seeded sampler repeats K and method
    assert sorted(j for t in plan["tune_trials"] for g in t for j in g) == list(range(7))
    kind = [(p["params"]["ensemble.k"], p["params"]["ensemble.method"]) for p in plan["points"]]
    for t in plan["tune_trials"]:
        for g in t:
            assert len({kind[j] for j in g}) == 1  # a group shares K and method
        assert len({kind[g[0]] for g in t}) == len(t)  # and different groups differ in them
    assert main(["train", "search_spaces/pdd_deg/adp.yaml", "--set", "train.epochs=0", "--dry-run"]) == 2
    assert "train.epochs" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_the_wheel_works_outside_the_clone(tmp_path):
    """The wheel, built from the clone, in a fresh venv whose only raysweep is the wheel's (its
    dependencies come from this environment's site-packages, without its editable raysweep), run
    from a folder outside the clone."""
    uv = repo_root() / ".tools" / "bin" / "uv"
    if not uv.is_file():
        pytest.skip("no uv in .tools/ (make setup installs it)")
    dist, venv, work = tmp_path / "dist", tmp_path / "venv", tmp_path / "work"
    subprocess.run([uv, "build", "--wheel", "--no-build-isolation", "--python", sys.executable, "-o", dist,
                    repo_root()], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("raysweep-*.whl")
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, venv], check=True, capture_output=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([uv, "pip", "install", "-q", "--no-deps", "--python", py, wheel], check=True, capture_output=True,
                   timeout=120)
    deps = next(Path(sys.prefix).glob("lib/python3*/site-packages"))
    site = next(venv.glob("lib/python3*/site-packages"))
    (site / "deps.pth").write_text(f"{deps}\n")  # a plain path: the .pth files there (editable raysweep) stay off
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*args):
        res = subprocess.run([venv / "bin" / "raysweep", *args], capture_output=True, text=True, timeout=300,
                             cwd=work, env=env)
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
        return res.stdout

    where = subprocess.run([py, "-c", "import raysweep; print(raysweep.__file__)"], capture_output=True, text=True,
                           cwd=work, env=env, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv), where
    assert "search_spaces/reproduce/je_sweep.yaml" in run("configs")
    run("configs", "jacobian_ensemble_fmnist")
    checked = run("check-cluster")
    assert all(f"cluster/{n}" in checked for n in ("aws-gpu.yaml", "gcp-gpu.yaml", "kuberay/rayjob.yaml"))
    cfg = yaml.safe_load(run("train", "jacobian_ensemble_fmnist.yaml", "--set", "train.epochs=1", "--dry-run"))
    assert cfg["train"]["epochs"] == 1 and cfg["ensemble"]["k"] == 3
    assert "to train" in run("reproduce", "robust-ensembles", "--dry-run")


def _readme_python_blocks() -> list[str]:
    text = (repo_root() / "README.md").read_text()
    return [block.split("\n```", 1)[0] for block in text.split("```python\n")[1:]]


@pytest.mark.slow
def test_the_readmes_python_examples_run(tmp_path):
    """Every Python example of the README, as written, in order, in one process started in an empty
    folder with the default MLflow store: the API example, then the plug-in example."""
    blocks = _readme_python_blocks()
    assert len(blocks) >= 2 and "raysweep.sweep(" in blocks[0] and "@register" in blocks[1]
    code = "\n\n".join(blocks)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                         env={**env, "RAY_ADDRESS": "local"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "weighted" in res.stdout and "K=" in res.stdout and (tmp_path / "mlflow.db").is_file()
    assert (tmp_path / "runs" / "api-eval" / "metrics.json").is_file()
