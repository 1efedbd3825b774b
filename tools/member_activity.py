"""How alive each member's last hidden layer is, for runs whose ensemble accuracy may be one member's
(PDD's dropout can silence a member: docs/RESULTS.md). For each run: every member's clean accuracy on
the first test images, on how many of them it has fewer than two activated (> 0) last hidden units
(where a variance of its activated values, and so the discrimination score, is undefined), its
fewest and median activated units, and the discrimination score's mean and median over the images;
for a PDD run, what its dropout would keep of each member's activated units on a training batch.

usage: .venv/bin/python tools/member_activity.py RUN [RUN ...] [--images 1000]
RUN: a run folder (its config.yaml and checkpoint/), e.g. docs/results/pdd_deg_fair/runs/variants/pdd
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from raysweep.config import load_config
from raysweep.core.checkpoint import load
from raysweep.core.data import load_dataset
from raysweep.evaluation.diversity import discrimination_score
from raysweep.members.local import make_local_executor
from raysweep.regularisers.pdd import intervals, keep_rates, pdd_statistics


def activity(run: Path, images: int) -> list[str]:
    cfg = load_config(run / "config.yaml")
    ensemble = load(run / "checkpoint")
    data = load_dataset(cfg.data, cfg.seed)
    test = data.test
    x, y = test.batch(torch.arange(min(images, len(test))), "cpu")
    ex = make_local_executor(ensemble.members, device="cpu")
    ex.train(False)
    with torch.no_grad():
        feats = ex.stacked_logits(x, part="features")  # [K,B,D]
        logits = ex.stacked_logits(feats, per_member=True, part="head")
    active = (feats > 0).sum(-1)  # [K,B]
    score = discrimination_score(feats)
    lines = [f"{run}: {x.shape[0]} images, {feats.shape[-1]} last hidden units per member; discrimination score "
             f"mean {score.mean().item():.4g}, median {score.median().item():.4g}"]
    for k in range(ensemble.k):
        acc = (logits[k].argmax(-1) == y).float().mean().item()
        few = (active[k] < 2).float().mean().item()
        lines.append(f"  member {k + 1}: clean {acc:.3f}; fewer than two activated units on {few:.1%} of the images; "
                     f"activated units fewest {active[k].min().item()}, median {active[k].float().median().item():.0f}")
    if cfg.train.pdd is not None:
        lines += _pdd_keep(cfg, ex, data.train)
    return lines


def _pdd_keep(cfg, ex, train) -> list[str]:
    """What PDD's dropout would keep of each member's activated units on the first training batch, with the
    trained weights. Its intervals split [smallest, largest activation] (from 0 after ReLU), so a few large
    activations put most values into one interval, where members other than its owner keep units at
    beta (1 - share)."""
    p = cfg.train.pdd
    x, _ = train.batch(torch.arange(min(cfg.data.batch_size, len(train))), "cpu")
    with torch.no_grad():
        feats = ex.stacked_logits(x, part="features")
    stats = pdd_statistics(feats, p.m, p.scope == "sample")
    rates, on = keep_rates(feats, stats, p.alpha, p.beta), feats > 0
    first = intervals(feats, stats) == stats.priority[:, 0].view(1, -1, 1)  # member 1's, per group
    where = (f"intervals over [{stats.lo.item():.3g}, {stats.hi.item():.3g}], priority intervals "
             f"{stats.priority[0].tolist()}" if p.scope == "batch" else
             f"intervals per image, over [{stats.lo.min().item():.3g}, {stats.hi.max().item():.3g}] at the widest")
    lines = [f"  PDD on the first {x.shape[0]} training images: {where}"]
    for k in range(feats.shape[0]):
        if not on[k].any():
            lines.append(f"    member {k + 1}: no activated unit")
            continue
        lines.append(f"    member {k + 1}: keeps {rates[k][on[k]].mean().item():.1%} of its activated units "
                     "(expected); "
                     f"{first[k][on[k]].float().mean().item():.1%} of them in member 1's priority interval; "
                     f"activation mean {feats[k][on[k]].mean().item():.3g}, largest {feats[k].max().item():.3g}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--images", type=int, default=1000, help="the first N test images (default 1000)")
    args = parser.parse_args()
    if args.images < 1:
        parser.error(f"--images {args.images}: expected at least 1 test image")
    for run in args.runs:
        if not (run / "config.yaml").is_file() or not (run / "checkpoint").is_dir():
            parser.error(f"{run}: not a run folder (expected its config.yaml and checkpoint/)")
    for run in args.runs:
        print("\n".join(activity(run, args.images)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
