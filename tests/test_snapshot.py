import math

import torch
from conftest import make_cfg

from raysweep.core.data import load_dataset
from raysweep.methods.snapshot import snapshot_steps
from raysweep.training.trainer import fit


def test_snapshot_cyclic_lr_and_distinct_snapshots():
    cfg = make_cfg(ensemble={"k": 3, "method": "snapshot"},
                   train={"epochs": 5, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9},
                   data={"train_size": 200, "batch_size": 50})
    data = load_dataset(cfg.data, 0)
    lrs = []  # the learning rate of every step, as a step callback sees it
    result = fit(cfg, data, progress=False, callbacks=(lambda event, state: lrs.append(state.lr) if event == "step"
                                                       else None,))
    total, k = 20, 3
    cycle = math.ceil(total / k)  # 7: cycles end at 7, 14, 20
    assert result.state.step == total
    expected = [0.1 / 2 * (math.cos(math.pi * ((t - 1) % cycle) / cycle) + 1) for t in range(1, total + 1)]
    assert lrs == expected
    assert [lrs[i] for i in (0, 7, 14)] == [0.1] * 3  # warm restarts
    assert snapshot_steps(total, k) == [7, 14, 20]
    members = result.ensemble.members
    assert len(members) == 3
    flat = [torch.cat([p.flatten() for p in m.parameters()]) for m in members]
    for i in range(3):
        for j in range(i + 1, 3):
            assert (flat[i] - flat[j]).abs().max() > 1e-3
