"""eval.transfer: black-box transfer (the PDD + DEG paper). raysweep trains a surrogate ensemble from
this run's own config with another architecture, crafts adversarial examples on it, and measures
the target ensemble on them. Type I (oblivious): the surrogate drops every defence (adversarial
training, an ensemble loss, and every regulariser registered as a defence); type II (adaptive): it
keeps them. The crafting attack uses the first of attack.objectives and keeps its last iterate.
Results transfer_acc/<name>/<eps>, with per-image flags."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field

from raysweep.attacks.pgd import AttackConfig, attack_batch, attack_params
from raysweep.core.data import Split, eval_batches
from raysweep.core.ensemble import Ensemble, combine
from raysweep.core.sections import Section
from raysweep.core.seeding import generator
from raysweep.evaluation.base import Evaluation, register
from raysweep.evaluation.report import eps_key
from raysweep.regularisers import REGULARISERS


class TransferConfig(Section):
    """One transfer evaluation; see the module docstring for types I and II."""
    name: str
    type: Literal["I", "II"]
    arch: Literal["lenet5", "small_cnn", "resnet18"] = Field(..., description="the surrogate's architecture")
    attack: AttackConfig = Field(..., description="crafting attack on the surrogate (first objective used)")
    epochs: Optional[int] = Field(None, ge=1, description="surrogate training epochs; null = the run's")
    samples: Optional[int] = Field(None, ge=1, description="first N test images; null = all")


def surrogate_config(cfg, t: TransferConfig) -> dict:
    """The surrogate's run config (raw, to be validated), from the target's."""
    raw = cfg.model_dump(mode="json")
    raw["name"] = f"{cfg.name}_surrogate_{t.name}"
    raw["seed"] = cfg.seed + 1000  # the surrogate must not share the target's initialisation
    raw["model"] = {"arch": t.arch}
    if t.epochs:
        raw["train"]["epochs"] = t.epochs
    if t.type == "I":  # oblivious: no defence at all, whatever regulariser plug-ins the run uses
        train = raw["train"]
        train.update(loss="member_ce", adversarial=None)
        for key, regulariser in REGULARISERS.items():
            if regulariser.defence:
                train[key] = regulariser.default.model_dump(mode="json") if regulariser.default else None
    raw["eval"] = {"uap": None, "jacobian_samples": 0, "diversity_samples": 0}
    return raw


def transfer_attack(target: Ensemble, surrogate: Ensemble, split: Split, t: TransferConfig, batch_size: int,
                    device, seed: int = 0) -> tuple[dict, dict]:
    """({eps: {target_acc, surrogate_acc}}, {eps: the target's per-image flags})."""
    split = split.head(t.samples)
    n = len(split)
    gen = generator(seed, "transfer", t.name)
    out, flags = {}, {}
    for eps in t.attack.eps:
        steps, step_size, start = attack_params(t.attack, eps)
        target_ok, surrogate_ok = [], 0
        for x, y in eval_batches(split, batch_size, device):
            x_adv, _ = attack_batch(surrogate.stacked_logits, x, y, surrogate.weights, t.attack.objectives[0], eps,
                                    t.attack.norm, steps, step_size, start, t.attack.step_rule,
                                    surrogate.combine_how, gen, keep_last=True)
            with torch.no_grad():
                target_ok.append((combine(target.stacked_logits(x_adv), target.weights, target.combine_how)
                                  .argmax(1) == y).cpu())
                surrogate_ok += (surrogate(x_adv).argmax(1) == y).sum().item()
        flags[eps_key(eps)] = torch.cat(target_ok)
        out[eps_key(eps)] = {"target_acc": flags[eps_key(eps)].sum().item() / n, "surrogate_acc": surrogate_ok / n}
    return out, flags


@register
class Transfer(Evaluation):
    key, Config, default = "transfer", list[TransferConfig], []

    @classmethod
    def names(cls, transfers, eval_cfg, k) -> list[str]:
        return [f"transfer_acc/{t.name}/{eps_key(e)}" for t in transfers for e in t.attack.eps]

    @classmethod
    def flagged(cls, transfers) -> set[tuple[str, float]]:
        return {(t.attack.norm, float(e)) for t in transfers for e in t.attack.eps}

    def run(self, ctx, report) -> None:
        details = {}
        for t in self.cfg:
            surrogate = ctx.train(surrogate_config(ctx.cfg, t)).to(ctx.device).eval()
            per_eps, flags = transfer_attack(ctx.model, surrogate, ctx.data.test, t, ctx.cfg.eval.batch_size,
                                             ctx.device, ctx.cfg.seed)
            for e in t.attack.eps:
                report.add(f"transfer_acc/{t.name}/{eps_key(e)}", per_eps[eps_key(e)]["target_acc"],
                           attack=f"transfer:{t.name}", objective=t.attack.objectives[0], norm=t.attack.norm, eps=e,
                           images=len(flags[eps_key(e)]), steps=attack_params(t.attack, e)[0])
                report.robust_flags(t.attack.norm, e, f"transfer:{t.name}", flags[eps_key(e)])
            details[t.name] = {"type": t.type, "surrogate_arch": t.arch, "crafting_objective": t.attack.objectives[0],
                               "per_eps": per_eps}
        report.details["transfer"] = details
