"""Attacks taken from ART (adversarial-robustness-toolbox) rather than rewritten: Square for l2,
and JSMA. The AutoAttack-grade evaluation here runs APGD-CE, APGD-DLR (apgd.py) and l_inf Square
(square.py) natively, without ART's numpy round trip, with the same accuracies within noise. (C&W L2 is
in cw.py: ART's was too slow for 2 CPU cores.)

The ensemble is wrapped as an ART PyTorchClassifier whose outputs are the ensemble's scores
(log of the averaged probabilities, or averaged logits): ART's cross-entropy on them is the CE of
the averaged ensemble, and DLR is unchanged by the per-sample log-sum-exp shift. As in AutoAttack,
each attack runs only on the samples still robust, and a sample counts as robust only if it
survives all of them.
"""
from __future__ import annotations

import logging
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field
from torch import nn

from raysweep.attacks.apgd import apgd
from raysweep.attacks.square import square_linf
from raysweep.core.data import Split
from raysweep.core.sections import EpsGrid, Section
from raysweep.core.seeding import generator


class AutoAttackConfig(Section):
    """AutoAttack-grade evaluation (APGD-CE, APGD-DLR, Square): a sample is robust only if it survives every
    attack."""
    eps: EpsGrid
    norm: Literal["linf", "l2"] = "linf"
    attacks: list[Literal["apgd-ce", "apgd-dlr", "square"]] = Field(["apgd-ce", "apgd-dlr", "square"], min_length=1)
    max_iter: int = Field(100, ge=1, description="APGD iterations")
    square_queries: int = Field(5000, ge=1)
    samples: Optional[int] = Field(None, ge=1, description="first N test images; null = all")


class JSMAConfig(Section):
    """JSMA (L0) through ART: theta is the change per feature, gamma the largest fraction changed."""
    theta: float = Field(1.0, gt=0)
    gamma: float = Field(0.1, gt=0, le=1)
    samples: int = Field(200, ge=1)

logging.getLogger("art").setLevel(logging.WARNING)


def art_classifier(model: nn.Module, image_shape, num_classes: int, device: torch.device):
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(image_shape),
                             nb_classes=num_classes, clip_values=(0.0, 1.0),
                             device_type="gpu" if device.type == "cuda" else "cpu")


def _arrays(split: Split, n: int | None):
    split = split.head(n)
    x, y = split.batch(torch.arange(len(split)))
    return x.numpy(), y.numpy()


def make_attack(name: str, clf, eps: float, cfg: AutoAttackConfig, batch_size: int):
    """ART's APGD-CE, APGD-DLR or Square at eps, with cfg's norm, iterations and queries."""
    from art.attacks.evasion import AutoProjectedGradientDescent, SquareAttack

    norm = np.inf if cfg.norm == "linf" else 2
    if name == "square":
        return SquareAttack(clf, norm=norm, eps=eps, max_iter=cfg.square_queries, nb_restarts=1,
                            batch_size=batch_size, verbose=False)
    loss = "cross_entropy" if name == "apgd-ce" else "difference_logits_ratio"
    return AutoProjectedGradientDescent(clf, norm=norm, eps=eps, eps_step=2 * eps, max_iter=cfg.max_iter,
                                        nb_random_init=1, batch_size=batch_size, loss_type=loss, verbose=False)


def native_attack(name: str, model, x, y, eps: float, cfg: AutoAttackConfig, gen) -> torch.Tensor:
    if name == "square":
        return square_linf(model.stacked_logits, x, y, model.weights, model.combine_how, eps, cfg.square_queries,
                           generator=gen)
    return apgd(model.stacked_logits, x, y, model.weights, model.combine_how, name[5:], eps, cfg.norm, cfg.max_iter,
                gen)


def autoattack(model: nn.Module, split: Split, cfg: AutoAttackConfig, num_classes: int, batch_size: int,
               device: torch.device, seed: int = 0) -> tuple[dict, dict]:
    """({"per_eps": {eps: {"acc": robust accuracy, "after": {attack: accuracy after it}}}, ...},
    {eps: per-image robust flags [N] as a torch bool tensor})."""
    clf = art_classifier(model, split.x.shape[1:], num_classes, device)
    x, y = _arrays(split, cfg.samples)
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    clean = clf.predict(x, batch_size=batch_size).argmax(1) == y
    out, flags = {}, {}
    for eps in cfg.eps:
        np.random.seed(seed)  # ART draws its random starts from numpy's global stream
        robust, after = clean.copy(), {}
        for name in cfg.attacks:
            idx = np.flatnonzero(robust)
            if len(idx) and eps > 0 and (name.startswith("apgd") or cfg.norm == "linf"):  # native
                gen = generator(seed, "autoattack", name, str(eps))
                fooled = torch.cat([native_attack(name, model, xt[j], yt[j], eps, cfg, gen)
                                    for j in torch.from_numpy(idx).to(device).split(batch_size)])
                robust[idx] = ~fooled.cpu().numpy()
            elif len(idx) and eps > 0:
                x_adv = make_attack(name, clf, eps, cfg, batch_size).generate(x[idx], y=y[idx])
                robust[idx] = clf.predict(x_adv, batch_size=batch_size).argmax(1) == y[idx]
            after[name] = float(robust.mean())
        out[str(eps)] = {"acc": float(robust.mean()), "after": after}
        flags[str(eps)] = torch.from_numpy(robust.copy())
    return {"per_eps": out, "clean_acc": float(clean.mean()), "samples": len(y), "norm": cfg.norm}, flags


def jsma(model: nn.Module, split: Split, cfg: JSMAConfig, num_classes: int, batch_size: int, device,
         seed: int = 0) -> dict:
    """Untargeted use of a targeted attack: ART draws a random wrong target per sample."""
    from art.attacks.evasion import SaliencyMapMethod

    clf = art_classifier(model, split.x.shape[1:], num_classes, device)
    x, y = _arrays(split, cfg.samples)
    np.random.seed(seed)
    x_adv = SaliencyMapMethod(clf, theta=cfg.theta, gamma=cfg.gamma, batch_size=batch_size, verbose=False).generate(x)
    correct = clf.predict(x_adv, batch_size=batch_size).argmax(1) == y
    changed = (np.abs(x_adv - x).reshape(len(x), -1) > 1e-6).mean(1)
    return {"acc": float(correct.mean()), "mean_l0_fraction": float(changed.mean()), "samples": len(y)}
