import os
import shutil
from pathlib import Path

import pytest
import torch

from raysweep.config import validate_config
from raysweep.core.data import DEBIAN_ROOT, load_dataset

# Under pytest-xdist the workers share the cores: one thread each (and in the processes they start),
# since OpenMP threads that outnumber the cores spin on each other's barriers and burn CPU for nothing.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
# Ray Train starts a spot-preemption watcher actor (one more process) with every run; no test
# preempts nodes, and on 2 cores each process start is ~1 s. Inherited by the CLI subprocesses.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

FMNIST_DIR = DEBIAN_ROOT / "fashion-mnist"
needs_fmnist = pytest.mark.skipif(not FMNIST_DIR.is_dir(),
                                  reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")


def make_cfg(**sections):
    """A small synthetic run config; keyword sections are merged into the defaults."""
    raw = {
        "seed": 0,
        "data": {"dataset": "synthetic", "train_size": 256, "test_size": 128, "batch_size": 64,
                 "synthetic": {"num_classes": 4, "image_shape": [1, 28, 28], "noise": 0.3}},
        "ensemble": {"k": 2, "method": "independent"},
        "train": {"epochs": 1, "optimizer": "adam", "lr": 1e-3},
        "eval": {"uap": None, "jacobian_samples": 0},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return validate_config(raw)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Staged IDX copies go to a per-session cache, never the user's home.
    monkeypatch.setenv("RAYSWEEP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    # `raysweep train` records to MLflow: into a per-session store, never the working directory's.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.getbasetemp() / 'mlflow.db'}")
    monkeypatch.delenv("RAYSWEEP_DATA_DIR", raising=False)


@pytest.fixture(scope="session")
def trained_synthetic():
    """A K=3 ensemble trained on easy synthetic data, shared by attack and metric tests."""
    from raysweep.training.trainer import fit

    cfg = make_cfg(ensemble={"k": 3, "method": "independent"}, train={"epochs": 4, "optimizer": "adam", "lr": 2e-3},
                   data={"train_size": 768, "test_size": 200})
    data = load_dataset(cfg.data, cfg.seed)
    return cfg, data, fit(cfg, data, progress=False).ensemble


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """mlflow_store(folder) -> the URI of a real, empty MLflow store, folder/mlflow.db: a copy of one that
    MLflow created and migrated once per session (a fresh SQLite store runs ~5 s of schema migrations).
    The tests of a store's first use (test_tracking_store.py) create theirs from nothing."""
    template = []

    def make(folder) -> str:
        if not template:
            from mlflow import MlflowClient

            db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
            MlflowClient(f"sqlite:///{db}").search_experiments()
            template.append(db)
        db = Path(folder) / "mlflow.db"
        shutil.copyfile(template[0], db)
        return f"sqlite:///{db}"

    return make


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance (2 CPUs) for every test that needs Ray, its workers set up as
    raysweep's own (WORKER_ENV); fractional CPUs per worker let K=3 or 4 workers share it. With the
    dashboard: Ray Train's placement-group cleaner asks the State API, which the dashboard serves, whether
    a run's controller is gone, so without it a stopped trial's CPUs are never freed. Shut down as soon as
    no test left needs it (pytest_runtest_teardown below), not at the session's end: the files that follow
    start their own instances, and an idle one beside them costs ~7 CPU-seconds a minute (2 cores)."""
    import ray

    from raysweep.training.ray import WORKER_ENV

    ray.init(address="local", num_cpus=2, logging_level="warning", configure_logging=False, runtime_env=WORKER_ENV)
    yield ray
    ray.shutdown()


def pytest_runtest_teardown(item, nextitem):
    # Not under xdist: its workers run files in no fixed order, so "later in the collection" is not "later".
    if nextitem is None or "ray_local" not in item.fixturenames or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    remaining = item.session.items[item.session.items.index(item) + 1:]
    if not any("ray_local" in later.fixturenames for later in remaining):
        import ray

        ray.shutdown()
