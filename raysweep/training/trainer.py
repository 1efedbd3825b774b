"""The trainer: one TrainStep (step.py) run on the schedule of an ensemble method (methods/).

The method decides each network's batches, the learning rate of each step, how many networks
train and how the ensemble is assembled from them; the step is the same for all. All networks
step together; with the member_ce loss the total is the sum of the members' losses, so each
member's gradient is its own.

Callbacks see every step and epoch as `cb("step", state)` and `cb("epoch", state)` with the
TrainState (MLflow logging of local runs plugs in there); Ray workers report through
training/ray.py instead.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from raysweep.attacks.adversarial import AdversarialTrainingConfig, ensemble_examples
from raysweep.config import RunConfig, dump_config, same_run
from raysweep.core.checkpoint import composite_members
from raysweep.core.data import Dataset, member_batches, steps_per_epoch
from raysweep.core.ensemble import Ensemble, uniform_weights
from raysweep.core.files import atomic_write
from raysweep.core.models import build_member
from raysweep.core.seeding import generator
from raysweep.members import make_local_executor
from raysweep.regularisers.jacobian import JacobianRegularisation
from raysweep.training.step import TrainStep


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float = float("nan")
    lr: float = float("nan")
    history: list[dict] = field(default_factory=list)  # one row per epoch


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


def training_layout(cfg: RunConfig) -> bool | str:
    """executor.channels_last for training: `auto` is left to make_local_executor (the members decide),
    except with forward-mode JR. Its tangents through NHWC convolutions cost more than NHWC saves on the
    CPU (benchmarks/bench_jr.py, LeNet-5: 3.2x a plain step in NHWC, 2.1x in NCHW), so it trains in NCHW.
    Evaluation decides on its own: its attack steps gain from NHWC whatever trained the members."""
    jr = cfg.train.jr
    if cfg.executor.channels_last == "auto" and JacobianRegularisation.enabled(jr) and jr.estimator == "forward_mode":
        return False
    return cfg.executor.channels_last


def configured_executor(cfg: RunConfig, members: list[torch.nn.Module]):
    """The local executor `cfg.executor` asks for, holding `members`."""
    e = cfg.executor
    return make_local_executor(members, e.vectorize, e.device, training_layout(cfg), e.compile)


def make_optimizer(params, cfg: RunConfig) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


class Trainer:
    """One training run: the executor's members, their optimiser, one TrainStep and the method's
    schedule. Resumable at epoch boundaries: `state_dict()` holds everything but the member
    weights (the executor's business), so a run restored from it repeats the uninterrupted run."""

    def __init__(self, cfg: RunConfig, data: Dataset, executor=None, progress: bool = True):
        self.cfg, self.data, self.progress = cfg, data, progress
        k = cfg.ensemble.k
        self.n_train = cfg.trained_members
        if executor is None:
            executor = configured_executor(cfg, build_members(cfg, data, self.n_train))
        self.ex = executor
        self.opt = make_optimizer(executor.parameters(), cfg)
        self.weights = torch.tensor(cfg.ensemble.weights) if cfg.ensemble.weights else None
        # The configured weights combine the K members; networks that are not the members (one network
        # whose snapshots are the members) train with uniform weights.
        own = self.weights is not None and self.n_train == k
        train_weights = self.weights if own else uniform_weights(self.n_train)
        self.step = TrainStep(cfg, executor, train_weights, generator(cfg.seed, "step", device=executor.device))
        # Logged loss per member for member_ce (a sum over members), else the ensemble's loss itself.
        self.loss_scale = self.n_train if cfg.train.loss == "member_ce" else 1
        total = steps_per_epoch(len(data.train), cfg.data.batch_size) * cfg.train.epochs
        self.method = cfg.method(k, total)
        self.state = TrainState(total_steps=total)
        self.seconds = 0.0

    @property
    def done(self) -> bool:
        return len(self.state.history) >= self.cfg.train.epochs

    def run_epoch(self, callbacks: tuple[Callable, ...] = ()) -> dict:
        """Train the next epoch; returns its history row."""
        tally, t0 = self.begin_epoch(), time.perf_counter()
        bar = tqdm(total=self.state.total_steps // self.cfg.train.epochs, desc=f"train {self.cfg.name} epoch "
                   f"{self.state.epoch + 1}/{self.cfg.train.epochs}", unit="step", disable=not self.progress,
                   leave=False, mininterval=1.0)
        for x, y in self.batches():
            self.begin_step()
            loss, logits = self.step(self.opt, x, y)
            self.end_step(tally, loss, logits, y, callbacks)
            bar.update(1)
            bar.set_postfix(loss=f"{self.state.loss:.3f}", lr=f"{self.state.lr:.3g}", refresh=False)
        bar.close()
        return self.end_epoch(tally, time.perf_counter() - t0, callbacks)

    # The pieces of an epoch, also driven by a pack of trainers stepping together (training/pack.py).
    def begin_epoch(self) -> dict:
        self.state.epoch = len(self.state.history)
        self.ex.train(True)
        return {"loss": 0.0, "correct": 0, "seen": 0}

    def batches(self):
        cfg = self.cfg
        return member_batches(self.data.train, self.n_train, self.method.batches, cfg.data.batch_size,
                              self.state.epoch, cfg.seed, self.ex.device)

    def begin_step(self) -> None:
        """Advance the schedule: this step's learning rate into the optimiser."""
        state, cfg = self.state, self.cfg
        state.step += 1
        state.lr = self.method.lr(state.step, cfg.train.lr, cfg.train.schedule)
        for group in self.opt.param_groups:
            group["lr"] = state.lr

    def end_step(self, tally: dict, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                 callbacks: tuple[Callable, ...]) -> None:
        state = self.state
        state.loss = loss.item() / self.loss_scale
        tally["loss"] += state.loss * y.shape[1]
        tally["correct"] += (logits.argmax(-1) == y).sum().item()
        tally["seen"] += y.shape[1]
        self.method.after_step(state.step, self.ex.export_members)
        for cb in callbacks:
            cb("step", state)

    def end_epoch(self, tally: dict, seconds: float, callbacks: tuple[Callable, ...]) -> dict:
        seen = tally["seen"]
        row = {"epoch": self.state.epoch, "loss": tally["loss"] / seen,
               "train_acc": tally["correct"] / (seen * self.n_train), "seconds": seconds}
        if self.cfg.train.probe is not None:
            row["probe_acc"] = self.probe(self.state.epoch)
        self.state.history.append(row)
        self.seconds += seconds
        for cb in callbacks:
            cb("epoch", self.state)
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
        trained = [m.cpu() for m in self.ex.export_members()]
        members = []
        for weights in self.method.ensemble_state([m.state_dict() for m in trained]):
            # In the standard layout whatever the executor used (executor.channels_last): the same values,
            # and then the same float results as these members loaded from their checkpoint.
            member = copy.deepcopy(trained[0]).to(memory_format=torch.contiguous_format)
            member.load_state_dict(weights)
            members.append(member.eval())
        return TrainResult(Ensemble(members, self.weights, self.cfg.ensemble.combine), self.state, self.seconds)

    def state_dict(self) -> dict:
        """Optimiser, random stream, regulariser state (PDD statistics), schedule position, the method's
        state (snapshots): tensors and plain containers only, so it loads with torch.load(weights_only=True)."""
        return {"optimizer": self.opt.state_dict(), "generator": self.step.gen.get_state(),
                "regularisers": self.step.state_dict(), "method": self.method.state_dict(),
                "train_state": dataclasses.asdict(self.state), "seconds": self.seconds}

    def load_state_dict(self, sd: dict) -> None:
        self.opt.load_state_dict(sd["optimizer"])
        self.step.gen.set_state(sd["generator"])
        self.step.load_state_dict(sd["regularisers"])
        self.method.load_state_dict(sd["method"])
        self.state = TrainState(**sd["train_state"])
        self.seconds = sd["seconds"]


EPOCH_STATE = "training_state.pt"


def saved_epochs(folder: Path, cfg: RunConfig) -> dict | None:
    """What `fit(resume_dir=folder)` saved after its last finished epoch, if it trained this config."""
    path = folder / EPOCH_STATE
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")  # saved on any device, loaded here
    except Exception as err:  # noqa: BLE001 - unreadable (truncated by a full disk, ...): start afresh
        print(f"raysweep: ignoring the unreadable training state {path} ({type(err).__name__}); training from "
              "the start", file=sys.stderr)
        return None
    return saved if same_run(saved.get("config", ""), cfg, training=True) else None  # an eval change keeps them


def _save_epochs(folder: Path, cfg: RunConfig, trainer: Trainer) -> None:
    members = [{n: t.detach().cpu() for n, t in m.state_dict().items()} for m in trainer.ex.export_members()]
    state = {"config": dump_config(cfg), "members": members, "trainer": trainer.state_dict()}
    atomic_write(folder / EPOCH_STATE, lambda tmp: torch.save(state, tmp))


def _resumed(cfg: RunConfig, data: Dataset, progress: bool, saved: dict) -> Trainer:
    members = build_members(cfg, data, cfg.trained_members)
    for member, weights in zip(members, saved["members"], strict=True):
        member.load_state_dict(weights)
    trainer = Trainer(cfg, data, configured_executor(cfg, members), progress)
    trainer.load_state_dict(saved["trainer"])
    return trainer


def fit(cfg: RunConfig, data: Dataset, progress: bool = True, callbacks: tuple[Callable, ...] = (),
        executor=None, resume_dir: str | Path | None = None) -> TrainResult:
    """Train the ensemble described by cfg on data.train, in this process. `executor` overrides
    the configured local one (tests compare looped and vmapped members this way); the Ray
    launcher (training/ray.py) runs the same Trainer inside each worker.

    `resume_dir`: a folder that outlives the process. The members and the trainer's state are saved
    there as each epoch ends, and a run started again with the same config continues after the last
    saved epoch, to the same numbers as a run never interrupted (a saved state of another config is
    ignored and overwritten)."""
    trainer = None
    if resume_dir is not None:
        resume_dir = Path(resume_dir)
        if executor is not None:
            raise ValueError("fit: resume_dir builds its own executor; pass one or the other")
        if (saved := saved_epochs(resume_dir, cfg)) is not None:
            try:
                trainer = _resumed(cfg, data, progress, saved)
            except (KeyError, ValueError, RuntimeError) as err:  # written by another version of raysweep
                print(f"raysweep: the training state in {resume_dir} does not load ({type(err).__name__}: "
                      f"{str(err)[:200]}); training from the start", file=sys.stderr)
            else:
                if progress:
                    print(f"resuming after epoch {len(trainer.state.history)} of {cfg.train.epochs} from "
                          f"{resume_dir}", file=sys.stderr)
        save = lambda event, state: event == "epoch" and _save_epochs(resume_dir, cfg, trainer)  # noqa: E731
        callbacks = (*callbacks, save)
    trainer = trainer or Trainer(cfg, data, executor, progress)
    return trainer.run(callbacks)
