"""Recommendations checked against the visitor's traits.

``RecommendationService.recommend`` asks the recommender and the profile source at the same
time, applies the trait rules (exclusions keep the recommender's order; an opt-out gets
popular items), over-fetches so the caller still gets ``num_results`` items when that many
exist, and adds catalog details. A profile failure degrades the answer (it says so); a
recommender failure falls back to popular items.
"""
from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import sqlalchemy as sa

from . import metrics
from .profiles import Profile, ProfileSource, local_purchases, trait_items, truthy
from .recommenders import Recommendation, Recommender, RecommenderUnavailable
from .recommenders.personalize import filter_values_from_traits
from .recommenders.popular import PopularItems
from .store import Store, StoreUnavailable, items
from .recommenders.base import ScoredItem  # issue 8: ranking

log = logging.getLogger("webhook.recommend")

MAX_RESULTS = 500
ITEM_DETAILS = ("name", "url", "image_url", "price")


class NoRecommendations(Exception):
    """Neither the recommender nor the popular fallback can answer."""


@dataclass
class Request:
    user_id: str | None = None
    anonymous_id: str | None = None
    item_id: str | None = None
    num_results: int = 25

    @property
    def visitor(self) -> str | None:
        """The id the recommender knows the visitor by (AWS: a session id as userId)."""
        return self.user_id or self.anonymous_id


@dataclass
class Answer:
    item_list: list[dict]
    recommendation_id: str
    source: str
    filtered: dict
    degraded: dict = field(default_factory=dict)
    traits: dict = field(default_factory=dict)
    opted_out: bool = False

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "itemList": self.item_list,
            "recommendationId": self.recommendation_id,
            "source": self.source,
            "filtered": self.filtered,
            "traitsUsed": self.traits,
        }
        if self.degraded:
            body["degraded"] = self.degraded
        if self.opted_out:
            body["optedOut"] = True
        return body


class RecommendationService:
    def __init__(self, *, store: Store, recommender: Recommender, profiles: ProfileSource,
                 popular: PopularItems, exclusion_traits: Sequence[str], opt_out_trait: str,
                 purchase_events: Sequence[str], filter_values_map: Sequence[tuple[str, str]],
                 pool_size: int = 16):
        self.store = store
        self.recommender = recommender
        self.profiles = profiles
        self.popular = popular
        self.exclusion_traits = tuple(exclusion_traits)
        self.opt_out_trait = opt_out_trait
        self.purchase_events = tuple(purchase_events)
        self.filter_values_map = tuple(filter_values_map)
        self.trait_names = tuple(dict.fromkeys(
            [*self.exclusion_traits, *([opt_out_trait] if opt_out_trait else []),
             *(trait for _, trait in self.filter_values_map)]))
        self._pool_size = pool_size
        self._pool: ThreadPoolExecutor | None = None

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:  # made on first use: after gunicorn forks the worker
            self._pool = ThreadPoolExecutor(self._pool_size, thread_name_prefix="recommend")
        return self._pool

    # --- the parts, each safe to run in a thread -----------------------------------------

    def _profile(self, request: Request) -> Profile:
        if not request.visitor:
            return Profile({}, "ok", "none")
        return self.profiles.traits(user_id=request.user_id, anonymous_id=request.anonymous_id,
                                    names=self.trait_names)

    def _purchases(self, request: Request) -> list[str] | None:
        if not request.visitor:
            return []
        try:
            return local_purchases(self.store, self.purchase_events,
                                   user_id=request.user_id, anonymous_id=request.anonymous_id)
        except StoreUnavailable:
            return None

    def _ask(self, request: Request, count: int, filter_values: dict | None) -> Recommendation:
        return self.recommender.recommend(user_id=request.visitor, item_id=request.item_id,
                                          num_results=count, filter_values=filter_values)

    def _profile_and(self, request: Request, ask, degraded: dict):
        """The visitor's traits and ``ask(filter_values)`` (the recommender), at the same
        time, or one after the other when Personalize's filter needs the traits first.
        Returns (profile, the recommender's future, filter values); marks ``degraded``."""
        filter_values: dict | None = None
        if self.filter_values_map and request.visitor:
            profile = self._profile(request)
            filter_values, notes = filter_values_from_traits(profile.traits,
                                                             self.filter_values_map)
            filter_values = filter_values or None
            if notes:
                degraded["filter"] = "; ".join(notes)
            future = self.pool.submit(ask, filter_values)
        else:
            future = self.pool.submit(ask, None)
            profile = self._profile(request)  # meanwhile, on this thread
        if profile.degraded and profile.status != "not_found":
            degraded["profile"] = f"{profile.source}: {profile.status}" + (
                f" ({profile.detail})" if profile.detail else "")
        elif profile.status == "not_found" and profile.source == "segment":
            degraded["profile"] = "segment: no profile for this visitor"
        return profile, future, filter_values

    # --- the whole -------------------------------------------------------------------------

    def recommend(self, request: Request) -> Answer:
        wanted = request.num_results
        # Over-fetch: exclusions are not known before the traits arrive.
        count = min(MAX_RESULTS, max(wanted * 2, wanted + 10))
        degraded: dict[str, str] = {}

        purchases_future = self.pool.submit(self._purchases, request)
        profile, recommendation_future, filter_values = self._profile_and(
            request, lambda values: self._ask(request, count, values), degraded)

        try:
            recommendation = recommendation_future.result()
        except RecommenderUnavailable as exc:
            degraded["recommender"] = str(exc)
            recommendation = None
        except StoreUnavailable as exc:  # the local engine reads histories from the store
            degraded["recommender"] = f"local store unavailable ({exc})"
            recommendation = None
        purchases = purchases_future.result()
        if purchases is None:
            degraded["purchases"] = "local store unavailable"
            purchases = []

        opted_out = bool(self.opt_out_trait) and truthy(profile.traits.get(self.opt_out_trait))
        if opted_out or recommendation is None or not recommendation.items and request.visitor:
            # Opted out, recommender down, or nothing personal to say: popular items.
            reason = "opted_out" if opted_out else None
            recommendation = self._popular(request, count, reason, recommendation)

        exclusions: dict[str, str] = {}
        for trait in self.exclusion_traits:
            for item_id in trait_items(profile.traits.get(trait)):
                exclusions.setdefault(item_id, trait)
        for item_id in purchases:
            exclusions.setdefault(item_id, "recent_purchase")
        if request.item_id:
            exclusions.setdefault(request.item_id, "seed_item")

        chosen, filtered = self._apply(recommendation, exclusions, wanted)
        if len(chosen) < wanted and len(recommendation.items) >= count and count < MAX_RESULTS:
            # Too many were excluded: ask once more, for as many as allowed.
            try:
                again = (self._ask(request, MAX_RESULTS, filter_values)
                         if recommendation.source != "popular"
                         else self.popular.recommend(item_id=request.item_id,
                                                     num_results=MAX_RESULTS))
                chosen, filtered = self._apply(again, exclusions, wanted)
                recommendation = Recommendation(again.items, recommendation.source,
                                                recommendation.recommendation_id)
            except RecommenderUnavailable:
                pass

        item_list = self._with_details(chosen, degraded)
        metrics.RECOMMENDATIONS.labels(source=recommendation.source,
                                       degraded=str(bool(degraded)).lower()).inc()
        return Answer(
            item_list=item_list,
            recommendation_id=recommendation.recommendation_id or
            "rid-" + uuid.uuid4().hex[:32],
            source=recommendation.source,
            filtered=filtered,
            degraded=degraded,
            traits={name: profile.traits[name] for name in self.trait_names
                    if name in profile.traits},
            opted_out=opted_out,
        )

    def _popular(self, request: Request, count: int, reason: str | None,
                 failed: Recommendation | None) -> Recommendation:
        try:
            popular = self.popular.recommend(item_id=request.item_id, num_results=count)
        except StoreUnavailable:
            if failed is None and reason != "opted_out":
                raise  # the store is the cause: say so (503 store_unavailable)
            popular = Recommendation(items=[], source="popular")
        if not popular.items and reason == "opted_out":
            # Never the personalized list for someone who opted out, even if empty.
            return Recommendation([], "popular", details={"reason": reason})
        if not popular.items and failed is None:
            raise NoRecommendations("the recommender is unavailable and no popular items "
                                    "are known")
        if not popular.items and failed is not None:
            return failed
        return Recommendation(popular.items, "popular", details={"reason": reason} if reason
                              else {})

    @staticmethod
    def _apply(recommendation: Recommendation, exclusions: dict[str, str],
               wanted: int) -> tuple[list, dict]:
        reasons: dict[str, int] = {}
        chosen = []
        for scored in recommendation.items:
            reason = exclusions.get(scored.item_id)
            if reason:
                reasons[reason] = reasons.get(reason, 0) + 1
                continue
            if len(chosen) < wanted:
                chosen.append(scored)
        return chosen, {"count": sum(reasons.values()), "reasons": reasons}

    def _with_details(self, chosen: list, degraded: dict) -> list[dict]:
        ids = [scored.item_id for scored in chosen]
        catalog: dict[str, dict] = {}
        if ids:
            try:
                with self.store.read() as conn:
                    for row in conn.execute(sa.select(items).where(items.c.item_id.in_(ids))):
                        catalog[row.item_id] = {k: getattr(row, k) for k in ITEM_DETAILS
                                                if getattr(row, k) is not None}
            except StoreUnavailable:
                degraded["catalog"] = "local store unavailable"
        return [{"itemId": s.item_id, "score": s.score, **catalog.get(s.item_id, {})}
                for s in chosen]

    # --- ranking a caller's list (issue 8: POST /recommendations/rank) ----------------------

    def rank(self, request: Request, item_ids: Sequence[str], ranker) -> Answer:
        """``item_ids`` re-ordered for the visitor by ``ranker`` (a recommender with a
        ``rank`` method), with the same trait checks as ``recommend``: an opt-out gets the
        list in popularity order, exclusion traits and recent purchases are removed (and
        counted in ``filtered``). A ranker failure falls back to popularity order."""
        degraded: dict[str, str] = {}
        ids = list(item_ids)

        def ask(filter_values):
            return ranker.rank(user_id=request.visitor, item_ids=ids,
                               filter_values=filter_values)

        purchases_future = self.pool.submit(self._purchases, request)
        profile, ranking_future, _ = self._profile_and(request, ask, degraded)

        try:
            ranking: Recommendation | None = ranking_future.result()
        except RecommenderUnavailable as exc:
            degraded["recommender"] = str(exc)
            ranking = None
        purchases = purchases_future.result()
        if purchases is None:
            degraded["purchases"] = "local store unavailable"
            purchases = []

        opted_out = bool(self.opt_out_trait) and truthy(profile.traits.get(self.opt_out_trait))
        if opted_out or ranking is None:
            try:
                popular = self.popular.rank(item_ids=ids)
            except StoreUnavailable:
                degraded["popular"] = "local store unavailable"
                popular = Recommendation([ScoredItem(i, 0.0) for i in ids], "popular")
            ranking = Recommendation(popular.items, "popular",
                                     details={"reason": "opted_out"} if opted_out else {})
        else:
            # A ranker may leave out ids it cannot rank; they follow, in the caller's order.
            returned = {s.item_id for s in ranking.items}
            missing = [ScoredItem(i, 0.0) for i in ids if i not in returned]
            if missing:
                ranking = Recommendation(list(ranking.items) + missing, ranking.source,
                                         ranking.recommendation_id, ranking.details)

        exclusions: dict[str, str] = {}
        for trait in self.exclusion_traits:
            for item_id in trait_items(profile.traits.get(trait)):
                exclusions.setdefault(item_id, trait)
        for item_id in purchases:
            exclusions.setdefault(item_id, "recent_purchase")

        chosen, filtered = self._apply(ranking, exclusions, len(ids))
        item_list = self._with_details(chosen, degraded)
        metrics.RECOMMENDATIONS.labels(source=ranking.source,
                                       degraded=str(bool(degraded)).lower()).inc()
        return Answer(
            item_list=item_list,
            recommendation_id=ranking.recommendation_id or "rid-" + uuid.uuid4().hex[:32],
            source=ranking.source,
            filtered=filtered,
            degraded=degraded,
            traits={name: profile.traits[name] for name in self.trait_names
                    if name in profile.traits},
            opted_out=opted_out,
        )
