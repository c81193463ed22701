"""POST /segment: the Segment Webhooks destination's endpoint."""

from __future__ import annotations

import logging
import time

from flask import Blueprint, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from .. import metrics
from ..ingest import NoMessages
from ..segment import BodyError, decode_body, parse_body
from ..settings import reveal
from ..signature import SignatureError, verify_delivery
from ..storage import StoreUnavailable
from .edge import BadBody, TooLarge, log_on_access_line, read_body
from .errors import error_response, json_response

bp = Blueprint("segment", __name__)
log = logging.getLogger("webhook.segment")
_access = logging.getLogger("webhook.access")


@bp.post("/segment")
def receive():
    started = time.perf_counter()
    outcomes: dict = {}  # (type, outcome) -> messages, counted with the delivery
    response = _receive(outcomes)
    metrics.delivery(response.status_code, time.perf_counter() - started, outcomes)
    return response


def _receive(outcomes: dict):
    services = current_app.extensions["segment"]
    settings = services.settings
    req = request
    try:
        raw = read_body(settings.max_body_bytes)
    except TooLarge:
        raise RequestEntityTooLarge() from None  # the app's 413 (views/errors.py)
    except BadBody as exc:
        return error_response(400, "invalid_body", str(exc))

    try:
        data = verify_delivery(
            req.headers,
            raw,
            secrets=reveal(settings.segment_shared_secrets),
            bearer_tokens=reveal(settings.webhook_bearer_tokens),
            decode=decode_body,
        )
        body = parse_body(raw, data)
    except SignatureError as exc:
        return _unauthorized(str(exc))
    except BodyError as exc:
        log.info("delivery refused: body", extra={"status": 400})
        return error_response(400, "invalid_body", str(exc))

    try:
        summary = services.ingestor.ingest(body.raw_messages)
    except NoMessages as exc:
        outcomes.update(exc.summary.outcomes)
        log.info(
            "delivery refused: no valid message",
            extra={"status": 400, "received": exc.summary.received},
        )
        return error_response(
            400,
            "no_valid_messages",
            "the delivery holds no valid Segment message",
            details=exc.summary.as_json(),
        )
    except StoreUnavailable as exc:
        log.warning("store unavailable: %s", exc, extra={"status": 503})
        return error_response(
            503,
            "store_unavailable",
            "the store is unavailable; retry later",
            retry_after=settings.retry_after_seconds,
        )

    outcomes.update(summary.outcomes)
    if _access.isEnabledFor(logging.DEBUG):  # a 2xx delivery's line is DEBUG (edge.py)
        # Logged on the request's own line (one line a delivery): counts, never contents.
        log_on_access_line(
            delivery="stored",
            shape=body.shape,
            received=summary.received,
            accepted=summary.accepted,
            duplicates=summary.duplicates,
            skipped=len(summary.skipped),
            rejected=len(summary.rejected),
            interactions=summary.interactions,
        )
    return json_response(summary.as_json())


def _unauthorized(reason: str):
    log.warning("delivery refused: %s", reason, extra={"status": 401})
    response = error_response(401, "unauthorized", reason)
    response.headers["WWW-Authenticate"] = 'Bearer realm="segment"'
    return response
