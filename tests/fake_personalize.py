"""Local impersonations of Amazon Personalize's data-plane APIs, for tests.

AWS is unreachable from the test machine and moto/LocalStack do not implement
these services, so tests drive the *real* boto3 client against the servers here,
which speak the services' documented wire protocol (``rest-json``, botocore
models ``personalize-events/2018-03-22`` and ``personalize-runtime/2018-05-22``):

* ``FakePersonalizeEvents``  -- PutEvents (POST /events), PutUsers (POST /users),
  PutItems (POST /items): the calls the service makes.
* ``FakePersonalizeRuntime`` -- GetRecommendations (POST /recommendations),
  GetPersonalizedRanking (POST /personalize-ranking).

Point a client at one with ``endpoint_url=fake.url`` or with the environment
variables ``AWS_ENDPOINT_URL_PERSONALIZE_EVENTS`` / ``AWS_ENDPOINT_URL_PERSONALIZE_RUNTIME``
(read by botocore when the client is created)::

    with FakePersonalizeEvents(tracking_ids=["t"]) as fake:
        client = boto3.client("personalize-events", endpoint_url=fake.url,
                              region_name="us-east-1",
                              aws_access_key_id="x", aws_secret_access_key="y")
        client.put_events(trackingId="t", sessionId="s",
                          eventList=[{"eventType": "click", "sentAt": datetime.now(UTC)}])
        assert fake.events()[0]["eventType"] == "click"

Wire facts this module relies on (checked against botocore 1.44):

* Requests are JSON bodies.  Timestamps (``sentAt``, ``timestamp``) arrive as
  epoch seconds -- a JSON *number*, an int when the datetime has no microseconds,
  otherwise a float (rest-json's default ``unixtimestamp`` format).
* ``properties`` members carry the ``jsonvalue`` trait, but for *body* members
  botocore sends them as an ordinary JSON string (only header jsonvalues are
  encoded specially); the caller must pass a ``str`` (``json.dumps(...)``).
* botocore's client-side validation checks types, required members and *minimum*
  lengths/sizes only.  Maximums (eventList <= 10, ids <= 256 chars, ...) and
  patterns are enforced by the service alone -- and by these fakes.
* Errors are HTTP status + header ``x-amzn-ErrorType: <Code>`` + body
  ``{"message": "..."}``.  botocore's RestJSONParser takes the code from that
  header (cutting anything after ``:``), falling back to ``code``/``Code`` in the
  body, and maps modeled codes (InvalidInputException, ResourceNotFoundException,
  ...) to ``client.exceptions.<Code>``; anything else is a plain ``ClientError``.
  ``ThrottlingException`` is not modeled for Personalize (it is one of AWS's
  common errors), so it surfaces as ``ClientError`` with that code; botocore's
  retry handlers (legacy and standard) classify that code as throttling.  AWS
  services throttle with HTTP 400 *or* 429, so ``throttle_next`` and
  ``throttle_for`` take the status (and tests of a caller's retries should try
  both).
* PutEvents's only modeled error is ``InvalidInputException``; the model does
  not say what an unknown ``trackingId`` (no such event tracker, or one not yet
  ACTIVE) gets.  ``FakePersonalizeEvents`` answers it as the service answers any
  resource it cannot find, and as the model lists for PutUsers/PutItems:
  404 ``ResourceNotFoundException``.  botocore maps that code for the whole
  service, so it still surfaces as ``client.exceptions.ResourceNotFoundException``.

Signatures are not verified, but a SigV4 ``Authorization`` header must be present
(403 ``MissingAuthenticationTokenException`` otherwise), as must the signing name
``personalize`` in its credential scope.

Plain classes only; pytest fixtures belong in the test modules.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler
from typing import Any, NamedTuple

from tests.loopback import LoopbackServer
from tests.waiting import wait_until

__all__ = [
    "Attempt",
    "Call",
    "FakePersonalizeEvents",
    "FakePersonalizeRuntime",
]


class Call(NamedTuple):
    """One accepted (HTTP 200) call: ``(operation, body, time)``."""

    operation: str  # e.g. "PutEvents"
    body: dict[str, Any]  # the parsed JSON request body, as sent by the client
    time: float  # time.time() when the call was accepted


class Attempt(NamedTuple):
    """One HTTP request, whatever its outcome (see ``attempt_log``)."""

    operation: str | None  # None if the path matched no operation
    status: int  # HTTP status answered
    error_code: str | None  # x-amzn-ErrorType answered, None on success
    time: float
    headers: dict[str, str]  # request headers, names lower-cased


class _ApiError(Exception):
    """Raised inside handlers; becomes a rest-json error response."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _invalid(message: str) -> _ApiError:
    return _ApiError(400, "InvalidInputException", message)


# Default error codes for injected 5xx answers (AWS "common errors" names).
_DEFAULT_5XX_CODES = {
    500: "InternalFailure",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


# --------------------------------------------------------------------------
# Validation helpers.
#
# Messages imitate AWS's validation wording ("Value ... at 'path' failed to
# satisfy constraint: ...").  Patterns use re.search: Smithy patterns are not
# implicitly anchored.  Lengths count code points, like Smithy's @length.
# Type mismatches answer SerializationException, as AWS JSON services do
# (boto3 cannot produce them; only hand-written requests can).
# --------------------------------------------------------------------------


def _constraint(path: str, value: Any, constraint: str) -> _ApiError:
    shown = value if not isinstance(value, str) or len(value) <= 64 else value[:61] + "..."
    return _invalid(
        f"1 validation error detected: Value {shown!r} at '{path}' "
        f"failed to satisfy constraint: {constraint}"
    )


def _type_error(path: str, expected: str) -> _ApiError:
    return _ApiError(400, "SerializationException", f"'{path}' must be {expected}")


def _required(obj: dict, key: str, path: str) -> Any:
    if obj.get(key) is None:
        raise _constraint(f"{path}{key}", None, "Member must not be null")
    return obj[key]


def _check_sized(
    obj: dict,
    key: str,
    path: str,
    kind: type,
    kind_name: str,
    required: bool,
    min_len: int | None,
    max_len: int | None,
) -> Any:
    """``obj[key]``, checked as the model's string or list: present when required, of
    ``kind``, within its lengths; None when absent."""
    if required:
        _required(obj, key, path)
    value = obj.get(key)
    if value is None:
        return None
    where = f"{path}{key}"
    if not isinstance(value, kind):
        raise _type_error(where, kind_name)
    if min_len is not None and len(value) < min_len:
        raise _constraint(
            where, value, f"Member must have length greater than or equal to {min_len}"
        )
    if max_len is not None and len(value) > max_len:
        raise _constraint(where, value, f"Member must have length less than or equal to {max_len}")
    return value


def _check_str(
    obj: dict,
    key: str,
    path: str = "",
    *,
    required: bool = False,
    min_len: int | None = None,
    max_len: int | None = None,
    pattern: str | None = None,
) -> str | None:
    """Validate ``obj[key]`` as a modeled string; return it (None if absent)."""
    value = _check_sized(obj, key, path, str, "a string", required, min_len, max_len)
    if value is not None and pattern is not None and not re.search(pattern, value):
        raise _constraint(
            f"{path}{key}", value, f"Member must satisfy regular expression pattern: {pattern}"
        )
    return value


def _check_list(
    obj: dict,
    key: str,
    path: str = "",
    *,
    required: bool = False,
    min_len: int | None = None,
    max_len: int | None = None,
) -> list | None:
    return _check_sized(obj, key, path, list, "a list", required, min_len, max_len)


def _check_str_items(values: list, where: str, *, min_len=None, max_len=None, pattern=None):
    """Validate every member of a list of strings."""
    for i, v in enumerate(values):
        _check_str(
            {str(i): v}, str(i), f"{where}.", min_len=min_len, max_len=max_len, pattern=pattern
        )


def _check_number(
    obj: dict,
    key: str,
    path: str = "",
    *,
    required: bool = False,
    integer: bool = False,
    min_val=None,
    max_val=None,
):
    if required:
        _required(obj, key, path)
    value = obj.get(key)
    if value is None:
        return None
    where = f"{path}{key}"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise _type_error(where, "an integer" if integer else "a number")
    if min_val is not None and value < min_val:
        raise _constraint(
            where, value, f"Member must have value greater than or equal to {min_val}"
        )
    if max_val is not None and value > max_val:
        raise _constraint(where, value, f"Member must have value less than or equal to {max_val}")
    return value


def _check_timestamp(obj: dict, key: str, path: str = "", *, required: bool = False):
    # rest-json body timestamps are epoch seconds (a JSON number).
    return _check_number(obj, key, path, required=required)


def _check_struct(obj: dict, key: str, path: str = "") -> dict | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, dict):
        raise _type_error(f"{path}{key}", "an object")
    return value


def _check_map(
    obj: dict,
    key: str,
    path: str = "",
    *,
    max_entries: int,
    key_max: int,
    key_pattern: str | None,
    value_max: int,
) -> dict | None:
    """A map<string, string> with entry-count, key and value constraints."""
    value = _check_struct(obj, key, path)
    if value is None:
        return None
    where = f"{path}{key}"
    if len(value) > max_entries:
        raise _constraint(where, value, f"Map must have length less than or equal to {max_entries}")
    for k, _v in value.items():
        if len(k) > key_max or (key_pattern and not re.search(key_pattern, k)):
            raise _constraint(
                f"{where}.{k}", k, f"Map keys must have length <= {key_max} and match {key_pattern}"
            )
        _check_str(value, k, f"{where}.", max_len=value_max)
    return value


def _check_json_properties(obj: dict, key: str, path: str, *, max_len: int) -> None:
    """``properties``: a string (1..max_len chars) holding a JSON object."""
    text = _check_str(obj, key, path, min_len=1, max_len=max_len)
    if text is None:
        return
    try:
        parsed = json.loads(text)
    except ValueError as exc:
        raise _invalid(f"Invalid {path}{key}: not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise _invalid(f"Invalid {path}{key}: must be a JSON object")


# --------------------------------------------------------------------------
# Model constraints (botocore service-2.json), kept in one place.
# --------------------------------------------------------------------------

ARN_PATTERN = r"arn:([a-z\d-]+):personalize:.*:.*:.+"  # shape Arn, max 256
ID_MAX = 256  # StringType / UserId / ItemId: 1..256
EVENT_LIST_MAX = 10  # EventList 1..10 (also UserList, ItemList)
EVENT_PROPERTIES_MAX = 1024  # EventPropertiesJSON
USER_PROPERTIES_MAX = 24000  # UserProperties
ITEM_PROPERTIES_MAX = 32000  # ItemProperties
RECOMMENDATION_ID_MAX = 40  # RecommendationId 1..40
IMPRESSION_MAX = 25  # Impression 1..25
ATTRIBUTION_PATTERN = r"^[\x20-\x7E]*[\x21-\x7E]+[\x20-\x7E]*$"  # EventAttributionSource, max 1024

NUM_RESULTS_DEFAULT = 25
NUM_RESULTS_MAX = 500  # documented (the model only says min 0)
NUM_RESULTS_MAX_WITH_METADATA = 50
INPUT_LIST_MAX = 500  # documented for GetPersonalizedRanking.inputList
FILTER_VALUES_MAX_KEYS = 25
FILTER_KEY_MAX, FILTER_KEY_PATTERN = 50, r"[A-Za-z0-9_]+"
FILTER_VALUE_MAX = 1000
CONTEXT_MAX_KEYS = 150
CONTEXT_KEY_MAX, CONTEXT_KEY_PATTERN = 150, r"[A-Za-z\d_]+"
CONTEXT_VALUE_MAX = 1000


def _check_arn(obj: dict, key: str, path: str = "", *, required: bool = False):
    return _check_str(obj, key, path, required=required, max_len=256, pattern=ARN_PATTERN)


# --------------------------------------------------------------------------
# Shared server machinery.
# --------------------------------------------------------------------------


class _FakeService(LoopbackServer):
    """Threaded HTTP server with recording and failure injection.

    Subclasses set ``ROUTES`` ({path: operation}) and implement
    ``_handle_<Operation>(body) -> dict | None`` (None: empty 200 answer),
    raising ``_ApiError`` for errors.
    """

    ROUTES: dict[str, str] = {}
    SIGNING_NAME = "personalize"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0):
        super().__init__(host=host, port=port)
        self._cond = threading.Condition()  # guards every mutable field below
        self._calls: list[Call] = []
        self._attempts: list[Attempt] = []
        self._clear_injection()

    def _clear_injection(self) -> None:
        self._throttle_left = 0
        self._throttle_until = 0.0
        self._throttle_status = 400
        self._fail_left = 0
        self._fail_status = 500
        self._fail_code = _DEFAULT_5XX_CODES[500]
        self._delay = 0.0
        self._delay_left: int | None = None  # None: every call

    # -- inspection --------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        """Accepted calls in arrival order (a copy)."""
        with self._cond:
            return list(self._calls)

    def calls_for(self, operation: str) -> list[Call]:
        return [c for c in self.calls if c.operation == operation]

    @property
    def attempts(self) -> int:
        """Number of HTTP requests received, including failed/rejected ones."""
        with self._cond:
            return len(self._attempts)

    @property
    def attempt_log(self) -> list[Attempt]:
        """Every request with its outcome, in arrival order (a copy).

        ``headers["amz-sdk-request"]`` shows botocore's attempt counter
        (``attempt=2; max=3``), handy in retry tests.
        """
        with self._cond:
            return list(self._attempts)

    def wait_for_calls(self, n: int, timeout: float = 5.0) -> list[Call]:
        """Wait until at least ``n`` calls were accepted (for code that sends in the
        background); return them."""
        wait_until(
            lambda: len(self.calls) >= n,
            timeout,
            f"{n} accepted call(s)",
            detail=lambda: f"{len(self.calls)} arrived",
        )
        return self.calls

    # -- failure injection (all thread-safe, effective immediately) --------

    def throttle_next(self, n: int = 1, *, status: int = 400) -> None:
        """Answer the next ``n`` requests with ThrottlingException "Rate exceeded", as
        HTTP ``status``: 400 (AWS's common-error answer) or 429 (Too Many Requests)."""
        if status not in (400, 429):
            raise ValueError("AWS throttles with HTTP 400 or 429")
        with self._cond:
            self._throttle_left = n
            self._throttle_status = status

    def throttle_for(self, seconds: float, *, status: int = 400) -> None:
        """Throttle every request arriving within the next ``seconds`` (as
        ``throttle_next``: HTTP 400 or 429)."""
        if status not in (400, 429):
            raise ValueError("AWS throttles with HTTP 400 or 429")
        with self._cond:
            self._throttle_until = time.monotonic() + seconds
            self._throttle_status = status

    def fail_next(self, n: int = 1, status: int = 500, code: str | None = None) -> None:
        """Answer the next ``n`` requests with a server error (default 500 InternalFailure)."""
        with self._cond:
            self._fail_left = n
            self._fail_status = status
            self._fail_code = code or _DEFAULT_5XX_CODES.get(status, "InternalFailure")

    def delay(self, seconds: float, n: int | None = None) -> None:
        """Sleep ``seconds`` before answering each request (only the next ``n`` if given).

        The request is still processed (and recorded if valid) after the sleep,
        even if the client has given up -- like a real service whose answer is
        lost to a client timeout.  ``delay(0)`` switches it off.
        """
        with self._cond:
            self._delay = seconds
            self._delay_left = n

    def reset(self) -> None:
        """Forget recorded calls/attempts and all injected failures and rejections."""
        with self._cond:
            self._calls.clear()
            self._attempts.clear()
            self._clear_injection()
            self._reset_extra()

    def _reset_extra(self) -> None:
        """Subclass hook, called under the lock by reset()."""

    # -- request handling --------------------------------------------------

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        length = int(headers.get("content-length") or 0)
        raw = handler.rfile.read(length) if length else b""
        path = handler.path.split("?", 1)[0]
        operation = self.ROUTES.get(path) if handler.command == "POST" else None
        try:
            self._check_auth(headers)
            if operation is None:
                raise _ApiError(
                    404, "UnknownOperationException", f"Unknown operation {handler.command} {path}"
                )
            self._maybe_sleep()
            self._maybe_inject_failure()
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                raise _ApiError(
                    400, "SerializationException", "Request body is not valid JSON"
                ) from None
            if not isinstance(body, dict):
                raise _ApiError(400, "SerializationException", "Request body must be a JSON object")
            result = getattr(self, f"_handle_{operation}")(body)
        except _ApiError as err:
            self._log_attempt(operation, err.status, err.code, headers)
            payload = json.dumps({"message": err.message}).encode()
            self._respond(handler, err.status, payload, {"x-amzn-ErrorType": err.code})
            return
        with self._cond:
            self._calls.append(Call(operation, body, time.time()))
            self._cond.notify_all()
        self._log_attempt(operation, 200, None, headers)
        payload = b"" if result is None else json.dumps(result).encode()
        self._respond(handler, 200, payload, {})

    def _log_attempt(self, operation, status, code, headers) -> None:
        with self._cond:
            self._attempts.append(Attempt(operation, status, code, time.time(), headers))

    @staticmethod
    def _respond(handler, status: int, payload: bytes, headers: dict[str, str]) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("x-amzn-RequestId", str(uuid.uuid4()))
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. read timeout during an injected delay)

    def _check_auth(self, headers: dict[str, str]) -> None:
        """Require a SigV4 Authorization header for our signing name; never verify it."""
        auth = headers.get("authorization")
        if not auth:
            raise _ApiError(
                403, "MissingAuthenticationTokenException", "Missing Authentication Token"
            )
        m = re.match(r"AWS4-HMAC-SHA256 Credential=[^/]+/\d{8}/([^/]+)/([^/]+)/aws4_request", auth)
        if not m or "x-amz-date" not in headers:
            raise _ApiError(
                403,
                "IncompleteSignatureException",
                "Authorization header requires a SigV4 Credential and X-Amz-Date",
            )
        if m.group(2) != self.SIGNING_NAME:
            raise _ApiError(
                403,
                "InvalidSignatureException",
                f"Credential should be scoped to correct service: '{self.SIGNING_NAME}'.",
            )

    def _maybe_sleep(self) -> None:
        with self._cond:
            seconds = self._delay
            if seconds and self._delay_left is not None:
                if self._delay_left <= 0:
                    seconds = 0.0
                else:
                    self._delay_left -= 1
        if seconds:
            self._stopping.wait(seconds)

    def _maybe_inject_failure(self) -> None:
        # Order: throttle_next, throttle_for, fail_next.
        with self._cond:
            if self._throttle_left > 0:
                self._throttle_left -= 1
                raise _ApiError(self._throttle_status, "ThrottlingException", "Rate exceeded")
            if time.monotonic() < self._throttle_until:
                raise _ApiError(self._throttle_status, "ThrottlingException", "Rate exceeded")
            if self._fail_left > 0:
                self._fail_left -= 1
                raise _ApiError(
                    self._fail_status, self._fail_code, "An internal error occurred. Try again."
                )


# --------------------------------------------------------------------------
# Personalize Events
# --------------------------------------------------------------------------


class FakePersonalizeEvents(_FakeService):
    """Fake ``personalize-events`` endpoint (rest-json, API version 2018-03-22).

    ``tracking_ids`` (required): the event trackers that exist, as
    CreateEventTracker made them.  PutEvents with any other trackingId answers
    404 ResourceNotFoundException, after the input checks (see the module's
    docstring for why that code); ``add_tracking_ids`` creates more later (a
    tracker that becomes ACTIVE).  There is no "accept any": a caller that
    sends the wrong tracking id must fail here as it would against AWS.

    ``known_dataset_arns``: if given, PutUsers/PutItems with any other
    datasetArn answer 404 ResourceNotFoundException.
    """

    ROUTES = {
        "/events": "PutEvents",
        "/users": "PutUsers",
        "/items": "PutItems",
    }

    def __init__(
        self,
        *,
        tracking_ids: Iterable[str],
        known_dataset_arns: Iterable[str] | None = None,
        **kwargs,
    ):
        if isinstance(tracking_ids, str):
            raise TypeError("tracking_ids: a list of tracking ids, not one string")
        super().__init__(**kwargs)
        self._tracking_ids = set(tracking_ids)
        self.known_dataset_arns = None if known_dataset_arns is None else set(known_dataset_arns)
        self._reset_extra()

    @property
    def tracking_ids(self) -> frozenset[str]:
        """The tracking ids PutEvents accepts."""
        with self._cond:
            return frozenset(self._tracking_ids)

    def add_tracking_ids(self, tracking_ids: Iterable[str]) -> None:
        """These event trackers exist from now on (reset() keeps them: configuration)."""
        with self._cond:
            self._tracking_ids |= set(tracking_ids)

    def _reset_extra(self) -> None:
        self._rejected_items: set[str] = set()
        self._rejected_users: set[str] = set()
        self._rejected_event_ids: set[str] = set()

    # -- permanent per-record errors ---------------------------------------

    def reject_items(self, item_ids: Iterable[str]) -> None:
        """PutItems requests containing any of these itemIds answer InvalidInputException."""
        with self._cond:
            self._rejected_items |= set(item_ids)

    def reject_users(self, user_ids: Iterable[str]) -> None:
        """PutUsers requests containing any of these userIds answer InvalidInputException."""
        with self._cond:
            self._rejected_users |= set(user_ids)

    def reject_event_ids(self, event_ids: Iterable[str]) -> None:
        """PutEvents requests containing any of these eventIds answer InvalidInputException."""
        with self._cond:
            self._rejected_event_ids |= set(event_ids)

    # -- flattened views ---------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        """Every accepted event in order, each with trackingId/sessionId/userId merged in."""
        out = []
        for call in self.calls_for("PutEvents"):
            common = {k: call.body.get(k) for k in ("trackingId", "sessionId", "userId")}
            out.extend({**event, **common} for event in call.body["eventList"])
        return out

    def users(self) -> list[dict[str, Any]]:
        """Every accepted user record in order, with datasetArn merged in."""
        return self._flatten("PutUsers", "users")

    def items(self) -> list[dict[str, Any]]:
        """Every accepted item record in order, with datasetArn merged in."""
        return self._flatten("PutItems", "items")

    def _flatten(self, operation: str, key: str) -> list[dict[str, Any]]:
        return [
            {**record, "datasetArn": call.body["datasetArn"]}
            for call in self.calls_for(operation)
            for record in call.body[key]
        ]

    # -- operations --------------------------------------------------------

    def _handle_PutEvents(self, body: dict) -> None:
        _check_str(body, "trackingId", required=True, min_len=1, max_len=ID_MAX)
        _check_str(body, "userId", min_len=1, max_len=ID_MAX)
        _check_str(body, "sessionId", required=True, min_len=1, max_len=ID_MAX)
        events = _check_list(body, "eventList", required=True, min_len=1, max_len=EVENT_LIST_MAX)
        for i, event in enumerate(events):
            p = f"eventList.{i + 1}.member."
            if not isinstance(event, dict):
                raise _type_error(p[:-1], "an object")
            _check_str(event, "eventId", p, min_len=1, max_len=ID_MAX)
            _check_str(event, "eventType", p, required=True, min_len=1, max_len=ID_MAX)
            _check_number(event, "eventValue", p)
            _check_str(event, "itemId", p, min_len=1, max_len=ID_MAX)
            _check_json_properties(event, "properties", p, max_len=EVENT_PROPERTIES_MAX)
            _check_timestamp(event, "sentAt", p, required=True)
            _check_str(event, "recommendationId", p, min_len=1, max_len=RECOMMENDATION_ID_MAX)
            impression = _check_list(event, "impression", p, min_len=1, max_len=IMPRESSION_MAX)
            if impression is not None:
                _check_str_items(impression, f"{p}impression", min_len=1, max_len=ID_MAX)
            attribution = _check_struct(event, "metricAttribution", p)
            if attribution is not None:
                _check_str(
                    attribution,
                    "eventAttributionSource",
                    f"{p}metricAttribution.",
                    required=True,
                    max_len=1024,
                    pattern=ATTRIBUTION_PATTERN,
                )
        with self._cond:
            known = body["trackingId"] in self._tracking_ids
        if not known:
            raise _ApiError(
                404,
                "ResourceNotFoundException",
                f"Could not find event tracker with tracking ID: {body['trackingId']}",
            )
        with self._cond:
            rejected = self._rejected_event_ids & {e.get("eventId") for e in events}
        if rejected:
            raise _invalid(f"Rejected eventId(s): {', '.join(sorted(rejected))}")

    def _put_records(
        self, body: dict, key: str, id_key: str, props_max: int, rejected_attr: str
    ) -> None:
        arn = _check_arn(body, "datasetArn", required=True)
        records = _check_list(body, key, required=True, min_len=1, max_len=EVENT_LIST_MAX)
        for i, record in enumerate(records):
            p = f"{key}.{i + 1}.member."
            if not isinstance(record, dict):
                raise _type_error(p[:-1], "an object")
            _check_str(record, id_key, p, required=True, min_len=1, max_len=ID_MAX)
            _check_json_properties(record, "properties", p, max_len=props_max)
        if self.known_dataset_arns is not None and arn not in self.known_dataset_arns:
            raise _ApiError(404, "ResourceNotFoundException", f"Could not find resource: {arn}")
        with self._cond:
            hit = getattr(self, rejected_attr) & {r[id_key] for r in records}
        if hit:
            raise _invalid(f"Rejected {id_key}(s): {', '.join(sorted(hit))}")

    def _handle_PutUsers(self, body: dict) -> None:
        self._put_records(body, "users", "userId", USER_PROPERTIES_MAX, "_rejected_users")

    def _handle_PutItems(self, body: dict) -> None:
        self._put_records(body, "items", "itemId", ITEM_PROPERTIES_MAX, "_rejected_items")


# --------------------------------------------------------------------------
# Personalize Runtime
# --------------------------------------------------------------------------


def _scores(n: int) -> list[float]:
    """Decreasing scores summing to ~1 over a ranking of n items (like Personalize's)."""
    total = n * (n + 1) / 2
    return [round((n - i) / total, 7) for i in range(n)]


class FakePersonalizeRuntime(_FakeService):
    """Fake ``personalize-runtime`` endpoint (rest-json, API version 2018-05-22).

    Recommendations come from a configurable ranking: ``set_ranking(id, items)``
    for a userId (GetRecommendations with userId, GetPersonalizedRanking) or an
    itemId (related-items GetRecommendations, looked up before userId), else
    ``default_ranking`` (constructor arg; default ``item-1`` .. ``item-500``).

    ``known_arns``: if given, any other campaignArn/recommenderArn answers
    404 ResourceNotFoundException.

    Deliberately strict where the real service's behaviour depends on the
    recipe: GetRecommendations needs exactly one of campaignArn/recommenderArn
    and a non-empty userId or itemId; numResults must be 1..500 (the model's
    minimum is 0, its documented maximum 500, or 50 with metadataColumns).
    """

    ROUTES = {
        "/recommendations": "GetRecommendations",
        "/personalize-ranking": "GetPersonalizedRanking",
    }

    def __init__(
        self,
        *,
        default_ranking: Iterable[str] | None = None,
        known_arns: Iterable[str] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._default_ranking = (
            [f"item-{i}" for i in range(1, 501)]
            if default_ranking is None
            else list(default_ranking)
        )
        self._rankings: dict[str, list[str]] = {}
        self.known_arns = None if known_arns is None else set(known_arns)
        self.recommendation_ids: list[str] = []  # answered, in order

    def set_ranking(self, user_or_item_id: str, item_ids: Iterable[str]) -> None:
        with self._cond:
            self._rankings[user_or_item_id] = list(item_ids)

    def set_default_ranking(self, item_ids: Iterable[str]) -> None:
        with self._cond:
            self._default_ranking = list(item_ids)

    def _reset_extra(self) -> None:
        # Rankings are configuration, not history: reset() keeps them.
        self.recommendation_ids = []

    def _ranking_for(self, *keys: str | None) -> list[str]:
        with self._cond:
            for key in keys:
                if key and key in self._rankings:
                    return list(self._rankings[key])
            return list(self._default_ranking)

    def _new_recommendation_id(self) -> str:
        rid = f"RID-{uuid.uuid4()}"
        with self._cond:
            self.recommendation_ids.append(rid)
        return rid

    def _check_common(self, body: dict) -> None:
        """Members shared by both operations: context, filterArn/Values, metadataColumns."""
        _check_map(
            body,
            "context",
            max_entries=CONTEXT_MAX_KEYS,
            key_max=CONTEXT_KEY_MAX,
            key_pattern=CONTEXT_KEY_PATTERN,
            value_max=CONTEXT_VALUE_MAX,
        )
        _check_arn(body, "filterArn")
        _check_map(
            body,
            "filterValues",
            max_entries=FILTER_VALUES_MAX_KEYS,
            key_max=FILTER_KEY_MAX,
            key_pattern=FILTER_KEY_PATTERN,
            value_max=FILTER_VALUE_MAX,
        )
        columns = _check_struct(body, "metadataColumns")
        if columns is not None:
            if len(columns) > 1:
                raise _constraint(
                    "metadataColumns", columns, "Map must have length less than or equal to 1"
                )
            for dataset_type, names in columns.items():
                names = _check_list(columns, dataset_type, "metadataColumns.", max_len=99) or []
                _check_str_items(names, f"metadataColumns.{dataset_type}", max_len=150)

    def _check_known(self, arn: str) -> None:
        if self.known_arns is not None and arn not in self.known_arns:
            raise _ApiError(404, "ResourceNotFoundException", f"Could not find resource: {arn}")

    def _handle_GetRecommendations(self, body: dict) -> dict:
        campaign = _check_arn(body, "campaignArn")
        recommender = _check_arn(body, "recommenderArn")
        if bool(campaign) == bool(recommender):
            raise _invalid("Provide exactly one of campaignArn or recommenderArn")
        item_id = _check_str(body, "itemId", max_len=ID_MAX)
        user_id = _check_str(body, "userId", max_len=ID_MAX)
        if not item_id and not user_id:
            raise _invalid("Provide a userId or an itemId")
        max_results = (
            NUM_RESULTS_MAX_WITH_METADATA if body.get("metadataColumns") else NUM_RESULTS_MAX
        )
        num = _check_number(body, "numResults", integer=True, min_val=1, max_val=max_results)
        self._check_common(body)
        promotions = _check_list(body, "promotions", max_len=1)
        for i, promo in enumerate(promotions or []):
            p = f"promotions.{i + 1}.member."
            if not isinstance(promo, dict):
                raise _type_error(p[:-1], "an object")
            _check_str(
                promo, "name", p, min_len=1, max_len=63, pattern=r"^[a-zA-Z0-9][a-zA-Z0-9\-_]*"
            )
            _check_number(promo, "percentPromotedItems", p, integer=True, min_val=1, max_val=100)
            _check_arn(promo, "filterArn", p)
            _check_map(
                promo,
                "filterValues",
                p,
                max_entries=FILTER_VALUES_MAX_KEYS,
                key_max=FILTER_KEY_MAX,
                key_pattern=FILTER_KEY_PATTERN,
                value_max=FILTER_VALUE_MAX,
            )
        self._check_known(campaign or recommender)

        ranking = self._ranking_for(item_id, user_id)
        if item_id:  # related items never recommend the seed item itself
            ranking = [i for i in ranking if i != item_id]
        scores = _scores(len(ranking))
        n = NUM_RESULTS_DEFAULT if num is None else num
        return {
            "itemList": [{"itemId": i, "score": s} for i, s in zip(ranking[:n], scores)],
            "recommendationId": self._new_recommendation_id(),
        }

    def _handle_GetPersonalizedRanking(self, body: dict) -> dict:
        campaign = _check_arn(body, "campaignArn", required=True)
        inputs = _check_list(body, "inputList", required=True, max_len=INPUT_LIST_MAX)
        _check_str_items(inputs, "inputList", max_len=ID_MAX)
        user_id = _check_str(body, "userId", required=True, max_len=ID_MAX)
        self._check_common(body)
        self._check_known(campaign)

        # Known items in ranking order, then unknown ones in input order
        # ("If an item was not included in the training dataset, the item is
        # appended to the end of the reranked list.").  sorted() is stable.
        ranking = self._ranking_for(user_id)
        position = {item: i for i, item in reversed(list(enumerate(ranking)))}
        ordered = sorted(inputs, key=lambda item: position.get(item, len(ranking)))
        known = [i for i in ordered if i in position]
        scores = _scores(len(known))
        result = [{"itemId": i, "score": s} for i, s in zip(known, scores)]
        result += [{"itemId": i, "score": 0.0} for i in ordered[len(known) :]]
        return {"personalizedRanking": result, "recommendationId": self._new_recommendation_id()}
