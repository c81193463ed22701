"""Amazon Personalize as the recommender: personalize-runtime GetRecommendations."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from ..aws import LazyClient
from .base import Recommendation, RecommenderUnavailable, ScoredItem

log = logging.getLogger("webhook.recommenders.personalize")

MAX_RESULTS = 500
MAX_FILTER_KEYS = 25
MAX_FILTER_VALUE = 1000


def filter_values_from_traits(
    traits: Mapping[str, Any], mapping: Sequence[tuple[str, str]]
) -> tuple[dict, list[str]]:
    """Personalize ``filterValues`` from traits: ``{placeholder: '"a","b"'}``.

    A list trait becomes several quoted values; a value that would pass 1000 characters is
    cut at the last whole value that fits; at most 25 placeholders. Returns (values, notes).
    """
    values: dict[str, str] = {}
    notes: list[str] = []
    for placeholder, trait in mapping:
        if trait not in traits or traits[trait] in (None, "", []):
            continue
        if len(values) >= MAX_FILTER_KEYS:
            notes.append(f"filter value {placeholder} left out: at most {MAX_FILTER_KEYS}")
            continue
        raw = traits[trait]
        items = raw if isinstance(raw, list) else [raw]
        parts: list[str] = []
        for item in items:
            if isinstance(item, (dict, list)) or item is None:
                continue
            text = str(item).lower() if isinstance(item, bool) else str(item)
            quoted = '"' + text.replace('"', '\\"') + '"'
            if len(",".join(parts + [quoted])) > MAX_FILTER_VALUE:
                notes.append(f"filter value {placeholder} cut to {MAX_FILTER_VALUE} characters")
                break
            parts.append(quoted)
        if parts:
            values[placeholder] = ",".join(parts)
    return values, notes


class PersonalizeRecommender:
    name = "personalize"

    def __init__(
        self,
        *,
        campaign_arn: str = "",
        recommender_arn: str = "",
        filter_arn: str = "",
        region: str = "",
        timeout: float = 1.0,
        pool_size: int = 16,
        client: Any = None,
    ):
        self.campaign_arn = campaign_arn
        self.recommender_arn = recommender_arn
        self.filter_arn = filter_arn
        self._client = LazyClient(
            "personalize-runtime",
            region=region,
            timeout=timeout,
            pool_size=pool_size,
            client=client,
        )

    @property
    def client(self):
        return self._client.get()

    def recommend(
        self,
        *,
        user_id: str | None = None,
        item_id: str | None = None,
        num_results: int = 25,
        filter_values: Mapping[str, str] | None = None,
    ) -> Recommendation:
        request: dict[str, Any] = {"numResults": max(1, min(MAX_RESULTS, num_results))}
        if self.campaign_arn:
            request["campaignArn"] = self.campaign_arn
        else:
            request["recommenderArn"] = self.recommender_arn
        if user_id:
            request["userId"] = user_id
        if item_id:
            request["itemId"] = item_id
        if self.filter_arn and filter_values:
            request["filterArn"] = self.filter_arn
            request["filterValues"] = dict(filter_values)
        return self._call("get_recommendations", request, "itemList")

    def rank(
        self,
        *,
        user_id: str | None = None,
        item_ids: Sequence[str] = (),
        filter_values: Mapping[str, str] | None = None,
    ) -> Recommendation:
        """``item_ids`` re-ordered for ``user_id`` by a personalized-ranking campaign
        (GetPersonalizedRanking). Items the campaign does not know come last, in the
        caller's order (Personalize's own rule)."""
        if not self.campaign_arn:
            raise RecommenderUnavailable("Amazon Personalize: no ranking campaign configured")
        request: dict[str, Any] = {
            "campaignArn": self.campaign_arn,
            "inputList": list(item_ids),
            "userId": user_id,
        }
        if self.filter_arn and filter_values:
            request["filterArn"] = self.filter_arn
            request["filterValues"] = dict(filter_values)
        return self._call("get_personalized_ranking", request, "personalizedRanking")

    def _call(self, operation: str, request: dict, list_member: str) -> Recommendation:
        """One personalize-runtime call; any failure is ``RecommenderUnavailable``."""
        try:
            answer = getattr(self.client, operation)(**request)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            log.warning("personalize-runtime refused %s: %s", operation, code)
            raise RecommenderUnavailable(f"Amazon Personalize: {code}") from None
        except BotoCoreError as exc:
            log.warning("personalize-runtime unreachable: %s", type(exc).__name__)
            raise RecommenderUnavailable(f"Amazon Personalize: {type(exc).__name__}") from None
        items = [
            ScoredItem(str(entry["itemId"]), float(entry.get("score") or 0.0))
            for entry in answer.get(list_member, [])
            if entry.get("itemId")
        ]
        return Recommendation(
            items=items, source="personalize", recommendation_id=answer.get("recommendationId")
        )
