"""GET /recommendations: what a shop page fetch()es."""

from __future__ import annotations

import logging

from flask import Blueprint, current_app, jsonify, request

from ..identity import is_linked
from ..recommend import MAX_RESULTS, NoRecommendations, Request
from ..settings import reveal
from ..storage import StoreUnavailable
from ..tokens import TokenError, check_token
from .auth import bearer
from .edge import BadParameter, visitor_id
from .errors import error_response

bp = Blueprint("recommendations", __name__)
log = logging.getLogger("webhook.recommendations")


def _id(name: str) -> str | None:
    return visitor_id(request.args.get(name), name)


def _num_results() -> int:
    raw = request.args.get("numResults")
    if raw is None:
        return 25
    try:
        number = int(raw.strip())
    except ValueError:
        raise BadParameter("numResults", "numResults must be a whole number") from None
    if not 1 <= number <= MAX_RESULTS:
        raise BadParameter("numResults", f"numResults must be between 1 and {MAX_RESULTS}")
    return number


def check_access(services, wanted: Request):
    """(refusal, disclose): ``refusal`` is None when the request may go on, else its 401,
    403 or 503 answer; ``disclose`` is True when a token proved the caller is this userId:
    only then are the trait checks' details and values in the answer.

    With SECRET_KEY, a token authorizes exactly its subject: a userId token answers for
    that userId, and an anonymousId in the same request only if the store links it to
    that user; an anonymousId token answers for that anonymous id's own data
    (``identity.subject``). Without SECRET_KEY the endpoint is open and discloses nothing
    of anyone's traits."""
    settings = services.settings
    if not settings.secret_key:
        return None, False
    try:
        check_token(
            reveal(settings.secret_key),
            bearer(),
            settings.token_max_age_seconds,
            user_id=wanted.user_id,
            anonymous_id=wanted.anonymous_id,
        )
        if wanted.user_id and wanted.anonymous_id:
            with services.store.read() as conn:
                linked = is_linked(conn, wanted.anonymous_id, wanted.user_id)
            if not linked:
                raise TokenError(
                    403,
                    "token_forbidden",
                    "anonymousId is not linked to this userId: a token reads "
                    "its own visitor's data only",
                )
    except TokenError as exc:
        response = error_response(exc.status, exc.code, exc.message)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="recommendations"'
        return response, False
    except StoreUnavailable as exc:
        return unavailable(exc, settings), False
    return None, bool(wanted.user_id)


def answer_response(answer, verified: bool):
    response = jsonify(answer.as_json(disclose_traits=verified))
    response.headers["Cache-Control"] = "private, no-store"
    return response


def unavailable(exc: Exception, settings):
    """503 for what the pipeline cannot answer: no recommender and no popular items, or
    the store down."""
    if isinstance(exc, NoRecommendations):
        return error_response(
            503, "recommender_unavailable", str(exc), retry_after=settings.retry_after_seconds
        )
    return error_response(
        503,
        "store_unavailable",
        "the store is unavailable; retry later",
        retry_after=settings.retry_after_seconds,
    )


@bp.get("/recommendations")
def recommendations():
    services = current_app.extensions["segment"]
    settings = services.settings
    try:
        wanted = Request(
            user_id=_id("userId"),
            anonymous_id=_id("anonymousId"),
            item_id=_id("itemId"),
            num_results=_num_results(),
        )
    except BadParameter as exc:
        return error_response(400, "bad_parameter", str(exc), details={"parameter": exc.name})
    if not (wanted.user_id or wanted.anonymous_id or wanted.item_id):
        return error_response(
            400,
            "bad_parameter",
            "give userId, anonymousId or itemId",
            details={"parameter": "userId"},
        )

    refusal, verified = check_access(services, wanted)
    if refusal is not None:
        return refusal

    try:
        # The pipeline also decides, in one place, whether the list is written back.
        answer = services.recommendations.recommend(wanted)
    except (NoRecommendations, StoreUnavailable) as exc:
        return unavailable(exc, settings)
    return answer_response(answer, verified)
