import subprocess
import sys

import pytest
import yaml
from conftest import make_cfg, repo_root

from raysweep.cli import main
from raysweep.config import dump_config, load_config, validate_config
from raysweep.errors import ConfigError


def error_of(raw) -> str:
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    return str(err.value)


def test_defaults_and_ready_config_validate():
    validate_config({})
    cfg = load_config(repo_root() / "search_spaces" / "jacobian_ensemble_fmnist.yaml")
    assert (cfg.ensemble.k, cfg.ensemble.method, cfg.train.jr.lambda_jr, cfg.model.arch) == (3, "bagging", 0.05, "lenet5")


@pytest.mark.parametrize("raw, path, words", [
    ({"trian": {}}, "trian", "unknown field"),
    ({"train": {"epochs": "many"}}, "train.epochs", "valid integer"),
    ({"train": {"jr": {"lambda_jr": 3.0}}}, "train.jr.lambda_jr", "less than or equal to 2"),
    ({"data": {"dataset": "imagenet"}}, "data.dataset", "'fashion_mnist'"),
    ({"ensemble": {"k": 3, "weights": [0.5, 0.5]}}, "ensemble", "2 values but k = 3"),
    ({"ensemble": {"k": 2, "weights": [0.7, 0.7]}}, "ensemble.weights", "sum to 1"),
    ({"eval": {"attacks": [{"name": "p", "eps": [0.1, -0.1]}]}}, "eval.attacks.0.eps", "eps must be >= 0"),
    ({"eval": {"uap": {"eps": [-0.2]}}}, "eval.uap.eps", "eps must be >= 0"),
    ({"eval": {"attacks": [{"name": "p", "eps": [0.1]}], "auc": {"attack": "q", "eps_target": 0.1}}}, "eval", "'q'"),
    ({"ensemble": {"k": 3, "method": "joint"}, "train": {"pdd": {"m": 3}}}, "(top level)", "m must be > ensemble.k"),
    ({"ensemble": {"k": 3, "method": "joint"}, "train": {"pdd": {"scope": "image"}}}, "train.pdd.scope", "'sample'"),
    ({"ensemble": {"k": 3, "method": "joint"}, "train": {"pdd": {"scope": "sample", "period": 4}}}, "train.pdd",
     "period must be 1, got 4"),
    ({"ensemble": {"k": 1, "method": "joint"}, "train": {"deg": {}}}, "(top level)", "needs ensemble.k >= 2"),
    ({"ensemble": {"k": 3}, "train": {"deg": {}}}, "(top level)", "need ensemble.method: joint"),
    ({"ensemble": {"k": 3}, "train": {"adversarial": {"mode": "member", "eps": [0.1, 0.2]}}}, "(top level)",
     "2 values but ensemble.k = 3"),
    ({"ensemble": {"k": 2, "method": "joint"}, "train": {"adversarial": {"mode": "ensemble", "eps": [0.1, 0.2]}}},
     "(top level)", "needs mode: member"),
    ({"train": {"adversarial": {"mode": "member", "eps": -0.1}}}, "train.adversarial.eps", "eps must be >= 0"),
    ({"model": {"arch": "composite"}}, "model", "go together"),
])
def test_bad_fields_name_path_and_allowed(raw, path, words):
    msg = error_of(raw)
    assert f"  {path}: " in msg and words in msg, msg


def test_overrides_are_validated(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ensemble: {k: 2}\n")
    cfg = load_config(f, ["ensemble.k=4", "train.jr.lambda_jr=0.5", "eval.uap.eps=[0.1, 0.2]"])
    assert cfg.ensemble.k == 4 and cfg.train.jr.lambda_jr == 0.5 and cfg.eval.uap.eps == [0.1, 0.2]
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(f, ["train.epochs=-1"])
    f.write_text("eval: {attacks: [{name: a, eps: [0.1]}, {name: b, eps: [0.2]}]}\n")
    assert load_config(f, ["eval.attacks.1.steps=20"]).eval.attacks[1].steps == 20
    with pytest.raises(ConfigError, match="not an index"):
        load_config(f, ["eval.attacks.2.steps=20"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(f, ["train.epochs"])


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "raysweep", *args], capture_output=True, text=True, env=env,
                          cwd=repo_root(), timeout=300)


@pytest.mark.parametrize("content, sets, expect", [
    ("data: [oops\n", [], "not valid YAML"),
    ("ensemble: {k: 3, weights: [0.5, 0.5]}\n", [], "2 values but k = 3"),
    ("eval: {attacks: [{name: p, eps: [-0.1]}]}\n", [], "eps must be >= 0"),
    ("data: {dataset: mnist, download: false}\n", [], "dataset 'mnist' not found"),
    ("{}\n", ["ensemble.kk=3"], "ensemble.kk: unknown field"),
])
def test_cli_user_errors_exit_nonzero_without_traceback(tmp_path, capsys, content, sets, expect):
    """Through the CLI's entry point in this process (an unexpected exception fails the test); the
    test below runs the command in its own process."""
    f = tmp_path / "c.yaml"
    f.write_text(content)
    args = ["train", str(f), "--out", str(tmp_path / "out")]
    for s in sets:
        args += ["--set", s]
    code, err = main(args), capsys.readouterr().err
    assert code == 2, err
    assert expect in err and "Traceback" not in err, err


def test_cli_missing_config_and_checkpoint(tmp_path):
    res = run_cli("train", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "config file not found" in res.stderr
    res = run_cli("evaluate", str(tmp_path))
    assert res.returncode == 2 and "not a raysweep checkpoint" in res.stderr and "Traceback" not in res.stderr


def test_bare_command_prints_help_and_version_names_the_stack(capsys):
    from raysweep import __version__

    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: raysweep") and all(c in out for c in ("train", "sweep", "evaluate", "reproduce"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"raysweep {__version__} (torch ")


def test_work_saved_under_other_executor_settings_or_an_older_schema_is_reused(tmp_path):
    """A study reuses a finished run whose saved config differs only in `executor` (same numbers) or
    lacks fields added to the schema since (their defaults); any other difference, a field since removed
    or a damaged file means another run."""
    from raysweep.reproduce.study import _cached

    cfg = make_cfg(train={"epochs": 2})
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"clean_acc": 0.5}')
    saved = yaml.safe_load(dump_config(cfg))
    saved["executor"].update(channels_last=False, vectorize="loop")
    del saved["executor"]["compile"], saved["train"]["precision"]  # not written by an older raysweep
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    assert _cached(out, cfg) == {"clean_acc": 0.5}
    assert _cached(out, make_cfg(train={"epochs": 3})) is None
    (out / "config.yaml").write_text(yaml.safe_dump({**saved, "train": {**saved["train"], "retired": 1}}))
    assert _cached(out, cfg) is None
    (out / "config.yaml").write_text("train: {epochs: [")
    assert _cached(out, cfg) is None
