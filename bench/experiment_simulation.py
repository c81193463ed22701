#!/usr/bin/env python3
"""What looking at /insights every day does to its conclusions, in simulated experiments.

Usage (from the repo root)::

    .venv/bin/python bench/experiment_simulation.py [--runs 10000] [--seed 29]

The simulation of tests/test_insights_stats.py (two arms, 30 days, a look a day at
everything so far; visitors click 10 %, a third of clickers add to the cart, half of those
order; the four comparisons /insights makes; Benjamini–Hochberg at 5 % over them), with
more runs than the tests afford, printed as the figures bench/README.md keeps:

* A/A: the share of runs that ever name a winner, always-valid vs fixed-sample;
* a 20 % lift in clicks: the share found before the planned sample size, and the median
  day it is found, for plans of 80 % and 90 % power, for one measure and for four
  (Bonferroni); the fixed-sample test at the planned size beside it;
* the sample-ratio check: false alarms of a correct 50/50 split and detections of a
  45/55 one, by visitors.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_insights_stats import (  # noqa: E402
    CLICK,
    DAYS,
    METRICS,
    declares_a_winner,
    planned_visitors,
    simulate,
)
from webhook.insights_stats import ALPHA, SRM_ALPHA, benjamini_hochberg  # noqa: E402


def a_a(rng, runs: int) -> None:
    print(f"A/A, {DAYS} daily looks, {runs:,} runs an arm size:")
    for per_day in (100, 400, 1000):
        sequential, fixed, _ = simulate(rng, runs, per_day, lift=0.0, expected=5000)
        print(
            f"  {per_day:>5} visitors an arm a day: ever a winner, always valid "
            f"{declares_a_winner(sequential).any(axis=1).mean():.2%}; fixed sample "
            f"{declares_a_winner(fixed).any(axis=1).mean():.2%} (last look alone "
            f"{declares_a_winner(fixed[:, -1]).mean():.2%})"
        )


def lift(rng, runs: int) -> None:
    print(f"A real 20 % lift in clicks (from {CLICK:.0%}), {runs:,} runs each plan:")
    for power in (0.80, 0.90):
        for metrics in (1, METRICS):
            planned = planned_visitors(CLICK, 0.20, power=power, metrics=metrics)
            per_day = math.ceil(planned / DAYS)
            sequential, fixed, differences = simulate(
                rng, runs, per_day, lift=0.20, expected=2 * planned
            )
            found = benjamini_hochberg(sequential, ALPHA) & (differences > 0)
            first = np.where(found.any(axis=(1, 2)), found.any(axis=2).argmax(axis=1) + 1, DAYS + 1)
            at_plan = benjamini_hochberg(fixed[:, -1], ALPHA) & (differences[:, -1] > 0)
            print(
                f"  plan {power:.0%} power, alpha shared by {metrics}: {planned:,} an arm "
                f"({per_day}/day); always valid finds it before the plan in "
                f"{np.mean(first < DAYS):.1%} (by it {np.mean(first <= DAYS):.1%}), median "
                f"day {np.median(first):g}; fixed sample at the plan "
                f"{at_plan.any(axis=-1).mean():.1%}"
            )


def sample_ratio(rng, runs: int) -> None:
    print(f"Sample-ratio check at p < {SRM_ALPHA}, {runs:,} runs:")
    for visitors in (1000, 2000, 4000, 10000):
        rates = []
        for share in (0.5, 0.45):
            first = rng.binomial(visitors, share, runs)
            table = np.stack([first, visitors - first], axis=1)
            rates.append(np.mean(stats.chisquare(table, axis=1).pvalue < SRM_ALPHA))
        print(
            f"  {visitors:>6,} visitors: 50/50 flagged {rates[0]:.2%}; 45/55 flagged {rates[1]:.1%}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=29)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    started = time.monotonic()
    a_a(rng, args.runs)
    lift(rng, max(1000, args.runs // 2))
    sample_ratio(rng, 10 * args.runs)
    print(f"({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
