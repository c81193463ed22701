"""The recommender interface: Amazon Personalize (personalize-runtime) in production, the
local engine on the embedded default. ``GET /recommendations`` talks only to this."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence


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
    name: str

    def recommend(self, *, user_id: str | None = None, item_id: str | None = None,
                  num_results: int = 25, exclude: Sequence[str] = (),
                  filter_values: Mapping[str, str] | None = None) -> Recommendation:
        """Items for ``user_id`` (a userId or, for an anonymous visitor, the anonymousId)
        or related to ``item_id``; best first. ``exclude``: item ids the caller will drop
        anyway (a recommender may use it to fill the list; it need not)."""
        ...
