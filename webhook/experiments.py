"""Experiments: which recommender answers a visitor (``EXPERIMENT=local:50,personalize:50``).

Each variant is a recommender (and a ranker for ``POST /recommendations/rank``):
``local`` (the local engine), ``popular`` (popular items: the control group),
``personalize`` (the configured campaign or recommender) or ``personalize:<ARN>``.
Without ``EXPERIMENT`` there is one variant, the configured recommender, and every answer
still names it.

A visitor's variant is fixed by a stable hash of their id (SHA-1, so every worker and
host agrees, across restarts), and it is kept after ``alias``: a visitor who already saw
answers keeps the variant of their first recorded answer (impressions), looked up over
every id of the person (``identity.resolve``). Someone who browsed anonymously in
variant B and then logs in is still in B, which keeps both the experience and the
statistics honest.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from .identity import resolve
from .recommenders import Recommender
from .storage import Store, StoreUnavailable
from .storage.schema import impressions

log = logging.getLogger("webhook.experiments")

BUCKETS = 10_000


@dataclass(frozen=True)
class Variant:
    name: str
    recommender: Recommender
    ranker: Recommender
    share: float = 1.0


def bucket(key: str) -> int:
    """A stable number in [0, BUCKETS) for a visitor id."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") % BUCKETS


class Experiment:
    def __init__(self, store: Store, variants: Sequence[Variant], remember: bool = True):
        if not variants:
            raise ValueError("an experiment needs at least one variant")
        self.store = store
        self.variants = tuple(variants)
        self.by_name = {v.name: v for v in self.variants}
        # Variant boundaries on the buckets, by share.
        total = sum(v.share for v in self.variants)
        edges, running = [], 0.0
        for variant in self.variants:
            running += variant.share
            edges.append(round(BUCKETS * running / total))
        self._edges = edges
        self.remember = remember and len(self.variants) > 1

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.variants]

    def by_hash(self, key: str) -> Variant:
        number = bucket(key)
        for variant, edge in zip(self.variants, self._edges):
            if number < edge:
                return variant
        return self.variants[-1]

    def choose(
        self,
        *,
        user_id: str | None = None,
        anonymous_id: str | None = None,
        item_id: str | None = None,
    ) -> Variant:
        if len(self.variants) == 1:
            return self.variants[0]
        visitor = user_id or anonymous_id
        if not visitor:  # items related to an item: nobody to keep apart
            return self.by_hash("item:" + (item_id or ""))
        if self.remember:
            try:
                kept = self._first_variant(user_id=user_id, anonymous_id=anonymous_id)
            except StoreUnavailable:
                kept = None  # the hash still gives a visitor without aliases their variant
            if kept is not None:
                return kept
        return self.by_hash(visitor)

    def _first_variant(self, *, user_id: str | None, anonymous_id: str | None) -> Variant | None:
        """The variant of the person's first recorded answer, if it is still one of ours."""
        with self.store.read() as conn:
            person = resolve(conn, user_id=user_id, anonymous_id=anonymous_id)
            ids = list(person.ids) or [user_id or anonymous_id or ""]
            name = conn.execute(
                sa.select(impressions.c.variant)
                .where(impressions.c.visitor.in_(ids), impressions.c.variant.in_(self.names))
                .order_by(impressions.c.shown_at)
                .limit(1)
            ).scalar()
        return self.by_name.get(name) if name else None
