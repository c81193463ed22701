"""JSON errors for every failure: never an HTML page or a stack trace to the caller."""

from __future__ import annotations

import json
import logging

import orjson
from flask import Flask, current_app
from werkzeug.exceptions import HTTPException

from ..logs import request_id

log = logging.getLogger("webhook.errors")
_dumps = json.JSONEncoder(separators=(",", ":")).encode


def json_response(body, status: int = 200):
    """A compact JSON answer (what ``jsonify`` gives, without its per-call provider
    lookups: this is on the path of every webhook delivery). orjson writes it (the
    standard encoder builds its C encoder again on every call); what orjson refuses (a
    lone surrogate echoed from a refused message, an integer beyond 64 bits) is written
    by the standard library."""
    text: bytes | str
    try:
        text = orjson.dumps(body, option=orjson.OPT_APPEND_NEWLINE)
    except (TypeError, orjson.JSONEncodeError):
        text = _dumps(body) + "\n"
    return current_app.response_class(text, status=status, content_type="application/json")


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    retry_after: int | None = None,
    details: dict | None = None,
    segment_style: bool = False,
):
    """The one error format: ``{"error": {"code", "message", "requestId"?}, "details"?}``.
    ``segment_style`` (the Tracking API, ``/v1``) adds Segment's own fields at the top
    level, ``success``, ``code`` and ``message``: what its libraries log."""
    body: dict = {"error": {"code": code, "message": message}}
    if segment_style:
        body = {"success": False, "code": code, "message": message, **body}
    rid = request_id()
    if rid:
        body["error"]["requestId"] = rid
    if details is not None:
        body["details"] = details
    response = json_response(body, status)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def init_app(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        if exc.code == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            return error_response(
                413, "body_too_large", f"the body is larger than {limit} bytes (MAX_BODY_BYTES)"
            )
        response = error_response(exc.code or 500, code, exc.description or exc.name)
        allowed = getattr(exc, "valid_methods", None)  # MethodNotAllowed's
        if exc.code == 405 and allowed:
            response.headers["Allow"] = ", ".join(allowed)
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
        return error_response(500, "internal_error", "internal error; it has been logged")
