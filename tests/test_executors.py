import copy

import pytest
import torch
from conftest import make_cfg

from raysweep.core.data import load_dataset
from raysweep.core.models import build_member
from raysweep.errors import ConfigError
from raysweep.members import LoopedMembers, VmappedMembers, make_local_executor
from raysweep.training.trainer import build_members, fit


@pytest.mark.parametrize("arch", ["lenet5", "small_cnn"])
def test_vmap_and_loop_give_same_logits(arch):
    cfg = make_cfg(model={"arch": arch}, ensemble={"k": 3})
    data = load_dataset(cfg.data, 0)
    members = build_members(cfg, data, 3)
    loop = LoopedMembers(copy.deepcopy(members), torch.device("cpu"))
    vmap = VmappedMembers(copy.deepcopy(members), torch.device("cpu"))
    x = data.test.batch(torch.arange(12))[0]
    assert torch.allclose(loop.stacked_logits(x), vmap.stacked_logits(x), atol=1e-5)
    xk = x.view(3, 4, *x.shape[1:])
    assert torch.allclose(loop.stacked_logits(xk, per_member=True), vmap.stacked_logits(xk, per_member=True), atol=1e-5)


@pytest.mark.parametrize("method, train", [("bagging", {"jr": {"lambda_jr": 0.1, "estimator": "double_backward"}}),
                                           ("bagging", {"jr": {"lambda_jr": 0.1, "estimator": "forward_mode"}}),
                                           ("independent", {}),
                                           ("joint", {"pdd": {"m": 6, "scope": "sample"}})])
def test_vmap_and_loop_give_same_updates(method, train):
    cfg = make_cfg(ensemble={"k": 3, "method": method}, train={"epochs": 2, "optimizer": "sgd", "lr": 0.05, **train})
    data = load_dataset(cfg.data, 0)
    # Synthetic images are clipped to [0, 1], so flat patches give exactly tied activations, where the
    # derivative is not defined and the loop's and vmap's kernels may pick different sides: forward-mode
    # JR then differs by ~3e-5 after 8 steps with one CPU thread (4e-8 with this jitter, which breaks the ties).
    data.train.x = data.train.x + 0.005 * torch.rand(data.train.x.shape, generator=torch.Generator().manual_seed(1))
    # Near-ties stay: the two executors sum in different orders, so their parameters part at ~1e-8 after the
    # first step, and a later max-pool whose two largest inputs lie closer than that can route a gradient
    # through the other unit. In fp32 that is chance, and the thread count moves it: on a 2-core AMD EPYC,
    # forward-mode JR ended 2.7e-5 apart with two threads and 4.5e-8 with one. One thread keeps each
    # executor's reduction order fixed across machines' thread counts; the comparison stays at 1e-5.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        members = build_members(cfg, data, 3)
        a = fit(cfg, data, progress=False, executor=LoopedMembers(copy.deepcopy(members), torch.device("cpu")))
        b = fit(cfg, data, progress=False, executor=VmappedMembers(copy.deepcopy(members), torch.device("cpu")))
    finally:
        torch.set_num_threads(threads)
    assert a.state.step == b.state.step == 8
    for ma, mb, m0 in zip(a.ensemble.members, b.ensemble.members, members):
        for (name, pa), pb, p0 in zip(ma.named_parameters(), mb.parameters(), m0.parameters()):
            assert not torch.allclose(pa, p0), f"{name} did not train"
            assert torch.allclose(pa, pb, atol=1e-5), (name, (pa - pb).abs().max())


def test_auto_loops_on_cpu_and_vmap_refuses_batchnorm():
    member = build_member("resnet18", (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3)
    assert isinstance(make_local_executor([build_member("lenet5", (1, 28, 28), 10, (0.5,), (0.25,))], "auto", "cpu"),
                      LoopedMembers)
    assert isinstance(make_local_executor([member], "auto", "cpu"), LoopedMembers)
    with pytest.raises(ConfigError, match="BatchNorm"):
        VmappedMembers([member], torch.device("cpu"))


@pytest.mark.parametrize("method, train", [
    ("joint", {"pdd": {"m": 6, "period": 3}, "deg": {"lambda_deg": 0.5}}),  # PDD pool spans the epoch boundary
    ("snapshot", {}),
])
def test_trainer_resumes_from_its_state_dict(method, train):
    """What the Ray executor's restarts rely on: members + Trainer.state_dict() after epoch 1 give the
    uninterrupted run's members after epoch 3."""
    from raysweep.training.trainer import Trainer

    cfg = make_cfg(ensemble={"k": 3, "method": method}, data={"train_size": 160, "batch_size": 32},
                   train={"epochs": 3, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, **train})
    data = load_dataset(cfg.data, 0)
    n = 1 if method == "snapshot" else 3
    whole = Trainer(cfg, data, LoopedMembers(build_members(cfg, data, n), torch.device("cpu")), progress=False).run()
    first = Trainer(cfg, data, LoopedMembers(build_members(cfg, data, n), torch.device("cpu")), progress=False)
    first.run_epoch()
    saved, weights = first.state_dict(), [copy.deepcopy(m.state_dict()) for m in first.ex.export_members()]
    members = build_members(cfg, data, n)
    for m, w in zip(members, weights):
        m.load_state_dict(w)
    resumed = Trainer(cfg, data, LoopedMembers(members, torch.device("cpu")), progress=False)
    resumed.load_state_dict(saved)
    result = resumed.run()
    assert result.state.step == whole.state.step and len(result.state.history) == 3
    assert result.ensemble.k == whole.ensemble.k == 3
    for ma, mb in zip(result.ensemble.members, whole.ensemble.members):
        for pa, pb in zip(ma.parameters(), mb.parameters()):
            assert torch.equal(pa, pb)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("method, train, vectorize", [
    ("joint", {"pdd": {"m": 6, "period": 3}, "deg": {"lambda_deg": 0.5}}, "loop"),
    ("bagging", {"jr": {"lambda_jr": 0.1}}, "vmap"),
])
def test_fit_continues_after_an_interruption_from_its_resume_dir(tmp_path, method, train, vectorize):
    """A fair study's variant trains for an hour: killed in its second epoch, it continues from the
    first, saved in resume_dir, and ends where the uninterrupted run ends."""
    from raysweep.training.trainer import saved_epochs

    cfg = make_cfg(ensemble={"k": 3, "method": method}, data={"train_size": 160, "batch_size": 32},
                   executor={"vectorize": vectorize},
                   train={"epochs": 3, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, **train})
    data = load_dataset(cfg.data, 0)
    whole = fit(cfg, data, progress=False)

    def kill_in_epoch_two(event, state):
        if event == "step" and len(state.history) == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        fit(cfg, data, progress=False, callbacks=(kill_in_epoch_two,), resume_dir=tmp_path)
    steps = []
    resumed = fit(cfg, data, progress=False, resume_dir=tmp_path,
                  callbacks=(lambda event, state: event == "step" and steps.append(state.step),))
    assert steps[0] == whole.state.step // 3 + 1  # it started in epoch two, not again from the first
    assert resumed.state.step == whole.state.step and resumed.state.history[0] == whole.state.history[0] | {
        "seconds": resumed.state.history[0]["seconds"]}
    for ma, mb in zip(resumed.ensemble.members, whole.ensemble.members):
        for pa, pb in zip(ma.parameters(), mb.parameters()):
            assert torch.equal(pa, pb)
    assert saved_epochs(tmp_path, cfg)["trainer"]["train_state"]["step"] == whole.state.step
    assert saved_epochs(tmp_path, make_cfg(**{**cfg.model_dump(), "seed": 1})) is None  # another config's
    # Training never reads `eval`: a study whose evaluation changed keeps the epochs it trained.
    other_eval = make_cfg(**{**cfg.model_dump(), "eval": {"uap": None, "jacobian_samples": 7}})
    assert saved_epochs(tmp_path, other_eval)["trainer"]["train_state"]["step"] == whole.state.step


def test_an_unreadable_training_state_is_ignored_not_fatal(tmp_path, capsys):
    """A state file cut short (a full disk, a kill mid-write outside the atomic rename) must not block
    the variant forever: it is reported and training starts from the beginning."""
    from raysweep.training.trainer import EPOCH_STATE

    cfg = make_cfg(ensemble={"k": 2}, data={"train_size": 64, "batch_size": 32}, train={"epochs": 1})
    data = load_dataset(cfg.data, 0)
    (tmp_path / EPOCH_STATE).write_bytes(b"PK\x03\x04 truncated")
    result = fit(cfg, data, progress=False, resume_dir=tmp_path)
    assert "ignoring the unreadable training state" in capsys.readouterr().err
    assert result.state.step == 2 and len(result.state.history) == 1
