"""eval.calibration: how far the ensemble's confidence is from its accuracy on the test split:
expected calibration error (equal-width confidence bins: sum_b n_b / N * |accuracy_b - confidence_b|)
and the negative log-likelihood of the true class. Results calibration/ece, calibration/nll
(lower is better: reported, not a sweep objective)."""
from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field

from raysweep.core.data import eval_batches
from raysweep.core.ensemble import combine
from raysweep.core.sections import Section
from raysweep.evaluation.base import Evaluation, register


class CalibrationConfig(Section):
    bins: int = Field(15, ge=2, description="equal-width confidence bins of the ECE")


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int) -> float:
    """sum over equal-width bins of (bin size / N) * |accuracy - mean confidence| in the bin."""
    which = (confidence * bins).long().clamp_(max=bins - 1)
    error = torch.zeros(())
    for b in which.unique():
        inside = which == b
        error += inside.float().mean() * (correct[inside].float().mean() - confidence[inside].mean()).abs()
    return error.item()


@register
class Calibration(Evaluation):
    key, Config, default = "calibration", Optional[CalibrationConfig], CalibrationConfig()
    results = ("calibration/ece", "calibration/nll")

    @torch.no_grad()
    def run(self, ctx, report) -> None:
        log_probs, labels = [], []
        for x, y in eval_batches(ctx.data.test, ctx.cfg.eval.batch_size, ctx.device):
            # combine gives log averaged probabilities (or averaged logits): normalised either way
            log_probs.append(combine(ctx.stacked_fn(x), ctx.weights, ctx.how).log_softmax(-1).cpu())
            labels.append(y.cpu())
        log_probs, labels = torch.cat(log_probs), torch.cat(labels)
        confidence, predicted = log_probs.exp().max(1)
        ece = expected_calibration_error(confidence, predicted == labels, self.cfg.bins)
        nll = -log_probs.gather(1, labels.view(-1, 1)).mean().item()
        report.add("calibration/ece", ece, images=len(labels))
        report.add("calibration/nll", nll, images=len(labels))
        report.details["calibration"] = {"ece": ece, "nll": nll, "bins": self.cfg.bins, "samples": len(labels)}
