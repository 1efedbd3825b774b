"""Shared set-up for benchmarks: timings with torch.utils.benchmark (warm-up, CUDA sync, medians)."""
from __future__ import annotations

import copy
import os

import torch
from torch.utils.benchmark import Timer

from raysweep.config import validate_config
from raysweep.core.data import load_dataset, member_batches
from raysweep.core.seeding import generator
from raysweep.members import resolve_device
from raysweep.core.ensemble import uniform_weights
from raysweep.training.step import TrainStep
from raysweep.training.trainer import build_members, make_optimizer

DEVICE = resolve_device(os.environ.get("RAYSWEEP_BENCH_DEVICE", "auto"))


def median_ms(fn, min_run_time: float = 2.0) -> float:
    for _ in range(3):  # warm-up: allocator, oneDNN primitive caches
        fn()
    # Timer defaults to one thread; measure with the threads training actually uses.
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def lenet_setup(k: int, lambda_jr: float = 0.0, batch_size: int = 128):
    cfg = validate_config({"data": {"dataset": "synthetic", "train_size": batch_size * 4, "batch_size": batch_size},
                           "ensemble": {"k": k}, "train": {"jr": {"lambda_jr": lambda_jr}}})
    data = load_dataset(cfg.data, 0)
    x, y = next(member_batches(data.train, k, "independent", batch_size, 0, 0, DEVICE))
    return cfg, data, build_members(cfg, data, k), x, y



def joint_setup(k: int = 3):
    """lenet_setup for a joint ensemble: (raw config dict, data, members, x, y), every member on the same batch."""
    base, data, members, x, y = lenet_setup(k)
    raw = base.model_dump(mode="json")
    raw["ensemble"]["method"] = "joint"
    return raw, data, members, x[:1].expand_as(x), y[:1].expand_as(y)


def step_fn(executor_cls, cfg, members, x, y, channels_last: bool = False):
    """One TrainStep of cfg on copies of members; channels_last: looped members in NHWC, what
    executor.channels_last auto gives LeNet-5 on the CPU."""
    ex = executor_cls(copy.deepcopy(members), DEVICE, *([True] if channels_last else []))
    opt = make_optimizer(ex.parameters(), cfg)
    step = TrainStep(cfg, ex, uniform_weights(len(members)), generator(0, "bench"))
    return lambda: step(opt, x, y)


def header(title: str) -> None:
    print(f"\n== {title} (device {DEVICE}, torch {torch.__version__}, {torch.get_num_threads()} threads)")


def alternating_ms(fn, plain_fn, rounds: int = 3) -> tuple[float, float]:
    """(ms of fn, ms of plain_fn), each the middle of `rounds` medians taken alternately: this machine's
    timings drift by 20-30% within a minute, so two things are compared only side by side."""
    plains, times = [], []
    for _ in range(rounds):
        plains.append(median_ms(plain_fn, 1.0))
        times.append(median_ms(fn, 1.0))
    return sorted(times)[rounds // 2], sorted(plains)[rounds // 2]

