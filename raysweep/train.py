"""The local trainer: the data regime of each ensemble method around one TrainStep (step.py).

independent (own shuffles, soft voting), bagging (own bootstrap samples), joint (all members see
the same mini-batch: Ensemble-Adv, PDD, DEG, ADP) and snapshot (one network, cyclic cosine
learning rate, one snapshot per cycle). All members step together; with the member_ce loss the
total is the sum of the members' losses, so each member's gradient is its own.

Callbacks (MadryLab-style hooks) see every step and epoch: `on_step(state)` and
`on_epoch_end(state)` with a TrainState; later layers (MLflow, Ray reporting) plug in there.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from .composite import composite_members
from .config import RunConfig
from .data import Dataset, member_batches, steps_per_epoch
from .ensemble import Ensemble, uniform_weights
from .errors import ConfigError
from .executors import make_local_executor
from .models import build_member
from .seeding import generator
from .step import TrainStep

BATCH_MODE = {"independent": "independent", "bagging": "bootstrap", "snapshot": "shared", "joint": "shared"}


def snapshot_lr(t: int, total: int, k: int, lr0: float) -> float:
    """SPEC section 1: lr(t) = lr0/2 * (cos(pi * ((t-1) mod ceil(T/K)) / ceil(T/K)) + 1), t = 1..T."""
    cycle = math.ceil(total / k)
    return lr0 / 2 * (math.cos(math.pi * ((t - 1) % cycle) / cycle) + 1)


def snapshot_steps(total: int, k: int) -> list[int]:
    """The iterations after which a snapshot is kept: the end of each of the K cycles."""
    cycle = math.ceil(total / k)
    ends = sorted({min(c * cycle, total) for c in range(1, k + 1)})
    if len(ends) < k:
        raise ConfigError(f"ensemble.k = {k} snapshots need at least {k} training steps with distinct cycle ends, "
                          f"got {total} steps: raise train.epochs or data.train_size, or lower data.batch_size")
    return ends


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float = float("nan")
    lr: float = float("nan")
    history: list[dict] = field(default_factory=list)  # one row per epoch
    lrs: list[float] = field(default_factory=list)  # one per step


@dataclass
class TrainResult:
    ensemble: Ensemble
    state: TrainState
    seconds: float


def build_members(cfg: RunConfig, data: Dataset, k: int) -> list[torch.nn.Module]:
    torch.manual_seed(cfg.seed)  # member inits come from one seeded stream: member k is reproducible
    if cfg.model.arch == "composite":
        c = cfg.model.composite
        return composite_members(c.robust, c.natural, k, data.image_shape, data.num_classes)
    return [build_member(cfg.model.arch, data.image_shape, data.num_classes, data.mean, data.std, cfg.model.width)
            for _ in range(k)]


def make_optimizer(params, cfg: RunConfig) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


def lr_at(cfg: RunConfig, t: int, total: int) -> float:
    """Learning rate of iteration t (1-based)."""
    lr0 = cfg.train.lr
    if cfg.ensemble.method == "snapshot":
        return snapshot_lr(t, total, cfg.ensemble.k, lr0)
    if cfg.train.schedule == "cosine":
        return lr0 / 2 * (math.cos(math.pi * (t - 1) / total) + 1)
    return lr0


def fit(cfg: RunConfig, data: Dataset, progress: bool = True, callbacks: tuple[Callable, ...] = (),
        executor=None) -> TrainResult:
    """Train the ensemble described by cfg on data.train. `executor` overrides the configured one
    (tests compare looped and vmapped members this way)."""
    method, k = cfg.ensemble.method, cfg.ensemble.k
    n_train = 1 if method == "snapshot" else k
    if executor is None:
        executor = make_local_executor(build_members(cfg, data, n_train), cfg.executor.vectorize, cfg.executor.device)
    opt = make_optimizer(executor.parameters(), cfg)
    weights = torch.tensor(cfg.ensemble.weights) if cfg.ensemble.weights else None
    train_weights = weights if weights is not None and method != "snapshot" else uniform_weights(n_train)
    step = TrainStep(cfg, executor, train_weights, generator(cfg.seed, "step", device=executor.device))
    # Logged loss per member for member_ce (a sum over members), else the ensemble's loss itself.
    per_member = n_train if cfg.train.loss == "member_ce" else 1
    spe = steps_per_epoch(len(data.train), cfg.data.batch_size)
    total = spe * cfg.train.epochs
    keep_at = snapshot_steps(total, k) if method == "snapshot" else []
    snapshots: list[torch.nn.Module] = []
    state = TrainState(total_steps=total)
    start = time.perf_counter()
    executor.train(True)
    bar = tqdm(total=total, desc=f"train {cfg.name}", unit="step", disable=not progress, leave=False,
               mininterval=1.0)
    for epoch in range(cfg.train.epochs):
        state.epoch = epoch
        run_loss, run_correct, seen = 0.0, 0, 0
        for x, y in member_batches(data.train, n_train, BATCH_MODE[method], cfg.data.batch_size, epoch, cfg.seed,
                                   executor.device):
            state.step += 1
            state.lr = lr_at(cfg, state.step, total)
            for group in opt.param_groups:
                group["lr"] = state.lr
            loss, logits = step(opt, x, y)
            state.loss = loss.item() / per_member
            state.lrs.append(state.lr)
            run_loss += state.loss * y.shape[1]
            run_correct += (logits.argmax(-1) == y).sum().item()
            seen += y.shape[1]
            if state.step in keep_at:
                snapshots.append(copy.deepcopy(executor.export_members()[0]))
            for cb in callbacks:
                cb("step", state)
            bar.update(1)
            bar.set_postfix(loss=f"{state.loss:.3f}", lr=f"{state.lr:.3g}", refresh=False)  # mininterval decides
        state.history.append({"epoch": epoch, "loss": run_loss / seen, "train_acc": run_correct / (seen * n_train)})
        for cb in callbacks:
            cb("epoch", state)
    bar.close()
    members = snapshots if method == "snapshot" else executor.export_members()
    members = [m.cpu().eval() for m in members]
    return TrainResult(Ensemble(members, weights, cfg.ensemble.combine), state, time.perf_counter() - start)
