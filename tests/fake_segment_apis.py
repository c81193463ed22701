"""Stand-ins for Segment's Profile API and HTTP Tracking API: real HTTP servers on 127.0.0.1.

Independent of the code under test (``webhook/``): they speak the wire formats Segment
documents, so the service's own HTTP clients (requests, segment-analytics-python) talk to
them exactly as they would to Segment.

* ``FakeProfileAPI`` -- ``GET /v1/spaces/<space_id>/collections/users/profiles/
  <user_id:ID|anonymous_id:ID>/traits?include=a,b&limit=N&next=CURSOR`` with HTTP Basic
  auth (the access token is the user name, the password empty). Answers one page of
  ``{"traits": {...}, "cursor": {"url", "has_more", "next", "limit"}}``, 404 for an
  unknown profile, 401 for a wrong token, 400 for a ``limit`` outside 1..200. HTTP/1.1
  with keep-alive (like Segment's), so connection pooling can be observed: every request
  records the client's (host, port) as ``connection``. ``delay(seconds)`` and
  ``fail(status)`` inject slowness and outages. Threaded: concurrent requests overlap.
  Like Segment's, it allows ``rate_limit`` (100) requests per second per space: a request
  arriving when that many were answered within the last second gets 429, without
  ``Retry-After`` (Segment's Profile API documents none; ``fail(429, retry_after=n)``
  sends one). ``busiest_second()`` is the most requests that arrived within any one
  second.

  Followed: Segment's Profile API documentation (segment.com/docs/unify/profile-api/):
  traits endpoint ("By default, the response includes 10 traits. You can return up to
  200 traits by appending ?limit=200"), Pagination (request ``limit`` and ``next``;
  response ``cursor.has_more``, ``cursor.next``, ``cursor.url``), the error table and
  error codes, and the example answer, whose traits come in key order with
  ``cursor.next`` naming the first trait of the next page. A page holds
  ``min(limit, page_size)`` traits: the documents disagree on the most a page holds
  (traits: 200; Pagination: "between 1 and 100"), so a client must follow ``has_more``
  rather than trust ``limit``, and ``page_size`` (200 by default) lets a test make pages
  shorter than asked.
* ``FakeTrackingAPI`` -- ``POST /v1/batch`` (gzip or plain JSON) with Basic auth = write
  key (or ``writeKey`` in the body). Records the events Segment would accept;
  ``identifies()`` / ``wait_for_identifies(n)``. Like Segment (its HTTP API Source
  documentation, quoted at ``MAX_EVENT_BYTES``), it answers 200 to a wrong write key and
  keeps nothing of it (``discarded()``), and 400 beyond 32 KB an event or 500 KB a
  request; events beyond 2,500 a batch are answered 200 and dropped.

Plain classes only; pytest fixtures belong in the test modules.
"""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from tests.loopback import LoopbackServer
from tests.waiting import wait_until


def _basic_user(header: str | None) -> str | None:
    """The user name of an HTTP Basic Authorization header (None if not Basic)."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except ValueError:
        return None
    user, sep, _password = decoded.partition(":")
    return user if sep else None


def busiest_second(arrivals) -> int:
    """The most of ``arrivals`` (times in seconds) within any one second."""
    arrivals = sorted(arrivals)
    most, start = 0, 0
    for end, when in enumerate(arrivals):
        while when - arrivals[start] >= 1.0:
            start += 1
        most = max(most, end - start + 1)
    return most


class _Server(LoopbackServer):
    """A threaded HTTP server with a request log and delay/failure injection."""

    protocol_version = "HTTP/1.1"  # keep-alive, like Segment's
    handler_timeout = 10  # an idle keep-alive connection ends after this
    disable_nagle = True
    request_queue_size = 128
    poll_interval = 0.02

    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition()
        self._delay = 0.0
        self._fail_status: int | None = None

    def _serve(self, handler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        status, headers, payload = self._handle(handler, body)
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    # -- injection -----------------------------------------------------------------------

    def delay(self, seconds: float) -> None:
        """Sleep this long before answering each request (0: off)."""
        with self._cond:
            self._delay = seconds

    def fail(self, status: int | None) -> None:
        """Answer every request with this HTTP status (None: answer normally)."""
        with self._cond:
            self._fail_status = status

    def _wait(self) -> None:
        with self._cond:
            delay = self._delay
        if delay:
            self._stopping.wait(delay)

    def _handle(self, handler, body: bytes) -> tuple[int, dict, bytes]:
        raise NotImplementedError


def _json(status: int, value: Any) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(value).encode("utf-8")


class ProfileRequest(NamedTuple):
    method: str
    path: str  # without the query string
    space_id: str | None
    identifier: str | None  # e.g. "user_id:u-1"
    include: list[str] | None  # None: no include parameter
    query: dict[str, list[str]]
    token: str | None  # the Basic user name sent
    connection: tuple[str, int]  # the client's address: one per TCP connection
    status: int  # answered
    time: float
    arrived: float = 0.0  # time.time() when the request arrived (before any delay)


# The traits endpoint's page sizes (see the module's docstring).
TRAITS_DEFAULT_LIMIT = 10
TRAITS_MAX_LIMIT = 200


class FakeProfileAPI(_Server):
    """Segment's Profile API (``profiles.segment.com``), traits endpoint only."""

    def __init__(
        self,
        *,
        space_id: str = "spa_test",
        token: str = "profile-token",
        rate_limit: int = 100,
        page_size: int = TRAITS_MAX_LIMIT,
    ):
        super().__init__()
        self.space_id = space_id
        self.token = token
        self.rate_limit = rate_limit
        self.page_size = page_size  # the most traits a page holds, whatever limit asks
        self._profiles: dict[str, dict] = {}
        self._requests: list[ProfileRequest] = []
        self._admitted: dict[str, list[float]] = {}  # space -> arrival times (monotonic)
        self._retry_after: int | None = None
        self._everyone: dict | None = None  # traits of a profile nobody set

    def know_everyone(self, traits: dict | None) -> None:
        """Answer for any profile not set as one with these traits (default: none), as a
        space where every visitor already has a profile; None: 404 for those again."""
        with self._cond:
            self._everyone = None if traits is None else dict(traits)

    def fail(self, status: int | None, retry_after: int | None = None) -> None:
        """Answer every request with this HTTP status (None: answer normally); a 429
        carries ``Retry-After: retry_after`` if it is given, else no Retry-After."""
        with self._cond:
            self._fail_status = status
            self._retry_after = retry_after

    def busiest_second(self) -> int:
        """The most requests that arrived within any one second (a sliding window)."""
        return busiest_second(r.arrived for r in self.requests)

    def _over_limit(self, space: str | None, now: float) -> bool:
        """Segment's limit: at most ``rate_limit`` answered requests per second per space."""
        with self._cond:
            recent = [t for t in self._admitted.get(space, []) if now - t < 1.0]
            if len(recent) >= self.rate_limit:
                self._admitted[space] = recent
                return True
            recent.append(now)
            self._admitted[space] = recent
            return False

    def set_traits(self, identifier: str, traits: dict) -> None:
        """``identifier``: ``user_id:<id>`` or ``anonymous_id:<id>``."""
        with self._cond:
            self._profiles[identifier] = dict(traits)

    def forget(self, identifier: str) -> None:
        with self._cond:
            self._profiles.pop(identifier, None)

    @property
    def requests(self) -> list[ProfileRequest]:
        with self._cond:
            return list(self._requests)

    def requests_for(self, identifier: str) -> list[ProfileRequest]:
        return [r for r in self.requests if r.identifier == identifier]

    def clear(self) -> None:
        with self._cond:
            self._requests.clear()

    def _handle(self, handler, body: bytes) -> tuple[int, dict, bytes]:
        arrived = time.time()
        limited = self._over_limit(None, time.monotonic())  # the stand-in serves one space
        self._wait()
        parts = urlsplit(handler.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        segments = parts.path.split("/")
        # ['', 'v1', 'spaces', SPACE, 'collections', 'users', 'profiles', ID, 'traits']
        space = identifier = None
        shape_ok = (
            len(segments) == 9
            and segments[1:3] == ["v1", "spaces"]
            and segments[4:7] == ["collections", "users", "profiles"]
            and segments[8] == "traits"
        )
        if shape_ok:
            space, identifier = unquote(segments[3]), unquote(segments[7])
        include = query["include"][0].split(",") if "include" in query else None
        token = _basic_user(handler.headers.get("Authorization"))
        with self._cond:
            fail = self._fail_status
            traits = self._profiles.get(identifier, self._everyone) if identifier else None

        limit = _traits_limit(query)
        if fail is not None:
            answer = _json(fail, {"error": {"code": "internal", "message": "injected"}})
            if fail == 429 and self._retry_after is not None:
                answer[1]["Retry-After"] = str(self._retry_after)
        elif limited:
            answer = _json(
                429,
                {
                    "error": {
                        "code": "rate_limit_error",
                        "message": "Too many requests hit the API too quickly.",
                    }
                },
            )
        elif handler.command != "GET" or not shape_ok:
            answer = _json(404, {"error": {"code": "not_found", "message": "no such route"}})
        elif token != self.token:
            answer = _json(
                401,
                {
                    "error": {
                        "code": "authentication_error",
                        "message": "No valid Access Token provided.",
                    }
                },
            )
        elif space != self.space_id:
            answer = _json(404, {"error": {"code": "not_found", "message": "no such space"}})
        elif limit is None:
            answer = _json(
                400,
                {
                    "error": {
                        "code": "invalid_request_error",
                        "message": f"limit must be between 1 and {TRAITS_MAX_LIMIT}",
                    }
                },
            )
        elif traits is None:
            answer = _json(
                404, {"error": {"code": "not_found", "message": "Profile was not found."}}
            )
        else:
            answer = _json(
                200, self._page(parts.path, traits, include, limit, query.get("next", [""])[0])
            )
        with self._cond:
            self._requests.append(
                ProfileRequest(
                    handler.command,
                    parts.path,
                    space,
                    identifier,
                    include,
                    query,
                    token,
                    handler.client_address[:2],
                    answer[0],
                    time.time(),
                    arrived,
                )
            )
            self._cond.notify_all()
        return answer

    def _page(
        self, path: str, traits: dict, include: list[str] | None, limit: int, after: str
    ) -> dict:
        """One page of the traits, in key order, from the first key at or after the
        cursor ``after`` (a key: one removed between pages is no harm)."""
        keys = sorted(k for k in traits if include is None or k in include)
        if after:
            keys = [k for k in keys if k >= after]
        size = min(limit, self.page_size)
        page, rest = keys[:size], keys[size:]
        following = rest[0] if rest else ""
        url = path + (f"?{urlencode({'limit': limit, 'next': following})}" if rest else "")
        return {
            "traits": {k: traits[k] for k in page},
            "cursor": {"url": url, "has_more": bool(rest), "next": following, "limit": size},
        }


def _traits_limit(query: dict[str, list[str]]) -> int | None:
    """The page size asked for (the default when none is), None when not 1..200."""
    if "limit" not in query:
        return TRAITS_DEFAULT_LIMIT
    value = query["limit"][0]
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= TRAITS_MAX_LIMIT:
        return None
    return int(value)


# Segment's HTTP Tracking API documentation, "HTTP API Source"
# (segment.com/docs/connections/sources/catalog/libraries/server/http-api/):
# - "Errors": "Segment returns a 200 response for all API requests except errors caused
#   by large payloads and JSON errors (which return 400 responses.)" So a wrong or
#   missing write key gets 200, and its events go nowhere.
# - "Max request size": "a maximum of 32KB per normal API request. The batch API
#   endpoint accepts a maximum of 500KB per request, with a limit of 32KB per event in
#   the batch. ... Segment's API responds with 400 Bad Request if these limits are
#   exceeded."
# - "Errors", the /batch endpoint: "Each batch request can only have up to 2500 events
#   ... Segment returns a 200 response but rejects the event when the number of batched
#   events exceeds the limit." Which events it rejects is not said: here, all of them.
# - "Errors": events without a userId or anonymousId, and track events without an
#   "event", are not accepted (answered 200 like the rest).
# KB are 1024 bytes, as Segment's own libraries count them (analytics-python:
# MAX_MSG_SIZE = 32 << 10); sizes are of the JSON as sent, before any gzip, an event's
# as analytics-python measures it (``len(json.dumps(event).encode())``).
MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
MAX_BATCH_EVENTS = 2500


class TrackingBatch(NamedTuple):
    write_key: str | None  # the Basic user name, else the body's writeKey
    gzipped: bool
    body: dict  # as received, except that "batch" holds only the accepted events
    time: float


class Discarded(NamedTuple):
    """An event answered 200 that Segment would not accept."""

    reason: str  # "write_key", "too_many_events", "no_user_anon_id", "no_event_name"
    write_key: str | None
    message: dict


class FakeTrackingAPI(_Server):
    """Segment's HTTP Tracking API (``api.segment.io``): ``POST /v1/batch``.

    As Segment does (see the documentation quoted above): 400 for a body that is not
    JSON, over 500 KB, or with an event over 32 KB (nothing of it kept); 200 for the
    rest, where only events under the right write key, in a batch of at most 2,500,
    with a userId or anonymousId (and a track event with its name) are accepted. What
    was answered 200 but not accepted is in ``discarded()``; what was answered 400 in
    ``refusals`` (``refused`` counts them)."""

    def __init__(self, *, write_key: str = "write-key-test"):
        super().__init__()
        self.write_key = write_key
        self._batches: list[TrackingBatch] = []
        self._discarded: list[Discarded] = []
        self._refusals: list[str] = []

    @property
    def batches(self) -> list[TrackingBatch]:
        """The requests answered 200 under the right write key, with their accepted
        events."""
        with self._cond:
            return list(self._batches)

    @property
    def refusals(self) -> list[str]:
        """Why each request answered 400 was refused, in order."""
        with self._cond:
            return list(self._refusals)

    @property
    def refused(self) -> int:
        return len(self.refusals)

    def discarded(self, reason: str | None = None) -> list[Discarded]:
        with self._cond:
            return [d for d in self._discarded if reason is None or d.reason == reason]

    def messages(self) -> list[dict]:
        """Every accepted event, in arrival order."""
        return [m for b in self.batches for m in b.body.get("batch", [])]

    def identifies(self, user_id: str | None = None) -> list[dict]:
        return [
            m
            for m in self.messages()
            if m.get("type") == "identify" and (user_id is None or m.get("userId") == user_id)
        ]

    def wait_for_identifies(
        self, n: int, user_id: str | None = None, timeout: float = 10.0
    ) -> list[dict]:
        wait_until(
            lambda: len(self.identifies(user_id)) >= n,
            timeout,
            f"{n} identify call(s) for {user_id or 'anyone'}",
            detail=lambda: f"{len(self.identifies(user_id))} arrived",
        )
        return self.identifies(user_id)

    def _refuse(self, reason: str) -> tuple[int, dict, bytes]:
        with self._cond:
            self._refusals.append(reason)
            self._cond.notify_all()
        return _json(400, {"success": False, "message": reason})

    def _handle(self, handler, body: bytes) -> tuple[int, dict, bytes]:
        self._wait()
        with self._cond:
            fail = self._fail_status
        if fail is not None:
            return _json(fail, {"success": False})
        if handler.command != "POST" or urlsplit(handler.path).path != "/v1/batch":
            return _json(404, {"success": False})
        gzipped = (handler.headers.get("Content-Encoding") or "").lower() == "gzip"
        try:
            raw = gzip.decompress(body) if gzipped else body
        except OSError:
            return self._refuse("not gzip")
        if len(raw) > MAX_BATCH_BYTES:
            return self._refuse(f"request over {MAX_BATCH_BYTES} bytes")
        try:
            payload = json.loads(raw)
        except ValueError:
            return self._refuse("not JSON")
        events = payload.get("batch") if isinstance(payload, dict) else None
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            return self._refuse("no batch of events")
        if any(len(json.dumps(e).encode()) > MAX_EVENT_BYTES for e in events):
            return self._refuse(f"an event over {MAX_EVENT_BYTES} bytes")
        key = _basic_user(handler.headers.get("Authorization"))
        if key is None and isinstance(payload.get("writeKey"), str):
            key = payload["writeKey"]
        accepted, dropped = [], []
        for event in events:
            if key != self.write_key:
                reason = "write_key"
            elif len(events) > MAX_BATCH_EVENTS:
                reason = "too_many_events"
            elif not event.get("userId") and not event.get("anonymousId"):
                reason = "no_user_anon_id"
            elif event.get("type") == "track" and not event.get("event"):
                reason = "no_event_name"
            else:
                accepted.append(event)
                continue
            dropped.append(Discarded(reason, key, event))
        with self._cond:
            self._discarded.extend(dropped)
            if key == self.write_key:
                self._batches.append(
                    TrackingBatch(key, gzipped, {**payload, "batch": accepted}, time.time())
                )
            self._cond.notify_all()
        return _json(200, {"success": True})
