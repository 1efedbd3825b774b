"""Black-box transfer evaluation (SPEC section 4): craft on a surrogate ensemble that raysweep
trains itself, measure the target ensemble on the crafted images. The crafting attack uses the
first of attack.objectives on the surrogate and keeps its last iterate."""
from __future__ import annotations

import torch

from raysweep.attacks.pgd import attack_batch, attack_params
from raysweep.config import RunConfig, run_config_model
from raysweep.config.schema import TransferConfig
from raysweep.core.data import Dataset, Split, eval_batches
from raysweep.core.ensemble import Ensemble, combine
from raysweep.core.seeding import generator
from raysweep.regularisers import REGULARISERS
from raysweep.training.trainer import fit


def surrogate_config(cfg: RunConfig, t: TransferConfig) -> RunConfig:
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
    return run_config_model().model_validate(raw)


def transfer_attack(target: Ensemble, surrogate: Ensemble, split: Split, t: TransferConfig, batch_size: int,
                    device, seed: int = 0) -> dict:
    split = split.head(t.samples)
    n = len(split)
    gen = generator(seed, "transfer", t.name)
    out = {}
    for eps in t.attack.eps:
        steps, step_size, start = attack_params(t.attack, eps)
        target_ok = surrogate_ok = 0
        for x, y in eval_batches(split, batch_size, device):
            x_adv, _ = attack_batch(surrogate.stacked_logits, x, y, surrogate.weights, t.attack.objectives[0], eps,
                                    t.attack.norm, steps, step_size, start, t.attack.step_rule,
                                    surrogate.combine_how, gen, keep_last=True)
            with torch.no_grad():
                target_ok += (combine(target.stacked_logits(x_adv), target.weights, target.combine_how)
                              .argmax(1) == y).sum().item()
                surrogate_ok += (surrogate(x_adv).argmax(1) == y).sum().item()
        out[str(eps)] = {"target_acc": target_ok / n, "surrogate_acc": surrogate_ok / n}
    return out


def evaluate_transfer(target: Ensemble, data: Dataset, cfg: RunConfig, device, progress: bool = True) -> dict:
    report = {}
    for t in cfg.eval.transfer:
        scfg = surrogate_config(cfg, t)
        surrogate = fit(scfg, data, progress=progress).ensemble.to(device).eval()
        report[t.name] = {"type": t.type, "surrogate_arch": t.arch, "crafting_objective": t.attack.objectives[0],
                          "per_eps": transfer_attack(target, surrogate, data.test, t, cfg.eval.batch_size, device,
                                                     cfg.seed)}
    return report
