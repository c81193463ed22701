"""Popularity: the one algorithm behind every "popular items" list.

Used by the popular fallback (``recommenders/popular.py``: opted-out and unknown visitors,
a recommender outage), by the local engine before its first model, and by the model itself
(training), so they never disagree.

Each interaction counts its event weight (one table: ``engine.model.DEFAULT_EVENT_WEIGHTS``
with ``ENGINE_EVENT_WEIGHTS`` over it), halved for every half-life of age. Age is measured
from the **newest interaction**, never from the wall clock, so a catalogue imported from
years ago ranks as it did then. The half-life is at least ``half_life_days``, and at least
the time the newest ``window`` interactions span: a handful of new events after a long
quiet period (an import of old data, then the first live traffic) then cannot outrank the
long-established best-sellers, because the window stretches back over the old data until it
holds enough interactions to mean something. Ages are capped at ``MAX_AGE_HALF_LIVES`` so
scores stay in a sane range (the oldest count 2**-20 of the newest, never 1e-116), and
scores are scaled so the best item has 1.
"""

from __future__ import annotations

import numpy as np

DEFAULT_HALF_LIFE_DAYS = 30.0
DEFAULT_WINDOW = 1000  # interactions the decay window must hold
MAX_AGE_HALF_LIVES = 20.0  # older counts as this old: 2**-20 ≈ 1e-6 of a new event


def decayed_popularity(
    items: np.ndarray,
    weights: np.ndarray,
    times: np.ndarray,
    n_items: int,
    counts: np.ndarray | None = None,
    *,
    half_life_days: float = DEFAULT_HALF_LIFE_DAYS,
    window: int = DEFAULT_WINDOW,
) -> np.ndarray:
    """Scores in [0, 1] per item number (float64), from interactions given as item
    numbers, event weights and times (epoch seconds). ``counts``: how many interactions
    each row stands for (rows may be aggregates sharing one time); default one each."""
    scores = np.zeros(n_items, dtype=np.float64)
    if len(times) == 0 or n_items == 0:
        return scores
    times = np.asarray(times, dtype=np.float64)
    counts = np.ones(len(times)) if counts is None else np.asarray(counts, dtype=np.float64)
    newest = float(times.max())
    # The time the newest `window` interactions span.
    order = np.argsort(-times, kind="stable")
    reached = np.cumsum(counts[order])
    last = min(int(np.searchsorted(reached, window)), len(order) - 1)
    span = newest - float(times[order[last]])
    half_life = max(half_life_days * 86400.0, span, 1.0)
    age = np.minimum((newest - times) / half_life, MAX_AGE_HALF_LIVES)
    np.add.at(
        scores,
        np.asarray(items, dtype=np.int64),
        np.asarray(weights, dtype=np.float64) * counts * np.exp2(-age),
    )
    top = scores.max()
    if top > 0:
        scores /= top
    return scores
