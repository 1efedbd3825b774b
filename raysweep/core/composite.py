"""Meta-composites (the robust-ensembles paper, Saligrama & Leclerc): a robust network (PGD-trained at eps)
and a natural one, both frozen; their last hidden features are concatenated and only a new last
linear layer is trained (PGD at eps, through train.adversarial). Composite k pairs member k of the
robust checkpoint with member k of the natural one; ensemble.weights (e.g. [0.9, 0.1]) combine them.
"""
from __future__ import annotations

import torch
from torch import nn

from raysweep.core.models import build_member


class Composite(nn.Module):
    def __init__(self, robust: nn.Module, natural: nn.Module, num_classes: int, spec: dict):
        super().__init__()
        self.robust, self.natural = robust, natural
        for p in (*robust.parameters(), *natural.parameters()):
            p.requires_grad_(False)
        self.head = nn.Linear(robust.head.in_features + natural.head.in_features, num_classes)
        self.spec = spec  # sub-architectures, written to the checkpoint manifest

    def train(self, mode: bool = True):
        super().train(mode)
        self.robust.eval()  # frozen: BatchNorm statistics must not move either
        self.natural.eval()
        return self

    def features(self, x):
        return torch.cat([self.robust.features(x), self.natural.features(x)], dim=1)

    def forward(self, x, part: str = "logits"):
        if part == "features":
            return self.features(x)
        if part == "head":
            return self.head(x)
        return self.head(self.features(x))


def rebuild_composite(spec: dict, image_shape, num_classes, mean, std) -> Composite:
    """An untrained composite of the right shapes, for loading a checkpoint into."""
    parts = [build_member(spec[n]["arch"], image_shape, num_classes, mean, std, spec[n].get("width", 1.0))
             for n in ("robust", "natural")]
    return Composite(*parts, num_classes, spec)
