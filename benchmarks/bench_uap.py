"""SGD-UAP: S seeds optimised together (all in one forward, or chunked as by default) vs one seed at
a time. Same total work and the same deltas."""
from common import DEVICE, header, lenet_setup, median_ms

from raysweep.attacks.uap import seeds_per_forward, sgd_uap, uap_init
from raysweep.core.seeding import generator
from raysweep.core.ensemble import Ensemble


def main():
    header("UAP: seeds batched vs one at a time, K=3 LeNet-5, 5 iterations of batch 100")
    _, data, members, _, _ = lenet_setup(3)
    ens = Ensemble(members).to(DEVICE).eval()
    for p in ens.parameters():
        p.requires_grad_(False)
    for seeds in (10, 50):
        init = uap_init(seeds, data.train.x.shape[1:], 0.1, generator(0, "init"))
        kw = dict(eps=0.1, iterations=5, batch_size=100, step_size=0.005, objective="ce_prob", weights=ens.weights,
                  how="probability", device=DEVICE)

        def batched():
            sgd_uap(ens.stacked_logits, data.train, init, generator=generator(0, "o"), chunk=seeds, **kw)

        def default():
            sgd_uap(ens.stacked_logits, data.train, init, generator=generator(0, "o"), **kw)

        def one_at_a_time():
            for s in range(seeds):
                sgd_uap(ens.stacked_logits, data.train, init[s:s + 1], generator=generator(0, "o"), **kw)

        b, d, o = median_ms(batched, 3.0), median_ms(default, 3.0), median_ms(one_at_a_time, 3.0)
        chunk = seeds_per_forward(seeds, 100, DEVICE)
        print(f"seeds={seeds}: one at a time {o:8.1f} ms  all seeds in one forward {b:8.1f} ms ({o / b:4.2f}x)  "
              f"default ({chunk} seeds per forward) {d:8.1f} ms ({o / d:4.2f}x)")


if __name__ == "__main__":
    main()
