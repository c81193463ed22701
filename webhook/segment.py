"""The Segment Spec: turn a request body into validated Segment messages.

``parse_body`` decodes what the webhook destinations send (one message, a bare array from
Webhooks (Actions), or the Tracking API's ``{"batch": [...]}``); ``parse_message`` checks one
message against the Spec and returns a ``Message``. Neither touches storage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import orjson

MESSAGE_TYPES = frozenset({"track", "identify", "page", "screen", "group", "alias", "delete"})
MAX_ID_LENGTH = 256
MAX_MESSAGES_PER_DELIVERY = 4000  # Webhooks (Actions) batches hold at most 4000 events


class BodyError(ValueError):
    """The request body is not something Segment sends: nothing in it is used."""


class MessageError(ValueError):
    """One message breaks the Segment Spec; the reason says how."""


# Plain slotted dataclasses, not frozen ones: a frozen dataclass's __init__ sets each
# field through object.__setattr__, and every message is built twice (the request, then
# its applier). Nothing changes them after parsing.
@dataclass(slots=True)
class Body:
    shape: str  # "single", "array" (Webhooks Actions) or "batch" (Tracking API shape)
    raw_messages: list[Any]


@dataclass(slots=True)
class Message:
    type: str
    message_id: str | None  # only a delete may come without one
    user_id: str | None
    anonymous_id: str | None
    timestamp: datetime  # timezone-aware UTC
    event: str | None = None  # track
    name: str | None = None  # page, screen
    properties: dict | None = None  # track, page, screen
    traits: dict | None = None  # identify, group
    previous_id: str | None = None  # alias
    group_id: str | None = None  # group


MAX_DEPTH = 64  # objects and arrays inside each other; Segment messages use a handful


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text[:20]}... is out of range")
    return value


# Made once: json.loads with hooks builds a new decoder (and scanner) on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
# A run of 20 digits or more: an integer that may not fit 64 bits (orjson would read it as
# a float, losing digits; the standard library keeps it exact). Found by mapping every
# digit to "0" and everything else to a space, then looking for twenty "0"s: both in C,
# rather than a regular expression that tries a match at every digit.
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_TWENTY_DIGITS = b"0" * 20


def _has_long_number(raw: bytes) -> bool:
    return _TWENTY_DIGITS in raw.translate(_DIGITS_AS_ZEROS)


def decode_json(raw: bytes) -> Any:
    """JSON as the standard library reads it, minus NaN and Infinity and numbers that
    overflow a float (ValueError, RecursionError). orjson reads the common case (JSON is a
    large share of the CPU of ingesting Actions batches); anything it refuses or
    might read differently (an integer beyond 64 bits, a lone surrogate escape, text
    that is not UTF-8) is read by the standard library, which says what is wrong."""
    if not _has_long_number(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # NaN, 1e400, bad UTF-8, lone surrogates...: the slow path decides
    return _DECODER.decode(raw.decode("utf-8"))


_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def encode_json(value: Any) -> str:
    """Compact JSON, keys in their order, non-ASCII and lone surrogates escaped (so any
    database takes it as text): what the standard library writes with
    ``ensure_ascii``. orjson writes the common case (ASCII text, integers within 64
    bits); what it would write otherwise (raw UTF-8) or refuses (a
    lone surrogate, a larger integer) is written by the standard library."""
    try:
        text = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        return _ENCODE(value)
    if text.isascii():
        return text.decode("ascii")
    return _ENCODE(value)


def _too_deep(data: Any, limit: int = MAX_DEPTH) -> bool:
    """More than ``limit`` objects and arrays inside each other? Level by level, with no
    per-node allocation: a batch of messages is a few short levels."""
    level = [data] if isinstance(data, (dict, list)) else []
    depth = 1
    while level:
        if depth > limit:
            return True
        deeper = []
        for value in level:
            for child in value.values() if isinstance(value, dict) else value:
                if isinstance(child, (dict, list)):
                    deeper.append(child)
        level = deeper
        depth += 1
    return False


def clean_text(value: str) -> bool:
    """Text a database can hold: no NUL character, no lone surrogate."""
    if "\x00" in value:
        return False
    if value.isascii():  # most ids and names: no surrogate possible (checked in O(1))
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_body(raw: bytes) -> Any:
    """A delivery's JSON. Raises ``BodyError`` saying what is wrong."""
    if not raw or not raw.strip():
        raise BodyError("the body is empty; expected a Segment message as JSON")
    try:
        data = decode_json(raw)
    except UnicodeDecodeError as exc:
        raise BodyError(f"the body is not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise BodyError("the body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, over-long integers
        raise BodyError(f"the body is not valid JSON: {exc}") from None
    # No deeper than the brackets it has: most bodies need no walk (counted in C).
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _too_deep(data):
        raise BodyError(f"the body is nested more than {MAX_DEPTH} levels deep")
    return data


def parse_body(raw: bytes, data: Any = None) -> Body:
    """Decode a delivery (or take ``data``, what ``decode_body(raw)`` gave already).
    Raises ``BodyError`` saying what is wrong."""
    if data is None:
        data = decode_body(raw)
    if isinstance(data, list):
        shape, messages = "array", data
    elif isinstance(data, dict) and "type" not in data and isinstance(data.get("batch"), list):
        shape, messages = "batch", data["batch"]
    elif isinstance(data, dict):
        shape, messages = "single", [data]
    else:
        raise BodyError(
            f"expected a Segment message (a JSON object) or an array of them, "
            f"got a JSON {type(data).__name__}"
        )
    if not messages:
        raise BodyError("the batch is empty: it holds no Segment messages")
    if len(messages) > MAX_MESSAGES_PER_DELIVERY:
        raise BodyError(
            f"the batch holds {len(messages)} messages; at most {MAX_MESSAGES_PER_DELIVERY}"
        )
    return Body(shape=shape, raw_messages=messages)


def parse_timestamp(value: Any) -> datetime:
    """An ISO-8601 timestamp as Segment and its libraries write it (``datetime.fromisoformat``:
    'T' or ' ', any fraction, 'Z' or an offset), in UTC; without an offset it is taken as
    UTC."""
    if not isinstance(value, str):
        raise MessageError("timestamp must be an ISO-8601 string")
    text = value.strip()
    if text.endswith("z"):  # RFC 3339 allows a lowercase z
        text = text[:-1] + "Z"
    # A date and a time to the minute at least, in the extended form (2024-05-01T10:00):
    # a date alone would place the event at midnight.
    extended = len(text) >= 16 and text[4] == text[7] == "-" and text[13] == ":"
    try:
        if not extended:
            raise ValueError(text)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise MessageError(f"timestamp is not ISO-8601: {value[:40]!r}") from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise MessageError("timestamp is out of range") from None


def clean_id(value: Any, name: str) -> str | None:
    """An id as Segment's libraries send it (None for absent or empty): a string, or a
    whole number sent as one, of at most 256 characters a database can hold. Raises
    ``MessageError`` naming ``name`` otherwise. The one check of an id, for messages and
    for the ids callers of the other endpoints give."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # Segment's libraries accept numeric ids and send them as numbers
    if not isinstance(value, str):
        raise MessageError(f"{name} must be a string")
    if len(value) > MAX_ID_LENGTH:
        raise MessageError(f"{name} is longer than {MAX_ID_LENGTH} characters")
    if not clean_text(value):
        raise MessageError(f"{name} holds a NUL character or a lone surrogate")
    return value


def _optional_id(raw: dict, key: str) -> str | None:
    return clean_id(raw.get(key), key)


def _optional_dict(raw: dict, key: str) -> dict:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MessageError(f"{key} must be an object")
    return value


def message_time(raw: dict) -> datetime:
    for key in ("timestamp", "originalTimestamp", "sentAt", "receivedAt"):
        value = raw.get(key)
        if value not in (None, ""):
            try:
                return parse_timestamp(value)
            except MessageError as exc:
                raise MessageError(f"{key}: {exc}") from None
    raise MessageError("no timestamp, originalTimestamp, sentAt or receivedAt")


def parse_message(raw: Any) -> Message:
    """Validate one Segment message. Raises ``MessageError`` with the reason."""
    if not isinstance(raw, dict):
        raise MessageError(f"a message must be a JSON object, got {type(raw).__name__}")
    kind = raw.get("type")
    if not isinstance(kind, str) or not kind:
        raise MessageError("missing type")
    kind = kind.strip().lower()
    if kind not in MESSAGE_TYPES:
        raise MessageError(f"unknown type {raw.get('type')!r}")

    message_id = _optional_id(raw, "messageId")
    user_id = _optional_id(raw, "userId")
    anonymous_id = _optional_id(raw, "anonymousId")
    # Every type carries these; each branch adds its own fields.
    make = partial(
        Message, type=kind, message_id=message_id, user_id=user_id, anonymous_id=anonymous_id
    )

    if kind == "delete":
        if not (user_id or anonymous_id):
            raise MessageError("a delete needs a userId or an anonymousId")
        # A deletion request may carry no time at all; it takes effect when received.
        try:
            timestamp = message_time(raw)
        except MessageError:
            timestamp = datetime.now(UTC)
        return make(
            timestamp=timestamp,
        )

    if not message_id:
        raise MessageError("missing messageId")
    if not (user_id or anonymous_id):
        raise MessageError("missing userId and anonymousId: one is required")
    timestamp = message_time(raw)

    if kind == "track":
        event = raw.get("event")
        if not isinstance(event, str) or not event.strip():
            raise MessageError("a track needs an event name")
        if len(event) > MAX_ID_LENGTH or not clean_text(event):
            raise MessageError(
                "the event name is longer than 256 characters or holds a NUL "
                "character or a lone surrogate"
            )
        return make(
            timestamp=timestamp,
            event=event.strip(),
            properties=_optional_dict(raw, "properties"),
        )
    if kind == "identify":
        return make(
            timestamp=timestamp,
            traits=_identify_traits(raw),
        )
    if kind in ("page", "screen"):
        name = raw.get("name")
        return make(
            timestamp=timestamp,
            name=name if isinstance(name, str) else None,
            properties=_optional_dict(raw, "properties"),
        )
    if kind == "group":
        return make(
            timestamp=timestamp,
            group_id=_optional_id(raw, "groupId"),
            traits=_optional_dict(raw, "traits"),
        )
    # alias: previousId becomes (is the same person as) userId
    previous_id = _optional_id(raw, "previousId")
    if not previous_id or not user_id:
        raise MessageError("an alias needs previousId and userId")
    return make(timestamp=timestamp, previous_id=previous_id)


def _identify_traits(raw: dict) -> dict:
    traits = _optional_dict(raw, "traits")
    if not traits:
        # Some libraries (and older sources) put identify traits in context.traits.
        context = raw.get("context")
        if isinstance(context, dict) and isinstance(context.get("traits"), dict):
            traits = context["traits"]
    return traits
