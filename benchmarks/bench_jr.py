"""Jacobian-regularised step vs plain step (K=3 LeNet-5, B=128, looped members), per estimator:
double_backward (output projections, the reference) and forward_mode (J u as a forward-mode tangent),
in both layouts: NCHW, and NHWC (what executor.channels_last auto picks for LeNet-5 on the CPU), each
against the plain step in the same layout. Target for the cheap estimator: <= 2.0x a plain step."""
from common import alternating_ms, header, lenet_setup, step_fn

from raysweep.members import LoopedMembers

VARIANTS = {
    "double_backward n_proj=1": {"estimator": "double_backward", "n_proj": 1},
    "double_backward n_proj=4": {"estimator": "double_backward", "n_proj": 4},
    "forward_mode": {"estimator": "forward_mode", "n_proj": 1},
}


def main():
    header("Jacobian regularisation: JR step / plain step, K=3 LeNet-5, B=128")
    cfg, _, members, x, y = lenet_setup(3)
    for layout, nhwc in (("NCHW", False), ("NHWC", True)):
        plain_fn = step_fn(LoopedMembers, cfg, members, x, y, nhwc)
        for name, jr in VARIANTS.items():
            cfg_jr = cfg.model_copy(deep=True)
            cfg_jr.train.jr.lambda_jr = 0.05
            for key, value in jr.items():
                setattr(cfg_jr.train.jr, key, value)
            fn = step_fn(LoopedMembers, cfg_jr, members, x, y, nhwc)
            t, p = alternating_ms(fn, plain_fn)
            print(f"{layout} {name:<26} {t:7.1f} ms  plain {p:6.1f} ms  {t / p:5.2f}x plain", flush=True)


if __name__ == "__main__":
    main()
