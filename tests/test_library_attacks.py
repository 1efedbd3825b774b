"""ART's attacks on the wrapped ensemble (real ART, real ensemble)."""
import numpy as np
import torch

from raysweep.attacks import robust_accuracy
from raysweep.attacks.cw import CWL2Config, cw_l2, cw_l2_batch
from raysweep.attacks.library import (
    AutoAttackConfig,
    JSMAConfig,
    art_classifier,
    autoattack,
    jsma,
)
from raysweep.attacks.pgd import AttackConfig

CPU = torch.device("cpu")


def test_art_sees_the_ensemble_scores(trained_synthetic):
    _, data, ens = trained_synthetic
    x = data.test.batch(torch.arange(20))[0]
    clf = art_classifier(ens, data.image_shape, 4, CPU)
    with torch.no_grad():
        assert np.allclose(clf.predict(x.numpy()), ens(x).numpy(), atol=1e-5)


def test_autoattack_flags_and_monotone(trained_synthetic):
    _, data, ens = trained_synthetic
    cfg = AutoAttackConfig(eps=[0.0, 0.05, 0.15, 1.0], max_iter=10, square_queries=30, samples=100)
    res, flags = autoattack(ens, data.test, cfg, 4, 100, CPU)
    accs = [res["per_eps"][str(e)]["acc"] for e in cfg.eps]
    assert accs[0] == res["clean_acc"] and accs[-1] == 0.0
    assert all(b <= a for a, b in zip(accs, accs[1:]))
    for r in res["per_eps"].values():  # each attack only removes robust samples
        after = list(r["after"].values())
        assert all(b <= a for a, b in zip(after, after[1:])) and after[-1] == r["acc"]
    pgd = AttackConfig(name="p", eps=[0.15], steps=10)
    pgd_acc = robust_accuracy(ens.stacked_logits, data.test, pgd, 0.15, ens.weights, "probability", 100, "cpu")[0]
    assert res["per_eps"]["0.15"]["acc"] <= pgd_acc + 0.1  # at least about as strong as our PGD-10
    assert all(flags[str(e)].sum().item() / len(flags[str(e)]) == res["per_eps"][str(e)]["acc"] for e in cfg.eps)


def test_cw_l2_fools_with_small_perturbations(trained_synthetic):
    _, data, ens = trained_synthetic
    cfg = CWL2Config(learning_rate=0.05, max_iter=50, binary_search_steps=4, initial_const=1.0, samples=60)
    x, y = data.test.batch(torch.arange(60))
    x_adv, success, l2 = cw_l2_batch(ens.stacked_logits, x, y, ens.weights, "probability", cfg)
    assert success.float().mean() > 0.9 and 0 <= x_adv.min() and x_adv.max() <= 1
    assert torch.allclose(l2[success], (x_adv - x)[success].flatten(1).norm(dim=1), atol=1e-4)
    with torch.no_grad():
        assert (ens(x_adv[success]).argmax(1) != y[success]).all()
    pgd = AttackConfig(name="p", eps=[1.0], norm="l2", steps=10)  # C&W finds smaller l2 than PGD needs
    pgd_acc = robust_accuracy(ens.stacked_logits, data.test, pgd, float(l2[success].median()), ens.weights,
                              "probability", 100, "cpu")[0]
    assert pgd_acc > 0.3
    res = cw_l2(ens.stacked_logits, data.test, cfg, ens.weights, "probability", 60, "cpu")
    assert res["acc"] < 0.1 and res["mean_l2_of_successes"] > 0


def test_jsma_fools_the_ensemble(trained_synthetic):
    _, data, ens = trained_synthetic
    js = jsma(ens, data.test, JSMAConfig(samples=30), 4, 30, CPU)
    assert js["acc"] < 0.5 and 0 < js["mean_l0_fraction"] <= 0.1 + 1e-9
