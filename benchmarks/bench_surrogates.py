"""What a transfer surrogate's training costs against the members it attacks: a K=3 training step of
small_cnn (the fair PDD+DEG study's surrogate), at width 1 and 0.5, plain and with DEG, against a plain
K=3 LeNet-5 step (joint, B=128, looped members in NHWC as `channels_last: auto` picks on the CPU).
Why that study trains one type I surrogate per seed, shared by its variants, and no type II
(search_spaces/reproduce/pdd_deg_fair.yaml)."""
from common import alternating_ms, header, joint_setup, step_fn

from raysweep.config import validate_config
from raysweep.members import LoopedMembers
from raysweep.training.trainer import build_members

SURROGATES = {
    "small_cnn": ("small_cnn", 1.0, {}),
    "small_cnn width 0.5": ("small_cnn", 0.5, {}),
    "small_cnn + DEG": ("small_cnn", 1.0, {"deg": {"lambda_deg": 0.01}}),
    "LeNet-5 + DEG": ("lenet5", 1.0, {"deg": {"lambda_deg": 0.01}}),
}


def main():
    header("transfer surrogates: training step / plain LeNet-5 step, K=3, B=128, joint")
    raw, data, members, x, y = joint_setup(3)
    lenet = validate_config(raw)
    plain_fn = step_fn(LoopedMembers, lenet, members, x, y, True)
    for name, (arch, width, train) in SURROGATES.items():
        cfg = validate_config({**raw, "model": {"arch": arch, "width": width}, "train": {**raw["train"], **train}})
        t, p = alternating_ms(step_fn(LoopedMembers, cfg, build_members(cfg, data, 3), x, y, True), plain_fn)
        print(f"{name:<22} {t:7.1f} ms  LeNet-5 plain {p:6.1f} ms  {t / p:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
