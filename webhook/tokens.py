"""Signed, time-limited tokens for browser access to GET /recommendations.

A shop's backend mints a token for the visitor it knows (``flask --app webhook token``, or
``mint_token`` from Python, or any itsdangerous implementation with the same key and salt);
the page sends it back as ``Authorization: Bearer <token>`` (never in the address: it
would end up in logs and browser history). A token is bound to one userId or anonymousId.
"""

from __future__ import annotations

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

SALT = "segment-personalize.recommendations.v1"


class TokenError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _serializer(secret_key: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(secret_key, salt=SALT)


def mint_token(
    secret_key: str, *, user_id: str | None = None, anonymous_id: str | None = None
) -> str:
    if bool(user_id) == bool(anonymous_id):
        raise ValueError("a token is for a userId or for an anonymousId")
    subject = {"u": user_id} if user_id else {"a": anonymous_id}
    return _serializer(secret_key).dumps(subject)


def check_token(
    secret_key: str,
    token: str | None,
    max_age: int,
    *,
    user_id: str | None,
    anonymous_id: str | None,
) -> None:
    """Raise ``TokenError`` (401 missing/invalid/expired, 403 someone else's)."""
    if not token:
        raise TokenError(
            401, "token_required", "a token is required: Authorization: Bearer <token>"
        )
    try:
        subject = _serializer(secret_key).loads(token, max_age=max_age)
    except SignatureExpired:
        raise TokenError(401, "token_expired", "the token has expired") from None
    except BadSignature:
        raise TokenError(401, "token_invalid", "the token is not valid") from None
    if not isinstance(subject, dict):
        raise TokenError(401, "token_invalid", "the token is not valid")
    if user_id is not None and subject.get("u") == user_id:
        return
    if user_id is None and anonymous_id is not None and subject.get("a") == anonymous_id:
        return
    if user_id is None and anonymous_id is None and (subject.get("u") or subject.get("a")):
        return  # related items only: any valid visitor token will do
    raise TokenError(403, "token_forbidden", "the token belongs to another visitor")
