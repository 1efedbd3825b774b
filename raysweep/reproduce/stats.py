"""Seeds, intervals and verdicts: how a reproduction decides whether a paper's finding holds.

Every compared variant runs at several seeds (a study's `seeds:`). A variant's number is the mean over
its seeds with a 95% Student-t interval; a finding "A beats B" is judged on the difference of the two
means with Welch's t-interval (unequal variances, Welch-Satterthwaite degrees of freedom): seeds of
two variants are independent trainings, not pairs. The verdict is read off the interval:

  reproduced                      the interval lies on the paper's side of zero
  same direction, not established the mean difference has the paper's sign, the interval holds zero
  not reproduced                  the mean difference has the other sign (or is zero), the interval holds zero
  contradicted                    the interval lies on the other side of zero

With one seed per arm there is no interval, and the verdict says so. A study's checks re-evaluate one
seed's models under a stronger attack on the same images; `paired` compares two of them image by image
(its interval covers the choice of images, not of training seed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

LEVEL = 0.95
TEST = "Welch t-interval, 95%"


@dataclass(frozen=True)
class Estimate:
    mean: float
    half_width: float  # of the 95% interval; nan with one value
    n: int

    @property
    def bar(self) -> float:
        """The half-width as a plot's error bar: none (0) with one value."""
        return 0.0 if math.isnan(self.half_width) else self.half_width

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:.3f} (1 seed)"
        return f"{self.mean:.3f} ± {self.half_width:.3f}"


def estimate(values: list[float]) -> Estimate:
    """Mean and the half-width of its 95% Student-t interval."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to estimate from")
    mean = sum(values) / n
    if n < 2:
        return Estimate(mean, math.nan, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Estimate(mean, stats.t.ppf(0.5 + LEVEL / 2, n - 1) * sd / math.sqrt(n), n)


@dataclass(frozen=True)
class Comparison:
    diff: float  # mean(a) - mean(b)
    low: float
    high: float
    df: float
    verdict: str

    def __str__(self) -> str:
        if math.isnan(self.low):
            return f"{self.diff:+.3f} (no interval: {self.verdict})"
        return f"{self.diff:+.3f} [{self.low:+.3f}, {self.high:+.3f}]: {self.verdict}"


def compare(a: list[float], b: list[float], paper_sign: int = 1) -> Comparison:
    """mean(a) - mean(b) with Welch's 95% interval, and the verdict on a paper that found the
    difference's sign to be `paper_sign` (+1: a above b; -1: a below b)."""
    if paper_sign not in (1, -1):
        raise ValueError(f"paper_sign must be +1 or -1, got {paper_sign}")
    ea, eb = estimate(a), estimate(b)
    diff = ea.mean - eb.mean
    if ea.n < 2 or eb.n < 2:
        verdict = "one seed, no interval" + (": same direction" if diff * paper_sign > 0 else ": other direction")
        return Comparison(diff, math.nan, math.nan, math.nan, verdict)
    va, vb = _var(a) / ea.n, _var(b) / eb.n
    se = math.sqrt(va + vb)
    if se == 0:
        df, half = math.inf, 0.0
    else:
        df = (va + vb) ** 2 / (va ** 2 / (ea.n - 1) + vb ** 2 / (eb.n - 1))
        half = stats.t.ppf(0.5 + LEVEL / 2, df) * se
    return Comparison(diff, diff - half, diff + half, df, _verdict(diff, diff - half, diff + half, paper_sign))


PAIRED_TEST = "paired t-interval over images, 95%"


def paired(a: list[bool], b: list[bool], paper_sign: int = 1) -> Comparison:
    """Accuracy of A minus B on the same images (a[i], b[i]: image i classified correctly), with the 95%
    paired t-interval of the mean per-image difference. Its noise is which images were drawn, not which
    training seed: a verdict from it holds for these trained models only."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired needs two equal-length lists of at least 2 images, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    diff, n = sum(d) / len(d), len(d)
    half = stats.t.ppf(0.5 + LEVEL / 2, n - 1) * math.sqrt(_var(d) / n)
    return Comparison(diff, diff - half, diff + half, n - 1, _verdict(diff, diff - half, diff + half, paper_sign))


def _verdict(diff: float, low: float, high: float, paper_sign: int) -> str:
    if paper_sign not in (1, -1):
        raise ValueError(f"paper_sign must be +1 or -1, got {paper_sign}")
    near, far = (low, high) if paper_sign > 0 else (-high, -low)  # the interval, turned so the paper's side is +
    if near > 0:
        return "reproduced"
    if far < 0:
        return "contradicted"
    return "same direction, not established" if diff * paper_sign > 0 else "not reproduced"


def _var(values: list[float]) -> float:
    m = sum(values) / len(values)
    return sum((v - m) ** 2 for v in values) / (len(values) - 1)
