"""Popular items from the local store: the fallback when personalization is not possible
(no history, an opted-out visitor, Personalize down)."""
from __future__ import annotations

import threading
import time
from typing import Mapping, Sequence

import sqlalchemy as sa

from ..store import Store, interactions, items
from .base import Recommendation, ScoredItem


class PopularItems:
    """Items ranked by recent interactions (a purchase counts more than a view); items
    known only from the catalog come last. Cached for ``ttl`` seconds per process."""
    name = "popular"

    def __init__(self, store: Store, weights: Mapping[str, float] | None = None,
                 ttl: float = 60.0, window_days: float = 90.0, size: int = 500):
        self.store = store
        self.weights = dict(weights or {})
        self.ttl = ttl
        self.window = window_days * 86400
        self.size = size
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
            self._cache = (time.monotonic(), ranking)
            return ranking

    def _compute(self) -> list[ScoredItem]:
        with self.store.read() as conn:
            newest = conn.execute(sa.select(sa.func.max(interactions.c.timestamp))).scalar()
            scores: dict[str, float] = {}
            if newest is not None:
                rows = conn.execute(
                    sa.select(interactions.c.item_id, interactions.c.event_type,
                              sa.func.count())
                    .where(interactions.c.timestamp >= newest - self.window)
                    .group_by(interactions.c.item_id, interactions.c.event_type))
                for item_id, event_type, count in rows:
                    scores[item_id] = scores.get(item_id, 0.0) + \
                        self.weights.get(event_type, 1.0) * count
            ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[: self.size]
            if len(ranked) < self.size:
                known = {item_id for item_id, _ in ranked}
                for (item_id,) in conn.execute(sa.select(items.c.item_id)
                                               .order_by(items.c.updated_at.desc())
                                               .limit(self.size)):
                    if item_id not in known:
                        ranked.append((item_id, 0.0))
                    if len(ranked) >= self.size:
                        break
        top = ranked[0][1] if ranked and ranked[0][1] > 0 else 1.0
        return [ScoredItem(item_id, round(score / top, 6)) for item_id, score in ranked]

    def recommend(self, *, user_id: str | None = None, item_id: str | None = None,
                  num_results: int = 25, exclude: Sequence[str] = (),
                  filter_values: Mapping[str, str] | None = None) -> Recommendation:
        skip = set(exclude)
        if item_id:
            skip.add(item_id)
        chosen = [s for s in self.ranking() if s.item_id not in skip][:num_results]
        return Recommendation(items=chosen, source="popular")

    def rank(self, *, user_id: str | None = None, item_ids: Sequence[str] = (),
             filter_values: Mapping[str, str] | None = None) -> Recommendation:
        """``item_ids`` in popularity order; items without interactions or not in the
        ranking come last, in the caller's order (issue 8: POST /recommendations/rank)."""
        scores = {s.item_id: s.score for s in self.ranking()}
        position = {s.item_id: i for i, s in enumerate(self.ranking())}
        ordered = sorted(item_ids, key=lambda i: position.get(i, len(position)))
        return Recommendation(items=[ScoredItem(i, scores.get(i, 0.0)) for i in ordered],
                              source="popular")
