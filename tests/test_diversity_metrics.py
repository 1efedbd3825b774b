import math

import torch

from raysweep.evaluation.diversity import (
    discrimination_score,
    gradient_angles,
    output_ambiguity,
)


def one_hot_logits(preds, c=3):
    return torch.nn.functional.one_hot(torch.tensor(preds), c).float() * 5


def test_output_ambiguity_by_hand():
    y = torch.tensor([0, 1, 2, 0])
    # K=3 members' predictions per sample -> correct counts l = 3, 2, 1, 0
    stacked = one_hot_logits([[0, 1, 2, 1], [0, 1, 0, 2], [0, 0, 1, 1]])
    amb = output_ambiguity(stacked, y)  # min(l, 3 - l) / (3 - 2)
    assert amb.tolist() == [0.0, 1.0, 1.0, 0.0]
    agree = one_hot_logits([[0, 2, 1, 0]] * 4)
    assert output_ambiguity(agree, y).sum() == 0  # all members agree: E = 0
    k4 = one_hot_logits([[0, 1, 2, 0], [0, 1, 2, 1], [1, 1, 2, 1], [1, 0, 0, 1]])  # l = 2, 3, 3, 1
    assert output_ambiguity(k4, y).tolist() == [2 / 2, 1 / 2, 1 / 2, 1 / 2]


def test_discrimination_score_by_hand():
    f = torch.tensor([[[1.0, 3.0, 0.0, -1.0]], [[2.0, 2.0, 2.0, 0.0]], [[0.0, 0.0, 4.0, 0.0]]])  # K=3, B=1
    # activated values: m0 {1,3}: mu 2 var 1; m1 {2,2,2}: mu 2 var 0; m2 {4}: mu 4 var 0
    expected = (2 - 2) ** 2 / (1 + 0) + (2 - 4) ** 2 / (1 + 0) + (2 - 4) ** 2 / 1e-12
    assert math.isclose(discrimination_score(f).item(), expected, rel_tol=1e-5)
    same = torch.rand(1, 5, 8).expand(3, 5, 8)
    assert torch.allclose(discrimination_score(same), torch.zeros(5))


def test_gradient_angles_by_hand():
    w = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # member k: logits [w_k . x, 0]

    def fn(xs):
        return torch.stack([torch.cat([(xs[k] * w[k]).sum(-1, keepdim=True), torch.zeros(len(xs[k]), 1)], 1)
                            for k in range(2)])

    angles = gradient_angles(fn, torch.randn(4, 2), torch.zeros(4, dtype=torch.long), 2)
    assert torch.allclose(angles, torch.full((1, 4), 90.0))  # orthogonal input gradients


def test_member_activity_finds_a_silenced_member(tmp_path, monkeypatch):
    """tools/member_activity.py on a run folder whose member 2 has its last hidden layer silenced (every
    unit's pre-activation negative): member 2 has fewer than two activated units on every image, the
    healthy member on none."""
    from conftest import make_cfg, repo_root

    from raysweep.config.io import dump_config
    from raysweep.core.checkpoint import save_checkpoint
    from raysweep.core.ensemble import Ensemble
    from raysweep.core.models import build_member

    monkeypatch.syspath_prepend(str(repo_root() / "tools"))
    from member_activity import activity

    cfg = make_cfg()
    torch.manual_seed(0)
    members = [build_member("lenet5", (1, 28, 28), 4, [0.5], [0.5]) for _ in range(2)]
    last = members[1].body[-2]  # the last hidden Linear, before its ReLU
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-1.0)
    save_checkpoint(tmp_path / "checkpoint", Ensemble(members, None, "probability"), cfg, (1, 28, 28), 4, [0.5], [0.5])
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    lines = activity(tmp_path, 64)
    assert "64 images, 84 last hidden units per member" in lines[0]
    assert "member 1:" in lines[1] and "fewer than two activated units on 0.0% of the images" in lines[1]
    assert "member 2:" in lines[2] and "on 100.0% of the images; activated units fewest 0, median 0" in lines[2]
    assert len(lines) == 3  # no PDD: nothing about its dropout

    # A PDD run: what its dropout would keep of each member's activated units; the silenced member has none
    pdd = make_cfg(ensemble={"k": 2, "method": "joint"}, train={"epochs": 1, "pdd": {"m": 4}})
    (tmp_path / "config.yaml").write_text(dump_config(pdd))
    lines = activity(tmp_path, 64)
    assert lines[3].startswith("  PDD on the first 64 training images: intervals over [0, ")
    assert "member 1: keeps " in lines[4] and lines[5] == "    member 2: no activated unit"
