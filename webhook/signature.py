"""Segment's request signatures: compute, verify, and generate them.

Segment signs a webhook with ``X-Signature`` = hex HMAC-SHA1 keyed with the shared secret:
of the raw body for a Classic webhook (one message a request), and of
``JSON.stringify(body[0])`` for a Webhooks (Actions) batch. To check the latter, the first
element is serialized here exactly as JavaScript would (``js_stringify``).

``verify_delivery`` is the one decision over a delivery's credentials. Every message stored
must be authenticated as a whole: a signature covers a Classic body, or the one element of
an array of one; an array of several is covered only by a whole-body credential, the
bearer token (``WEBHOOK_BEARER_TOKEN``), because its first element's signature says nothing
about the others.

This module knows nothing about Flask or Segment messages beyond that.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Callable, Iterable
from typing import Any, Protocol

__all__ = [
    "SignatureError",
    "compute_signature",
    "verify_signature",
    "verify_bearer",
    "verify_delivery",
    "js_stringify",
]


class SignatureError(Exception):
    """The request's credentials are missing or wrong."""


def compute_signature(secret: str, payload: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), payload, hashlib.sha1).hexdigest()


def verify_signature(header: str | None, payload: bytes, secrets: Iterable[str]) -> None:
    """Raise ``SignatureError`` unless ``header`` signs ``payload`` with one of ``secrets``.

    Every secret is tried (rotation), each compared in constant time.
    """
    if not header:
        raise SignatureError("missing X-Signature header")
    presented = header.strip().lower().encode("ascii", "replace")
    matched = False
    for secret in secrets:
        expected = compute_signature(secret, payload).encode("ascii")
        # No early exit: the time taken does not tell which secret matched.
        matched |= hmac.compare_digest(expected, presented)
    if not matched:
        raise SignatureError("X-Signature does not match")


def verify_bearer(header: str | None, tokens: Iterable[str]) -> None:
    """Raise ``SignatureError`` unless ``Authorization: Bearer <token>`` names a token."""
    if not header:
        raise SignatureError("missing Authorization header")
    scheme, _, presented = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise SignatureError("Authorization must be 'Bearer <token>'")
    presented_bytes = presented.strip().encode("utf-8", "replace")
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(token.encode("utf-8"), presented_bytes)
    if not matched:
        raise SignatureError("bearer token does not match")


_ARRAY = re.compile(rb"\s*\[")  # a Webhooks (Actions) batch: a bare JSON array


class HeaderLookup(Protocol):
    """What ``verify_delivery`` reads of a request's headers (a dict, werkzeug's)."""

    def get(self, key: str, /) -> str | None: ...


def verify_delivery(
    headers: HeaderLookup,
    raw: bytes,
    *,
    secrets: Iterable[str],
    bearer_tokens: Iterable[str],
    decode: Callable[[bytes], Any],
) -> Any:
    """Raise ``SignatureError`` unless the delivery's credentials cover all of ``raw``.

    * ``bearer_tokens`` set: ``Authorization: Bearer`` must name one (whole body).
    * ``secrets`` set: ``X-Signature`` must sign the raw body (Classic, or the Tracking
      API's ``{"batch": [...]}``), or, for a bare array, ``JSON.stringify`` of its first
      element (Webhooks Actions). An array of more than one message is refused unless a
      bearer token authenticated the whole body.
    * neither set: nothing is checked (the service warns that it is open).

    ``decode`` turns the raw body into JSON; it is called only when the credentials depend
    on the content (an array under a shared secret), and what it returned is returned so
    the caller need not decode twice (None otherwise). Its own errors propagate.
    """
    secrets = tuple(secrets)
    bearer_tokens = tuple(bearer_tokens)
    if bearer_tokens:
        verify_bearer(headers.get("Authorization"), bearer_tokens)
    if not secrets:
        return None
    if not _ARRAY.match(raw):
        # One message (or a {"batch": [...]} replay): the raw bytes are signed, so a forged
        # body is refused before any parsing.
        verify_signature(headers.get("X-Signature"), raw, secrets)
        return None
    data = decode(raw)
    if not isinstance(data, list) or not data:
        return data  # not something Segment sends: the parser says what is wrong with it
    if len(data) > 1 and not bearer_tokens:
        raise SignatureError(
            f"an array of {len(data)} messages needs a whole-body credential: Segment's "
            "X-Signature covers only the first message of a Webhooks (Actions) batch. Add "
            "the header 'Authorization: Bearer <token>' to the destination's mapping and "
            "set WEBHOOK_BEARER_TOKEN to the same token (or turn batching off)"
        )
    try:
        first = js_stringify(data[0]).encode("utf-8", "surrogatepass")
    except RecursionError:
        raise SignatureError("the first message is nested too deeply to verify") from None
    verify_signature(headers.get("X-Signature"), first, secrets)
    return data


def accepted_shapes(*, secrets: bool, bearer: bool) -> dict[str, str]:
    """What each delivery shape needs under a configuration (for /healthz and the docs)."""
    if not secrets and not bearer:
        return {
            "single": "accepted unsigned",
            "array": "accepted unsigned",
            "batch": "accepted unsigned",
        }
    need = []
    if bearer:
        need.append("Authorization: Bearer")
    single = " and ".join(need + (["X-Signature of the body"] if secrets else []))
    if secrets and not bearer:
        array = (
            "one message: X-Signature of it; several: refused (401), they need WEBHOOK_BEARER_TOKEN"
        )
    elif secrets:
        array = "Authorization: Bearer and X-Signature of the first message"
    else:
        array = "Authorization: Bearer"
    return {"single": single, "array": array, "batch": single}


# --- JavaScript's JSON.stringify ---------------------------------------------------------

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _js_string(value: str) -> str:
    out = ['"']
    for char in value:
        code = ord(char)
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif code < 0x20 or 0xD800 <= code <= 0xDFFF:
            # Control characters, and lone surrogates (well-formed JSON.stringify, ES2019),
            # become lower-case \u escapes; everything else is kept as it is.
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _js_number(value: float | int) -> str:
    """Number::toString for a JSON number, as V8 prints it."""
    try:
        number = float(value)  # JavaScript has only doubles: big integers round like this too
    except OverflowError:
        return "null"  # JavaScript reads it as Infinity, which JSON.stringify writes as null
    if math.isnan(number) or math.isinf(number):
        return "null"
    if number == 0:
        return "0"  # also for -0
    if number.is_integer() and abs(number) < 2**53:
        return str(int(number))  # exact; larger doubles print their shortest digits
    # repr gives the shortest round-tripping digits, as JavaScript does; only the layout
    # differs (JavaScript switches to exponents at 1e21 and below 1e-6).
    sign = "-" if number < 0 else ""
    mantissa, _, exponent = repr(abs(number)).partition("e")
    digits, point_exp = _digits_and_exponent(mantissa, int(exponent or 0))
    # value = 0.d1d2...dk * 10**point_exp  (point_exp is ECMAScript's n)
    k, n = len(digits), point_exp
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * (-n) + digits
    else:
        exp = n - 1
        exp_text = f"e+{exp}" if exp >= 0 else f"e-{-exp}"
        text = digits + exp_text if k == 1 else digits[0] + "." + digits[1:] + exp_text
    return sign + text


def _digits_and_exponent(mantissa: str, exponent: int) -> tuple[str, int]:
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    leading_zeros = len(whole + fraction) - len((whole + fraction).lstrip("0"))
    point_exp = len(whole) + exponent - leading_zeros
    return digits.rstrip("0") or "0", point_exp


def _is_array_index(key: str) -> bool:
    # JavaScript objects list integer-like keys first, in ascending order.
    return (
        key.isascii()
        and key.isdigit()
        and (key == "0" or not key.startswith("0"))
        and int(key) < 2**32 - 1
    )


def _js_keys(obj: dict) -> list[str]:
    keys = list(obj)
    indexes = sorted((k for k in keys if _is_array_index(k)), key=int)
    if not indexes:
        return keys
    return indexes + [k for k in keys if not _is_array_index(k)]


def js_stringify(value: Any) -> str:
    """``JSON.stringify(JSON.parse(text))`` for a value that ``json.loads`` produced."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _js_string(value)
    if isinstance(value, (int, float)):
        return _js_number(value)
    if isinstance(value, list):
        return "[" + ",".join(js_stringify(item) for item in value) + "]"
    if isinstance(value, dict):
        return (
            "{"
            + ",".join(_js_string(key) + ":" + js_stringify(value[key]) for key in _js_keys(value))
            + "}"
        )
    raise TypeError(f"not a JSON value: {type(value).__name__}")
