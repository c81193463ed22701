"""The HTTP edge's shared pieces: the one body reader and the one parameter check.

``read_body(limit)`` reads a request's body up to ``limit`` bytes, before anything parses
it: a body of known length in one read, a chunked one up to one byte past the limit (to
tell), a gzip one (``gzip=True``) inflated up to the limit. Above it: ``TooLarge``, which
each endpoint answers its own way (413 on the webhook, 400 as Segment's Tracking API does).

``visitor_id`` and ``BadParameter``: an id given by a caller (a query parameter, a JSON
field), checked as the Spec checks a message's ids (``segment.clean_id``).

``RequestLog``: the WSGI middleware around the whole app that gives every request its id
and writes its access line.
"""

from __future__ import annotations

import logging
import random
import re
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from flask import request

from ..logs import REQUEST_ID
from ..segment import MessageError, clean_id

CHUNK = 65536


class TooLarge(Exception):
    """The body is larger than the endpoint's limit."""


class BadBody(Exception):
    """The body cannot be read (bad gzip, an unknown encoding)."""


class BadParameter(Exception):
    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def read_body(limit: int, *, gzip: bool = False) -> bytes:
    """The raw body (inflated, with ``gzip`` and ``Content-Encoding: gzip``); TooLarge
    above ``limit`` bytes; BadBody for an encoding it cannot read."""
    encoding = (request.headers.get("Content-Encoding") or "").strip().lower()
    if encoding not in ("", "identity") and not (gzip and encoding == "gzip"):
        raise BadBody(f"unsupported Content-Encoding {encoding[:20]!r}")
    inflating = encoding == "gzip"
    # Compressed, the wire may carry a little more than the inflated limit.
    wire_limit = limit + 64 * 1024 if inflating else limit
    stream = request.environ["wsgi.input"]  # read as the server gives it: nothing else does
    length = request.content_length
    if length is not None:
        if length > wire_limit:
            raise TooLarge()
        raw = _read_exactly(stream, length)
    else:
        raw = _read_at_most(stream, wire_limit)
        if len(raw) > wire_limit:
            raise TooLarge()
    if inflating:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            raw = inflater.decompress(raw, limit + 1)
        except zlib.error:
            raise BadBody("the body is not valid gzip") from None
        if len(raw) > limit:
            raise TooLarge()
    return raw


def _read_exactly(stream, length: int) -> bytes:
    """A body of known length: one read where the server hands it over whole (gunicorn
    does), more where it gives less at a time."""
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


def _read_at_most(stream, limit: int) -> bytes:
    """Up to ``limit + 1`` bytes: more than ``limit`` means "too large", known without
    reading (or holding) the rest."""
    chunks, size = [], 0
    while size <= limit:
        chunk = stream.read(min(CHUNK, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def visitor_id(value: Any, name: str) -> str | None:
    """An id a caller gave (None: not given): non-empty once stripped, at most 256
    characters a database can hold (a whole number counts as its text)."""
    if value is None:
        return None
    try:
        checked = clean_id(value.strip() if isinstance(value, str) else value, name)
    except MessageError as exc:
        raise BadParameter(name, str(exc)) from None
    if checked is None:
        raise BadParameter(name, f"{name} is empty")
    return checked


# -- request ids and the access line ---------------------------------------------------

LOG_EXTRA = "webhook.log_extra"  # a WSGI environ key
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_access = logging.getLogger("webhook.access")


def log_on_access_line(**fields: Any) -> None:
    """Fields for this request's access line (counts and outcomes, never contents)."""
    request.environ[LOG_EXTRA] = fields


class RequestLog:
    """WSGI middleware around the app (``app.wsgi_app``): every request gets an id, the
    caller's ``X-Request-Id`` when it is a short plain token, a random one otherwise
    (unique, not secret), answered in ``X-Request-Id`` and carried by every log line of
    the request; and one access line when the answer starts: method, path (never the
    query string: it may name a visitor), status, duration. Answers of ``quiet_paths``
    under 400 are logged at DEBUG only: webhook deliveries at thousands a second are
    counted in /metrics instead. A middleware rather than Flask's request hooks: the
    same job for fewer steps on every request (bench/README.md)."""

    def __init__(self, app: Callable, quiet_paths: Iterable[str]):
        self.app = app
        self.quiet = tuple(quiet_paths)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        incoming = environ.get("HTTP_X_REQUEST_ID")
        rid = (
            incoming
            if incoming and _REQUEST_ID.fullmatch(incoming)
            else f"{random.getrandbits(64):016x}"
        )
        environ[REQUEST_ID] = rid
        started = time.perf_counter()

        def start(status: str, headers: list, exc_info: Any = None) -> Callable:
            headers.append(("X-Request-Id", rid))
            code = int(status[:3])
            path = environ.get("PATH_INFO", "")
            level = logging.DEBUG if code < 400 and path.startswith(self.quiet) else logging.INFO
            if _access.isEnabledFor(level):
                _access.log(
                    level,
                    "request",
                    extra={
                        "request_id": rid,
                        "method": environ.get("REQUEST_METHOD"),
                        "path": path,
                        "status": code,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                        **environ.get(LOG_EXTRA, {}),
                    },
                )
            return start_response(status, headers, exc_info)

        return self.app(environ, start)
