"""Evaluation an ensemble cannot fool: ensemble-adaptive objectives on a hand-built ensemble, the
minimum-norm attack against PGD, the escalation ladder and its masking flags on a deliberately
masked ensemble, and a champion that must earn its alias (real attacks, a real MLflow store)."""
import copy
import math

import mlflow
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from torch import nn

from raysweep.attacks.minnorm import accuracy_at, fmn
from raysweep.attacks.pgd import AttackConfig, robust_accuracy
from raysweep.config import validate_config
from raysweep.core.checkpoint import save_checkpoint
from raysweep.core.data import Split
from raysweep.core.ensemble import Ensemble
from raysweep.core.objectives import OBJECTIVES
from raysweep.evaluation.masking import beyond_noise
from raysweep.evaluation.minnorm import exact_auc
from raysweep.run import evaluate
from raysweep.sweeps.champion import ChampionConfig, strong_figures
from raysweep.tracking.registry import register


class Pixel(nn.Module):
    """Not robust: its two-class score reads pixel 0 alone (0.53 for class 1, 0.47 for class 0)."""

    def forward(self, x):
        s = 30 * (x.flatten(1)[:, 0] - 0.5)
        return torch.stack([-s / 2, s / 2], 1)


class Anchor(nn.Module):
    """Robust: its score reads the image mean (0.8 or 0.2; l_inf eps 0.1 cannot cross 0.5), plus a
    steep bounded term on pixel 0 whose gradient points the other way from Pixel's."""

    def forward(self, x):
        f = x.flatten(1)
        m = f[:, 1:].mean(1)
        side = torch.sign(m - 0.5)
        s = 7.3 * (m - 0.5) - side * torch.tanh(200 * (f[:, 0] - 0.5 - 0.03 * side))
        return torch.stack([-s / 2, s / 2], 1)


def _two_class_images(n=200):
    y = torch.arange(n) % 2
    x = torch.where(y.view(-1, 1, 1, 1) == 1, 0.8, 0.2).expand(n, 1, 28, 28).clone()
    x.view(n, -1)[:, 0] = torch.where(y == 1, 0.53, 0.47)
    return Split(x, y)


def test_reweighting_beats_averaging_when_one_member_is_robust():
    ens, split = Ensemble([Anchor(), Pixel(), Pixel()]), _two_class_images()

    def acc(fn, weights, objective):
        attack = AttackConfig(name=objective, eps=[0.1], steps=20, objectives=[objective], random_start=False)
        return robust_accuracy(fn, split, attack, 0.1, weights, "probability", 100, "cpu")[0]

    one = torch.ones(1)
    assert acc(lambda x: ens.stacked_logits(x)[:1], one, "ce_prob") == 1.0  # the anchor is robust
    assert acc(lambda x: ens.stacked_logits(x)[1:2], one, "ce_prob") == 0.0  # the pixel readers are not
    # Averaged probabilities follow the anchor's steep gradient away from the pixel readers' boundary;
    # MORA's re-weighting moves the weight to the members that are correct and nearest their boundary.
    averaged, reweighted = acc(ens.stacked_logits, ens.weights, "ce_prob"), acc(ens.stacked_logits, ens.weights, "mora")
    assert averaged >= 0.4 and reweighted <= averaged - 0.3, (averaged, reweighted)


def test_every_ensemble_objective_is_its_single_model_counterpart_for_one_member():
    torch.manual_seed(0)
    logits, y, one = torch.randn(1, 16, 5), torch.randint(0, 5, (16,)), torch.ones(1)
    ce = F.cross_entropy(logits[0], y, reduction="none")
    true = logits[0].gather(1, y[:, None]).squeeze(1)
    other = logits[0].masked_fill(F.one_hot(y, 5).bool(), float("-inf")).amax(1)
    top = logits[0].sort(1, descending=True).values
    expected = {"ce_prob": ce, "ce_logit": ce, "mean_member_ce": ce, "mora": ce, "minmax_ce": ce,
                "cw_margin": F.log_softmax(logits[0], 1).gather(1, y[:, None]).squeeze(1).neg()
                + F.log_softmax(logits[0], 1).masked_fill(F.one_hot(y, 5).bool(), float("-inf")).amax(1),
                "member_dlr": (other - true) / (top[:, 0] - top[:, 2])}
    assert set(expected) == set(OBJECTIVES)
    for name, fn in OBJECTIVES.items():
        assert torch.allclose(fn(logits, y, one), expected[name], atol=1e-5), name


def test_min_norm_accuracy_is_never_above_pgd_and_gives_an_exact_auc(trained_synthetic):
    _, data, ens = trained_synthetic
    x, y = data.test.batch(torch.arange(len(data.test)))
    norms = fmn(ens.stacked_logits, x, y, ens.weights, steps=100)
    n = len(y)
    for eps in (0.05, 0.1, 0.2):
        attack = AttackConfig(name="pgd", eps=[eps], steps=20)
        pgd = robust_accuracy(ens.stacked_logits, data.test, attack, eps, ens.weights, "probability", 100, "cpu")[0]
        assert not beyond_noise(pgd, accuracy_at(norms, eps), n), (eps, accuracy_at(norms, eps), pgd)
    assert accuracy_at(norms, 0.0) == pytest.approx((ens(x).argmax(1) == y).float().mean().item())
    grid = torch.linspace(0, 0.2, 20001)  # the AUC by the rectangle rule on a fine grid
    numeric = sum(accuracy_at(norms, e.item()) for e in grid[1:]) / (len(grid) - 1)
    assert exact_auc(norms, 0.2) == pytest.approx(numeric, abs=2e-3)


def _masked(ens):
    """The same ensemble with every member's logits scaled by 1000: the same decisions, but each
    softmax saturates, so the cross-entropy gradients vanish (gradient masking)."""
    masked = copy.deepcopy(ens)
    with torch.no_grad():
        for m in masked.members:
            m.head.weight.mul_(1000)
            m.head.bias.mul_(1000)
    return masked


def _strong(cfg, samples=100):
    raw = cfg.model_dump(mode="json")
    raw["eval"] = {"uap": None, "jacobian_samples": 0, "diversity_samples": 0, "batch_size": 100,
                   "attacks": [{"name": "pgd", "eps": [0.2], "steps": 10}],
                   "protocol": {"level": "strong", "eps": [0.2], "samples": samples, "steps": 10,
                                "square_queries": 100, "fmn_steps": 30}}
    return validate_config(raw)


def test_a_masked_ensemble_is_flagged_and_the_ladder_sees_through_it(trained_synthetic):
    cfg, data, ens = trained_synthetic
    report = evaluate(_masked(ens), data, _strong(cfg), progress=False)
    pgd, strong = report.results["robust_acc/pgd/0.2"].value, report.results["protocol_acc/strong/0.2"].value
    assert "vanishing_gradients" in report.masking
    assert beyond_noise(strong, pgd, 100), (pgd, strong)
    ladder = report.details["protocol"]
    per_eps = ladder["per_eps"]["0.2"]
    after = list(per_eps["after"].values())
    assert after == sorted(after, reverse=True) and after[-1] == strong  # each stage only takes images away
    assert sum(per_eps["broken"].values()) == sum(b >= 0 for b in per_eps["image_broken_by"])
    assert report.results["worst_acc/linf/0.2"].value <= strong
    assert all(p["forward"] > 0 for s, p in ladder["passes"].items() if per_eps["seconds"][s] > 0.01)


def test_the_champion_is_the_best_candidate_under_the_strong_protocol(trained_synthetic, tmp_path, mlflow_store):
    """The masked ensemble wins the cheap objective (PGD cannot move it) but is flagged under the
    strong protocol: the runner-up is registered and becomes champion; registering the masked one
    afterwards gives it a version, with its flags, but never the alias."""
    cfg, data, ens = trained_synthetic
    raw = _strong(cfg, samples=64).model_dump(mode="json")
    rows = []
    for name, model in (("masked", _masked(ens)), ("plain", ens)):
        save_checkpoint(tmp_path / name, model, cfg, data.image_shape, data.num_classes, data.mean, data.std)
        cheap = robust_accuracy(model.stacked_logits, data.test.head(64), AttackConfig(name="pgd", eps=[0.2], steps=10),
                                0.2, model.weights, "probability", 100, "cpu")[0]
        rows.append({"trial_id": name, "params": {}, "checkpoint": str(tmp_path / name), "cheap": cheap})
    assert rows[0]["cheap"] > rows[1]["cheap"]  # the masked one looks better to PGD
    champion = ChampionConfig(top=2, protocol=raw["eval"]["protocol"])
    table = strong_figures(rows, "cheap", champion, lambda params: raw, tmp_path / "champion", str, progress=False)
    assert [e["trial_id"] for e, _ in table] == ["plain", "masked"]
    assert table[1][0]["masking_flags"] and not table[0][0]["masking_flags"]
    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    exp = client.create_experiment("champion")
    for entry, row in table[::-1]:  # the flagged one first: it must not take the alias even then
        run = client.create_run(exp).info.run_id
        got = register("champ-ens", row["checkpoint"], run, uri, "cheap", row["cheap"], strong=entry)
        assert got["champion"] == (row["trial_id"] == "plain"), got
    versions = {str(v.version): v.tags for v in client.search_model_versions("name = 'champ-ens'")}
    assert versions["1"]["masking_flags"] and not versions["2"]["masking_flags"]
    assert float(versions["2"]["strong_value"]) == table[0][0]["strong_value"]
    assert str(client.get_model_version_by_alias("champ-ens", "champion").version) == "2"
    assert math.isfinite(float(versions["1"]["objective_value"]))
    # registering into another store leaves the caller's MLflow settings as they were
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before


def test_a_sweep_may_maximise_the_worst_case_of_a_named_protocol(trained_synthetic):
    from raysweep.errors import ConfigError
    from raysweep.sweeps.objectives import Objective, check_objective, objective_from_name

    cfg, _, _ = trained_synthetic
    objective = Objective(**objective_from_name("protocol_acc/strong/0.2"))
    check_objective(objective, _strong(cfg))
    with pytest.raises(ConfigError, match="eval.protocol"):
        check_objective(objective, cfg)


def test_native_apgd_ce_matches_pgd_and_dlr_sees_through_saturated_softmaxes(trained_synthetic):
    from raysweep.attacks.apgd import apgd, checkpoints
    from raysweep.core.seeding import generator

    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]  # 0.22, then steps shrinking by 0.03, >= 0.06
    _, data, ens = trained_synthetic
    x, y = data.test.batch(torch.arange(len(data.test)))
    for model, loss in ((ens, "ce"), (_masked(ens), "dlr")):
        pgd = robust_accuracy(model.stacked_logits, data.test, AttackConfig(name="pgd", eps=[0.1], steps=20), 0.1,
                              model.weights, "probability", 200, "cpu")[0]
        fooled = apgd(model.stacked_logits, x, y, model.weights, "probability", loss, 0.1, iterations=50,
                      generator=generator(0, "apgd"))
        acc = ((model(x).argmax(1) == y) & ~fooled).float().mean().item()
        if loss == "ce":  # as strong as PGD (20 steps) within noise
            assert not beyond_noise(pgd, acc, len(y)), (acc, pgd)
        else:  # the masked ensemble: PGD's CE gradients vanish, DLR is scale-free
            assert beyond_noise(acc, pgd, len(y)), (acc, pgd)
