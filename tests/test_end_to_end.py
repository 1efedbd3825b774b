"""Real Fashion-MNIST through the real CLI: train, metrics JSON, checkpoint reload."""
import json
import subprocess
import sys

import torch
from conftest import needs_fmnist, repo_root

import raysweep
from raysweep.core.data import DataConfig, load_dataset

CONFIG = """
name: e2e
data: {dataset: fashion_mnist, train_size: 12000, test_size: 1000, batch_size: 128, download: false}
model: {arch: lenet5}
ensemble: {k: 2, method: bagging}
train: {epochs: 3, optimizer: adam, lr: 0.002, jr: {lambda_jr: 0.01}}
eval:
  uap: {eps: [0.1, 0.2], seeds: 3, iterations: 5, batch_size: 64, selection_size: 200}
  attacks: [{name: pgd, eps: [0.0, 0.05], steps: 3}]
  auc: {attack: pgd, eps_target: 0.05}
  jacobian_samples: 20
"""


@needs_fmnist
def test_train_cli_on_fashion_mnist_then_reload(tmp_path):
    cfg_file = tmp_path / "e2e.yaml"
    cfg_file.write_text(CONFIG)
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "raysweep", "train", str(cfg_file), "--out", str(out), "--quiet"],
                         capture_output=True, text=True, cwd=repo_root(), timeout=900)
    assert res.returncode == 0, res.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["clean_acc"] >= 0.80, m["clean_acc"]
    assert set(m["uap_acc"]) == {"0.1", "0.2"} and m["mean_uap_acc"] == sum(m["uap_acc"].values()) / 2
    assert m["weighted_acc"] == 0.5 * m["clean_acc"] + 0.5 * m["mean_uap_acc"]
    assert m["robust_acc"]["pgd"]["0.0"] == m["clean_acc"] and 0 <= m["auc"]["value"] <= 1
    assert len(m["jacobian_sq_norm"]["members"]) == 2
    for name in ("config.yaml", "acc_vs_eps.png", "uap.png", "checkpoint/members.safetensors"):
        assert (out / name).is_file(), name

    ens = raysweep.load(out / "checkpoint")
    assert isinstance(ens, torch.nn.Module) and ens.k == 2
    data = load_dataset(DataConfig(dataset="fashion_mnist", train_size=12000, test_size=1000, download=False), 0)
    x, y = data.test.batch(torch.arange(len(data.test)))
    with torch.no_grad():
        acc = (ens(x).argmax(1) == y).sum().item() / len(y)
    assert acc == m["clean_acc"]
    assert torch.allclose(ens.predict_proba(x[:5]).sum(1), torch.ones(5))

    eval_cfg = tmp_path / "eval.yaml"
    eval_cfg.write_text("eval: {uap: null, jacobian_samples: 0}\n")
    res = subprocess.run([sys.executable, "-m", "raysweep", "evaluate", str(out), "--config", str(eval_cfg),
                          "--out", str(tmp_path / "ev"), "--quiet"], capture_output=True, text=True, cwd=repo_root(),
                         timeout=600)
    assert res.returncode == 0, res.stderr
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["clean_acc"] == m["clean_acc"] and "uap_acc" not in again
