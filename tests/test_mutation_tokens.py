"""Tokens for GET /recommendations as a shop and a visitor see them: which token opens
which request, and what each refusal says.

Written for the gaps that mutation testing (``make mutation``, docs/mutation.md) found in
webhook/tokens.py. Tokens are made with ``mint_token`` (the documented Python way) or with
itsdangerous directly, in the format the service documents (a URL-safe timed serializer
with its key and salt), for the ones ``mint_token`` cannot make.
"""

from __future__ import annotations

import time

import pytest
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from tests.deliveries import deliver, product_viewed
from webhook.tokens import mint_token

SECRET = "mutation-secret-key-0123456789abcdef"
DOCUMENTED_SALT = "segment-personalize.recommendations.v1"


def token(subject, *, seconds_ago: int = 0, secret: str = SECRET, salt=DOCUMENTED_SALT) -> str:
    class Signer(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - seconds_ago

    return URLSafeTimedSerializer(secret, salt=salt, signer=Signer).dumps(subject)


@pytest.fixture
def client(make_app):
    app = make_app(secret_key=SECRET, token_max_age_seconds=600)
    client = app.test_client()
    deliver(client, product_viewed("sku-1"), product_viewed("sku-2"))
    return client


def get(client, query: str, bearer: str | None):
    headers = {"Authorization": f"Bearer {bearer}"} if bearer is not None else {}
    return client.get(f"/recommendations?{query}", headers=headers)


def refusal(response, status: int) -> tuple[str, str]:
    assert response.status_code == status, response.get_data(as_text=True)
    if status == 401:
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="recommendations"'
    else:
        assert "WWW-Authenticate" not in response.headers
    error = response.get_json()["error"]
    return error["code"], error["message"]


def test_each_refusal_says_what_is_wrong(client):
    assert refusal(get(client, "userId=u-1", None), 401) == (
        "token_required",
        "a token is required: Authorization: Bearer <token>",
    )
    invalid = ("token_invalid", "the token is not valid")
    assert refusal(get(client, "userId=u-1", "not-a-token"), 401) == invalid
    assert refusal(get(client, "userId=u-1", token({"u": "u-1"}, secret="x" * 32)), 401) == (
        invalid
    )
    assert refusal(get(client, "userId=u-1", token({"u": "u-1"}, salt="another")), 401) == (invalid)
    # Signed with the right key, but not a subject the service issues.
    assert refusal(get(client, "userId=u-1", token("u-1")), 401) == invalid
    assert refusal(get(client, "userId=u-1", token(["u-1"])), 401) == invalid
    assert refusal(get(client, "userId=u-1", token({"u": "u-1"}, seconds_ago=700)), 401) == (
        "token_expired",
        "the token has expired",
    )
    assert refusal(get(client, "userId=u-2", token({"u": "u-1"})), 403) == (
        "token_forbidden",
        "the token belongs to another visitor",
    )


@pytest.mark.parametrize(
    ("subject", "query", "status"),
    [
        ({"u": "u-1"}, "userId=u-1", 200),
        ({"u": "u-1"}, "userId=u-2", 403),
        ({"u": "u-1"}, "anonymousId=u-1", 403),  # a userId token is not an anonymousId's
        ({"a": "a-1"}, "anonymousId=a-1", 200),
        ({"a": "a-1"}, "anonymousId=a-2", 403),
        ({"a": "a-1"}, "userId=a-1", 403),  # nor the other way round
        ({"a": "a-1"}, "userId=u-1&anonymousId=a-1", 403),
        # Items related to an item: any visitor's valid token will do...
        ({"u": "u-1"}, "itemId=sku-1", 200),
        ({"a": "a-1"}, "itemId=sku-1", 200),
        # ...but not a validly signed token that names nobody.
        ({}, "itemId=sku-1", 403),
        ({"u": "", "a": ""}, "itemId=sku-1", 403),
        ({}, "userId=u-1", 403),
        ({}, "anonymousId=a-1", 403),
    ],
)
def test_a_token_opens_only_its_own_visitors_recommendations(client, subject, query, status):
    assert get(client, query, token(subject)).status_code == status


def test_mint_token_makes_a_token_for_exactly_one_visitor(client):
    user = mint_token(SECRET, user_id="u-1")
    assert get(client, "userId=u-1", user).status_code == 200
    assert get(client, "anonymousId=u-1", user).status_code == 403
    anonymous = mint_token(SECRET, anonymous_id="a-1")
    assert get(client, "anonymousId=a-1", anonymous).status_code == 200
    assert get(client, "userId=a-1", anonymous).status_code == 403
    # A token minted with another key opens nothing.
    assert get(client, "userId=u-1", mint_token("y" * 32, user_id="u-1")).status_code == 401


@pytest.mark.parametrize(
    "ids", [{}, {"user_id": "u-1", "anonymous_id": "a-1"}, {"user_id": "", "anonymous_id": ""}]
)
def test_mint_token_refuses_anything_but_one_id(ids):
    with pytest.raises(ValueError, match="^a token is for a userId or for an anonymousId$"):
        mint_token(SECRET, **ids)


def test_a_token_is_good_until_its_max_age(client):
    assert get(client, "userId=u-1", token({"u": "u-1"}, seconds_ago=590)).status_code == 200
    assert get(client, "userId=u-1", token({"u": "u-1"}, seconds_ago=610)).status_code == 401
