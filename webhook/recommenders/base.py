"""The recommender interface: Amazon Personalize (personalize-runtime) in production, the
local engine on the embedded default. ``GET /recommendations`` and
``POST /recommendations/rank`` talk only to this."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class ScoredItem:
    item_id: str
    score: float


@dataclass(frozen=True)
class Recommendation:
    items: Sequence[ScoredItem]  # best first
    source: str  # "personalize", "local" or "popular"
    recommendation_id: str | None = None
    details: Mapping[str, object] = field(default_factory=dict)  # e.g. model version


class RecommenderUnavailable(Exception):
    """The recommender cannot answer now (an outage, a timeout, no model yet)."""


class Recommender(Protocol):
    """Both questions the recommendation pipeline asks (``webhook/recommend.py``)."""

    name: str

    def recommend(
        self,
        *,
        user_id: str | None = None,
        item_id: str | None = None,
        num_results: int = 25,
        filter_values: Mapping[str, str] | None = None,
    ) -> Recommendation:
        """Items for ``user_id`` (a userId or, for an anonymous visitor, the anonymousId)
        or related to ``item_id``; best first."""
        ...

    def rank(
        self,
        *,
        user_id: str | None = None,
        item_ids: Sequence[str] = (),
        filter_values: Mapping[str, str] | None = None,
    ) -> Recommendation:
        """``item_ids`` re-ordered for ``user_id``, best first; ids the recommender cannot
        rank may be left out or come last (the pipeline appends missing ones)."""
        ...
