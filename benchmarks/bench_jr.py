"""Jacobian-regularised step vs plain step (K=3 LeNet-5, B=128, looped members)."""
from common import header, lenet_setup, median_ms, step_fn

from raysweep.executors import LoopedMembers


def main():
    header("Jacobian regularisation: JR step vs plain step, K=3 LeNet-5")
    cfg, _, members, x, y = lenet_setup(3)
    plain = median_ms(step_fn(LoopedMembers, cfg, members, x, y))
    for n_proj in (1, 4):
        cfg_jr = cfg.model_copy(deep=True)
        cfg_jr.train.jr.lambda_jr, cfg_jr.train.jr.n_proj = 0.05, n_proj
        jr = median_ms(step_fn(LoopedMembers, cfg_jr, members, x, y))
        print(f"n_proj={n_proj}: plain {plain:6.1f} ms  JR {jr:6.1f} ms  JR/plain {jr / plain:4.2f}x")


if __name__ == "__main__":
    main()
