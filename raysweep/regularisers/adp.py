"""ADP, Adaptive Diversity Promoting (Pang et al. 2019), the baseline of the PDD + DEG paper:
L = L_ECE - alpha * H(mean prediction) - beta * log det(M^T M + offset * I),
M's columns are the members' predictions with the true class removed, normalised to unit length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from raysweep.core.sections import Section
from raysweep.regularisers.base import Regulariser, StepOutputs, register


class ADPConfig(Section):
    alpha: float = Field(2.0, ge=0)
    beta: float = Field(0.5, ge=0)
    det_offset: float = Field(1e-6, gt=0, description="multiple of the identity added before the log-det")


def ensemble_entropy(stacked: torch.Tensor) -> torch.Tensor:
    """H of the mean of member softmaxes, per sample [B]."""
    p = stacked.softmax(-1).mean(0)
    return -(p * p.clamp_min(1e-20).log()).sum(-1)


def log_det_diversity(stacked: torch.Tensor, y: torch.Tensor, offset: float = 1e-6) -> torch.Tensor:
    """log det(M^T M + offset I) per sample [B]; finite even for collinear members thanks to the offset."""
    k, b, c = stacked.shape
    p = stacked.softmax(-1)  # [K,B,C]
    keep = ~F.one_hot(y, c).bool()  # [B,C]
    non_true = p.masked_select(keep.unsqueeze(0).expand(k, b, c)).view(k, b, c - 1)
    m = F.normalize(non_true, dim=-1).permute(1, 2, 0)  # [B, C-1, K]
    gram = m.transpose(1, 2) @ m + offset * torch.eye(k, device=stacked.device, dtype=stacked.dtype)
    return torch.linalg.slogdet(gram)[1]


def adp_regulariser(stacked: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, offset: float = 1e-6):
    """The terms ADP adds to L_ECE: -alpha * H - beta * log ED, averaged over the batch."""
    return (-alpha * ensemble_entropy(stacked) - beta * log_det_diversity(stacked, y, offset)).mean()


@register
class AdaptiveDiversityPromoting(Regulariser):
    key, Config = "adp", ADPConfig

    def term(self, out: StepOutputs) -> torch.Tensor:
        return adp_regulariser(out.logits, out.y[0], self.cfg.alpha, self.cfg.beta, self.cfg.det_offset)
