"""Datasets as in-memory tensors, and seeded per-member batch orders.

Images are kept as uint8 (real data) and turned into float pixels in [0,1] per batch; on 2 CPU
cores indexing one tensor is far cheaper than a DataLoader with workers.

Where a dataset comes from, in order: `data.data_dir`, $RAYSWEEP_DATA_DIR, Debian's
/usr/share/datasets/<name> (package dataset-fashion-mnist), then torchvision's download into
the cache ($RAYSWEEP_CACHE_DIR, default ~/.cache/raysweep) when `data.download` is true.
"""
from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np
import torch
from pydantic import Field

from raysweep.core.files import atomic_write
from raysweep.core.sections import Section
from raysweep.core.seeding import generator
from raysweep.errors import DataError

ENV_DATA_DIR = "RAYSWEEP_DATA_DIR"
ENV_CACHE_DIR = "RAYSWEEP_CACHE_DIR"
DEBIAN_ROOT = Path("/usr/share/datasets")

# name: (torchvision class name, Debian folder, stored as raw IDX files, mean, std)
_SPECS = {
    "fashion_mnist": ("FashionMNIST", "fashion-mnist", True, (0.2860,), (0.3530,)),
    "mnist": ("MNIST", "mnist", True, (0.1307,), (0.3081,)),
    "cifar10": ("CIFAR10", "cifar10", False, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", "cifar100", False, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

DATASETS = (*_SPECS, "synthetic")


class SyntheticConfig(Section):
    num_classes: int = Field(10, ge=2)
    image_shape: tuple[int, int, int] = (1, 28, 28)
    noise: float = Field(0.15, ge=0)


class DataConfig(Section):
    dataset: Literal[DATASETS] = "fashion_mnist"
    data_dir: Optional[str] = None
    download: bool = True
    train_size: Optional[int] = Field(None, ge=1, description="first N after a seeded shuffle; null = all")
    test_size: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(128, ge=1)
    synthetic: SyntheticConfig = SyntheticConfig()


@dataclass
class Split:
    x: torch.Tensor  # uint8 or float, [N, C, H, W]
    y: torch.Tensor  # int64, [N]

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: torch.Tensor, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[idx]
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        return x.to(device, non_blocking=True), self.y[idx].to(device, non_blocking=True)

    def head(self, n: int | None) -> "Split":
        """The first n samples (all when n is None)."""
        return self if n is None or n >= len(self) else Split(self.x[:n], self.y[:n])

    def subset(self, n: int | None, seed: int) -> "Split":
        if n is None or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=generator(seed, "subset"))[:n]
        return Split(self.x[idx], self.y[idx])


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])


def synthetic(cfg: DataConfig, seed: int) -> Dataset:
    """Class prototypes plus Gaussian noise: learnable in a few steps, for fast tests."""
    s = cfg.synthetic
    g = generator(seed, "synthetic")
    protos = torch.rand((s.num_classes, *s.image_shape), generator=g)

    def draw(n):
        y = torch.randint(0, s.num_classes, (n,), generator=g)
        x = (protos[y] + s.noise * torch.randn((n, *s.image_shape), generator=g)).clamp_(0, 1)
        return Split(x, y)

    train, test = draw(cfg.train_size or 2000), draw(cfg.test_size or 500)
    c = s.image_shape[0]
    return Dataset("synthetic", train, test, s.num_classes, (0.5,) * c, (0.3,) * c)


def _cache_root() -> Path:
    return Path(os.environ.get(ENV_CACHE_DIR, Path.home() / ".cache" / "raysweep")) / "datasets"


def _stage_idx(folder: Path, tv_name: str) -> Path | None:
    """Copy flat (optionally gzipped) IDX files into the layout torchvision's MNIST classes read."""
    sources = {}
    for name in _IDX_FILES:
        for cand in (folder / name, folder / f"{name}.gz"):
            if cand.is_file():
                sources[name] = cand
                break
    if len(sources) < len(_IDX_FILES):
        return None
    root = _cache_root() / "staged" / tv_name
    raw = root / tv_name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        dst = raw / name
        if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
            continue
        atomic_write(dst, lambda tmp, src=src: _unpack(src, tmp))  # concurrent trials may stage at once
    return root


def _unpack(src: Path, dst: Path) -> None:
    with (gzip.open(src) if src.suffix == ".gz" else open(src, "rb")) as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)


def _torchvision(tv_name: str, root: Path, download: bool):
    import torchvision.datasets as tvd  # imported late: torchvision is slow to import

    cls = getattr(tvd, tv_name)
    return cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)


def _to_split(ds) -> Split:
    x = torch.as_tensor(np.asarray(ds.data))
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # MNIST [N,H,W]; CIFAR [N,H,W,C]
    return Split(x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long))


def _try_folder(folder: Path, tv_name: str, has_idx: bool):
    """torchvision's own layout under folder, or (MNIST family) flat IDX files in it."""
    if not folder.is_dir():
        return None, "not a directory"
    try:
        return _torchvision(tv_name, folder, download=False), None
    except (RuntimeError, FileNotFoundError) as err:
        reason = str(err).splitlines()[0]
    if has_idx:
        staged = _stage_idx(folder, tv_name)
        if staged is not None:
            return _torchvision(tv_name, staged, download=False), None
        reason += f"; no IDX files {', '.join(_IDX_FILES)} (.gz allowed)"
    return None, reason


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    if cfg.dataset == "synthetic":
        return synthetic(cfg, seed)
    tv_name, debian_name, has_idx, mean, std = _SPECS[cfg.dataset]
    tried: list[str] = []
    candidates = []
    if cfg.data_dir:
        candidates.append(("data.data_dir", Path(cfg.data_dir).expanduser()))
    if os.environ.get(ENV_DATA_DIR):
        env = Path(os.environ[ENV_DATA_DIR]).expanduser()
        candidates += [(f"${ENV_DATA_DIR}", env), (f"${ENV_DATA_DIR}/{debian_name}", env / debian_name)]
    else:
        tried.append(f"${ENV_DATA_DIR}: not set")
    candidates.append(("Debian package", DEBIAN_ROOT / debian_name))

    found = None
    for label, folder in candidates:
        found, reason = _try_folder(folder, tv_name, has_idx)
        if found:
            break
        tried.append(f"{label} {folder}: {reason}")
    if found is None:
        if cfg.download:
            root = _cache_root() / "download"
            try:
                found = _torchvision(tv_name, root, download=True)
            except Exception as err:  # any network failure: report it with the other options
                tried.append(f"download into {root}: failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
        else:
            tried.append("download: disabled (data.download: false)")
    if found is None:
        hint = (f"Set data.data_dir, or ${ENV_DATA_DIR}, to a folder holding it"
                + (", install Debian's dataset-fashion-mnist" if cfg.dataset == "fashion_mnist" else "")
                + ", or enable data.download on a machine that is online.")
        raise DataError(f"dataset '{cfg.dataset}' not found. Tried:\n  - " + "\n  - ".join(tried) + "\n" + hint)

    train, test = (_to_split(ds) for ds in found)
    num_classes = int(train.y.max()) + 1
    return Dataset(cfg.dataset, train.subset(cfg.train_size, seed), test.subset(cfg.test_size, seed),
                   num_classes, mean, std)


def member_orders(n: int, k: int, mode: str, epoch: int, seed: int) -> torch.Tensor:
    """Index order [K, N] of one epoch for each member.

    shared: one shuffle for all members (simultaneous training: all see the same batch);
    independent: each member its own shuffle; bootstrap: each member a fixed bootstrap sample
    (N draws with replacement, drawn once per member), shuffled every epoch.
    """
    if mode == "shared":
        return torch.randperm(n, generator=generator(seed, "order", epoch)).expand(k, n)
    orders = []
    for m in range(k):
        perm = torch.randperm(n, generator=generator(seed, "order", m, epoch))
        if mode == "bootstrap":
            sample = torch.randint(0, n, (n,), generator=generator(seed, "bootstrap", m))
            perm = sample[perm]
        elif mode != "independent":
            raise ValueError(f"unknown batch mode {mode!r}")
        orders.append(perm)
    return torch.stack(orders)


def member_batches(split: Split, k: int, mode: str, batch_size: int, epoch: int, seed: int,
                   device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields x [K,B,C,H,W] and y [K,B]: member k's b-th batch of this epoch."""
    orders = member_orders(len(split), k, mode, epoch, seed)
    for start in range(0, orders.shape[1], batch_size):
        idx = orders[:, start:start + batch_size]
        x, y = split.batch(idx.reshape(-1), device)
        yield x.view(*idx.shape, *x.shape[1:]), y.view(idx.shape)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def eval_batches(split: Split, batch_size: int, device: torch.device | str = "cpu"):
    for start in range(0, len(split), batch_size):
        yield split.batch(torch.arange(start, min(start + batch_size, len(split))), device)
