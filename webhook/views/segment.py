"""POST /segment: the Segment Webhooks destination's endpoint."""
from __future__ import annotations

import logging
import time

from flask import Blueprint, current_app, g, request
from werkzeug.exceptions import RequestEntityTooLarge

from .. import metrics
from ..ingest import NoMessages
from ..segment import BodyError, decode_body, parse_body
from ..settings import reveal
from ..signature import SignatureError, verify_delivery
from ..storage import StoreUnavailable
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
    req = request._get_current_object()  # this request (one proxy lookup, not one a use)
    raw = _read_body(req, settings.max_body_bytes)

    try:
        data = verify_delivery(req.headers, raw, secrets=reveal(settings.segment_shared_secrets),
                               bearer_tokens=reveal(settings.webhook_bearer_tokens),
                               decode=decode_body)
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
        log.info("delivery refused: no valid message",
                 extra={"status": 400, "received": exc.summary.received})
        return error_response(400, "no_valid_messages",
                              "the delivery holds no valid Segment message",
                              details=exc.summary.as_json())
    except StoreUnavailable as exc:
        log.warning("store unavailable: %s", exc, extra={"status": 503})
        return error_response(503, "store_unavailable",
                              "the store is unavailable; retry later",
                              retry_after=settings.retry_after_seconds)

    outcomes.update(summary.outcomes)
    if _access.isEnabledFor(logging.DEBUG):  # a 2xx delivery's line is DEBUG (__init__.py)
        # Logged on the request's own line (one line a delivery): counts, never contents.
        g.log_extra = {
            "delivery": "stored", "shape": body.shape, "received": summary.received,
            "accepted": summary.accepted, "duplicates": summary.duplicates,
            "skipped": len(summary.skipped), "rejected": len(summary.rejected),
            "interactions": summary.interactions,
        }
    return json_response(summary.as_json())


def _read_body(req, limit: int) -> bytes:
    """The raw body; 413 above ``limit`` bytes, before anything parses it. A body without
    Content-Length (chunked) is read up to one byte past the limit to tell."""
    stream = req.environ["wsgi.input"]  # read as the server gives it: nothing else does
    length = req.content_length
    if length is not None:
        if length > limit:
            raise RequestEntityTooLarge()
        return _read_exactly(stream, length)
    raw = read_at_most(stream, limit)
    if len(raw) > limit:
        raise RequestEntityTooLarge()
    return raw


def _read_exactly(stream, length: int) -> bytes:
    """A body of known length: one read where the server hands it over whole (gunicorn
    does; the server stops at Content-Length, so no read past it is needed to tell the
    end), more where it gives less at a time."""
    first = stream.read(length)
    if len(first) >= length or not first:
        return first[:length]
    chunks, size = [first], len(first)
    while size < length:
        chunk = stream.read(length - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def read_at_most(stream, limit: int) -> bytes:
    """Up to ``limit + 1`` bytes of ``stream``: more than ``limit`` means "too large",
    known without reading (or holding) the rest."""
    chunks, size = [], 0
    while size <= limit:
        chunk = stream.read(min(65536, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _unauthorized(reason: str):
    log.warning("delivery refused: %s", reason, extra={"status": 401})
    response = error_response(401, "unauthorized", reason)
    response.headers["WWW-Authenticate"] = 'Bearer realm="segment"'
    return response
