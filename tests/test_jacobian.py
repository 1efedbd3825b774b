import torch
from conftest import make_cfg
from torch.func import jacrev

from raysweep.core.data import load_dataset
from raysweep.core.seeding import generator
from raysweep.evaluation.jacobian import ensemble_jacobian_norms
from raysweep.members import LoopedMembers
from raysweep.regularisers.jacobian import (
    jacobian_sq_norm_estimate,
    jacobian_sq_norm_exact,
)
from raysweep.training.trainer import build_members, fit


def stacked_setup(k=2, b=3):
    cfg = make_cfg(ensemble={"k": k})
    data = load_dataset(cfg.data, 0)
    ex = LoopedMembers(build_members(cfg, data, k), torch.device("cpu"))
    x = data.train.batch(torch.arange(k * b))[0].view(k, b, 1, 28, 28).requires_grad_(True)
    return ex, x


def test_exact_norm_matches_jacrev():
    ex, x = stacked_setup()
    exact = jacobian_sq_norm_exact(ex.stacked_logits(x, per_member=True), x)
    for k, member in enumerate(ex.members):
        for i in range(x.shape[1]):
            jac = jacrev(member)(x[k, i:i + 1].detach())
            assert torch.allclose(exact[k, i], jac.pow(2).sum(), rtol=1e-4)


def test_projection_estimator_is_unbiased():
    # Mean over 3000 projections within 3% of the exact norm (its standard error here is < 1%).
    ex, x = stacked_setup()
    logits = ex.stacked_logits(x, per_member=True)
    est = jacobian_sq_norm_estimate(logits, x, n_proj=3000, generator=generator(0, "t"), create_graph=False)
    exact = jacobian_sq_norm_exact(logits, x)
    assert torch.allclose(est, exact, rtol=0.03), (est, exact)
    one = jacobian_sq_norm_estimate(logits, x, n_proj=1, generator=generator(1, "t"), create_graph=False)
    assert not torch.allclose(one, exact, rtol=0.03)  # a single projection is noisy: the test above means something


def test_ensemble_jacobian_is_convex_combination():
    cfg = make_cfg(ensemble={"k": 3})
    data = load_dataset(cfg.data, 0)
    members = build_members(cfg, data, 3)
    w = torch.tensor([0.5, 0.3, 0.2])
    x = data.test.batch(torch.arange(4))[0]
    member_sq, ens_sq = ensemble_jacobian_norms(lambda z: torch.stack([m(z) for m in members]), x, w)
    combined = lambda z: sum(c * m(z) for c, m in zip(w, members))  # noqa: E731
    for i in range(4):
        assert torch.allclose(ens_sq[i], jacrev(combined)(x[i:i + 1]).pow(2).sum(), rtol=1e-4)
        assert torch.allclose(member_sq[1, i], jacrev(members[1])(x[i:i + 1]).pow(2).sum(), rtol=1e-4)
    _, same = ensemble_jacobian_norms(lambda z: torch.stack([members[0](z)] * 3), x, w)
    assert torch.allclose(same, member_sq[0], rtol=1e-5)  # identical members: J_F = J_1


def params(ensemble):
    return torch.cat([p.detach().flatten() for m in ensemble.members for p in m.parameters()])


def test_lambda_zero_is_plain_training_and_lambda_shrinks_jacobian():
    base = dict(data={"train_size": 256}, train={"epochs": 3, "optimizer": "adam", "lr": 2e-3})
    cfg_plain = make_cfg(**base)
    data = load_dataset(cfg_plain.data, 0)
    plain = fit(cfg_plain, data, progress=False).ensemble
    zero = fit(make_cfg(**{**base, "train": {**base["train"], "jr": {"lambda_jr": 0.0, "n_proj": 3}}}), data,
               progress=False).ensemble
    assert torch.equal(params(plain), params(zero))
    strong = fit(make_cfg(**{**base, "train": {**base["train"], "jr": {"lambda_jr": 1.0}}}), data,
                 progress=False).ensemble
    x = data.test.batch(torch.arange(64))[0]
    norm = lambda e: ensemble_jacobian_norms(e.stacked_logits, x, e.weights)[0].mean()  # noqa: E731
    assert norm(strong) < 0.7 * norm(plain), (norm(strong), norm(plain))
