import pytest
import torch
from conftest import make_cfg

import raysweep
from raysweep.core.checkpoint import save_checkpoint
from raysweep.core.data import load_dataset
from raysweep.training.trainer import fit


@pytest.mark.parametrize("arch, shape", [("resnet18", [3, 32, 32]), ("small_cnn", [3, 32, 32]),
                                         ("lenet5", [3, 32, 32]), ("lenet5", [1, 28, 28])])
def test_architectures_train_and_round_trip(tmp_path, arch, shape):
    cfg = make_cfg(model={"arch": arch}, data={"train_size": 16, "test_size": 8, "batch_size": 8,
                                               "synthetic": {"num_classes": 5, "image_shape": shape}})
    data = load_dataset(cfg.data, 0)
    ens = fit(cfg, data, progress=False).ensemble
    x = data.test.batch(torch.arange(8))[0]
    with torch.no_grad():
        out = ens(x)
    assert out.shape == (8, 5) and torch.allclose(out.exp().sum(1), torch.ones(8), atol=1e-5)
    save_checkpoint(tmp_path, ens, cfg, data.image_shape, data.num_classes, data.mean, data.std)
    again = raysweep.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(x), out)  # BatchNorm running statistics included
    assert len(again.members) == 2 and not again.training
