"""train.precision (bf16 autocast), executor.channels_last and executor.compile, on this CPU.

bf16 changes the numbers, so it is held to the fp32 run's loss and accuracy, not to 1e-5; the layout
and compilation keep fp32 and are held to the plain executor at the equivalence tests' tolerance.
(bf16 on the Ray executor against the local one is in test_ray_executor's packs.)"""
import copy

import pytest
import torch
from conftest import make_cfg

from raysweep.config import validate_config
from raysweep.core.data import load_dataset
from raysweep.errors import ConfigError
from raysweep.members import LoopedMembers, make_local_executor
from raysweep.run import evaluate
from raysweep.training.trainer import build_members, configured_executor, fit

# One config per kind of step: plain, both JR estimators (double backward; forward-mode tangent),
# Ensemble-Adv and Madry (attacks inside the step), DEG (input gradients), PDD (features), ADP.
STEPS = {
    "plain": ({"method": "independent"}, {}),
    "jr": ({"method": "independent"}, {"jr": {"lambda_jr": 0.1}}),
    "jr_forward": ({"method": "independent"}, {"jr": {"lambda_jr": 0.1, "estimator": "forward_mode"}}),
    "ensemble_adv": ({"method": "joint"}, {"loss": "ensemble_ce",
                                           "adversarial": {"mode": "ensemble", "eps": 0.1, "steps": 3}}),
    "madry": ({"method": "independent"}, {"adversarial": {"mode": "member", "eps": 0.1, "steps": 3}}),
    "deg": ({"method": "joint"}, {"deg": {"lambda_deg": 0.5}}),
    "pdd": ({"method": "joint"}, {"pdd": {"m": 6, "period": 2}}),
    "adp": ({"method": "joint"}, {"adp": {}}),
}


def _fit(name, precision, **sections):
    ensemble, train = STEPS[name]
    cfg = make_cfg(ensemble={**ensemble, "k": 3}, data={"train_size": 256},
                   train={"epochs": 2, "optimizer": "adam", "lr": 2e-3, "precision": precision, **train}, **sections)
    data = load_dataset(cfg.data, 0)
    return cfg, data, fit(cfg, data, progress=False)


@pytest.mark.parametrize("name", sorted(STEPS))
def test_bf16_training_tracks_fp32(name):
    _, _, ref = _fit(name, "fp32")
    cfg, data, got = _fit(name, "bf16")
    last, ref_last = got.state.history[-1], ref.state.history[-1]
    assert last["loss"] != ref_last["loss"], "bf16 computed exactly what fp32 did: autocast was not applied"
    assert last["loss"] == pytest.approx(ref_last["loss"], rel=0.08)
    assert abs(last["train_acc"] - ref_last["train_acc"]) < 0.06
    assert {p.dtype for m in got.ensemble.members for p in m.parameters()} == {torch.float32}  # fp32 weights


def test_evaluation_is_fp32_whatever_the_training_precision():
    attacks = {"eval": {"uap": None, "jacobian_samples": 0, "attacks": [{"name": "pgd", "eps": [0.1], "steps": 3}]}}
    cfg, data, got = _fit("plain", "bf16", **attacks)
    fp32 = make_cfg(ensemble={"k": 3}, data={"train_size": 256}, **attacks)
    a, b = evaluate(got.ensemble, data, cfg, progress=False), evaluate(got.ensemble, data, fp32, progress=False)
    assert a.scalars() == b.scalars() and len(a.scalars()) > 2  # clean, PGD and worst-case accuracy, bit for bit


def _same_members(a, b, init, atol):
    for ma, mb, m0 in zip(a.ensemble.members, b.ensemble.members, init):
        for (name, pa), pb, p0 in zip(ma.named_parameters(), mb.parameters(), m0.parameters()):
            assert not torch.equal(pa, p0), f"{name} did not train"
            assert torch.allclose(pa, pb, atol=atol, rtol=0), (name, (pa - pb).abs().max().item())


def test_channels_last_members_train_exactly_as_plain_ones():
    cfg = make_cfg(ensemble={"k": 2, "method": "joint"},
                   train={"epochs": 2, "optimizer": "sgd", "lr": 0.05, "deg": {"lambda_deg": 0.5}})
    data = load_dataset(cfg.data, 0)
    init = build_members(cfg, data, 2)
    nhwc = make_local_executor(copy.deepcopy(init), "auto", "cpu", channels_last=True)
    assert isinstance(nhwc, LoopedMembers)  # auto loops when channels_last is asked
    conv = next(m for m in nhwc.members[0].modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    got = fit(cfg, data, progress=False, executor=nhwc)
    ref = fit(cfg, data, progress=False, executor=LoopedMembers(copy.deepcopy(init), torch.device("cpu")))
    _same_members(got, ref, init, 1e-5)


def test_compiled_members_train_as_eager_ones():
    """vmapped (the cheaper compile here, ~15 s); the looped path compiles each member the same way."""
    cfg = make_cfg(ensemble={"k": 2}, data={"train_size": 128, "batch_size": 64},
                   train={"epochs": 1, "optimizer": "sgd", "lr": 0.05},
                   executor={"vectorize": "vmap", "compile": True})
    data = load_dataset(cfg.data, 0)
    init = build_members(cfg, data, 2)
    got = fit(cfg, data, progress=False, executor=make_local_executor(copy.deepcopy(init), "vmap", "cpu",
                                                                       compile=True))
    ref = fit(cfg, data, progress=False, executor=make_local_executor(copy.deepcopy(init), "vmap", "cpu"))
    _same_members(got, ref, init, 1e-5)


@pytest.mark.parametrize("sections, message", [
    ({"train": {"precision": "fp16"}}, "train.precision"),
    ({"executor": {"vectorize": "vmap", "channels_last": True}}, "channels_last applies to looped members"),
    ({"executor": {"compile": True}, "train": {"jr": {"lambda_jr": 0.1}}},
     "train.jr differentiate an input gradient"),
    ({"executor": {"compile": True}, "ensemble": {"k": 2, "method": "joint"}, "train": {"deg": {"lambda_deg": 1}}},
     "train.deg differentiate an input gradient"),
])
def test_bad_precision_layout_and_compile_settings_are_config_errors(sections, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(**sections)


def test_compile_with_forward_mode_jr_is_allowed():
    cfg = make_cfg(executor={"compile": True}, train={"jr": {"lambda_jr": 0.1, "estimator": "forward_mode"}})
    assert cfg.executor.compile and cfg.train.jr.estimator == "forward_mode"


def test_channels_last_auto_is_on_for_conv_members_without_batchnorm_on_the_cpu():
    cfg = make_cfg()
    data = load_dataset(cfg.data, 0)
    lenet = build_members(cfg, data, 2)
    assert cfg.executor.channels_last == "auto"
    assert make_local_executor(copy.deepcopy(lenet), "auto", "cpu").channels_last
    assert not isinstance(make_local_executor(copy.deepcopy(lenet), "vmap", "cpu"), LoopedMembers)
    resnet = build_members(make_cfg(model={"arch": "resnet18"}), data, 1)  # BatchNorm: measured no faster
    assert not make_local_executor(resnet, "auto", "cpu").channels_last
    # Training with forward-mode JR stays in NCHW (measured slower in NHWC); the double backward goes NHWC
    forward = make_cfg(train={"jr": {"lambda_jr": 0.1, "estimator": "forward_mode"}})
    assert not configured_executor(forward, copy.deepcopy(lenet)).channels_last
    assert configured_executor(make_cfg(train={"jr": {"lambda_jr": 0.1}}), copy.deepcopy(lenet)).channels_last
    assert configured_executor(make_cfg(executor={"channels_last": True}, train={"jr": {
        "lambda_jr": 0.1, "estimator": "forward_mode"}}), copy.deepcopy(lenet)).channels_last  # asked for: kept


def test_an_nhwc_evaluation_equals_an_nchw_one_and_hands_the_members_back_as_they_were(trained_synthetic):
    """Attacks (PGD, SGD-UAP) differentiate through the NHWC kernels; every accuracy is the same, and
    the ensemble's weights leave the evaluation in the standard layout."""
    cfg, data, ens = trained_synthetic
    raw = cfg.model_dump(mode="json")
    raw["eval"].update(attacks=[{"name": "pgd", "eps": [0.1, 0.2], "steps": 5}],
                       uap={"eps": [0.1], "seeds": 2, "iterations": 4, "batch_size": 32, "selection_size": 64})
    reports = {}
    for layout in (False, True):
        raw["executor"]["channels_last"] = layout
        reports[layout] = evaluate(ens, data, validate_config(raw), progress=False).scalars()
    assert reports[True].keys() == reports[False].keys() and "uap_acc/0.1" in reports[True]
    for key, value in reports[False].items():
        assert reports[True][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key  # accuracies: the same images
    for p in ens.parameters():
        assert p.is_contiguous(), "a weight left the evaluation in the executor's layout"

    def stop(line):  # an evaluation that ends in an error (a stage failing, Ctrl-C) after its first stage
        raise KeyboardInterrupt(line)

    with pytest.raises(KeyboardInterrupt):
        evaluate(ens, data, validate_config(raw), progress=False, log=stop)
    for p in ens.parameters():
        assert p.is_contiguous(), "a weight left an evaluation that ended in an error in the executor's layout"
