"""Ensemble-level methods vs a plain simultaneous step (K=3 LeNet-5, B=128, same batch for all
members, looped members), in both layouts: NCHW, and NHWC (what executor.channels_last auto picks for
LeNet-5 on the CPU), each against the plain step in the same layout. Targets: DEG <= 3x (the paper's
implementation: 13x), PDD <= 1.3x."""
from common import alternating_ms, header, joint_setup, step_fn

from raysweep.config import validate_config
from raysweep.members import LoopedMembers

METHODS = {
    "DEG (lambda 0.01)": {"deg": {"lambda_deg": 0.01}},
    "PDD (M 10)": {"pdd": {"m": 10}},
    "PDD + DEG": {"pdd": {"m": 10}, "deg": {"lambda_deg": 0.01}},
    "ADP": {"adp": {}},
    "Ensemble-Adv IFGSM N=7": {"loss": "ensemble_ce",
                               "adversarial": {"mode": "ensemble", "eps": 0.1, "steps": 7}},
}


def main():
    header("ensemble-level methods: step time / plain simultaneous step, K=3 LeNet-5, B=128")
    raw, _, members, x, y = joint_setup(3)
    plain_cfg = validate_config(raw)
    for layout, nhwc in (("NCHW", False), ("NHWC", True)):
        plain_fn = step_fn(LoopedMembers, plain_cfg, members, x, y, nhwc)
        for name, train in METHODS.items():
            cfg = validate_config({**raw, "train": {**raw["train"], **train}})
            t, p = alternating_ms(step_fn(LoopedMembers, cfg, members, x, y, nhwc), plain_fn)
            print(f"{layout} {name:<24} {t:7.1f} ms  plain {p:6.1f} ms  {t / p:5.2f}x plain", flush=True)


if __name__ == "__main__":
    main()
