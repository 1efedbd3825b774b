import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import FMNIST_DIR, needs_fmnist

from raysweep.core.data import DataConfig, load_dataset, member_batches, member_orders
from raysweep.errors import DataError


def test_synthetic_is_seeded_and_in_unit_range():
    cfg = DataConfig(dataset="synthetic", train_size=100, test_size=50)
    a, b, c = load_dataset(cfg, 0), load_dataset(cfg, 0), load_dataset(cfg, 1)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.x, c.train.x)
    assert a.train.x.shape == (100, 1, 28, 28) and len(a.test) == 50
    assert 0 <= a.train.x.min() and a.train.x.max() <= 1


def test_member_orders_by_mode():
    shared = member_orders(50, 3, "shared", epoch=0, seed=0)
    assert all(torch.equal(shared[0], row) for row in shared)
    indep = member_orders(50, 3, "independent", epoch=0, seed=0)
    assert not torch.equal(indep[0], indep[1])
    assert all(torch.equal(row.sort().values, torch.arange(50)) for row in indep)  # permutations
    boot0, boot1 = member_orders(1000, 2, "bootstrap", 0, 0), member_orders(1000, 2, "bootstrap", 1, 0)
    for m in range(2):
        uniq = boot0[m].unique().numel()
        assert 550 < uniq < 720, uniq  # about 1 - 1/e of 1000 distinct: draws with repeats
        assert torch.equal(boot0[m].sort().values, boot1[m].sort().values)  # one bootstrap sample per member
        assert not torch.equal(boot0[m], boot1[m])  # reshuffled each epoch
    assert not torch.equal(boot0[0].sort().values, boot0[1].sort().values)
    assert torch.equal(member_orders(50, 3, "independent", 2, 7), member_orders(50, 3, "independent", 2, 7))


def test_member_batches_shapes():
    data = load_dataset(DataConfig(dataset="synthetic", train_size=100, test_size=10), 0)
    batches = list(member_batches(data.train, 3, "bootstrap", 32, 0, 0))
    assert [x.shape[:2] for x, _ in batches] == [(3, 32)] * 3 + [(3, 4)]
    assert batches[0][1].shape == (3, 32)


@needs_fmnist
def test_fashion_mnist_from_debian_package():
    data = load_dataset(DataConfig(dataset="fashion_mnist", train_size=1000, test_size=300, download=False), 0)
    assert data.train.x.shape == (1000, 1, 28, 28) and data.train.x.dtype == torch.uint8
    assert len(data.test) == 300 and data.num_classes == 10
    again = load_dataset(DataConfig(dataset="fashion_mnist", train_size=1000, test_size=300, download=False), 0)
    assert torch.equal(data.train.y, again.train.y)
    x, _ = data.train.batch(torch.arange(10))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


@needs_fmnist
def test_explicit_dir_and_env_var_come_first(tmp_path, monkeypatch):
    flat = tmp_path / "flat"
    shutil.copytree(FMNIST_DIR, flat)
    data = load_dataset(DataConfig(dataset="fashion_mnist", data_dir=str(flat), test_size=10, download=False))
    assert len(data.train) == 60000
    monkeypatch.setenv("RAYSWEEP_DATA_DIR", str(tmp_path))  # finds $RAYSWEEP_DATA_DIR/fashion-mnist
    shutil.copytree(FMNIST_DIR, tmp_path / "fashion-mnist")
    assert len(load_dataset(DataConfig(dataset="fashion_mnist", test_size=10, download=False)).test) == 10


def test_missing_dataset_names_every_option(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSWEEP_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(dataset="cifar10", data_dir=str(tmp_path / "given"), download=False))
    msg = str(err.value)
    for option in ("data.data_dir", "$RAYSWEEP_DATA_DIR", "Debian package /usr/share/datasets/cifar10",
                   "download: disabled"):
        assert option in msg, msg


@needs_fmnist
def test_concurrent_first_staging_of_the_idx_files(tmp_path):
    """Two processes staging Fashion-MNIST into a fresh cache at once (two trials starting together)
    both succeed: each writes its own temporary file before the atomic move."""
    code = ("import sys; from pathlib import Path; from raysweep.core.data import _stage_idx; "
            "assert _stage_idx(Path(sys.argv[1]), 'FashionMNIST') is not None")
    env = {**os.environ, "RAYSWEEP_CACHE_DIR": str(tmp_path / "cache")}
    for _ in range(3):  # fresh cache each round: the race is at the first copy
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
        procs = [subprocess.Popen([sys.executable, "-c", code, str(FMNIST_DIR)], env=env, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-2000:]
