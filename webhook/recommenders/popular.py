"""Popular items from the local store: the fallback when personalization is not possible
(no history, an opted-out visitor or one whose consent is unknown, a recommender outage),
and the local engine's answer before its first model."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np
import sqlalchemy as sa

from ..engine.model import UNKNOWN_EVENT_WEIGHT
from ..popularity import DEFAULT_HALF_LIFE_DAYS, decayed_popularity
from ..storage import Store
from ..storage.schema import interactions, items
from .base import Recommendation, ScoredItem

BUCKET_SECONDS = 86400  # interactions are counted per item, event type and day


class PopularItems:
    """Items ranked by event-weighted interactions decayed from the newest one (the one
    algorithm: ``webhook/popularity.py``); items known only from the catalog come last.
    Cached for ``ttl`` seconds per process; an empty ranking (a store with no items yet)
    is not cached, so the first events a new shop sends show up at once."""

    name = "popular"

    def __init__(
        self,
        store: Store,
        weights: Mapping[str, float] | None = None,
        ttl: float = 60.0,
        size: int = 500,
        half_life_days: float = DEFAULT_HALF_LIFE_DAYS,
    ):
        self.store = store
        self.weights = dict(weights or {})
        self.ttl = ttl
        self.size = size
        self.half_life_days = half_life_days
        self._cache: tuple[float, list[ScoredItem]] | None = None
        self._lock = threading.Lock()

    def ranking(self) -> list[ScoredItem]:
        now = time.monotonic()
        cached = self._cache
        if cached and now - cached[0] < self.ttl:
            return cached[1]
        with self._lock:
            cached = self._cache
            if cached and now - cached[0] < self.ttl:
                return cached[1]
            ranking = self._compute()
            self._cache = (time.monotonic(), ranking) if ranking else None
            return ranking

    def _compute(self) -> list[ScoredItem]:
        # One pass over the interactions, aggregated in the database per item, event type
        # and day (a few rows per item and day, whatever the volume).
        # (A literal, not a bound parameter: PostgreSQL must see the same expression in
        # the select list and in GROUP BY.)
        day = sa.cast(interactions.c.timestamp / sa.literal_column(str(BUCKET_SECONDS)), sa.Integer)
        with self.store.read() as conn:
            rows = conn.execute(
                sa.select(
                    interactions.c.item_id, interactions.c.event_type, day, sa.func.count()
                ).group_by(interactions.c.item_id, interactions.c.event_type, day)
            ).all()
            numbers: dict[str, int] = {}
            item_col = [numbers.setdefault(item_id, len(numbers)) for item_id, _, _, _ in rows]
            scores = decayed_popularity(
                np.asarray(item_col, dtype=np.int64),
                np.asarray(
                    [self.weights.get(event, UNKNOWN_EVENT_WEIGHT) for _, event, _, _ in rows],
                    dtype=np.float64,
                ),
                np.asarray([float(bucket) * BUCKET_SECONDS for _, _, bucket, _ in rows]),
                len(numbers),
                np.asarray([count for *_, count in rows], dtype=np.float64),
                half_life_days=self.half_life_days,
            )
            ranked = sorted(
                ((item_id, float(scores[n])) for item_id, n in numbers.items()),
                key=lambda kv: (-kv[1], kv[0]),
            )[: self.size]
            if len(ranked) < self.size:
                known = {item_id for item_id, _ in ranked}
                for (item_id,) in conn.execute(
                    sa.select(items.c.item_id).order_by(items.c.updated_at.desc()).limit(self.size)
                ):
                    if item_id not in known:
                        ranked.append((item_id, 0.0))
                    if len(ranked) >= self.size:
                        break
        return [ScoredItem(item_id, round(score, 6)) for item_id, score in ranked]

    def recommend(
        self,
        *,
        user_id: str | None = None,
        item_id: str | None = None,
        num_results: int = 25,
        filter_values: Mapping[str, str] | None = None,
    ) -> Recommendation:
        chosen = [s for s in self.ranking() if s.item_id != item_id][:num_results]
        return Recommendation(items=chosen, source="popular")

    def rank(
        self,
        *,
        user_id: str | None = None,
        item_ids: Sequence[str] = (),
        filter_values: Mapping[str, str] | None = None,
    ) -> Recommendation:
        """``item_ids`` in popularity order; items without interactions or not in the
        ranking come last, in the caller's order."""
        ranking = self.ranking()
        scores = {s.item_id: s.score for s in ranking}
        position = {s.item_id: i for i, s in enumerate(ranking)}
        ordered = sorted(item_ids, key=lambda i: position.get(i, len(position)))
        return Recommendation(
            items=[ScoredItem(i, scores.get(i, 0.0)) for i in ordered], source="popular"
        )
