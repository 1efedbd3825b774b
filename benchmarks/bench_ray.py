"""Ray executor vs local executor: training step time and bytes exchanged per step, K=2 and K=3
LeNet-5 members, B=128: plain joint step, Ensemble-Adv (IFGSM N=7 on the averaged output), DEG, PDD.

Step times are measured inside the training loop (epoch seconds / steps, best of the epochs after
the first), so the Ray run's 15-20 s start-up is reported separately, not mixed into the step.
Local: all members in this process with all cores; Ray: one worker per member, cores split evenly.

Then a pack: the four cases at K=2 trained one after another in one Ray Train run
(fit_pack_on_ray) against four separate runs (fit_on_ray each), wall time of each whole call.
"""
import os
import time

import torch

from common import header

from raysweep.config import validate_config
from raysweep.core.data import load_dataset, steps_per_epoch
from raysweep.training.ray import fit_on_ray, fit_pack_on_ray
from raysweep.training.trainer import fit

CASES = {
    "plain": {},
    "Ensemble-Adv N=7": {"loss": "ensemble_ce", "adversarial": {"mode": "ensemble", "eps": 0.1, "steps": 7}},
    "DEG": {"deg": {"lambda_deg": 0.01}},
    "PDD": {"pdd": {"m": 10}},
}
BATCH, STEPS, EPOCHS = 128, 8, 3


def _cfg(k: int, train: dict, executor: dict):
    return validate_config({
        "data": {"dataset": "synthetic", "train_size": BATCH * STEPS, "batch_size": BATCH},
        "ensemble": {"k": k, "method": "joint"},
        "train": {"epochs": EPOCHS, "optimizer": "sgd", "lr": 0.01, **train},
        "executor": executor, "eval": {"uap": None}})


def _step_ms(history, spe) -> float:
    return min(row["seconds"] for row in history[1:]) / spe * 1e3


def main():
    import ray

    header("Ray executor vs local executor: step time, bytes per step (LeNet-5, B=128, joint)")
    if not ray.is_initialized():
        ray.init(address="local", logging_level="warning", configure_logging=False)
    cpus = os.cpu_count() or 1
    print(f"{'case':<20} {'K':>2} {'local ms':>9} {'ray ms':>8} {'ray/local':>9} {'bytes/step':>11} {'ray start-up s':>15}")
    for k in (2, 3):
        for name, train in CASES.items():
            local_cfg = _cfg(k, train, {"kind": "local", "vectorize": "loop"})
            ray_cfg = _cfg(k, train, {"kind": "ray", "ray": {"cpus_per_worker": cpus / k}})
            data = load_dataset(local_cfg.data, 0)
            spe = steps_per_epoch(len(data.train), BATCH)
            local = _step_ms(fit(local_cfg, data, progress=False).state.history, spe)
            t0 = time.perf_counter()
            got = fit_on_ray(ray_cfg, data, "runs/bench_ray", progress=False)
            overhead = time.perf_counter() - t0 - sum(r["seconds"] for r in got.state.history)
            remote = _step_ms(got.state.history, spe)
            print(f"{name:<20} {k:>2} {local:9.1f} {remote:8.1f} {remote / local:9.2f} "
                  f"{got.info['bytes_per_step']:11.0f} {overhead:15.1f}", flush=True)
    print(f"(torch {torch.__version__}; Ray workers get {cpus}/K CPUs each and one thread per whole CPU)")
    pack()


def pack():
    """The four cases at K=2: one packed Ray Train run against four separate ones."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", logging_level="warning", configure_logging=False)
    cpus = os.cpu_count() or 1
    cfgs = [_cfg(2, train, {"kind": "ray", "ray": {"cpus_per_worker": cpus / 2}}) for train in CASES.values()]
    data = load_dataset(cfgs[0].data, 0)
    t0 = time.perf_counter()
    for cfg in cfgs:
        fit_on_ray(cfg, data, "runs/bench_ray", progress=False)
    separate = time.perf_counter() - t0
    t0 = time.perf_counter()
    fit_pack_on_ray(cfgs, "runs/bench_ray", [data] * len(cfgs), progress=False)
    packed = time.perf_counter() - t0
    print(f"\n{len(cfgs)} configs (the cases above, K=2): {len(cfgs)} separate Ray Train runs {separate:.1f} s, one "
          f"packed run {packed:.1f} s: separate/packed {separate / packed:.2f}")


if __name__ == "__main__":
    main()
