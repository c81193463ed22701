"""Segment-compatible Tracking API: ``POST /v1/batch``, ``/v1/track``, ``/v1/identify``,
``/v1/page``, ``/v1/screen``, ``/v1/group``, ``/v1/alias`` (and analytics.js' short forms
``/v1/b``, ``/v1/t``, ``/v1/i``, ``/v1/p``, ``/v1/s``, ``/v1/g``, ``/v1/a``; ``/v1/import``
as Segment's old name for batch).

A site sends straight to the service with Segment's own libraries: point
segment-analytics-python's ``host=`` (or analytics.js' ``apiHost``) at the service. Messages
go through the webhook's ingestion (``Ingestor.ingest``): the same Spec checks,
de-duplication by messageId, the same inbox and appliers.

* Off unless ``INGEST_WRITE_KEYS`` is set: then every ``/v1`` endpoint answers 404
  ``tracking_api_disabled`` (nothing listens there, rather than a credential that can
  never be right).
* Write key: HTTP Basic with the key as user name (analytics-python and Segment's HTTP
  API), or ``writeKey`` in the JSON body (analytics.js). A wrong key in the header is
  refused even if the body has a right one. Missing or wrong: 401.
* Segment's limits, checked on the (decompressed) body before parsing: 32 KB a call, 500 KB
  a batch: larger → 400 ``request_too_large`` naming the limit (Segment answers 400 too).
  Within a batch, a message larger than 32 KB is rejected alone; the others are stored.
* The write key is public (analytics.js puts it in every page), so this endpoint writes
  only what a browser may: no ``delete`` (rejected; deletion requests come from Segment,
  signed, through ``POST /segment``), and an ``identify`` may set the opt-out trait to
  opted out but never clear it (a value that would is left out, with a note).
* ``Content-Encoding: gzip`` (analytics-python's ``gzip=True``) is accepted; any
  ``Content-Type`` is (analytics.js sends ``text/plain``).
* Like Segment's API, the service sets ``receivedAt`` and gives a message without a
  ``messageId`` one (``api-<uuid>``: such a message cannot be de-duplicated on a retry);
  a single call's ``type`` comes from the path when the body has none. Batch-level
  ``context`` is merged under each message's own.
* Answers: 200 ``{"success": true, "received", "accepted", "duplicates", "skipped",
  "rejected", "interactions"}`` (the webhook's summary). Unlike Segment, which answers 200
  to anything parseable, bad input gets the webhook's semantics: a body that is not JSON,
  or a call/batch without one valid message, is a 400 with the reasons in ``details``; a
  batch with some invalid messages is a 200 that lists them under ``rejected``. Errors
  carry Segment's ``code``/``message`` at the top level (what the libraries log) and the
  service's usual ``error`` object. 503 + ``Retry-After`` when the store is unavailable
  (the libraries retry 5xx); Amazon Personalize being slow or down never delays or
  refuses a call (its applier catches up from the inbox).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import uuid
from datetime import UTC, datetime

from flask import Blueprint, current_app, jsonify, request

from .. import metrics
from ..ingest import NoMessages
from ..segment import BodyError, parse_body
from ..settings import reveal
from ..storage import StoreUnavailable
from .edge import BadBody, TooLarge, log_on_access_line, read_body
from .errors import error_response

bp = Blueprint("tracking_api", __name__, url_prefix="/v1")
log = logging.getLogger("webhook.tracking_api")

MAX_MESSAGE_BYTES = 32 * 1024  # Segment: 32 KB a call
MAX_BATCH_BYTES = 500 * 1024  # Segment: 500 KB a batch request

SINGLE = {
    "track": "track",
    "t": "track",
    "identify": "identify",
    "i": "identify",
    "page": "page",
    "p": "page",
    "screen": "screen",
    "s": "screen",
    "group": "group",
    "g": "group",
    "alias": "alias",
    "a": "alias",
}
BATCH = ("batch", "b", "import")


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


def _error(
    status: int,
    code: str,
    message: str,
    *,
    details: dict | None = None,
    retry_after: int | None = None,
):
    response = error_response(
        status, code, message, details=details, retry_after=retry_after, segment_style=True
    )
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Basic realm="tracking-api"'
    return response


@bp.post("/<kind>")
def receive(kind: str):
    if kind not in SINGLE and kind not in BATCH:
        return _error(404, "not_found", f"no Tracking API endpoint /v1/{kind}")
    services = current_app.extensions["segment"]
    settings = services.settings
    if not settings.ingest_write_keys:
        return _error(
            404,
            "tracking_api_disabled",
            "the Tracking API (/v1) is off: set INGEST_WRITE_KEYS to enable it",
        )
    try:
        return _receive(kind, services)
    except _Refused as exc:
        if exc.status == 401:
            log.warning("tracking API refused: %s", exc.message, extra={"status": 401})
        return _error(exc.status, exc.code, exc.message, details=exc.details)


def _receive(kind: str, services):
    settings = services.settings
    batch = kind in BATCH
    limit = MAX_BATCH_BYTES if batch else MAX_MESSAGE_BYTES
    header_key = _basic_user(request.headers.get("Authorization"))
    if header_key is not None and not _known(header_key, reveal(settings.ingest_write_keys)):
        raise _Refused(401, "unauthorized", "the write key is not valid")
    raw = _read_body(limit, batch)

    try:
        body = parse_body(raw)
    except BodyError as exc:
        raise _Refused(400, "invalid_body", str(exc)) from None
    if batch:
        if body.shape == "single":
            raise _Refused(
                400, "invalid_body", 'expected {"batch": [...]} (or an array of messages)'
            )
        envelope = json.loads(raw) if body.shape == "batch" else {}
        body_key = envelope.get("writeKey")
        messages = list(body.raw_messages)
        context = envelope.get("context")
    else:
        if body.shape != "single":
            raise _Refused(
                400, "invalid_body", f"/v1/{kind} takes one message; send batches to /v1/batch"
            )
        message = body.raw_messages[0]
        body_key = message.get("writeKey")
        expected = SINGLE[kind]
        sent = message.get("type")
        if sent in (None, ""):
            message["type"] = expected
        elif not isinstance(sent, str) or sent.strip().lower() != expected:
            raise _Refused(
                400,
                "invalid_body",
                f"a {str(sent)[:20]!r} message sent to /v1/{kind}; it takes {expected} messages",
            )
        messages, context = [message], None
    if header_key is None:
        if not isinstance(body_key, str) or not body_key:
            raise _Refused(
                401,
                "unauthorized",
                "no write key: send it as the Basic auth user name or as writeKey in the body",
            )
        if not _known(body_key, reveal(settings.ingest_write_keys)):
            raise _Refused(401, "unauthorized", "the write key is not valid")

    received_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    opt_out = services.recommendations.opt_out
    kept, positions, refused, notes = [], [], [], []
    for index, message in enumerate(messages):
        if isinstance(message, dict):
            reason = _refusal(message, batch)
            if reason is not None:
                refused.append(_entry(index, message, reason))
                continue
            message.pop("writeKey", None)
            message["receivedAt"] = received_at
            if message.get("messageId") in (None, ""):
                message["messageId"] = "api-" + str(uuid.uuid4())
            if isinstance(context, dict):
                own = message.get("context")
                message["context"] = (
                    {**context, **own}
                    if isinstance(own, dict)
                    else (own if own is not None else dict(context))
                )
            if _keep_opt_out(message, opt_out):
                notes.append(
                    _entry(
                        index,
                        message,
                        f"{opt_out.trait} can only be set to "
                        "opted out through the Tracking API: "
                        "the value that clears it was left out",
                    )
                )
        kept.append(message)
        positions.append(index)

    if not kept:
        raise _Refused(
            400,
            "no_valid_messages",
            "the batch holds no valid Segment message",
            details={
                "received": len(messages),
                "accepted": 0,
                "duplicates": 0,
                "skipped": [],
                "rejected": refused,
                "interactions": 0,
            },
        )
    try:
        summary = services.ingestor.ingest(kept)
    except NoMessages as exc:
        metrics.record_outcomes(exc.summary.outcomes)
        details = _renumber(exc.summary.as_json(), positions, refused, notes, len(messages))
        raise _Refused(
            400, "no_valid_messages", "the request holds no valid Segment message", details=details
        ) from None
    except StoreUnavailable as exc:
        log.warning("store unavailable: %s", exc, extra={"status": 503})
        return _error(
            503,
            "store_unavailable",
            "the store is unavailable; retry later",
            retry_after=settings.retry_after_seconds,
        )

    metrics.record_outcomes(summary.outcomes)
    answer = _renumber(summary.as_json(), positions, refused, notes, len(messages))
    log_on_access_line(
        delivery="stored",
        shape="tracking-api",
        received=len(messages),
        accepted=summary.accepted,
        duplicates=summary.duplicates,
        skipped=len(summary.skipped),
        rejected=len(answer["rejected"]),
        interactions=summary.interactions,
    )
    return jsonify({"success": True, **answer})


def _renumber(
    answer: dict, positions: list[int], refused: list[dict], notes: list[dict], total: int
) -> dict:
    """The summary's indexes are into the messages passed on; give them back the request's
    own, and add the messages refused here and the notes made here."""
    for key in ("skipped", "rejected", "notes"):
        for entry in answer.get(key, []):
            if isinstance(entry.get("index"), int):
                entry["index"] = positions[entry["index"]]
    if refused:
        answer["rejected"] = sorted(answer.get("rejected", []) + refused, key=lambda e: e["index"])
    if notes:
        answer["notes"] = sorted(answer.get("notes", []) + notes, key=lambda e: e["index"])
    answer["received"] = total
    return answer


def _entry(index: int, message: dict, reason: str) -> dict:
    entry = {"index": index, "reason": reason}
    if isinstance(message.get("messageId"), str) and len(message["messageId"]) <= 256:
        entry["messageId"] = message["messageId"]
    return entry


def _refusal(message: dict, batch: bool) -> str | None:
    """Why this endpoint refuses a message that the webhook would take, if it does."""
    if batch and _size(message) > MAX_MESSAGE_BYTES:
        return (
            f"the message is larger than 32 KB ({MAX_MESSAGE_BYTES} bytes), Segment's "
            f"limit for one message"
        )
    kind = message.get("type")
    if isinstance(kind, str) and kind.strip().lower() == "delete":
        # The write key is public (every page carries it): a deletion request comes from
        # Segment's deletion API, in a signed webhook delivery, never from a browser.
        return (
            "the Tracking API takes no delete: deletion requests come from Segment, "
            "through POST /segment"
        )
    return None


def _keep_opt_out(message: dict, opt_out) -> bool:
    """A browser may opt out, never opt back in (anyone holds the public write key): an
    identify's opt-out trait that does not say opted out is left out of the message.
    True when something was left out."""
    kind = message.get("type")
    if not opt_out.trait or not isinstance(kind, str) or kind.strip().lower() != "identify":
        return False
    removed = False
    context = message.get("context")
    for traits in (
        message.get("traits"),
        context.get("traits") if isinstance(context, dict) else None,
    ):
        if (
            isinstance(traits, dict)
            and opt_out.trait in traits
            and not opt_out.opted_out(traits[opt_out.trait])
        ):
            del traits[opt_out.trait]
            removed = True
    return removed


def _size(message: dict) -> int:
    try:
        return len(
            json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode(
                "utf-8", "surrogatepass"
            )
        )
    except (TypeError, ValueError, RecursionError):
        return 0  # parse_message will say what is wrong with it


def _basic_user(header: str | None) -> str | None:
    """The user name of an ``Authorization: Basic`` header; None without a header."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise _Refused(
            401, "unauthorized", "use HTTP Basic auth with the write key as the user name"
        )
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise _Refused(401, "unauthorized", "the Basic auth header is not valid base64") from None
    return decoded.partition(":")[0]


def _known(key: str, keys) -> bool:
    candidate = key.encode("utf-8", "surrogatepass")
    found = False
    for known in keys:
        found |= hmac.compare_digest(candidate, known.encode("utf-8"))
    return found


def _read_body(limit: int, batch: bool) -> bytes:
    """The body, inflated; 400 naming Segment's limit above ``limit`` bytes, checked
    before anything parses it (and, for gzip, while inflating)."""
    what = "a batch request is 500 KB" if batch else "a single call is 32 KB"
    try:
        return read_body(limit, gzip=True)
    except TooLarge:
        raise _Refused(
            400,
            "request_too_large",
            f"the request is larger than Segment's Tracking API limit: {what} ({limit} bytes)",
        ) from None
    except BadBody as exc:
        raise _Refused(400, "invalid_body", str(exc)) from None
