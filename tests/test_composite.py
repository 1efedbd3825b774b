import torch
from conftest import make_cfg, repo_root
from test_ready_configs import TINY

import raysweep
from raysweep.cli import main
from raysweep.core.checkpoint import save_checkpoint
from raysweep.core.data import load_dataset
from raysweep.training.trainer import build_members, fit


def train_and_save(tmp_path, name, **sections):
    cfg = make_cfg(**sections)
    data = load_dataset(cfg.data, 0)
    ens = fit(cfg, data, progress=False).ensemble
    save_checkpoint(tmp_path / name, ens, cfg, data.image_shape, data.num_classes, data.mean, data.std)
    return tmp_path / name, data


def flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_meta_composite_trains_only_new_head_and_round_trips(tmp_path):
    robust, data = train_and_save(tmp_path, "robust", ensemble={"k": 2},
                                  train={"epochs": 1, "adversarial": {"mode": "member", "eps": 0.1, "steps": 2}})
    natural, _ = train_and_save(tmp_path, "natural", ensemble={"k": 2}, model={"arch": "small_cnn"})
    cfg = make_cfg(model={"arch": "composite", "composite": {"robust": str(robust), "natural": str(natural)}},
                   ensemble={"k": 2, "weights": [0.9, 0.1]},
                   train={"epochs": 2, "adversarial": {"mode": "member", "eps": 0.1, "steps": 2}})
    init_heads = [m.head.weight.clone() for m in build_members(cfg, data, 2)]
    ens = fit(cfg, data, progress=False).ensemble
    r, n = raysweep.load(robust), raysweep.load(natural)
    for i, comp in enumerate(ens.members):
        assert torch.equal(flat(comp.robust), flat(r.members[i]))  # frozen
        assert torch.equal(flat(comp.natural), flat(n.members[i]))
        assert comp.head.in_features == 84 + 128  # lenet5 + small_cnn features
        assert not torch.equal(comp.head.weight, init_heads[i])  # the new head trained
    x = data.test.batch(torch.arange(8))[0]
    with torch.no_grad():
        feats = ens.members[1].features(x)
        assert torch.equal(feats, torch.cat([r.members[1].features(x), n.members[1].features(x)], 1))
    save_checkpoint(tmp_path / "comp", ens, cfg, data.image_shape, data.num_classes, data.mean, data.std)
    again = raysweep.load(tmp_path / "comp")
    with torch.no_grad():
        assert torch.equal(again(x), ens(x)) and torch.allclose(again.weights, torch.tensor([0.9, 0.1]))


def test_ready_meta_composite_config_runs(tmp_path):
    robust, _ = train_and_save(tmp_path, "robust", ensemble={"k": 2})
    args = ["train", str(repo_root() / "search_spaces/robust_ensembles/meta_composite.yaml"), "--quiet",
            "--out", str(tmp_path / "bad"), "--set", f"model.composite.robust={robust}",
            "--set", f"model.composite.natural={robust}"] + [a for s in TINY for a in ("--set", s)]
    assert main(args) == 2  # 4-class checkpoints for 10-class data: a user error, not a crash
    ten = {"synthetic": {"num_classes": 10, "image_shape": [1, 28, 28], "noise": 0.3}}
    robust, _ = train_and_save(tmp_path, "robust10", ensemble={"k": 2}, data=ten)
    natural, _ = train_and_save(tmp_path, "natural10", ensemble={"k": 2}, data=ten)
    args = ["train", str(repo_root() / "search_spaces/robust_ensembles/meta_composite.yaml"), "--out",
            str(tmp_path / "run"), "--quiet", "--set", f"model.composite.robust={robust}",
            "--set", f"model.composite.natural={natural}", "--set", "eval.attacks.0.steps=2"]
    for s in TINY:
        args += ["--set", s]
    assert main(args) == 0 and (tmp_path / "run" / "metrics.json").is_file()
