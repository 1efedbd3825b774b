import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_cfg

from raysweep.attacks.adversarial import (
    AdversarialTrainingConfig,
    ensemble_examples,
    member_examples,
)
from raysweep.core.data import load_dataset
from raysweep.core.seeding import generator
from raysweep.members import LoopedMembers, VmappedMembers
from raysweep.training.trainer import build_members, fit


def members_and_batch(k=3, b=8):
    cfg = make_cfg(ensemble={"k": k})
    data = load_dataset(cfg.data, 0)
    x, y = data.test.batch(torch.arange(b))
    return build_members(cfg, data, k), x, y


def test_ensemble_adv_step_follows_gradient_of_averaged_model():
    members, x, y = members_and_batch()

    class Averaged(torch.nn.Module):  # the ensemble written out as one model
        def forward(self, z):
            return torch.stack([m(z).softmax(-1) for m in members]).mean(0).log()

    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.nll_loss(Averaged()(xr), y, reduction="sum"), xr)
    cfg = AdversarialTrainingConfig(mode="ensemble", eps=2.0, norm="l2", steps=1, step_size=0.5, start="none")
    w = torch.full((3,), 1 / 3)
    stacked = lambda z: torch.stack([m(z) for m in members])  # noqa: E731
    x_adv = ensemble_examples(stacked, x, y, w, cfg)
    direction = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    expected = (x + 0.5 * direction).clamp(0, 1)  # l2 step: the exact gradient direction, not just its sign
    assert torch.allclose(x_adv, expected, atol=1e-6)


@pytest.mark.parametrize("rule", ["sign", "adam"])
def test_ensemble_adv_stays_in_ball(rule):
    members, x, y = members_and_batch()
    cfg = AdversarialTrainingConfig(mode="ensemble", eps=0.1, steps=7, step_rule=rule, sigma=0.2)
    x_adv = ensemble_examples(lambda z: torch.stack([m(z) for m in members]), x, y, torch.full((3,), 1 / 3), cfg,
                              generator(0, "t"))
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1


def test_member_examples_use_own_eps_and_never_see_other_members():
    members, x, y = members_and_batch(k=2)
    cfg = AdversarialTrainingConfig(mode="member", eps=[0.05, 0.2], steps=3)
    xs, ys = x.expand(2, *x.shape), y.expand(2, -1)

    def run(ms):
        ex = LoopedMembers(ms, torch.device("cpu"))
        return member_examples(lambda z: ex.stacked_logits(z, per_member=True), xs, ys, cfg, generator(0, "m"))

    a = run(members)
    other = copy.deepcopy(members)
    torch.nn.init.normal_(other[1].head.weight)  # change member 1 only
    b = run(other)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    assert (a[0] - xs[0]).abs().max() <= 0.05 + 1e-6 and (a[1] - xs[1]).abs().max() > 0.1


def test_separate_adv_training_members_independent():
    base = dict(ensemble={"k": 2, "method": "independent"},
                train={"epochs": 1, "adversarial": {"mode": "member", "eps": 0.1, "steps": 2}})
    cfg = make_cfg(**base)
    data = load_dataset(cfg.data, 0)
    members = build_members(cfg, data, 2)
    changed = copy.deepcopy(members)
    torch.nn.init.normal_(changed[1].head.weight)
    a = fit(cfg, data, progress=False, executor=LoopedMembers(copy.deepcopy(members), torch.device("cpu")))
    b = fit(cfg, data, progress=False, executor=LoopedMembers(changed, torch.device("cpu")))
    pa, pb = (torch.cat([p.flatten() for p in r.ensemble.members[0].parameters()]) for r in (a, b))
    assert torch.equal(pa, pb)


JOINT = {
    "ensemble_adv": {"loss": "ensemble_ce", "adversarial": {"mode": "ensemble", "eps": 0.1, "steps": 3}},
    "pdd_deg": {"pdd": {"m": 6}, "deg": {"lambda_deg": 0.5}},
    # At init the members agree, so det(M^T M) is ~1e-7 and its log amplifies the 1e-7 float differences
    # between looped and vmapped convolutions about 1e6-fold; offset 1e-2 bounds that amplification.
    "adp": {"adp": {"det_offset": 1e-2}},
    # l2 steps: a sign step flips where a gradient entry is ~0, so 1e-7 float noise can move a pixel by a whole step.
    "pdd_pgd": {"pdd": {"m": 6}, "adversarial": {"mode": "member", "eps": 1.0, "norm": "l2", "steps": 2,
                                                 "clean": True}},
    "member_eps_jr": {"jr": {"lambda_jr": 0.1}, "adversarial": {"mode": "member", "eps": [0.0, 0.05, 0.1], "steps": 2}},
}


@pytest.mark.parametrize("name", sorted(JOINT))
def test_loop_and_vmap_agree_for_joint_methods(name):
    cfg = make_cfg(ensemble={"k": 3, "method": "joint"},
                   train={"epochs": 1, "optimizer": "sgd", "lr": 0.05, **JOINT[name]})
    data = load_dataset(cfg.data, 0)
    members = build_members(cfg, data, 3)
    a = fit(cfg, data, progress=False, executor=LoopedMembers(copy.deepcopy(members), torch.device("cpu")))
    b = fit(cfg, data, progress=False, executor=VmappedMembers(copy.deepcopy(members), torch.device("cpu")))
    for ma, mb, m0 in zip(a.ensemble.members, b.ensemble.members, members):
        for (n, pa), pb, p0 in zip(ma.named_parameters(), mb.parameters(), m0.parameters()):
            assert not torch.equal(pa, p0), f"{n} did not train"
            assert torch.allclose(pa, pb, atol=1e-5), (n, (pa - pb).abs().max())


def test_pdd_is_off_at_eval_time():
    cfg = make_cfg(ensemble={"k": 3, "method": "joint"}, train={"epochs": 1, "pdd": {"m": 6}})
    data = load_dataset(cfg.data, 0)
    ens = fit(cfg, data, progress=False).ensemble
    x = data.test.batch(torch.arange(16))[0]
    with torch.no_grad():
        out1, out2 = ens.stacked_logits(x), ens.stacked_logits(x)
        plain = torch.stack([m.head(m.features(x)) for m in ens.members])
    assert torch.equal(out1, out2) and torch.equal(out1, plain)


def test_width_multiplier_gives_parameter_matched_baseline():
    cfg = make_cfg()
    data = load_dataset(cfg.data, 0)
    n = lambda w: sum(p.numel() for p in build_members(make_cfg(model={"width": w}), data, 1)[0].parameters())  # noqa
    assert 1.8 < n(1.45) / n(1.0) < 2.2  # DoubleAdv for K=2


def test_robustness_probe_reads_every_epoch_without_touching_training():
    """train.probe adds PGD accuracy on fixed test images to each epoch's row: lower at a larger eps,
    and the members trained are the same as without it (its own random stream)."""
    base = dict(ensemble={"k": 2, "method": "independent"}, train={"epochs": 2, "optimizer": "adam", "lr": 2e-3},
                data={"train_size": 256, "test_size": 128})
    plain = make_cfg(**base)
    data = load_dataset(plain.data, plain.seed)
    results = {}
    for eps in (0.02, 0.3):
        cfg = make_cfg(**{**base, "train": {**base["train"], "probe": {"eps": eps, "steps": 3, "samples": 64}}})
        results[eps] = fit(cfg, data, progress=False)
    reference = fit(plain, data, progress=False)
    for result in results.values():
        assert [r["epoch"] for r in result.state.history] == [0, 1]
        for got, want in zip(result.ensemble.parameters(), reference.ensemble.parameters()):
            assert torch.equal(got, want)
    low, high = (results[e].state.history[-1]["probe_acc"] for e in (0.02, 0.3))
    assert 0 <= high < low <= 1
