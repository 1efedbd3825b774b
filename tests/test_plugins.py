"""Plug-ins defined here, outside the package, are picked up by config validation, the search
space, the trainer and transfer surrogates without an edit to raysweep."""
from typing import Optional

import pytest
import torch
from conftest import make_cfg
from pydantic import Field

from raysweep.config import validate_config
from raysweep.core.data import load_dataset
from raysweep.core.sections import Section
from raysweep.errors import ConfigError
from raysweep.evaluation import EVALUATIONS, Evaluation
from raysweep.evaluation import register as register_evaluation
from raysweep.evaluation.transfer import TransferConfig, surrogate_config
from raysweep.members import LoopedMembers
from raysweep.methods import METHODS, EnsembleMethod
from raysweep.methods import register as register_method
from raysweep.regularisers import REGULARISERS, Regulariser, register
from raysweep.run import evaluate
from raysweep.sweeps.objectives import Objective, check_objective, produced_results
from raysweep.sweeps.space import check_path
from raysweep.tracking.runs import flat_metrics
from raysweep.training.step import TrainStep
from raysweep.training.trainer import build_members, fit


class LogitSquaresConfig(Section):
    lam: float = Field(0.1, ge=0, le=1)


class LogitSquares(Regulariser):
    """Per member: lam * mean squared logit (a logit-norm penalty), a defence."""
    key, Config = "logit_squares", LogitSquaresConfig
    joint, min_k = False, 1

    def term(self, out):
        return self.cfg.lam * out.logits.pow(2).mean((1, 2))


class Agreement(Regulariser):
    """Ensemble-level: lam * variance of the members' logits; couples members, not a defence."""
    key, Config = "agreement", LogitSquaresConfig
    defence = False

    def term(self, out):
        return self.cfg.lam * out.logits.var(0).mean()


class Horizontal(EnsembleMethod):
    """Horizontal voting (Xie et al. 2013): one network, its last K iterates are the members."""
    name, batches = "horizontal", "independent"
    description = "one network; its last K iterates are the members"

    def __init__(self, k, total_steps):
        super().__init__(k, total_steps)
        self.kept = []

    @classmethod
    def trained_networks(cls, k):
        return 1

    def after_step(self, step, export):
        if step > self.total_steps - self.k:
            self.kept.append({n: t.detach().clone() for n, t in export()[0].state_dict().items()})

    def ensemble_state(self, trained):
        return list(self.kept)


class VoteConfig(Section):
    pass


class HardVote(Evaluation):
    """Accuracy of the members' majority vote (ties to the lowest class)."""
    key, Config = "vote", Optional[VoteConfig]

    @classmethod
    def names(cls, cfg, eval_cfg, k):
        return ["vote_acc"]

    def run(self, ctx, report):
        x, y = ctx.data.test.batch(torch.arange(len(ctx.data.test)), ctx.device)
        with torch.no_grad():
            votes = ctx.stacked_fn(x).argmax(-1)  # [K,B]
        winner = torch.nn.functional.one_hot(votes, ctx.data.num_classes).sum(0).argmax(1)
        report.add("vote_acc", (winner == y).float().mean().item(), images=len(y))


@pytest.fixture
def plugins():
    register(LogitSquares)
    register(Agreement)
    register_method(Horizontal)
    register_evaluation(HardVote)
    yield
    REGULARISERS.pop(LogitSquares.key)
    REGULARISERS.pop(Agreement.key)
    METHODS.pop(Horizontal.name)
    EVALUATIONS.pop(HardVote.key)


def test_a_regulariser_plugin_is_validated_searchable_and_trained(plugins):
    cfg = make_cfg(train={"epochs": 1, "optimizer": "adam", "lr": 1e-3, "logit_squares": {"lam": 0.5}})
    assert cfg.train.logit_squares.lam == 0.5 and cfg.train.agreement is None
    with pytest.raises(ConfigError, match=r"train\.logit_squares\.lam: .*less than or equal to 1"):
        make_cfg(train={"logit_squares": {"lam": 5}})
    with pytest.raises(ConfigError, match=r"train\.agreement make members interact and need ensemble\.method: "
                                          r"joint .* got 'independent'"):
        make_cfg(train={"agreement": {}})
    with pytest.raises(ConfigError, match=r"train\.agreement is a term between members and needs ensemble\.k >= 2"):
        make_cfg(ensemble={"k": 1, "method": "joint"}, train={"agreement": {}})
    assert check_path("train.logit_squares.lam", "search.params").metadata  # its bounds reach the search space

    # The step adds exactly its term: the same batch, parameters and random stream with and without it.
    plain = make_cfg()
    data = load_dataset(cfg.data, cfg.seed)
    ex = LoopedMembers(build_members(plain, data, 2), torch.device("cpu"))
    x, y = data.train.batch(torch.arange(32))
    xs, ys = x.expand(2, *x.shape), y.expand(2, -1)
    with torch.no_grad():
        logits = ex.stacked_logits(xs, per_member=True)
    on, _ = TrainStep(cfg, ex, torch.full((2,), 0.5), torch.Generator().manual_seed(0)).pass_loss(xs, ys)
    off, _ = TrainStep(plain, ex, torch.full((2,), 0.5), torch.Generator().manual_seed(0)).pass_loss(xs, ys)
    assert torch.allclose(on - off, 0.5 * logits.pow(2).mean((1, 2)).sum(), rtol=0, atol=1e-6)  # float32 of ~2.8

    # A trained run differs from the same run without it.
    trained = fit(cfg, data, progress=False).ensemble.members[0].state_dict()
    untouched = fit(plain, data, progress=False).ensemble.members[0].state_dict()
    assert any(not torch.equal(trained[n], untouched[n]) for n in trained)


def test_type_one_surrogates_drop_every_registered_defence(plugins):
    cfg = make_cfg(ensemble={"k": 2, "method": "joint"},
                   train={"logit_squares": {"lam": 0.5}, "agreement": {"lam": 0.2}, "deg": {"lambda_deg": 0.1},
                          "jr": {"lambda_jr": 0.1}})
    attack = {"name": "t", "eps": [0.1]}
    oblivious = validate_config(surrogate_config(cfg, TransferConfig(name="t", type="I", arch="small_cnn",
                                                                     attack=attack)))
    adaptive = validate_config(surrogate_config(cfg, TransferConfig(name="t", type="II", arch="small_cnn",
                                                                    attack=attack)))
    assert oblivious.train.logit_squares is None and oblivious.train.deg is None
    assert oblivious.train.jr.lambda_jr == 0
    assert oblivious.train.agreement.lam == 0.2  # not a defence: kept
    assert adaptive.train.logit_squares.lam == 0.5 and adaptive.train.deg.lambda_deg == 0.1


def test_an_ensemble_method_plugin_schedules_and_assembles(plugins):
    cfg = make_cfg(ensemble={"k": 3, "method": "horizontal"})
    assert cfg.trained_members == 1
    with pytest.raises(ConfigError, match=r"ensemble\.method: got 'horizontl'; input should be .*'horizontal'"):
        make_cfg(ensemble={"method": "horizontl"})
    data = load_dataset(cfg.data, cfg.seed)
    members = fit(cfg, data, progress=False).ensemble.members
    assert len(members) == 3
    # The last member is the last iterate: one network trained alone on the same batches.
    alone = fit(make_cfg(ensemble={"k": 1, "method": "independent"}), data, progress=False).ensemble.members[0]
    last, first = members[-1].state_dict(), members[0].state_dict()
    assert all(torch.equal(last[n], t) for n, t in alone.state_dict().items())
    assert any(not torch.equal(first[n], last[n]) for n in last)


def test_an_evaluation_plugin_reaches_the_report_mlflow_and_sweep_objectives(plugins, trained_synthetic):
    _, data, ensemble = trained_synthetic
    cfg = make_cfg(ensemble={"k": 3}, data={"train_size": 768, "test_size": 200},
                   eval={"vote": {}, "uap": None, "jacobian_samples": 0, "diversity_samples": 0})
    assert "vote_acc" in produced_results(cfg)
    check_objective(Objective(metric="vote_acc"), cfg)  # a sweep may maximise it
    report = evaluate(ensemble, data, cfg, progress=False)
    x, y = data.test.batch(torch.arange(len(data.test)))
    with torch.no_grad():
        votes = torch.stack([m(x).argmax(1) for m in ensemble.members])
    by_hand = (torch.mode(votes, 0).values == y).float().mean().item()  # K = 3: a majority exists or all differ
    assert abs(report.scalars()["vote_acc"] - by_hand) <= 2 / len(y)  # all-differ ties may break apart
    metrics = report.to_json()
    assert metrics["schema"] == 2 and metrics["results"]["vote_acc"]["images"] == len(y)
    assert flat_metrics(metrics)["vote_acc"] == report.scalars()["vote_acc"]


def test_unregistered_sections_and_methods_are_unknown():
    with pytest.raises(ConfigError, match=r"train\.logit_squares: unknown field"):
        validate_config({"train": {"logit_squares": {"lam": 0.5}}})
    with pytest.raises(ConfigError, match=r"ensemble\.method: got 'horizontal'"):
        validate_config({"ensemble": {"method": "horizontal"}})
    with pytest.raises(ConfigError, match=r"eval\.vote: unknown field"):
        validate_config({"eval": {"vote": {}}})


def test_installed_plugins_are_found_through_entry_points(tmp_path):
    """A package installed beside raysweep registers a regulariser in every process that validates a
    config (the CLI, Tune trials, Ray workers) through the `raysweep.plugins` entry-point group; one
    that fails to import is named and skipped."""
    import subprocess
    import sys

    (tmp_path / "rs_demo_plugin.py").write_text(
        "from raysweep.core.sections import Section\n"
        "from raysweep.regularisers import Regulariser, register\n\n"
        "class DemoConfig(Section):\n    lam: float = 0.1\n\n"
        "@register\nclass Demo(Regulariser):\n    key, Config, joint, min_k = 'demo', DemoConfig, False, 1\n"
        "    def term(self, out):\n        return self.cfg.lam * out.logits.pow(2).mean((1, 2))\n")
    info = tmp_path / "rs_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rs-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[raysweep.plugins]\ndemo = rs_demo_plugin\nbroken = rs_missing_module\n")
    code = ("from raysweep.config import validate_config\n"
            "print(validate_config({'train': {'demo': {'lam': 0.3}}}).train.demo.lam)")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.3"
    assert "plug-in broken (rs_missing_module) failed to import and is skipped" in out.stderr
