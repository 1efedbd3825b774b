"""Jacobian regularisation (the Jacobian Ensembles paper).

The penalty added to each member's loss is (lambda_JR / 2) * mean_i ||J(x_i)||_F^2, the full
squared Frobenius norm halved by the 1/2 in front, with J = d logits / d x. The estimator is
Hoffman, Roberts & Yaida (2019): ||J||_F^2 = C * E_v ||v^T J||^2, v uniform on the unit sphere
of R^C, one extra backward with create_graph per projection. `jacobian_sq_norm_forward` is the
cheaper estimator (train.jr.estimator: forward_mode, docs/estimators.md): J u along a random input
direction, carried through the forward pass as a forward-mode tangent.

Both functions take stacked logits [K,B,C] computed from per-member inputs x [K,B,...], so
member k's logits depend on x[k] only and one autograd call gives every member's Jacobian.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
from pydantic import Field, model_validator

from raysweep.core.sections import Section
from raysweep.core.seeding import randn_like
from raysweep.regularisers.base import Regulariser, StepOutputs, register


class JacobianRegConfig(Section):
    lambda_jr: float = Field(0.0, ge=0, le=2, description="L = CE + lambda_jr/2 * mean ||J||_F^2")
    n_proj: int = Field(1, ge=1)
    exact: bool = Field(False, description="exact ||J||_F^2 with C backward passes (tests, tiny models)")
    estimator: Literal["double_backward", "forward_mode"] = Field(
        "double_backward", description="double_backward: random output projections, one backward with "
        "create_graph (the reference); forward_mode: J u for one random unit input direction u per sample, carried "
        "through the forward pass as a forward-mode tangent, no double backward (docs/estimators.md)")

    @model_validator(mode="after")
    def _estimator_fits(self):
        if self.estimator == "forward_mode" and (self.exact or self.n_proj != 1):
            raise ValueError(f"train.jr.estimator 'forward_mode' draws one direction per sample and is not exact; "
                             f"it cannot be combined with exact: {self.exact} or n_proj: {self.n_proj} (use "
                             "estimator 'double_backward')")
        return self


def jacobian_sq_norm_estimate(logits: torch.Tensor, x: torch.Tensor, n_proj: int = 1,
                              generator: torch.Generator | None = None, create_graph: bool = True) -> torch.Tensor:
    """Unbiased random-projection estimate of ||J(x_i)||_F^2, shape [K, B]."""
    c = logits.shape[-1]
    total = torch.zeros(logits.shape[:2], device=logits.device, dtype=logits.dtype)
    for _ in range(n_proj):
        v = randn_like(logits, generator)
        v = v / v.norm(dim=-1, keepdim=True)
        (g,) = torch.autograd.grad((logits * v).sum(), x, create_graph=create_graph, retain_graph=True)
        total = total + c * g.pow(2).flatten(2).sum(-1)
    return total / n_proj


def jacobian_sq_norm_exact(logits: torch.Tensor, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Exact ||J(x_i)||_F^2 with one backward per class, shape [K, B]."""
    total = torch.zeros(logits.shape[:2], device=logits.device, dtype=logits.dtype)
    for j in range(logits.shape[-1]):
        (g,) = torch.autograd.grad(logits[..., j].sum(), x, create_graph=create_graph, retain_graph=True)
        total = total + g.pow(2).flatten(2).sum(-1)
    return total


def unit_directions(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One random unit vector per sample of x [K,B,...], uniform on the sphere of R^D (D = one sample's size)."""
    u = randn_like(x, generator)
    return u / u.flatten(2).norm(dim=-1).view(*x.shape[:2], *[1] * (x.dim() - 2))


def jacobian_sq_norm_forward(forward, x: torch.Tensor, generator: torch.Generator | None):
    """(logits [K,B,C], unbiased estimate of ||J(x_i)||_F^2 [K,B]) from one forward pass carrying a
    forward-mode tangent: J u for one unit direction u per sample, ||J||_F^2 = D * E_u ||J u||^2 (u uniform
    on the sphere, E[u u^T] = I/D). The logits come from the same pass, so no extra forward and no double
    backward: backward runs once through the primal and the tangent. Exact J u, no step size. Noisier than
    the output projections of jacobian_sq_norm_estimate when C is small (docs/estimators.md)."""
    u = unit_directions(x, generator)
    with fwAD.dual_level():
        logits, ju = fwAD.unpack_dual(forward(fwAD.make_dual(x, u)))
    return logits, x[0, 0].numel() * ju.float().pow(2).sum(-1)


def jr_penalty(logits, x, lambda_jr: float, n_proj: int = 1, exact: bool = False, generator=None) -> torch.Tensor:
    """Per-member penalty [K]: (lambda_JR / 2) * mean over the batch of ||J||_F^2."""
    sq = (jacobian_sq_norm_exact(logits, x, create_graph=True) if exact
          else jacobian_sq_norm_estimate(logits, x, n_proj, generator))
    return 0.5 * lambda_jr * sq.mean(1)


@register
class JacobianRegularisation(Regulariser):
    """Per member: JR trains each member on its own Jacobian, so any ensemble method may use it."""
    key, Config, default = "jr", JacobianRegConfig, JacobianRegConfig()
    joint, min_k = False, 1

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg is not None and cfg.lambda_jr > 0

    @property
    def needs_input_grad(self) -> bool:
        return self.cfg.estimator == "double_backward"

    def forward(self, forward, x, generator):
        if self.cfg.estimator != "forward_mode":
            return None
        logits, self._sq_norm = jacobian_sq_norm_forward(forward, x, generator)  # J u from the pass itself
        return logits

    def term(self, out: StepOutputs) -> torch.Tensor:
        c = self.cfg
        if c.estimator == "forward_mode":
            return 0.5 * c.lambda_jr * self._sq_norm.mean(1)
        return jr_penalty(out.logits, out.x, c.lambda_jr, c.n_proj, c.exact, out.generator)
