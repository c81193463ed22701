"""Bearer tokens at the HTTP edge: the one reader of ``Authorization: Bearer`` for the
browser's visitor tokens and the operator's tokens (``METRICS_TOKEN``,
``INSIGHTS_TOKEN``). Tokens come from that header only, never from the address: an
address ends up in logs, proxies and browser history."""

from __future__ import annotations

import hmac

from flask import request

from .errors import error_response


def bearer() -> str | None:
    """The token of this request's ``Authorization: Bearer <token>``, if any."""
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def matches(given: str | None, expected: str) -> bool:
    """``given`` is ``expected``, compared in constant time."""
    return (
        given is not None
        and given != ""
        and hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))
    )


def operator_refusal(expected: str, setting: str, realm: str):
    """None when the request carries ``expected`` as its bearer token (or no token is
    configured); else the 401 answer, naming the setting it needs."""
    if not expected:
        return None
    given = bearer()
    if matches(given, expected):
        return None
    response = error_response(
        401,
        "token_required" if not given else "token_invalid",
        f"this needs {setting} as a bearer token (Authorization: Bearer <token>)",
    )
    response.headers["WWW-Authenticate"] = f'Bearer realm="{realm}"'
    return response
