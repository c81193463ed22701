"""GET /insights: the operator's view of what the recommendations earn, per variant.

JSON (``webhook/insights.py``) for scripts and ``fetch()``; the page
(``templates/insights.html``, ``static/insights.js``) for a browser, which draws the same
JSON as charts and a table with no third-party request (the page's strict CSP). Which one
is answered follows the ``Accept`` header: a browser asking for HTML gets the page.

``INSIGHTS_TOKEN``, when set, is required for the data (``Authorization: Bearer …``); the
page itself holds no data: it takes the token from its form or its address's fragment
(``#token=…``, never sent to a server), keeps it for the tab and out of every address, and
sends it with its ``fetch()``. Unset: open, with a warning at start-up, like
``/recommendations`` without ``SECRET_KEY``.
"""

from __future__ import annotations

from flask import Blueprint, current_app, make_response, render_template, request

from ..insights import report, report_settings
from ..settings import reveal
from ..storage import StoreUnavailable
from .auth import operator_refusal
from .errors import error_response, json_response

bp = Blueprint("insights", __name__)

MAX_DAYS = 366


def wants_page() -> bool:
    best = request.accept_mimetypes.best_match(["application/json", "text/html"])
    return best == "text/html" and request.args.get("format") != "json"


@bp.get("/insights")
def insights():
    services = current_app.extensions["segment"]
    settings = services.settings
    if wants_page():
        response = make_response(
            render_template("insights.html", token_required=bool(settings.insights_token))
        )
        response.headers["Cache-Control"] = "no-cache"
        return response
    refusal = operator_refusal(reveal(settings.insights_token), "INSIGHTS_TOKEN", "insights")
    if refusal is not None:
        return refusal
    raw = request.args.get("days", "7").strip()
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_DAYS:
        return error_response(
            400,
            "bad_parameter",
            f"days must be a whole number from 1 to {MAX_DAYS}",
            details={"parameter": "days"},
        )
    if not settings.insights_retention_days:
        return error_response(
            404, "insights_off", "answers are not recorded: INSIGHTS_RETENTION_DAYS is 0"
        )
    try:
        body = report(services.store, int(raw), **report_settings(services))
    except StoreUnavailable:
        return error_response(
            503,
            "store_unavailable",
            "the store is unavailable; retry later",
            retry_after=settings.retry_after_seconds,
        )
    response = json_response(body, 200)
    response.headers["Cache-Control"] = "private, no-store"
    return response
