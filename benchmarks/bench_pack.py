"""Trial packing: N Jacobian Ensembles trials (LeNet-5, K=3 bagging, B=128, their own learning rate and
lambda_JR) trained together by training.pack.fit_pack, against the same N trained one after another by
fit, looped and vmapped members. Training only, on synthetic data of 1024 images (8 steps per epoch),
so the figure is the step's, without data loading or evaluation. Each way is timed alternately with
its sequential twin, middle of three rounds; the packed trials' parameters are checked against the
lone ones."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import DEVICE, header  # noqa: E402

from raysweep.config import validate_config  # noqa: E402
from raysweep.core.data import load_dataset  # noqa: E402
from raysweep.training.pack import fit_pack  # noqa: E402
from raysweep.training.trainer import fit  # noqa: E402

TRIALS = [(1e-3, 0.05), (2e-3, 0.1), (5e-4, 0.2), (1e-3, 0.5), (3e-3, 0.02), (7e-4, 0.3), (1.5e-3, 0.08),
          (2.5e-3, 0.15)]


def _cfgs(n: int, vectorize: str, estimator: str):
    return [validate_config({"data": {"dataset": "synthetic", "train_size": 1024, "batch_size": 128},
                             "ensemble": {"k": 3, "method": "bagging"},
                             "executor": {"vectorize": vectorize, "device": DEVICE.type},
                             "train": {"epochs": 1, "lr": lr, "jr": {"lambda_jr": lam, "estimator": estimator}}})
            for lr, lam in TRIALS[:n]]


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    out = fn()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def compare(n: int, vectorize: str, estimator: str = "double_backward", rounds: int = 3) -> None:
    cfgs = _cfgs(n, vectorize, estimator)
    data = load_dataset(cfgs[0].data, 0)
    packed, alone = [], []
    for _ in range(rounds):
        s, a = _seconds(lambda: [fit(c, data, progress=False) for c in cfgs])
        alone.append(s)
        s, p = _seconds(lambda: fit_pack(cfgs, data, progress=False))
        packed.append(s)
    diff = max((pp - pa).abs().max().item() for rp, ra in zip(p, a)
               for mp, ma in zip(rp.ensemble.members, ra.ensemble.members)
               for pp, pa in zip(mp.parameters(), ma.parameters()))
    tp, ta = sorted(packed)[rounds // 2], sorted(alone)[rounds // 2]
    print(f"N={n} {vectorize:4s} JR {estimator:15s}  packed {tp:6.2f} s  one after another {ta:6.2f} s  "
          f"packed/alone {tp / ta:.2f}  max |param diff| {diff:.1e}")


def main() -> None:
    header("trial packing: N JE trials (LeNet-5 K=3 bagging, B=128, 8 steps) packed vs one after another")
    for vectorize in ("loop", "vmap"):
        for n in (2, 4):
            compare(n, vectorize)
    compare(4, "vmap", "forward_mode")
    if DEVICE.type == "cuda":
        compare(8, "vmap")


if __name__ == "__main__":
    main()
