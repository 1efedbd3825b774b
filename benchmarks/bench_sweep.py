"""Trial start-up: the same 4-trial Jacobian Ensembles sweep (the shipped space, shortened) run four
ways, one after another in one process, each on a fresh local Ray sized to this machine: a fresh Tune
trial process per trial (Ray Tune's default, and raysweep's before it reused them), unpacked with
reused processes (raysweep's default for local-executor trials), two trials per Tune trial and four per
Tune trial (search.pack). Wall time of the whole sweep, start to summary.

Every trial trains and evaluates the same sampled point whichever way (tests/test_sweep.py checks a
packed trial's metrics against its run alone; the benchmark checks the results agree), so the
differences are start-up: a fresh trial process imports torch, MLflow and Ray Tune's trial code (~5
CPU-s); a pack also loads its data once. A pack trains its trials one after another, so on a machine
with more cores than Tune trials running, packing can also cost parallelism: pack 4 below runs one
Tune trial (one core) where the others run two."""
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
from raysweep.sweeps import tune  # noqa: E402

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


def _sweep_seconds(tmp: Path, pack: int, reuse: bool) -> tuple[float, dict]:
    import ray

    if ray.is_initialized():  # run_all: an earlier benchmark's Ray
        ray.shutdown()
    ray.init(address="local", num_cpus=os.cpu_count(), logging_level="warning", configure_logging=False)
    chosen = tune._reuse_actors
    if not reuse:  # the "before": Tune's default, a fresh process per trial
        tune._reuse_actors = lambda space: False
    try:
        t0 = time.perf_counter()
        name = f"{pack}{'' if reuse else '-fresh'}"
        summary = tune.run_sweep(str(_space(tmp, pack)), out=str(tmp / f"out{name}"),
                                 tracking=f"sqlite:///{tmp / f'mlflow{name}.db'}", progress=False)
        return time.perf_counter() - t0, summary
    finally:
        tune._reuse_actors = chosen
        ray.shutdown()


WAYS = {"fresh process per trial": (1, False), "reused processes": (1, True), "search.pack 2": (2, True),
        "search.pack 4": (4, True)}


def main() -> None:
    header("trial start-up: a 4-trial JE sweep (Fashion-MNIST 2000 images, 1 epoch, short UAP)")
    seconds, results = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for way, (pack, reuse) in WAYS.items():
            seconds[way], summary = _sweep_seconds(Path(tmp), pack, reuse)
            # every trial's sampled point and result: the same whichever way
            results[way] = sorted((sorted(t["params"].items()), t["weighted_acc"])
                                  for t in summary["finished_trials"])
            print(f"  {way:<24} {seconds[way]:6.1f} s   ({summary['finished']} trials finished)")
    base = "fresh process per trial"
    for way in list(WAYS)[1:]:
        print(f"  {base} / {way}: {seconds[base] / seconds[way]:.2f}; same points and results: "
              f"{'yes' if results[way] == results[base] else 'NO'}")


if __name__ == "__main__":
    main()
