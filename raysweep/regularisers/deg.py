"""Dispersed Ensemble Gradients (the PDD + DEG paper): L_g = sum_{i<j} cos(g_i, g_j), averaged over
the batch, with g_k = d CE(f_k(x), y) / d x per sample.

The gradients come from the same forward that gives the CE loss (inputs copied per member so one
autograd call separates the members), with create_graph so L_g trains every member: one extra
backward and a double backward: 3.4x a plain step on a 2-core CPU (benchmarks/bench_methods.py),
against the paper's 13x.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from raysweep.core.sections import Section
from raysweep.regularisers.base import Regulariser, StepOutputs, register


class DEGConfig(Section):
    lambda_deg: float = Field(0.01, ge=0, description="L = L_ECE + lambda * sum_{i<j} cos(g_i, g_j)")


def member_input_grads(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, create_graph: bool = True):
    """g [K,B,D]: gradient of member k's per-sample CE w.r.t. its copy x[k] of the input."""
    k, b, c = logits.shape
    ce = F.cross_entropy(logits.reshape(k * b, c), y.reshape(-1), reduction="sum")
    (g,) = torch.autograd.grad(ce, x, create_graph=create_graph, retain_graph=True)
    return g.flatten(2)


def pairwise_cosines(g: torch.Tensor) -> torch.Tensor:
    """cos(g_i, g_j) for i < j, [P,B] with P = K(K-1)/2."""
    u = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    gram = torch.einsum("ibd,jbd->ijb", u, u)
    i, j = torch.triu_indices(g.shape[0], g.shape[0], offset=1)
    return gram[i, j]


def deg_penalty(g: torch.Tensor) -> torch.Tensor:
    """sum over member pairs of the cosine of their input gradients, averaged over the batch."""
    return pairwise_cosines(g).sum(0).mean()


@register
class DispersedEnsembleGradients(Regulariser):
    key, Config = "deg", DEGConfig

    @property
    def needs_input_grad(self) -> bool:
        return True

    def term(self, out: StepOutputs) -> torch.Tensor:
        return self.cfg.lambda_deg * deg_penalty(out.member_input_grads())
