"""Trial packing (search.pack): the same 4-trial Jacobian Ensembles sweep (the shipped space, shortened)
run unpacked, two trials per Tune trial and four per Tune trial, one after another in one process,
each on a fresh local Ray sized to this machine. Wall time of the whole sweep, start to summary.

Every trial trains and evaluates the same sampled point whatever the packing (tests/test_sweep.py checks
a packed trial's metrics against its run alone), so the difference is what packing saves: Tune trial
start-up (an actor process that imports torch, Ray Train's MLflow and Tune set-up) and data loading,
paid once per pack instead of once per trial. A pack trains its trials one after another, so on a
machine with more cores than Tune trials running, packing can also cost parallelism: pack 4 below runs
one Tune trial (one core) where the others run two."""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import header  # noqa: E402

from raysweep import presets  # noqa: E402
from raysweep.sweeps.tune import run_sweep  # noqa: E402

SHORT = {"data.train_size": 2000, "data.test_size": 500, "train.epochs": 1, "eval.uap.seeds": 2,
         "eval.uap.iterations": 5, "eval.uap.selection_size": 200, "search.samples": 4}


def _space(tmp: Path, pack: int) -> Path:
    raw = yaml.safe_load(presets.resolve("search_spaces/jacobian_ensembles_sweep.yaml").read_text())
    for dotted, value in {**SHORT, "search.pack": pack}.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = tmp / f"pack{pack}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _sweep_seconds(tmp: Path, pack: int) -> tuple[float, dict]:
    import ray

    if ray.is_initialized():  # run_all: an earlier benchmark's Ray
        ray.shutdown()
    ray.init(address="local", num_cpus=os.cpu_count(), logging_level="warning", configure_logging=False)
    try:
        t0 = time.perf_counter()
        summary = run_sweep(str(_space(tmp, pack)), out=str(tmp / f"out{pack}"),
                            tracking=f"sqlite:///{tmp / f'mlflow{pack}.db'}", progress=False)
        return time.perf_counter() - t0, summary
    finally:
        ray.shutdown()


def main() -> None:
    header("trial packing: a 4-trial JE sweep (Fashion-MNIST 2000 images, 1 epoch, short UAP)")
    seconds, results = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for pack in (1, 2, 4):
            seconds[pack], summary = _sweep_seconds(Path(tmp), pack)
            # every trial's sampled point and result: the same whatever the packing
            results[pack] = sorted((sorted(t["params"].items()), t["weighted_acc"])
                                   for t in summary["finished_trials"])
            print(f"  search.pack {pack}: {seconds[pack]:6.1f} s   ({summary['finished']} trials finished)")
    for pack in (2, 4):
        print(f"  unpacked / pack {pack}: {seconds[1] / seconds[pack]:.2f}; same points and results as unpacked: "
              f"{'yes' if results[pack] == results[1] else 'NO'}")


if __name__ == "__main__":
    main()
