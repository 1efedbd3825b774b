import pytest
import torch
import torch.nn.functional as F

from raysweep.attacks import attack_batch, robust_accuracy
from raysweep.attacks.pgd import AttackConfig
from raysweep.attacks.uap import UAPConfig, evaluate_uap, sgd_uap, uap_init
from raysweep.core.objectives import OBJECTIVES
from raysweep.core.seeding import generator
from raysweep.evaluation.robust import accuracies


def setup(trained_synthetic, n=64):
    cfg, data, ens = trained_synthetic
    x, y = data.test.batch(torch.arange(n))
    return data, ens, x, y


def test_objectives_match_hand_formulas():
    torch.manual_seed(0)
    stacked, y, w = torch.randn(3, 5, 4), torch.randint(0, 4, (5,)), torch.tensor([0.2, 0.3, 0.5])
    mean_prob = (w.view(3, 1, 1) * stacked.softmax(-1)).sum(0)
    assert torch.allclose(OBJECTIVES["ce_prob"](stacked, y, w), -mean_prob.log()[range(5), y], atol=1e-6)
    mean_logit = (w.view(3, 1, 1) * stacked).sum(0)
    assert torch.allclose(OBJECTIVES["ce_logit"](stacked, y, w), F.cross_entropy(mean_logit, y, reduction="none"))
    z = mean_prob.log()
    margin = torch.stack([max(z[i, j] for j in range(4) if j != y[i]) - z[i, y[i]] for i in range(5)])
    assert torch.allclose(OBJECTIVES["cw_margin"](stacked, y, w), margin, atol=1e-6)
    member = torch.stack([F.cross_entropy(stacked[k], y, reduction="none") for k in range(3)])
    assert torch.allclose(OBJECTIVES["mean_member_ce"](stacked, y, w), (w.view(3, 1) * member).sum(0))


@pytest.mark.parametrize("norm, rule", [("linf", "sign"), ("l2", "sign"), ("linf", "adam")])
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_pgd_stays_in_ball_and_image_range(trained_synthetic, norm, rule, objective):
    _, ens, x, y = setup(trained_synthetic, 32)
    eps = 0.1 if norm == "linf" else 1.5
    x_adv, _ = attack_batch(ens.stacked_logits, x, y, ens.weights, objective, eps, norm, steps=5, step_size=eps / 2,
                            start=True, step_rule=rule, generator=generator(0, "t"))
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert size.max() <= eps + 1e-5 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert size.max() > 0.5 * eps  # it moved


def test_fgsm_is_one_signed_gradient_step(trained_synthetic):
    _, ens, x, y = setup(trained_synthetic, 16)
    x_req = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(OBJECTIVES["ce_prob"](ens.stacked_logits(x_req), y, ens.weights).sum(), x_req)
    expected = (x + 0.05 * g.sign()).clamp(0, 1)
    x_adv, fooled = attack_batch(ens.stacked_logits, x, y, ens.weights, "ce_prob", 0.05, steps=1, step_size=0.05,
                                 start=False)
    assert torch.allclose(x_adv[~fooled], expected[~fooled], atol=1e-6)


def test_robust_accuracy_falls_with_eps_and_breaks_trivially(trained_synthetic):
    cfg, data, ens = trained_synthetic
    attack = AttackConfig(name="pgd", eps=[0.0], steps=10)
    acc = [robust_accuracy(ens.stacked_logits, data.test, attack, e, ens.weights, "probability", 100, "cpu")[0]
           for e in (0.0, 0.05, 0.1, 0.2, 0.4)]
    clean = accuracies(ens.stacked_logits, data.test, ens.weights, "probability", 100, "cpu")[0]
    assert clean > 0.9 and acc[0] == clean
    assert all(b <= a for a, b in zip(acc, acc[1:])), acc
    assert acc[-2] < clean - 0.2
    # eps = 1 lets the attacker paint any image: nothing survives.
    assert robust_accuracy(ens.stacked_logits, data.test, attack, 1.0, ens.weights, "probability", 100, "cpu")[0] == 0


@pytest.mark.parametrize("norm, eps, rule, objective", [("linf", 0.1, "sign", "ce_prob"), ("l2", 1.5, "sign", "cw_margin"),
                                                       ("linf", 0.06, "adam", "ce_logit")])
def test_robust_accuracy_does_not_depend_on_the_evaluation_batch_size(trained_synthetic, norm, eps, rule, objective):
    """Each image is attacked alone: a loss or a step normalised over the batch (a classic bug) would
    make an image's fate depend on its batch mates. No random start, so every batching draws alike."""
    _, data, ens = trained_synthetic
    attack = AttackConfig(name="pgd", eps=[eps], steps=8, random_start=False, norm=norm, step_rule=rule,
                          objectives=[objective])
    runs = [robust_accuracy(ens.stacked_logits, data.test, attack, eps, ens.weights, "probability", b, "cpu")
            for b in (7, 64, 200)]
    assert 0 < runs[0][0] < 1
    for acc, flags in runs[1:]:
        assert torch.equal(flags, runs[0][1]) and acc == runs[0][0]


def test_more_steps_and_restarts_never_raise_robust_accuracy(trained_synthetic):
    cfg, data, ens = trained_synthetic
    accs = []
    for steps, restarts in [(2, 1), (5, 1), (20, 1), (20, 3)]:
        attack = AttackConfig(name="pgd", eps=[0.1], steps=steps, step_size=0.02, restarts=restarts,
                              objectives=["ce_prob", "cw_margin"] if restarts > 1 else ["ce_prob"])
        accs.append(robust_accuracy(ens.stacked_logits, data.test, attack, 0.1, ens.weights, "probability", 100,
                                    "cpu")[0])
    assert all(b <= a for a, b in zip(accs, accs[1:])), accs
    assert accs[-1] < accs[0]


def test_uap_seeds_batched_equal_one_at_a_time_and_stay_in_ball(trained_synthetic):
    _, data, ens = trained_synthetic
    eps = 0.2
    init = uap_init(4, data.train.x.shape[1:], eps, generator(0, "init"))
    kw = dict(eps=eps, iterations=6, batch_size=50, step_size=0.03, objective="ce_prob", weights=ens.weights,
              how="probability")
    batched = sgd_uap(ens.stacked_logits, data.train, init, generator=generator(0, "order"), chunk=4, **kw)
    assert batched.abs().max() <= eps + 1e-6 and batched.shape == init.shape
    chunked = sgd_uap(ens.stacked_logits, data.train, init, generator=generator(0, "order"), chunk=3, **kw)
    assert torch.allclose(chunked, batched, atol=1e-6)
    for s in range(4):
        alone = sgd_uap(ens.stacked_logits, data.train, init[s:s + 1], generator=generator(0, "order"), **kw)
        assert torch.allclose(alone[0], batched[s], atol=1e-6)


def test_uap_step_fraction_steps_a_fraction_of_each_eps(trained_synthetic):
    """step_fraction 0.8 (sgd-uap-torch's rule) over an eps grid crafts, at each eps, the UAP of a fixed
    step of 0.8 eps at that eps alone; unset, the step stays eps / 20 exactly."""
    from pydantic import ValidationError

    _, data, ens = trained_synthetic
    kw = dict(seeds=2, iterations=8, batch_size=64, selection_size=100)
    run = lambda cfg: evaluate_uap(ens.stacked_logits, data.train, data.test, cfg, ens.weights,  # noqa: E731
                                   "probability", 200, "cpu")
    grid = run(UAPConfig(eps=[0.1, 0.3], step_fraction=0.8, **kw))
    for eps in (0.1, 0.3):
        alone = run(UAPConfig(eps=[eps], step_size=0.8 * eps, **kw))
        assert torch.equal(grid["deltas"][eps], alone["deltas"][eps]) and grid["acc"][eps] == alone["acc"][eps]
    assert not torch.equal(grid["deltas"][0.3], run(UAPConfig(eps=[0.3], **kw))["deltas"][0.3])
    assert [UAPConfig().step(e) for e in (0.1, 0.15)] == [0.1 / 20, 0.15 / 20]
    with pytest.raises(ValidationError, match="step_size .* or step_fraction"):
        UAPConfig(step_size=0.01, step_fraction=0.5)


def test_uap_accuracy_drops_and_worst_seed_is_kept(trained_synthetic):
    _, data, ens = trained_synthetic
    cfg = UAPConfig(eps=[0.1, 0.3], seeds=4, iterations=15, batch_size=64, selection_size=200)
    res = evaluate_uap(ens.stacked_logits, data.train, data.test, cfg, ens.weights, "probability", 200, "cpu")
    clean = accuracies(ens.stacked_logits, data.test, ens.weights, "probability", 100, "cpu")[0]
    assert res["acc"][0.3] < clean and res["acc"][0.3] <= res["acc"][0.1] + 0.05
    for eps, delta in res["deltas"].items():
        assert delta.abs().max() <= eps + 1e-6
