"""POST /recommendations/rank: re-rank a caller's list of item ids for a visitor.

Body (JSON): ``{"userId": "u1" | "anonymousId": "a1", "itemIds": ["sku-1", ...]}``, 1–500
distinct ids (Personalize's ``inputList`` limit; repeated ids count once). The ranker is
Amazon Personalize's GetPersonalizedRanking when ``PERSONALIZE_RANKING_CAMPAIGN_ARN`` is
set, the local engine otherwise (popularity before its first model). The same pipeline as
``GET /recommendations`` (``RecommendationService.rank``): exclusion traits and recent
purchases are removed (and counted in ``filtered``), a visitor who opted out or whose
opt-out cannot be read gets the list in popularity order, the same token when
``SECRET_KEY`` is set, 503 while the store is down. The answer has
``GET /recommendations``' shape.
"""

from __future__ import annotations

import json

from flask import Blueprint, current_app

from ..recommend import NoRecommendations, Request
from ..recommenders.personalize import MAX_RESULTS
from ..storage import StoreUnavailable
from .edge import BadBody, BadParameter, TooLarge, read_body, visitor_id
from .errors import error_response
from .recommendations import answer_response, check_access, unavailable

bp = Blueprint("rank", __name__)

MAX_ITEMS = MAX_RESULTS  # GetPersonalizedRanking takes at most 500 ids
MAX_BODY = 256 * 1024  # 500 ids of 256 characters, escaped, fit


def _id(body: dict, name: str) -> str | None:
    return visitor_id(body.get(name), name)


def _item_ids(body: dict) -> list[str]:
    raw = body.get("itemIds")
    if not isinstance(raw, list) or not raw:
        raise BadParameter("itemIds", "itemIds must be a non-empty array of item ids")
    ids: list[str] = []
    for position, value in enumerate(raw):
        checked = visitor_id(value, f"itemIds[{position}]")
        if checked is None:
            raise BadParameter("itemIds", f"itemIds[{position}] is not an item id")
        ids.append(checked)
    ids = list(dict.fromkeys(ids))
    if len(ids) > MAX_ITEMS:
        raise BadParameter("itemIds", f"itemIds holds {len(ids)} distinct ids; at most {MAX_ITEMS}")
    return ids


@bp.post("/recommendations/rank")
def rank():
    services = current_app.extensions["segment"]
    settings = services.settings
    try:
        raw = read_body(MAX_BODY)
    except TooLarge:
        return error_response(413, "body_too_large", f"the body is larger than {MAX_BODY} bytes")
    except BadBody as exc:
        return error_response(400, "invalid_body", str(exc))
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return error_response(400, "invalid_body", "the body is not a JSON object")
    if not isinstance(body, dict):
        return error_response(400, "invalid_body", "the body is not a JSON object")
    try:
        wanted = Request(user_id=_id(body, "userId"), anonymous_id=_id(body, "anonymousId"))
        item_ids = _item_ids(body)
    except BadParameter as exc:
        parameter = "itemIds" if exc.name.startswith("itemIds") else exc.name
        return error_response(400, "bad_parameter", str(exc), details={"parameter": parameter})
    if not wanted.visitor:
        return error_response(
            400, "bad_parameter", "give userId or anonymousId", details={"parameter": "userId"}
        )

    refusal, verified = check_access(services, wanted)
    if refusal is not None:
        return refusal

    try:
        answer = services.recommendations.rank(wanted, item_ids)
    except (NoRecommendations, StoreUnavailable) as exc:
        return unavailable(exc, settings)
    return answer_response(answer, verified)
