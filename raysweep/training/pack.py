"""Trial packing: N runs trained together, as one training step over N x K members.

A sweep's small trials cannot fill a GPU one at a time. Runs that differ only in their learning rate,
lambda_JR and per-member adversarial eps (what pack_key leaves out), and share everything else
(architecture, K, method, batch size, data, seed, ...), step together: one forward of all N x K members
(one vmapped call on the pack executor, members/pack.py), one backward of the sum of the N trials'
losses, then each trial's own optimiser step. A trial's loss depends on its own parameters only, so
each trial gets exactly its own gradient. Every trial keeps its own Trainer (optimiser, schedule,
history, probe, result), so a packed trial ends as it ends alone, to float rounding
(tests/test_pack.py: 1e-5).

Why these fields: the learning rate belongs to each trial's optimiser; lambda_JR multiplies a
per-member term; member-mode adversarial training (Madry, robust ensembles) already takes one eps per
member, so the pack's eps is the trials' lists end to end. Trials of one seed draw the same data order,
JR directions and attack starts alone; the pack draws them once for all N (core/seeding.Repeated).
Ensemble-level losses and terms (ensemble_ce, ADP, DEG, PDD) and Ensemble-Adv's ensemble-mode examples
are not packed: their hyper-parameters act inside the term, not per member.
"""
from __future__ import annotations

import json
import time
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from raysweep.attacks.adversarial import eps_list
from raysweep.config import RunConfig
from raysweep.core.data import Dataset
from raysweep.core.seeding import Repeated
from raysweep.members.pack import PackedMembers
from raysweep.regularisers import active
from raysweep.training.step import TrainStep
from raysweep.training.trainer import Trainer, TrainResult


def pack_key(cfg: RunConfig) -> str | None:
    """Configs with equal keys train together as one pack, each exactly as alone. None when cfg cannot
    join a pack: a Ray executor run, the ensemble_ce loss, Ensemble-Adv (ensemble-mode) examples, or a
    regulariser other than JR."""
    t = cfg.train
    if (cfg.executor.kind != "local" or t.loss != "member_ce" or (t.adversarial and t.adversarial.mode != "member")
            or any(r.key != "jr" for r in active(t, cfg.ensemble.k))):
        return None
    raw = cfg.model_dump(mode="json")
    for section in ("name", "eval"):  # training never reads them
        raw.pop(section, None)
    raw["train"]["lr"] = None
    if raw["train"].get("adversarial") is not None:
        raw["train"]["adversarial"]["eps"] = None
    if raw["train"].get("jr") is not None:
        raw["train"]["jr"]["lambda_jr"] = t.jr.lambda_jr > 0  # JR on in all of a pack's trials, or in none
    return json.dumps(raw, sort_keys=True)


def packs(cfgs: Sequence[RunConfig | None]) -> list[list[int]]:
    """The indices of cfgs grouped into packs, in order of first appearance; a config that cannot be
    packed (or None: no valid config) is a pack of one."""
    groups: dict = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault((cfg is not None and pack_key(cfg)) or f"alone-{i}", []).append(i)
    return list(groups.values())


class PackStep:
    """The training step of a pack: one TrainStep over all N x K members (its random draws repeated for
    the N trials), summed per trial, lambda_JR applied per trial."""

    def __init__(self, trainers: list[Trainer], executor: PackedMembers):
        first = trainers[0]
        self.trainers, self.k = trainers, first.n_train
        cfg, adv = first.cfg, first.cfg.train.adversarial
        if adv is not None:  # member k of trial n attacked at trial n's eps_k: the trials' lists end to end
            eps = [e for t in trainers for e in eps_list(t.cfg.train.adversarial, self.k)]
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
                "adversarial": adv.model_copy(update={"eps": eps})})})
        self.step = TrainStep(cfg, executor, first.step.weights, Repeated(first.step.gen, len(trainers)))
        # JR's term is built with the first trial's lambda: trial n's is that term times lambda_n / lambda_0.
        lam = [t.cfg.train.jr.lambda_jr if t.cfg.train.jr is not None else 0.0 for t in trainers]
        self.scale = {"jr": [x / lam[0] if lam[0] > 0 else 1.0 for x in lam]}

    def per_trial(self, base: torch.Tensor, terms: list) -> torch.Tensor:
        """[N]: each trial's loss of one pass (TrainStep.total of its own members' slots)."""
        losses = []
        for i in range(len(self.trainers)):
            part = slice(i * self.k, (i + 1) * self.k)
            loss = base[part].sum()
            for key, term in terms:
                loss = loss + term[part].sum() * self.scale[key][i]
            losses.append(loss)
        return torch.stack(losses)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One step of every trial on their shared batch x [K,B,...]: (each trial's loss [N], its logits)."""
        n = len(self.trainers)
        xs, ys = x.repeat(n, *[1] * (x.dim() - 1)), y.repeat(n, 1)
        with torch.autocast(self.step.ex.device.type, dtype=torch.bfloat16, enabled=self.step.bf16):
            losses, logits = self.step.loss(xs, ys, self.per_trial)
        for t in self.trainers:
            t.opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        for t in self.trainers:
            t.opt.step()
        return losses.detach(), list(logits.detach().split(self.k))


def fit_pack(cfgs: Sequence[RunConfig], data: Dataset, progress: bool = True,
             callbacks: Sequence[tuple[Callable, ...]] | None = None) -> list[TrainResult]:
    """Train the configs of one pack (equal pack_key) together; one TrainResult per config, each as
    `fit(cfg, data)` alone gives. `callbacks[n]`: config n's hooks (`cb("step"|"epoch", state)`)."""
    keys = {pack_key(c) for c in cfgs}
    if None in keys or len(keys) != 1:
        raise ValueError("fit_pack: the configs do not form one pack (training.pack.pack_key)")
    callbacks = list(callbacks or [()] * len(cfgs))
    trainers = [Trainer(cfg, data, progress=False) for cfg in cfgs]
    step = PackStep(trainers, PackedMembers([t.ex for t in trainers]))
    first, epochs = trainers[0], cfgs[0].train.epochs
    for epoch in range(epochs):
        tallies, t0 = [t.begin_epoch() for t in trainers], time.perf_counter()
        bar = tqdm(total=first.state.total_steps // epochs, unit="step", disable=not progress, leave=False,
                   desc=f"train pack of {len(cfgs)} epoch {epoch + 1}/{epochs}", mininterval=1.0)
        for x, y in first.batches():
            for t in trainers:
                t.begin_step()
            losses, logits = step(x, y)
            for t, tally, loss, out, cbs in zip(trainers, tallies, losses, logits, callbacks):
                t.end_step(tally, loss, out, y, cbs)
            bar.update(1)
        bar.close()
        seconds = time.perf_counter() - t0  # the pack's epoch: every trial's own wall time
        for t in trainers[1:]:  # the draws came from the first trial's stream: the others' are where it is
            t.step.gen.set_state(first.step.gen.get_state())
        for t, tally, cbs in zip(trainers, tallies, callbacks):
            t.end_epoch(tally, seconds, cbs)
    results = [t.result() for t in trainers]
    for r in results:
        r.info["packed"] = len(cfgs)
    return results
