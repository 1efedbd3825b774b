"""The training step of every method, written once over stacked outputs.

Per step, on per-member batches x [K,B,...], y [K,B] (identical rows for ensemble.method joint):
  1. adversarial examples if asked (adversarial_training.py), members in eval mode;
  2. a forward pass: last hidden features [K,B,D] -> PDD dropout (pdd.py) -> logits [K,B,C];
  3. the pass loss: the base loss (member_ce = sum_k CE(f_k); ensemble_ce = CE of the averaged
     probabilities) plus JR (jacobian.py; by double backward, or forward-mode in the forward pass of
     step 2: train.jr.estimator), DEG (deg.py) and ADP (adp.py) when configured;
  4. total = clean pass + rho * adversarial pass (the clean pass is left out for Madry training
     unless adversarial.clean is set), one backward, one optimiser step.
The executor supplies stacked forwards, plus `sync` for per-member quantities computed here from
them (JR penalties, DEG input gradients): a distributed executor (executors/distributed.py) only
computes its own members' slots and gathers the others, so the same step serves looped, vmapped
and distributed members. All randomness comes from one seeded generator, in a fixed order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raysweep.regularisers.adp import adp_regulariser
from raysweep.attacks.adversarial import ensemble_examples, member_examples
from raysweep.core.objectives import ce_prob
from raysweep.config.schema import RunConfig
from raysweep.regularisers.deg import deg_penalty, member_input_grads
from raysweep.regularisers.jacobian import jacobian_sq_norm_forward, jr_penalty
from raysweep.regularisers.pdd import PriorityDropout
from raysweep.core.seeding import rand_like


class TrainStep:
    def __init__(self, cfg: RunConfig, executor, weights: torch.Tensor, generator: torch.Generator):
        t = cfg.train
        self.cfg, self.ex, self.gen = cfg, executor, generator
        self.weights = weights.to(executor.device)
        self.pdd = PriorityDropout(t.pdd.alpha, t.pdd.beta, t.pdd.m, t.pdd.period, t.pdd.rescale) if t.pdd else None
        self.terms: dict[str, torch.Tensor] = {}  # last step's loss terms, for logging

    def adversarial(self, x, y):
        adv = self.cfg.train.adversarial
        self.ex.train(False)
        try:
            if adv.mode == "ensemble":
                x_adv = ensemble_examples(self.ex.stacked_logits, x[0], y[0], self.weights, adv, self.gen)
                return x_adv.expand_as(x)
            return member_examples(lambda z: self.ex.stacked_logits(z, per_member=True), x, y, adv, self.gen)
        finally:
            self.ex.train(True)

    def forward(self, x):
        if self.pdd is None:
            return self.ex.stacked_logits(x, per_member=True)
        feats = self.ex.stacked_logits(x, per_member=True, part="features")
        uniform = rand_like(feats, self.gen)
        return self.ex.stacked_logits(self.pdd(feats, uniform), per_member=True, part="head")

    def pass_loss(self, x, y) -> tuple[torch.Tensor, dict, torch.Tensor]:
        t = self.cfg.train
        forward_jr = t.jr.lambda_jr > 0 and t.jr.estimator == "forward_mode"
        if (t.jr.lambda_jr > 0 and not forward_jr) or t.deg is not None:
            x = x.clone().requires_grad_(True)
        if forward_jr:  # the logits and J u from one forward pass
            logits, sq_jacobian = jacobian_sq_norm_forward(self.forward, x, self.gen)
        else:
            logits = self.forward(x)
        k, b, c = logits.shape
        if t.loss == "member_ce":
            base = F.cross_entropy(logits.reshape(k * b, c), y.reshape(-1), reduction="none").view(k, b).mean(1).sum()
        else:
            base = ce_prob(logits, y[0], self.weights).mean()
        terms = {"ce": base}
        if t.jr.lambda_jr > 0:
            jr = (0.5 * t.jr.lambda_jr * sq_jacobian.mean(1) if forward_jr
                  else jr_penalty(logits, x, t.jr.lambda_jr, t.jr.n_proj, t.jr.exact, self.gen))
            terms["jr"] = self.ex.sync(jr).sum()
        if t.deg is not None:
            terms["deg"] = t.deg.lambda_deg * deg_penalty(self.ex.sync(member_input_grads(logits, x, y)))
        if t.adp is not None:
            terms["adp"] = adp_regulariser(logits, y[0], t.adp.alpha, t.adp.beta, t.adp.det_offset)
        return sum(terms.values()), terms, logits

    def loss(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, logits of the first pass)."""
        adv = self.cfg.train.adversarial
        passes = []
        if adv is None or (adv.clean if adv.clean is not None else adv.mode == "ensemble"):
            passes.append(("clean", x, 1.0))
        if adv is not None:
            passes.append(("adv", self.adversarial(x, y), adv.rho))
        total, first = 0.0, None
        self.terms = {}
        for name, xin, weight in passes:
            loss, terms, logits = self.pass_loss(xin, y)
            total = total + weight * loss
            first = logits if first is None else first
            self.terms.update({f"{name}_{key}": v.detach() for key, v in terms.items()})
        return total, first

    def __call__(self, opt, x, y):
        loss, logits = self.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach(), logits.detach()
