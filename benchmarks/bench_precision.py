"""train.precision and executor.channels_last / compile: one LeNet-5 training step, K=3, B=128 per
member, each variant timed alternately with the plain fp32 step (medians of three rounds), looped
members (channels_last is a looped-members layout). A JR step (double backward) and an Ensemble-Adv
step (IFGSM N=3 inside the step) show bf16 where the step is heavier. compile: the first step
compiles (seconds to a minute here); the figure is the compiled steady state."""
import time

from common import DEVICE, alternating_ms, header

from raysweep.config import validate_config
from raysweep.core.data import load_dataset, member_batches
from raysweep.core.ensemble import uniform_weights
from raysweep.core.seeding import generator
from raysweep.members import make_local_executor
from raysweep.training.step import TrainStep
from raysweep.training.trainer import build_members, make_optimizer

K, BATCH = 3, 128
STEPS = {"plain": {}, "JR (n_proj 1)": {"jr": {"lambda_jr": 0.1}},
         "Ensemble-Adv N=3": {"loss": "ensemble_ce", "adversarial": {"mode": "ensemble", "eps": 0.1, "steps": 3}}}


def _step(train: dict, precision: str = "fp32", channels_last: bool = False, compile: bool = False):
    method = "joint" if "adversarial" in train else "independent"
    cfg = validate_config({"data": {"dataset": "synthetic", "train_size": BATCH * 4, "batch_size": BATCH},
                           "ensemble": {"k": K, "method": method},
                           "train": {**train, "precision": precision},
                           "executor": {"vectorize": "loop", "channels_last": channels_last, "compile": compile}})
    data = load_dataset(cfg.data, 0)
    x, y = next(member_batches(data.train, K, cfg.method.batches, BATCH, 0, 0, DEVICE))
    ex = make_local_executor(build_members(cfg, data, K), "loop", DEVICE.type, channels_last, compile)
    opt = make_optimizer(ex.parameters(), cfg)
    step = TrainStep(cfg, ex, uniform_weights(K), generator(0, "bench"))
    return lambda: step(opt, x, y)


def main():
    header(f"precision and layout: one training step, LeNet-5, K={K} looped, B={BATCH}")
    print(f"{'step':<18} {'variant':<16} {'fp32 ms':>8} {'variant ms':>11} {'variant/fp32':>13}")
    for name, train in STEPS.items():
        variants = {"bf16": {"precision": "bf16"}, "channels_last": {"channels_last": True}}
        if name == "plain":
            variants["compile"] = {"compile": True}
        for label, kw in variants.items():
            fn = _step(train, **kw)
            t0 = time.perf_counter()
            fn()  # a compiled step compiles here
            first = time.perf_counter() - t0
            ms, plain = alternating_ms(fn, _step(train))
            extra = f"  (first step {first:.1f} s)" if label == "compile" else ""
            print(f"{name:<18} {label:<16} {plain:8.1f} {ms:11.1f} {ms / plain:13.2f}{extra}", flush=True)


if __name__ == "__main__":
    main()
