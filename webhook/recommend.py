"""The recommendation pipeline: one path for ``GET /recommendations`` and
``POST /recommendations/rank``.

Every answer goes through the same steps (``RecommendationService._answer``):

1. the visitor's local purchases (read at once, before any upstream knows them), the
   visitor's traits (the profile source) and the recommender's answer, concurrently (one
   after the other only when a Personalize filter needs the traits first);
2. consent (``consent_of``): personalized only when the opt-out trait was *read* as false
   (or the profile does not exist); opted out, or unknown because the profile could not be
   read (timeout, error, 429, paused, over budget): popular items, and the answer says why;
3. a recommender failure: popular items (503 when none are known);
4. exclusions (exclusion traits, recent purchases, the seed item), keeping the order, with
   one larger second fetch when too many were excluded;
5. catalog details; ``degraded`` says what could not be checked.

Then ``recommend`` offers the list for write-back (``_write_back``): the one place that
decides, and only for a personalized, non-degraded answer for a userId whose opt-out was
read as false. Trait values go into the JSON only when the caller proved, with a token,
that they are that visitor (``Answer.as_json``).

Which recommender answers is the visitor's experiment variant (``experiments.py``; one
variant without ``EXPERIMENT``); every step above applies to every variant alike. Every
answer is recorded for the insights (``impressions.py``), off the request path.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from . import metrics
from .consent import GRANTED, OPTED_OUT, UNKNOWN, OptOut, consent_of
from .experiments import Experiment, Variant
from .profiles import Profile, ProfileSource, local_purchases, trait_items
from .recommenders import Recommendation, RecommenderUnavailable, ScoredItem
from .recommenders.personalize import filter_values_from_traits
from .recommenders.popular import PopularItems
from .storage import Store, StoreUnavailable
from .storage.schema import items

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
    record: bool = True  # an answer someone sees (not a recomputation for write-back)

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
    consent: str
    variant: str = ""
    degraded: dict = field(default_factory=dict)
    traits: dict = field(default_factory=dict)  # the values used: private
    # Whether the visitor's profile exists at Segment: a Profile API 404 means Segment
    # does not know them (or SEGMENT_SPACE_ID is wrong), and nothing is written back.
    unknown_to_segment: bool = False

    @property
    def personalized(self) -> bool:
        return self.source != "popular"

    def as_json(self, disclose_traits: bool = False) -> dict[str, Any]:
        """The answer's JSON. What the trait checks did, and with which values, is the
        visitor's own data: ``filtered`` (how many items each check removed),
        ``traitsUsed``, ``traitValues`` and ``optedOut`` are in it only with
        ``disclose_traits``, when the caller holds a valid token for this userId. Without
        one (no SECRET_KEY, or an anonymous visitor's token) the answer says nothing of
        them: a list of candidates would otherwise tell anyone which of them a person
        bought, and ``traitsUsed`` whether they opted out."""
        body: dict[str, Any] = {
            "itemList": self.item_list,
            "recommendationId": self.recommendation_id,
            "source": self.source,
            "variant": self.variant,
        }
        if self.degraded:
            body["degraded"] = self.degraded
        if disclose_traits:
            body["filtered"] = self.filtered
            body["traitsUsed"] = sorted(self.traits)
            body["traitValues"] = self.traits
            if self.consent == OPTED_OUT:
                body["optedOut"] = True
        return body


@dataclass
class _Question:
    """What differs between recommending and ranking; everything else is shared."""

    ask: Callable[[dict | None], Recommendation]  # the recommender, with filter values
    popular: Callable[[int], Recommendation]  # the popular fallback, for n items
    wanted: int
    count: int  # asked for (over-fetch)
    seed_item: str | None = None
    ask_more: Callable[[dict | None], Recommendation] | None = None  # a larger 2nd fetch


class RecommendationService:
    def __init__(
        self,
        *,
        store: Store,
        experiment: Experiment,
        profiles: ProfileSource,
        popular: PopularItems,
        activation=None,
        recorder=None,
        exclusion_traits: Sequence[str],
        opt_out: OptOut,
        purchase_events: Sequence[str],
        filter_values_map: Sequence[tuple[str, str]],
        pool_size: int = 16,
    ):
        self.store = store
        self.experiment = experiment
        self.recorder = recorder  # impressions.ImpressionRecorder, or None: not recorded
        self.profiles = profiles
        self.popular = popular
        self.activation = activation
        self.exclusion_traits = tuple(exclusion_traits)
        self.opt_out = opt_out
        self.purchase_events = tuple(purchase_events)
        self.filter_values_map = tuple(filter_values_map)
        self.trait_names = tuple(
            dict.fromkeys(
                [
                    *self.exclusion_traits,
                    *([opt_out.trait] if opt_out.trait else []),
                    *(trait for _, trait in self.filter_values_map),
                ]
            )
        )
        self._pool_size = pool_size
        self._pool: ThreadPoolExecutor | None = None

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:  # made on first use: after gunicorn forks the worker
            self._pool = ThreadPoolExecutor(self._pool_size, thread_name_prefix="recommend")
        return self._pool

    # --- the two questions ---------------------------------------------------------------

    def recommend(self, request: Request) -> Answer:
        """Items for a visitor or related to an item; offered for write-back."""
        wanted = request.num_results
        # Over-fetch: exclusions are not known before the traits arrive.
        count = min(MAX_RESULTS, max(wanted * 2, wanted + 10))
        variant = self._variant(request)

        def ask(values, n=count):
            return variant.recommender.recommend(
                user_id=request.visitor,
                item_id=request.item_id,
                num_results=n,
                filter_values=values,
            )

        def popular(n):
            return self.popular.recommend(item_id=request.item_id, num_results=n)

        answer = self._answer(
            request,
            _Question(
                ask=ask,
                popular=popular,
                wanted=wanted,
                count=count,
                seed_item=request.item_id,
                ask_more=lambda values: ask(values, MAX_RESULTS),
            ),
            variant,
        )
        self._record(request, answer, "recommend")
        self._write_back(request, answer)
        return answer

    def rank(self, request: Request, item_ids: Sequence[str]) -> Answer:
        """``item_ids`` re-ordered for the visitor, with the same steps as ``recommend``
        (never written back: the list is the caller's)."""
        ids = list(dict.fromkeys(item_ids))
        variant = self._variant(request)

        def ask(values):
            ranking = variant.ranker.rank(
                user_id=request.visitor, item_ids=ids, filter_values=values
            )
            # A ranker may leave out ids it cannot rank; they follow, in the caller's order.
            returned = {s.item_id for s in ranking.items}
            missing = [ScoredItem(i, 0.0) for i in ids if i not in returned]
            if not missing:
                return ranking
            return Recommendation(
                list(ranking.items) + missing,
                ranking.source,
                ranking.recommendation_id,
                ranking.details,
            )

        answer = self._answer(
            request,
            _Question(
                ask=ask,
                popular=lambda n: self.popular.rank(item_ids=ids),
                wanted=len(ids),
                count=len(ids),
            ),
            variant,
        )
        self._record(request, answer, "rank")
        return answer

    # --- the steps, shared ---------------------------------------------------------------

    def _variant(self, request: Request) -> Variant:
        return self.experiment.choose(
            user_id=request.user_id, anonymous_id=request.anonymous_id, item_id=request.item_id
        )

    def _record(self, request: Request, answer: Answer, kind: str) -> None:
        if self.recorder is not None and request.record:
            self.recorder.record(
                recommendation_id=answer.recommendation_id,
                visitor=request.visitor,
                variant=answer.variant,
                source=answer.source,
                kind=kind,
                items=[i["itemId"] for i in answer.item_list],
            )

    def _answer(self, request: Request, question: _Question, variant: Variant) -> Answer:
        degraded: dict[str, str] = {}
        purchases_future = self.pool.submit(self._purchases, request)
        profile, recommendation, filter_values = self._profile_and_ask(request, question, degraded)
        consent = consent_of(profile, self.opt_out)
        purchases = purchases_future.result()
        if purchases is None:
            degraded["purchases"] = "local store unavailable"
            purchases = []

        if consent in (OPTED_OUT, UNKNOWN):
            # Never personalized without a confirmed consent: popular items.
            if consent == UNKNOWN:
                degraded["consent"] = "the opt-out could not be read: popular items"
            recommendation = self._popular(question, question.count, required=False)
        elif recommendation is None:
            recommendation = self._popular(question, question.count, required=True)
        elif not recommendation.items and request.visitor:
            # Nothing personal to say: popular items if any are known.
            try:
                popular = question.popular(question.count)
            except StoreUnavailable:
                popular = None
            if popular is not None and popular.items:
                recommendation = Recommendation(popular.items, "popular")

        exclusions: dict[str, str] = {}
        traits = profile.traits if profile is not None else {}
        for trait in self.exclusion_traits:
            for item_id in trait_items(traits.get(trait)):
                exclusions.setdefault(item_id, trait)
        for item_id in purchases:
            exclusions.setdefault(item_id, "recent_purchase")
        if question.seed_item:
            exclusions.setdefault(question.seed_item, "seed_item")

        chosen, filtered = self._apply(recommendation, exclusions, question.wanted)
        if (
            len(chosen) < question.wanted
            and len(recommendation.items) >= question.count
            and question.count < MAX_RESULTS
            and question.ask_more is not None
        ):
            # Too many were excluded: ask once more, for as many as allowed.
            try:
                again = (
                    question.ask_more(filter_values)
                    if recommendation.source != "popular"
                    else question.popular(MAX_RESULTS)
                )
                chosen, filtered = self._apply(again, exclusions, question.wanted)
                recommendation = Recommendation(
                    again.items, recommendation.source, recommendation.recommendation_id
                )
            except (RecommenderUnavailable, StoreUnavailable):
                pass

        item_list = self._with_details(chosen, degraded)
        metrics.RECOMMENDATIONS.labels(
            source=recommendation.source, degraded=str(bool(degraded)).lower()
        ).inc()
        return Answer(
            item_list=item_list,
            recommendation_id=recommendation.recommendation_id or "rid-" + uuid.uuid4().hex[:32],
            source=recommendation.source,
            filtered=filtered,
            consent=consent,
            variant=variant.name,
            degraded=degraded,
            traits={name: traits[name] for name in self.trait_names if name in traits},
            unknown_to_segment=(
                profile is not None
                and profile.source == "segment"
                and profile.status == "not_found"
            ),
        )

    def _profile(self, request: Request) -> Profile | None:
        if not request.visitor:
            return None
        return self.profiles.traits(
            user_id=request.user_id, anonymous_id=request.anonymous_id, names=self.trait_names
        )

    def _purchases(self, request: Request) -> list[str] | None:
        if not request.visitor:
            return []
        try:
            return local_purchases(
                self.store,
                self.purchase_events,
                user_id=request.user_id,
                anonymous_id=request.anonymous_id,
            )
        except StoreUnavailable:
            return None

    def _profile_and_ask(self, request: Request, question: _Question, degraded: dict):
        """The visitor's traits and the recommender's answer: at the same time, or one
        after the other when Personalize's filter needs the traits first (then the
        recommender is not asked at all unless the visitor consented). Returns (profile,
        recommendation or None if it failed, filter values); marks ``degraded``."""
        filter_values: dict | None = None
        if self.filter_values_map and request.visitor:
            profile = self._profile(request)
            if profile is None or consent_of(profile, self.opt_out) in (OPTED_OUT, UNKNOWN):
                future = None
            else:
                filter_values, notes = filter_values_from_traits(
                    profile.traits, self.filter_values_map
                )
                filter_values = filter_values or None
                if notes:
                    degraded["filter"] = "; ".join(notes)
                future = self.pool.submit(question.ask, filter_values)
        else:
            future = self.pool.submit(question.ask, None)
            profile = self._profile(request)  # meanwhile, on this thread
        if profile is not None and not profile.known:
            degraded["profile"] = f"{profile.source}: {profile.status}" + (
                f" ({profile.detail})" if profile.detail else ""
            )
        recommendation = None
        if future is not None:
            try:
                recommendation = future.result()
            except RecommenderUnavailable as exc:
                degraded["recommender"] = str(exc)
            except StoreUnavailable as exc:  # the local engine reads histories from the store
                degraded["recommender"] = f"local store unavailable ({exc})"
        return profile, recommendation, filter_values

    @staticmethod
    def _popular(question: _Question, count: int, *, required: bool) -> Recommendation:
        """Popular items instead of a personal answer. ``required``: the recommender
        failed, so no popular items at all is a 503 (NoRecommendations); otherwise (no
        consent) an empty list is the answer. A store outage is always a 503."""
        popular = question.popular(count)  # StoreUnavailable: the store is the cause
        if not popular.items and required:
            raise NoRecommendations("the recommender is unavailable and no popular items are known")
        return Recommendation(popular.items, "popular")

    @staticmethod
    def _apply(
        recommendation: Recommendation, exclusions: dict[str, str], wanted: int
    ) -> tuple[list, dict]:
        reasons: dict[str, int] = {}
        chosen: list = []
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
                        catalog[row.item_id] = {
                            k: getattr(row, k) for k in ITEM_DETAILS if getattr(row, k) is not None
                        }
            except StoreUnavailable:
                degraded["catalog"] = "local store unavailable"
        return [
            {"itemId": s.item_id, "score": s.score, **catalog.get(s.item_id, {})} for s in chosen
        ]

    # --- write-back: the one place that decides --------------------------------------------

    @staticmethod
    def may_write_back(request: Request, answer: Answer) -> bool:
        """Only a personalized, complete answer, for an identified visitor whose opt-out
        was read and is not opted out, and whom Segment knows (a Profile API 404 would
        have the write-back create a profile there)."""
        return (
            bool(request.user_id)
            and answer.consent == GRANTED
            and answer.personalized
            and not answer.degraded
            and bool(answer.item_list)
            and not answer.unknown_to_segment
        )

    def _write_back(self, request: Request, answer: Answer) -> None:
        if self.activation is not None and self.may_write_back(request, answer):
            self.activation.offer(request.user_id, [i["itemId"] for i in answer.item_list])
