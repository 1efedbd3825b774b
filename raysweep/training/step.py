"""The training step of every method, written once over stacked outputs.

Per step, on per-member batches x [K,B,...], y [K,B] (identical rows when members share batches):
  1. adversarial examples if asked (attacks/adversarial.py), members in eval mode;
  2. a forward pass: last hidden features [K,B,D] -> feature transforms (PDD) -> logits [K,B,C]
     (or the pass a regulariser computes its own way: forward-mode JR carries a tangent through it);
  3. the pass loss: the base loss (member_ce = sum_k CE(f_k); ensemble_ce = CE of the averaged
     probabilities) plus every active regulariser's term (regularisers/);
  4. total = clean pass + rho * adversarial pass (the clean pass is left out for Madry training
     unless adversarial.clean is set), one backward, one optimiser step.
Where members live is the executor's business, and it stays here: a distributed executor
(members/distributed.py) computes only its own members' slots of per-member quantities, so this
step makes per-member terms ([K]) and per-member input gradients whole with `executor.sync` before
any regulariser sees them. All randomness comes from one seeded generator, in a fixed order.

train.precision: bf16 runs steps 1-3 and the backward under torch.autocast(bfloat16): convolutions
and matmuls in bf16, everything autocast keeps in fp32 in fp32. The logits (and PDD's features) are
cast to fp32 as they leave the members, so losses, softmaxes, norms and regulariser terms are fp32
reductions of bf16 products; weights, gradients and optimiser state stay fp32 (bf16 keeps fp32's
exponent range, so no loss scaling).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from raysweep.attacks.adversarial import ensemble_examples, member_examples
from raysweep.config import RunConfig
from raysweep.core.objectives import ce_prob
from raysweep.errors import ConfigError
from raysweep.regularisers import StepOutputs, active
from raysweep.regularisers.deg import member_input_grads


class TrainStep:
    def __init__(self, cfg: RunConfig, executor, weights: torch.Tensor, generator: torch.Generator):
        self.cfg, self.ex, self.gen = cfg, executor, generator
        self.weights = weights.to(executor.device)
        self.regularisers = active(cfg.train, cfg.ensemble.k)
        self.transforms = [r for r in self.regularisers if r.transforms_features]
        self.input_grad = any(r.needs_input_grad for r in self.regularisers)
        self.bf16 = cfg.train.precision == "bf16"
        device = executor.device
        if self.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"train.precision: bf16, but {torch.cuda.get_device_name(device)} has no bfloat16 "
                              "support; use fp32")

    def logits(self, x, per_member: bool = True, part: str = "logits"):
        """The members' outputs in fp32 whatever the autocast dtype (a no-op in fp32)."""
        return self.ex.stacked_logits(x, per_member=per_member, part=part).float()

    def adversarial(self, x, y):
        adv = self.cfg.train.adversarial
        self.ex.train(False)
        try:
            if adv.mode == "ensemble":
                x_adv = ensemble_examples(lambda z: self.logits(z, False), x[0], y[0], self.weights, adv, self.gen)
                return x_adv.expand_as(x)
            return member_examples(self.logits, x, y, adv, self.gen)
        finally:
            self.ex.train(True)

    def forward(self, x):
        if not self.transforms:
            return self.logits(x)
        feats = self.logits(x, part="features")
        for r in self.transforms:
            feats = r.features(feats, self.gen)
        return self.logits(feats, part="head")

    def pass_parts(self, x, y):
        """(logits, base loss, terms) of one pass. The base loss is per member, [K], for member_ce (member
        k's mean cross-entropy), else a scalar; terms are (regulariser key, [K] made whole, or a scalar).
        A pack of trials (training/pack.py) sums them per trial; pass_loss sums them all."""
        if self.input_grad:
            x = x.clone().requires_grad_(True)
        logits = next((out for r in self.regularisers if (out := r.forward(self.forward, x, self.gen)) is not None),
                      None)
        if logits is None:
            logits = self.forward(x)
        k, b, c = logits.shape
        if self.cfg.train.loss == "member_ce":
            base = F.cross_entropy(logits.reshape(k * b, c), y.reshape(-1), reduction="none").view(k, b).mean(1)
        else:
            base = ce_prob(logits, y[0], self.weights).mean()
        out = StepOutputs(logits, x, y, self.weights, self.gen,
                          functools.cache(lambda: self.ex.sync(member_input_grads(logits, x, y))))
        terms = []
        for r in self.regularisers:
            term = r.term(out)
            if term is not None:  # [K]: valid in this executor's own slots until synced
                terms.append((r.key, self.ex.sync(term) if term.dim() == 1 else term))
        return logits, base, terms

    @staticmethod
    def total(base, terms) -> torch.Tensor:
        loss = base.sum()
        for _, term in terms:
            loss = loss + term.sum()
        return loss

    def pass_loss(self, x, y, reduce=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss of one pass, its logits). `reduce(base, terms)` makes the loss of pass_parts' pieces:
        by default their sum; a pack of trials keeps one loss per trial."""
        logits, base, terms = self.pass_parts(x, y)
        return (reduce or self.total)(base, terms), logits

    def loss(self, x, y, reduce=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, logits of the first pass)."""
        adv = self.cfg.train.adversarial
        passes = []
        if adv is None or (adv.clean if adv.clean is not None else adv.mode == "ensemble"):
            passes.append((x, 1.0))
        if adv is not None:
            passes.append((self.adversarial(x, y), adv.rho))
        total, first = 0.0, None
        for xin, weight in passes:
            loss, logits = self.pass_loss(xin, y, reduce)
            total = total + weight * loss
            first = logits if first is None else first
        return total, first

    def __call__(self, opt, x, y):
        with torch.autocast(self.ex.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, logits = self.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach(), logits.detach()

    def state_dict(self) -> dict:
        return {r.key: sd for r in self.regularisers if (sd := r.state_dict()) is not None}

    def load_state_dict(self, sd: dict) -> None:
        for r in self.regularisers:
            r.load_state_dict(sd.get(r.key), self.ex.device)
