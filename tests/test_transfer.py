import torch
from conftest import make_cfg

from raysweep.config import validate_config
from raysweep.core.data import Split
from raysweep.evaluation.robust import accuracies
from raysweep.evaluation.transfer import (
    TransferConfig,
    surrogate_config,
    transfer_attack,
)
from raysweep.training.trainer import fit

ATTACK = {"name": "pgd", "eps": [0.0, 0.3], "steps": 10}


def test_surrogate_configs_by_type():
    cfg = make_cfg(ensemble={"k": 3, "method": "joint"},
                   train={"pdd": {"m": 6}, "deg": {}, "jr": {"lambda_jr": 0.1},
                          "adversarial": {"mode": "ensemble", "eps": 0.1}, "loss": "ensemble_ce"})
    one = validate_config(surrogate_config(cfg, TransferConfig(name="t1", type="I", arch="small_cnn", attack=ATTACK)))
    two = validate_config(surrogate_config(cfg, TransferConfig(name="t2", type="II", arch="small_cnn", attack=ATTACK,
                                                               epochs=7)))
    assert one.model.arch == two.model.arch == "small_cnn" and one.seed != cfg.seed
    assert (one.train.pdd, one.train.deg, one.train.adversarial, one.train.jr.lambda_jr) == (None, None, None, 0.0)
    assert one.train.loss == "member_ce" and two.train.loss == "ensemble_ce"
    assert two.train.pdd == cfg.train.pdd and two.train.adversarial == cfg.train.adversarial and two.train.epochs == 7


def test_transfer_from_self_trained_surrogate(trained_synthetic):
    cfg, data, target = trained_synthetic
    t = TransferConfig(name="type1", type="I", arch="small_cnn", attack=ATTACK, samples=100)
    surrogate = fit(validate_config(surrogate_config(cfg, t)), data, progress=False).ensemble
    per_eps, flags = transfer_attack(target, surrogate, data.test, t, 100, torch.device("cpu"), cfg.seed)
    at0, at3 = per_eps["0.0"], per_eps["0.3"]
    assert len(flags["0.3"]) == 100 and flags["0.3"].sum().item() / 100 == at3["target_acc"]
    first100 = Split(data.test.x[:100], data.test.y[:100])
    clean = accuracies(target.stacked_logits, first100, target.weights, "probability", 100, "cpu")[0]
    assert at0["target_acc"] == clean  # eps 0: the clean images
    assert at3["surrogate_acc"] < 0.2  # white-box on the surrogate
    assert at3["target_acc"] < clean - 0.2  # the examples transfer


def test_runs_sharing_a_surrogate_folder_train_each_surrogate_once(trained_synthetic, tmp_path):
    """A type I surrogate drops every defence, so the variants of a study at one seed need the same one
    (on this CPU it costs more than a LeNet-5 variant): with a shared folder it is trained once and
    loaded after, and the evaluation is exactly the one that trained its own. A type II surrogate that
    keeps a defence is its own."""
    from raysweep.run import evaluate

    cfg, data, target = trained_synthetic
    transfer = [{"name": n, "type": n, "arch": "small_cnn", "epochs": 1, "samples": 100,
                 "attack": {**ATTACK, "eps": [0.3]}} for n in ("I", "II")]
    eval_cfg = {"uap": None, "jacobian_samples": 0, "diversity_samples": 0, "transfer": transfer}
    joint = {**cfg.model_dump(), "ensemble": {"k": 3, "method": "joint"}, "eval": eval_cfg}  # as PDD + DEG's
    baseline = make_cfg(**{**joint, "name": "baseline"})
    deg = make_cfg(**{**joint, "name": "deg", "train": {**cfg.train.model_dump(), "deg": {}}})
    shared, lines = tmp_path / "surrogates", []
    first = evaluate(target, data, baseline, progress=False, surrogates=shared, log=lines.append)
    assert sum("loaded" in line for line in lines) == 1  # the baseline's type II is its type I
    assert sum("surrogate small_cnn (seed 1000): epoch 1/1" in line for line in lines) == 1  # trained once, shown
    lines.clear()
    second = evaluate(target, data, deg, progress=False, surrogates=shared, log=lines.append)
    assert sum("loaded" in line for line in lines) == 1  # type I loaded, type II (with DEG) trained
    assert len([p for p in shared.iterdir() if (p / "checkpoint").is_dir()]) == 2

    alone = evaluate(target, data, deg, progress=False)
    assert second.results == alone.results
    assert first.results["transfer_acc/I/0.3"] == second.results["transfer_acc/I/0.3"]
