"""The statistics behind ``/insights``: fixed-sample tests, always-valid results, the
sample-ratio check and the false-discovery rate. Plain functions of counts and sums, no
Flask and no storage; the interval and p-value functions take numpy arrays as well as
numbers (the simulation tests run thousands of experiments at once).

**Fixed-sample** (valid for one look at a sample size fixed in advance): Wilson's score
interval for a rate; the two-sided z-test of a difference (pooled standard error for two
proportions, unpooled for means) and the Wald interval ``d ± z·se``.

**Always valid** (valid at every look, however often one looks and whenever one stops):
the asymptotic confidence sequence for the mean of i.i.d. observations of Waudby-Smith,
Arbour, Sinha, Kennedy and Ramdas, "Time-uniform central limit theory and asymptotic
confidence sequences" (Annals of Statistics 2024; arXiv 2103.06476, Section 2), the one
GrowthBook uses:

    d̂_t ± σ̂_t · sqrt( 2(tρ² + 1) / (t²ρ²) · log( sqrt(tρ² + 1) / α ) )

for the mean d̂_t of t observations with standard deviation σ̂_t. Here t is the number of
visitors in both arms together and σ̂_t² = t · se², se the difference's (unpooled)
standard error, so that with v = tρ² the half-width is

    se · sqrt( (v + 1)/v · (log(v + 1) − 2 log α) ).

It is Robbins' normal mixture: the set of differences d at which the mixture martingale
Λ_t(d) = (1 + v)^(−1/2) · exp( z_t(d)² · v / (2(1 + v)) ), z_t(d) = (d̂_t − d)/se, stays
below 1/α (Howard, Ramdas, McAuliffe and Sekhon, "Time-uniform, nonparametric,
nonasymptotic confidence sequences", Annals of Statistics 2021, arXiv 1810.08240: the
two-sided normal-mixture boundary sqrt((V + r) log((V + r)/(r α²))) with r = 1/ρ²). By
Ville's inequality P(Λ_t(d) ≥ 1/α for some t) ≤ α, so its always-valid p-value for "no
difference" is

    p_t = min(1, 1/Λ_t(0)) = min(1, sqrt(1 + v) · exp( −z_t² · v / (2(1 + v)) )),

the same as the mixture SPRT's (Johari, Koomen, Pekelis and Walsh, "Always valid
inference", Operations Research 2022, arXiv 1512.04922): p_t ≤ α exactly when 0 is outside
the sequence.

ρ is set once for the experiment from the number of visitors ``expected`` at which one
expects to decide (``EXPERIMENT_EXPECTED_VISITORS``; GrowthBook's tuning parameter, 5,000
by default): the sequence is then about as narrow as it can be there (checked against a
numerical minimisation in the tests). The paper's choice (its appendix on tuning ρ; eq. 161
of the version GrowthBook cites):

    ρ² = ( −2 log α + log(1 − 2 log α) ) / expected.

**Sample-ratio mismatch**: Pearson's chi-squared test of the visitors per variant against
the configured shares; p < 0.001 is a mismatch (GrowthBook's and Eppo's threshold).

**Several comparisons**: Benjamini and Hochberg (1995, J. R. Statist. Soc. B 57:289) over
the always-valid p-values of every variant and metric, at a false-discovery rate of α.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# scipy.special, not scipy.stats: that import costs every process far more (bench/README.md).
from scipy import special

ALPHA = 0.05
Z95 = 1.959963984540054  # the two-sided 95 % normal quantile
SRM_ALPHA = 0.001


# --- fixed-sample ---------------------------------------------------------------------------


def wilson(successes: int, trials: int, z: float = Z95) -> dict:
    """The rate and its Wilson score interval (95 % by default)."""
    if trials <= 0:
        return {"value": None, "low": None, "high": None}
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return {
        "value": round(p, 6),
        "low": round(max(0.0, centre - half), 6),
        "high": round(min(1.0, centre + half), 6),
    }


def two_proportion_test(x1: int, n1: int, x2: int, n2: int) -> dict:
    """Two-sided z-test of p2 - p1 with the pooled standard error: difference, z, p."""
    if n1 <= 0 or n2 <= 0:
        return {"difference": None, "z": None, "pValue": None}
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return {"difference": round(p2 - p1, 6), "z": 0.0, "pValue": 1.0}
    z = (p2 - p1) / se
    return {
        "difference": round(p2 - p1, 6),
        "z": round(z, 4),
        "pValue": float(f"{math.erfc(abs(z) / math.sqrt(2)):.6g}"),
    }


def fixed_p_value(z):
    """Two-sided p-value of a standard normal statistic."""
    return 2 * special.ndtr(-np.abs(z))  # the normal survival function at |z|, twice


# --- always valid ---------------------------------------------------------------------------


def mixture_rho(expected: float, alpha: float = ALPHA) -> float:
    """ρ that makes the confidence sequence about as narrow as it can be at ``expected``
    observations (Waudby-Smith et al., the appendix on tuning ρ)."""
    if expected <= 0:
        raise ValueError("expected must be greater than 0")
    log_alpha = math.log(alpha)
    return math.sqrt((-2 * log_alpha + math.log(1 - 2 * log_alpha)) / expected)


def sequence_half_width(se, n, rho: float, alpha: float = ALPHA):
    """The half-width of the asymptotic confidence sequence for a mean of ``n``
    observations whose standard error is ``se`` (module docstring)."""
    v = np.asarray(n, dtype=float) * rho * rho
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(se, dtype=float) * np.sqrt(
            (v + 1) / v * (np.log1p(v) - 2 * math.log(alpha))
        )


def always_valid_p_value(difference, se, n, rho: float):
    """min(1, 1/Λ_t(0)) of Robbins' normal mixture (module docstring)."""
    v = np.asarray(n, dtype=float) * rho * rho
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.asarray(difference, dtype=float) / np.asarray(se, dtype=float)
        log_p = 0.5 * np.log1p(v) - z * z * v / (2 * (1 + v))
    return np.minimum(1.0, np.exp(log_p))


# --- one comparison ---------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One arm's visitors: ``n`` of them, the sum of a per-visitor value and the sum of its
    squares (for a yes/no metric both sums are the count of yeses). Numbers, or numpy
    arrays of many arms at once."""

    n: int
    total: float
    squares: float

    def mean_and_variance(self, binary: bool):
        """The mean per visitor and the variance of that mean: p(1 − p)/n for a yes/no
        metric, else the sample variance (n − 1 in its denominator) over n."""
        n = np.asarray(self.n, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = np.asarray(self.total, dtype=float) / n
            if binary:
                return mean, mean * (1 - mean) / n
            spread = np.maximum(0.0, np.asarray(self.squares, dtype=float) - n * mean * mean)
            return mean, spread / (n - 1) / n


def difference_test(
    base: Sample, other: Sample, *, rho: float, binary: bool, alpha: float = ALPHA
) -> dict:
    """``other`` against ``base``: the difference of the means, its always-valid interval
    and p-value, and the fixed-sample ones beside them (the z-test with the pooled
    standard error for a yes/no metric, as ``two_proportion_test``). Arrays in, arrays
    out; NaN where an arm is empty."""
    mean_base, var_base = base.mean_and_variance(binary)
    mean_other, var_other = other.mean_and_variance(binary)
    difference = mean_other - mean_base
    se = np.sqrt(var_base + var_other)
    n = np.asarray(base.n, dtype=float) + np.asarray(other.n, dtype=float)
    half = sequence_half_width(se, n, rho, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        if binary:
            pooled = (np.asarray(base.total, dtype=float) + other.total) / n
            z = difference / np.sqrt(
                pooled * (1 - pooled) * (1 / np.asarray(base.n) + 1 / np.asarray(other.n))
            )
        else:
            z = difference / se
    z_alpha = -special.ndtri(alpha / 2)  # the normal quantile above alpha / 2
    return {
        "difference": difference,
        "se": se,
        "sequential": {
            "low": difference - half,
            "high": difference + half,
            "pValue": always_valid_p_value(difference, se, n, rho),
        },
        "fixed": {
            "low": difference - z_alpha * se,
            "high": difference + z_alpha * se,
            "z": z,
            "pValue": fixed_p_value(z),
        },
    }


def compare(
    base: Sample, other: Sample, *, rho: float, binary: bool, alpha: float = ALPHA
) -> dict | None:
    """``difference_test`` of one pair of arms, as plain numbers, with the means and the
    relative difference. None when either arm has fewer than two visitors or neither
    varies: there is nothing to test."""
    if base.n < 2 or other.n < 2:
        return None
    result = difference_test(base, other, rho=rho, binary=binary, alpha=alpha)
    if not result["se"] > 0:
        return None
    mean_base = base.total / base.n
    return {
        "baselineValue": mean_base,
        "value": other.total / other.n,
        "difference": float(result["difference"]),
        "relativeDifference": float(result["difference"]) / mean_base if mean_base else None,
        "sequential": {k: float(v) for k, v in result["sequential"].items()},
        "fixed": {k: float(v) for k, v in result["fixed"].items()},
    }


# --- the split ------------------------------------------------------------------------------


def sample_ratio_p_value(observed: Sequence[int], shares: Sequence[float]) -> float | None:
    """Pearson's chi-squared test of the visitors per variant against the configured
    shares (any positive weights). None with fewer than two variants or no visitors."""
    counts = np.asarray(observed, dtype=float)
    weights = np.asarray(shares, dtype=float)
    if len(counts) < 2 or counts.sum() <= 0:
        return None
    expected = counts.sum() * weights / weights.sum()
    statistic = float(((counts - expected) ** 2 / expected).sum())
    return float(special.chdtrc(len(counts) - 1, statistic))  # chi-squared survival, k-1 df


# --- several comparisons ----------------------------------------------------------------


def benjamini_hochberg(p_values, q: float = ALPHA):
    """Which hypotheses Benjamini–Hochberg rejects at false-discovery rate ``q``: the k
    smallest p-values, k the largest rank with p_(k) ≤ k·q/m. Along the last axis, so a
    2-D array is many families at once."""
    p = np.asarray(p_values, dtype=float)
    m = p.shape[-1]
    if m == 0:
        return np.zeros(p.shape, dtype=bool)
    order = np.argsort(p, axis=-1)
    ranked = np.take_along_axis(p, order, axis=-1)
    below = ranked <= q * np.arange(1, m + 1) / m
    # k: the largest rank below its line (0 when none is).
    k = np.where(below.any(axis=-1), m - np.argmax(below[..., ::-1], axis=-1), 0)
    rejected_ranked = np.arange(m) < np.expand_dims(k, -1)
    rejected = np.empty_like(rejected_ranked)
    np.put_along_axis(rejected, order, rejected_ranked, axis=-1)
    return rejected
