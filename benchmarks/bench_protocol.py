"""The strong evaluation protocol on a K=3 LeNet-5 ensemble (Fashion-MNIST, trained here for 3 epochs
on 12k images) and 1000 test images at l_inf eps 0.1: seconds and forward passes per stage, and the
minimum-norm attack's whole curve against PGD-20 run once per eps of a 3-point grid, and the
native APGD and Square (attacks/apgd.py, attacks/square.py) against ART's on the same images
(1000 queries for Square).

Needs Debian's dataset-fashion-mnist (or a download); minutes on 2 CPU cores, so not in `make bench`:
    python benchmarks/bench_protocol.py
"""
import time

import numpy as np
import torch
from common import DEVICE, header

from raysweep.attacks.library import AutoAttackConfig, art_classifier, make_attack, native_attack
from raysweep.attacks.minnorm import accuracy_at, fmn
from raysweep.attacks.pgd import AttackConfig, robust_accuracy
from raysweep.config import validate_config
from raysweep.core.data import load_dataset
from raysweep.core.seeding import generator
from raysweep.run import evaluate
from raysweep.training.trainer import fit


def main(images: int = 1000, eps: float = 0.1):
    header(f"strong protocol, K=3 LeNet-5, {images} Fashion-MNIST test images, l_inf eps {eps}")
    raw = {"seed": 0, "data": {"dataset": "fashion_mnist", "train_size": 12000, "test_size": images},
           "ensemble": {"k": 3, "method": "independent"}, "train": {"epochs": 3, "optimizer": "adam", "lr": 1e-3},
           "executor": {"device": DEVICE.type},
           "eval": {"uap": None, "jacobian_samples": 0, "diversity_samples": 0,
                    "protocol": {"level": "strong", "eps": [eps], "samples": images}}}
    cfg = validate_config(raw)
    data = load_dataset(cfg.data, cfg.seed)
    ensemble = fit(cfg, data, progress=False).ensemble.to(DEVICE).eval()
    t0 = time.perf_counter()
    report = evaluate(ensemble, data, cfg, progress=False)
    total = time.perf_counter() - t0
    ladder = report.details["protocol"]
    per = ladder["per_eps"][str(float(eps))]
    print(f"clean {report.results['clean_acc'].value:.4f}  strong {per['acc']:.4f}  whole evaluation {total:.1f} s "
          f"(masking checks included)  flags: {sorted(report.masking) or 'none'}")
    print(f"{'stage':<11}{'acc after':>10}{'broke':>7}{'seconds':>9}{'forward (images)':>18}{'with graph':>12}")
    for s in ladder["stages"]:
        p = ladder["passes"][s]
        print(f"{s:<11}{per['after'][s]:>10.4f}{per['broken'][s]:>7}{per['seconds'][s]:>9.1f}{p['forward']:>18,}"
              f"{p['with_grad']:>12,}")

    grid = [0.02, 0.05, 0.1]
    split = data.test.head(images)
    x, y = split.batch(torch.arange(len(split)), DEVICE)
    t0 = time.perf_counter()
    norms = torch.cat([fmn(ensemble.stacked_logits, x[i:i + 500], y[i:i + 500], ensemble.weights, steps=100)
                       for i in range(0, len(y), 500)])
    t_fmn = time.perf_counter() - t0
    t0 = time.perf_counter()
    pgd = {e: robust_accuracy(ensemble.stacked_logits, split, AttackConfig(name="pgd", eps=[e], steps=20), e,
                              ensemble.weights, "probability", 500, DEVICE)[0] for e in grid}
    t_pgd = time.perf_counter() - t0
    print("eps        " + "".join(f"{e:>8}" for e in grid))
    print("PGD-20     " + "".join(f"{pgd[e]:>8.4f}" for e in grid) + f"   {t_pgd:.1f} s (one run per eps)")
    print("FMN-100    " + "".join(f"{accuracy_at(norms, e):>8.4f}" for e in grid) + f"   {t_fmn:.1f} s (one run, "
          f"every eps; median norm {norms.median().item():.4f})")

    clean = ensemble(x).argmax(1) == y
    clf = art_classifier(ensemble, data.image_shape, data.num_classes, DEVICE)
    aa = AutoAttackConfig(eps=[eps], square_queries=1000)
    for name in ("apgd-ce", "apgd-dlr", "square"):
        t0 = time.perf_counter()
        fooled = torch.cat([native_attack(name, ensemble, x[i:i + 500], y[i:i + 500], eps, aa, generator(0, name, i))
                            for i in range(0, len(y), 500)])
        t_native = time.perf_counter() - t0
        np.random.seed(0)
        t0 = time.perf_counter()
        x_adv = make_attack(name, clf, eps, aa, 500).generate(x.cpu().numpy(), y=y.cpu().numpy())
        t_art = time.perf_counter() - t0
        art = (clean.cpu().numpy() & (clf.predict(x_adv, batch_size=500).argmax(1) == y.cpu().numpy())).mean()
        print(f"{name} at eps {eps}: native {(clean & ~fooled).float().mean().item():.4f} in {t_native:.1f} s, "
              f"ART {art:.4f} in {t_art:.1f} s (native {t_art / t_native:.2f}x faster)")

if __name__ == "__main__":
    main()
