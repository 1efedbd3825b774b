"""eval.jacobian_samples: the exact squared Frobenius norm of the input Jacobian of each member and
of the ensemble's logit combination, on the first test images. Results jacobian_sq_norm/{members_mean,
ensemble}."""
from __future__ import annotations

import torch

from raysweep.evaluation.base import Evaluation, register


def ensemble_jacobian_norms(stacked_fn, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ||J||_F^2 per sample of each member [K,B] and of the convex combination of logits
    F = sum_k c_k f_k [B], whose Jacobian is J_F = sum_k c_k J_k (the Jacobian Ensembles paper)."""
    x = x.detach().requires_grad_(True)
    stacked = stacked_fn(x)  # [K,B,C], shared input
    k, b, c = stacked.shape
    members = torch.zeros(k, b, device=x.device)
    ens = torch.zeros(b, device=x.device)
    w = weights.to(stacked).view(-1, 1)
    for j in range(c):
        # Member Jacobians need separate backward passes since they share x.
        rows = [torch.autograd.grad(stacked[m, :, j].sum(), x, retain_graph=True)[0] for m in range(k)]
        rows = torch.stack(rows).flatten(2)  # [K,B,D]
        members += rows.pow(2).sum(-1)
        ens += (w.unsqueeze(-1) * rows).sum(0).pow(2).sum(-1)
    return members.detach(), ens.detach()


@register
class JacobianNorms(Evaluation):
    key, Config, default = "jacobian_samples", int, 200
    results = ("jacobian_sq_norm/members_mean", "jacobian_sq_norm/ensemble")

    def run(self, ctx, report) -> None:
        x, _ = ctx.data.test.batch(torch.arange(min(self.cfg, len(ctx.data.test))), ctx.device)
        with torch.enable_grad():
            member_sq, ens_sq = ensemble_jacobian_norms(ctx.stacked_fn, x, ctx.weights)
        report.add("jacobian_sq_norm/members_mean", member_sq.mean().item(), images=x.shape[0])
        report.add("jacobian_sq_norm/ensemble", ens_sq.mean().item(), images=x.shape[0])
        report.details["jacobian_sq_norm"] = {
            "members": member_sq.mean(1).tolist(), "members_mean": member_sq.mean().item(),
            "ensemble": ens_sq.mean().item(), "samples": x.shape[0], "ensemble_of": "logit combination sum_k c_k f_k"}
