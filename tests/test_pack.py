"""Trial packing (training/pack.py): N trials stepped together as one ensemble of N x K members end as
each ends alone."""
import pytest
import torch
from conftest import make_cfg

from raysweep.core.data import load_dataset
from raysweep.training.pack import fit_pack, pack_key, packs
from raysweep.training.trainer import fit


def _cfg(lr, lambda_jr, vectorize="loop", estimator="double_backward", method="bagging", k=3, **extra):
    return make_cfg(ensemble={"k": k, "method": method}, executor={"vectorize": vectorize},
                    data={"train_size": 192, "batch_size": 48},
                    train={"epochs": 2, "optimizer": "adam", "lr": lr,
                           "jr": {"lambda_jr": lambda_jr, "estimator": estimator}, **extra})


MADRY = {"mode": "member", "norm": "linf", "steps": 2}


@pytest.mark.parametrize("vectorize, estimator, method, eps", [
    ("loop", "double_backward", "bagging", None),
    ("vmap", "double_backward", "bagging", None),
    ("vmap", "forward_mode", "independent", None),
    ("loop", "double_backward", "snapshot", None),
    ("vmap", "double_backward", "independent", [[0.05, 0.1, 0.08], 0.03, [0.02, 0.04, 0.06]]),  # robust ensembles
])
def test_a_packed_trial_ends_as_it_ends_alone(vectorize, estimator, method, eps):
    """Three trials with their own learning rate and lambda_JR (and per-member adversarial eps): the same
    members, losses and accuracies as each trained alone (same seed). A pack that drew one stream of JR
    directions or attack starts for all 3 x K members, or mixed the trials' gradients, learning rates or
    eps, would part from the lone runs at the first step."""
    trials = [(1e-3, 0.1), (3e-3, 0.5), (5e-4, 0.02)]
    cfgs = [_cfg(lr, lam, vectorize, estimator, method,
                 **({"adversarial": {**MADRY, "eps": eps[i]}} if eps else {})) for i, (lr, lam) in enumerate(trials)]
    data = load_dataset(cfgs[0].data, 0)
    # Break the exact ties of clipped synthetic images (see test_executors: loop and vmap kernels may route
    # a tied max-pool's gradient differently); one thread fixes the reduction order.
    data.train.x = data.train.x + 0.005 * torch.rand(data.train.x.shape, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        epochs_seen = [[] for _ in cfgs]
        hooks = [(lambda event, state, i=i: event == "epoch" and epochs_seen[i].append(state.epoch),)
                 for i in range(len(cfgs))]
        packed = fit_pack(cfgs, data, progress=False, callbacks=hooks)
        alone = [fit(cfg, data, progress=False) for cfg in cfgs]
    finally:
        torch.set_num_threads(threads)
    assert epochs_seen == [[0, 1]] * 3
    for p, a in zip(packed, alone):
        assert p.info["packed"] == 3 and p.state.step == a.state.step == 8
        for rp, ra in zip(p.state.history, a.state.history):
            assert rp["loss"] == pytest.approx(ra["loss"], abs=1e-5)
            assert rp["train_acc"] == pytest.approx(ra["train_acc"], abs=1e-9)
        assert p.ensemble.k == a.ensemble.k == 3
        for mp, ma in zip(p.ensemble.members, a.ensemble.members):
            for (name, pp), pa in zip(mp.named_parameters(), ma.parameters()):
                assert torch.allclose(pp, pa, atol=1e-5), (name, (pp - pa).abs().max())
    # The trials did differ: different learning rates and penalties give different members.
    assert not torch.allclose(next(packed[0].ensemble.members[0].parameters()),
                              next(packed[1].ensemble.members[0].parameters()), atol=1e-3)


def test_only_trials_that_differ_in_lr_and_lambda_jr_share_a_pack():
    cfgs = [_cfg(1e-3, 0.1), _cfg(2e-3, 0.3),             # one pack
            _cfg(1e-3, 0.0),                               # JR off: another pack
            _cfg(1e-3, 0.1, k=2),                          # another K
            _cfg(1e-3, 0.1, method="independent"),         # another method
            _cfg(1e-3, 0.1, method="joint", loss="ensemble_ce"),  # an ensemble-level loss: alone
            _cfg(1e-3, 0.2),
            _cfg(1e-3, 0.1, adversarial={**MADRY, "eps": 0.1}),     # Madry: a pack of its own, any eps
            _cfg(1e-3, 0.1, adversarial={**MADRY, "eps": [0.1, 0.2, 0.3]}),
            _cfg(1e-3, 0.1, method="joint", adversarial={**MADRY, "mode": "ensemble", "eps": 0.1})]  # Ensemble-Adv
    assert packs(cfgs) == [[0, 1, 6], [2], [3], [4], [5], [7, 8], [9]]
    assert pack_key(cfgs[5]) is None and pack_key(cfgs[9]) is None
    # The evaluation and the run's name are not training: they may differ within a pack.
    other = make_cfg(**{**cfgs[0].model_dump(), "name": "other", "eval": {"uap": None, "jacobian_samples": 7}})
    assert pack_key(other) == pack_key(cfgs[0])
    with pytest.raises(ValueError, match="one pack"):
        fit_pack([cfgs[0], cfgs[3]], load_dataset(cfgs[0].data, 0), progress=False)
