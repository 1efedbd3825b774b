"""Every shipped config validates, and runs through `raysweep train` (on tiny synthetic data)."""
import json

import pytest
from conftest import repo_root

from raysweep.cli import main
from raysweep.config import load_config

CONFIGS = sorted(p.relative_to(repo_root() / "search_spaces")
                 for p in (repo_root() / "search_spaces").rglob("*.yaml")
                 if "composite" not in p.name  # needs two checkpoints: test_composite.py runs it
                 and "reproduce" not in p.parts  # study files, not run configs: test_reproduce.py
                 and not p.name.endswith("_sweep.yaml"))  # search spaces: test_sweep.py
TINY = ["data.dataset=synthetic", "data.train_size=64", "data.test_size=32", "data.batch_size=32",
        "train.epochs=1", "eval.diversity_samples=16", "eval.jacobian_samples=4"]


def test_configs_are_found():
    assert len(CONFIGS) >= 12


@pytest.mark.parametrize("name", CONFIGS, ids=str)
def test_ready_config_runs_through_cli(tmp_path, name):
    path = repo_root() / "search_spaces" / name
    cfg = load_config(path)
    sets = list(TINY)
    if cfg.eval.uap is not None:
        sets += ["eval.uap.seeds=2", "eval.uap.iterations=2", "eval.uap.batch_size=16", "eval.uap.selection_size=16"]
    if cfg.eval.autoattack is not None:
        sets += ["eval.autoattack.samples=8", "eval.autoattack.max_iter=2", "eval.autoattack.square_queries=3"]
    if cfg.eval.cw_l2 is not None:
        sets += ["eval.cw_l2.samples=4", "eval.cw_l2.max_iter=2", "eval.cw_l2.binary_search_steps=1"]
    if cfg.eval.jsma is not None:
        sets += ["eval.jsma.samples=4"]
    for i, t in enumerate(cfg.eval.transfer):
        sets += [f"eval.transfer.{i}.epochs=1", f"eval.transfer.{i}.samples=8", f"eval.transfer.{i}.attack.steps=2"]
    for i, a in enumerate(cfg.eval.attacks):
        sets += [f"eval.attacks.{i}.steps=2"] if a.kind != "fgsm" else []
        sets += [f"eval.attacks.{i}.max_steps=4"] if a.double_steps else []
    args = ["train", str(path), "--out", str(tmp_path), "--quiet"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= m["clean_acc"] <= 1
    for a in cfg.eval.attacks:
        assert set(m["robust_acc"][a.name]) == {str(e) for e in a.eps}
        if cfg.eval.attack_members and cfg.ensemble.k > 1:
            assert all(len(v) == cfg.ensemble.k for v in m["attacks"][a.name]["member_robust_acc"].values())
        if a.double_steps:
            report = m["attacks"][a.name]["per_eps"][str(a.eps[-1])]
            assert "converged" in report and report["history"][0][0] == 2
    assert set(m.get("transfer", {})) == {t.name for t in cfg.eval.transfer}
    for name in ("autoattack", "cw_l2", "jsma"):
        assert (name in m) == (getattr(cfg.eval, name) is not None)
    if cfg.ensemble.k > 1 and cfg.eval.diversity_samples:
        assert 0 <= m["diversity"]["output_ambiguity"] <= 1
