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
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from raysweep.core.composite import composite_members
from raysweep.attacks.adversarial import ensemble_examples
from raysweep.config.schema import AdversarialTrainingConfig, RunConfig
from raysweep.core.data import Dataset, member_batches, steps_per_epoch
from raysweep.core.ensemble import Ensemble, uniform_weights
from raysweep.errors import ConfigError
from raysweep.members import make_local_executor
from raysweep.core.models import build_member
from raysweep.core.seeding import generator
from raysweep.training.step import TrainStep

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
    info: dict = field(default_factory=dict)  # executor details (Ray: workers, backend, checkpoint, bytes/step)


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


class Trainer:
    """One training run: the executor's members, their optimiser, one TrainStep and the method's
    schedule. Resumable at epoch boundaries: `state_dict()` holds everything but the member
    weights (the executor's business), so a run restored from it repeats the uninterrupted run."""

    def __init__(self, cfg: RunConfig, data: Dataset, executor=None, progress: bool = True):
        self.cfg, self.data, self.progress = cfg, data, progress
        method, k = cfg.ensemble.method, cfg.ensemble.k
        self.n_train = cfg.trained_members
        if executor is None:
            executor = make_local_executor(build_members(cfg, data, self.n_train), cfg.executor.vectorize,
                                           cfg.executor.device)
        self.ex = executor
        self.opt = make_optimizer(executor.parameters(), cfg)
        self.weights = torch.tensor(cfg.ensemble.weights) if cfg.ensemble.weights else None
        train_weights = self.weights if self.weights is not None and method != "snapshot" \
            else uniform_weights(self.n_train)
        self.step = TrainStep(cfg, executor, train_weights, generator(cfg.seed, "step", device=executor.device))
        # Logged loss per member for member_ce (a sum over members), else the ensemble's loss itself.
        self.loss_scale = self.n_train if cfg.train.loss == "member_ce" else 1
        total = steps_per_epoch(len(data.train), cfg.data.batch_size) * cfg.train.epochs
        self.keep_at = snapshot_steps(total, k) if method == "snapshot" else []
        self.snapshots: list[torch.nn.Module] = []
        self.state = TrainState(total_steps=total)
        self.seconds = 0.0

    @property
    def done(self) -> bool:
        return len(self.state.history) >= self.cfg.train.epochs

    def run_epoch(self, callbacks: tuple[Callable, ...] = ()) -> dict:
        """Train the next epoch; returns its history row."""
        cfg, state, step = self.cfg, self.state, self.step
        state.epoch = epoch = len(state.history)
        t0 = time.perf_counter()
        self.ex.train(True)
        run_loss, run_correct, seen = 0.0, 0, 0
        bar = tqdm(total=self.state.total_steps // cfg.train.epochs, desc=f"train {cfg.name} epoch {epoch + 1}/"
                   f"{cfg.train.epochs}", unit="step", disable=not self.progress, leave=False, mininterval=1.0)
        for x, y in member_batches(self.data.train, self.n_train, BATCH_MODE[cfg.ensemble.method],
                                   cfg.data.batch_size, epoch, cfg.seed, self.ex.device):
            state.step += 1
            state.lr = lr_at(cfg, state.step, state.total_steps)
            for group in self.opt.param_groups:
                group["lr"] = state.lr
            loss, logits = step(self.opt, x, y)
            state.loss = loss.item() / self.loss_scale
            state.lrs.append(state.lr)
            run_loss += state.loss * y.shape[1]
            run_correct += (logits.argmax(-1) == y).sum().item()
            seen += y.shape[1]
            if state.step in self.keep_at:
                self.snapshots.append(copy.deepcopy(self.ex.export_members()[0]))
            for cb in callbacks:
                cb("step", state)
            bar.update(1)
            bar.set_postfix(loss=f"{state.loss:.3f}", lr=f"{state.lr:.3g}", refresh=False)  # mininterval decides
        bar.close()
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "loss": run_loss / seen, "train_acc": run_correct / (seen * self.n_train),
               "seconds": seconds}
        if cfg.train.probe is not None:
            row["probe_acc"] = self.probe(epoch)
        state.history.append(row)
        self.seconds += seconds
        for cb in callbacks:
            cb("epoch", state)
        return row

    def probe(self, epoch: int) -> float:
        """train.probe: PGD accuracy of the ensemble (the members trained so far) on the first test
        images. Over stacked outputs like the training step, so every executor gives the same number;
        its own generator per epoch, so the training stream and a resumed run are unchanged."""
        p = self.cfg.train.probe
        x, y = self.data.test.head(p.samples).batch(torch.arange(min(p.samples, len(self.data.test))), self.ex.device)
        attack = AdversarialTrainingConfig(mode="ensemble", eps=p.eps, steps=p.steps, start="uniform")
        weights = self.step.weights
        self.ex.train(False)
        try:
            x_adv = ensemble_examples(self.ex.stacked_logits, x, y, weights, attack,
                                      generator(self.cfg.seed, "probe", epoch, device=self.ex.device))
            with torch.no_grad():
                probs = (weights.view(-1, 1, 1) * self.ex.stacked_logits(x_adv).softmax(-1)).sum(0)
        finally:
            self.ex.train(True)
        return (probs.argmax(1) == y).float().mean().item()

    def run(self, callbacks: tuple[Callable, ...] = ()) -> TrainResult:
        while not self.done:
            self.run_epoch(callbacks)
        return self.result()

    def result(self) -> TrainResult:
        members = self.snapshots if self.cfg.ensemble.method == "snapshot" else self.ex.export_members()
        members = [m.cpu().eval() for m in members]
        return TrainResult(Ensemble(members, self.weights, self.cfg.ensemble.combine), self.state, self.seconds)

    def state_dict(self) -> dict:
        """Optimiser, random stream, PDD statistics, schedule position, snapshots: tensors and plain
        containers only, so it loads with torch.load(weights_only=True)."""
        return {"optimizer": self.opt.state_dict(), "generator": self.step.gen.get_state(),
                "pdd": self.step.pdd.state_dict() if self.step.pdd else None,
                "train_state": dataclasses.asdict(self.state), "seconds": self.seconds,
                "snapshots": [{n: t.detach().cpu() for n, t in m.state_dict().items()} for m in self.snapshots]}

    def load_state_dict(self, sd: dict) -> None:
        self.opt.load_state_dict(sd["optimizer"])
        self.step.gen.set_state(sd["generator"])
        if self.step.pdd:
            self.step.pdd.load_state_dict(sd["pdd"], self.ex.device)
        self.state = TrainState(**sd["train_state"])
        self.seconds = sd["seconds"]
        self.snapshots = []
        for weights in sd["snapshots"]:
            member = copy.deepcopy(self.ex.export_members()[0])
            member.load_state_dict(weights)
            self.snapshots.append(member)


def fit(cfg: RunConfig, data: Dataset, progress: bool = True, callbacks: tuple[Callable, ...] = (),
        executor=None) -> TrainResult:
    """Train the ensemble described by cfg on data.train, in this process. `executor` overrides
    the configured local one (tests compare looped and vmapped members this way); the Ray
    executor (executors/ray_train.py) runs the same Trainer inside each worker."""
    return Trainer(cfg, data, executor, progress).run(callbacks)
