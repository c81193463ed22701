"""Who may write, as the sender sees it: what POST /segment answers for each kind of wrong
or unusual credential, and what /healthz tells the operator each configuration needs.

Written for the gaps that mutation testing (``make mutation``, docs/mutation.md) found in
webhook/signature.py. Signatures are computed here with Python's hmac (or by Node.js for
``JSON.stringify``), never by webhook.signature.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from tests.conftest import health, store_of

SECRET = "mutation-secret"
TOKEN = "mutation-token"


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha1).hexdigest()


def compact(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def track(message_id: str, product_id: str = "p-1") -> dict:
    return {
        "type": "track",
        "event": "Product Viewed",
        "messageId": message_id,
        "userId": "user-1",
        "timestamp": "2024-05-01T10:00:00.000Z",
        "properties": {"product_id": product_id},
    }


def post(client, body: bytes, **headers: str):
    return client.post(
        "/segment", data=body, headers={"Content-Type": "application/json", **headers}
    )


def refused(response) -> str:
    """The 401's error message; asserts the shape of the refusal."""
    assert response.status_code == 401, response.get_data(as_text=True)
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="segment"'
    return response.get_json()["error"]["message"]


def stored(response, interactions: int = 1) -> None:
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["interactions"] == interactions


# --- X-Signature ------------------------------------------------------------------------


def test_each_signature_refusal_says_what_is_wrong(make_app):
    app = make_app(segment_shared_secrets=(SECRET,))
    client = app.test_client()
    body = compact(track("m-1"))
    assert refused(post(client, body)) == "missing X-Signature header"
    assert refused(post(client, body, **{"X-Signature": ""})) == "missing X-Signature header"
    assert refused(post(client, body, **{"X-Signature": sign(body, "other")})) == (
        "X-Signature does not match"
    )
    assert store_of(app).counts()["interactions"] == 0


def test_a_signature_header_with_non_ascii_characters_is_a_401_not_a_crash(make_app):
    app = make_app(segment_shared_secrets=(SECRET,))
    body = compact(track("m-1"))
    response = post(app.test_client(), body, **{"X-Signature": "é" + sign(body)[1:]})
    assert refused(response) == "X-Signature does not match"


def test_a_signature_in_upper_case_or_padded_with_spaces_is_accepted(make_app):
    app = make_app(segment_shared_secrets=(SECRET,))
    client = app.test_client()
    first, second = compact(track("m-1", "p-1")), compact(track("m-2", "p-2"))
    stored(post(client, first, **{"X-Signature": sign(first).upper()}))
    stored(post(client, second, **{"X-Signature": f"  {sign(second)} "}))


def test_a_secret_with_non_ascii_characters_signs_its_utf8_bytes(make_app):
    secret = "sécret-ü"
    app = make_app(segment_shared_secrets=(secret,))
    body = compact(track("m-1"))
    stored(post(app.test_client(), body, **{"X-Signature": sign(body, secret)}))


# --- Authorization: Bearer --------------------------------------------------------------


def test_each_bearer_refusal_says_what_is_wrong(make_app):
    app = make_app(webhook_bearer_tokens=(TOKEN,))
    client = app.test_client()
    body = compact(track("m-1"))
    assert refused(post(client, body)) == "missing Authorization header"
    assert refused(post(client, body, Authorization=f"Basic {TOKEN}")) == (
        "Authorization must be 'Bearer <token>'"
    )
    assert refused(post(client, body, Authorization="Bearer   ")) == (
        "Authorization must be 'Bearer <token>'"
    )
    assert refused(post(client, body, Authorization="Bearer not-the-token")) == (
        "bearer token does not match"
    )
    assert store_of(app).counts()["interactions"] == 0


@pytest.mark.parametrize(
    "authorization",
    [
        f"Bearer {TOKEN}",
        f"bearer {TOKEN}",
        f"BEARER {TOKEN}",
        f"Bearer  {TOKEN} ",
        f" Bearer {TOKEN}",
    ],
)
def test_the_bearer_scheme_is_case_insensitive_and_spaces_around_the_token_do_not_matter(
    make_app, authorization
):
    app = make_app(webhook_bearer_tokens=(TOKEN,))
    stored(post(app.test_client(), compact(track("m-1")), Authorization=authorization))


def test_a_token_with_non_ascii_characters_is_compared_as_utf8(make_app):
    token = "jeton-é-ü"
    app = make_app(webhook_bearer_tokens=(token,))
    client = app.test_client()
    # Headers travel as Latin-1: the sender's UTF-8 bytes arrive as these characters.
    latin1 = token.encode("utf-8").decode("latin-1")
    body = compact(track("m-1"))
    assert refused(post(client, body, Authorization=f"Bearer {latin1}x")) == (
        "bearer token does not match"
    )


def test_either_of_two_bearer_tokens_is_accepted(make_app):
    app = make_app(webhook_bearer_tokens=("old-token", TOKEN))
    client = app.test_client()
    stored(post(client, compact(track("m-1", "p-1")), Authorization="Bearer old-token"))
    stored(post(client, compact(track("m-2", "p-2")), Authorization=f"Bearer {TOKEN}"))


def test_with_both_credentials_a_good_signature_does_not_stand_in_for_the_token(make_app):
    app = make_app(segment_shared_secrets=(SECRET,), webhook_bearer_tokens=(TOKEN,))
    client = app.test_client()
    body = compact(track("m-1"))
    assert refused(post(client, body, **{"X-Signature": sign(body)})) == (
        "missing Authorization header"
    )
    assert refused(post(client, body, Authorization=f"Bearer {TOKEN}")) == (
        "missing X-Signature header"
    )
    stored(post(client, body, Authorization=f"Bearer {TOKEN}", **{"X-Signature": sign(body)}))


# --- Webhooks (Actions) arrays under a shared secret ------------------------------------


def test_an_array_of_several_under_a_secret_alone_is_refused_naming_the_fix(make_app):
    app = make_app(segment_shared_secrets=(SECRET,))
    messages = [track("m-1", "p-1"), track("m-2", "p-2")]
    message = refused(
        post(app.test_client(), compact(messages), **{"X-Signature": sign(compact(messages[0]))})
    )
    assert message == (
        "an array of 2 messages needs a whole-body credential: Segment's X-Signature covers "
        "only the first message of a Webhooks (Actions) batch. Add the header "
        "'Authorization: Bearer <token>' to the destination's mapping and set "
        "WEBHOOK_BEARER_TOKEN to the same token (or turn batching off)"
    )
    assert store_of(app).counts()["interactions"] == 0


def test_an_array_of_one_is_signed_over_its_message_not_the_array(make_app):
    app = make_app(segment_shared_secrets=(SECRET,))
    client = app.test_client()
    message = track("m-1")
    array = compact([message])
    assert refused(post(client, array, **{"X-Signature": sign(array)})) == (
        "X-Signature does not match"
    )
    assert refused(post(client, array)) == "missing X-Signature header"
    # Whitespace before the bracket is still an array.
    stored(post(client, b"  \n" + array, **{"X-Signature": sign(compact(message))}))


def test_an_array_under_a_secret_whose_first_message_is_not_an_object_is_answered_400(make_app):
    """Not something Segment sends: the parser, not the signature check, answers (400)."""
    app = make_app(segment_shared_secrets=(SECRET,))
    client = app.test_client()
    # Signed as Segment would sign them (the first element): then the parser refuses them.
    for body, first in ((b"[]", b""), (b'["text"]', b'"text"'), (b"[1]", b"1")):
        response = post(client, body, **{"X-Signature": sign(first)})
        assert response.status_code == 400, (body, response.get_data(as_text=True))
    response = post(client, b"[1, 2", **{"X-Signature": "0" * 40})
    assert response.status_code == 400
    assert response.get_json()["error"]["message"].startswith("the body is not valid JSON")


def test_an_array_of_several_with_the_token_needs_the_first_messages_signature(make_app):
    app = make_app(segment_shared_secrets=(SECRET,), webhook_bearer_tokens=(TOKEN,))
    client = app.test_client()
    messages = [track("m-1", "p-1"), track("m-2", "p-2")]
    body = compact(messages)
    bearer = f"Bearer {TOKEN}"
    assert refused(
        post(client, body, Authorization=bearer, **{"X-Signature": sign(compact(messages[1]))})
    ) == ("X-Signature does not match")
    stored(
        post(client, body, Authorization=bearer, **{"X-Signature": sign(compact(messages[0]))}),
        2,
    )


# --- what /healthz tells the operator ---------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "deliveries"),
    [
        (
            {},
            {
                "single": "accepted unsigned",
                "array": "accepted unsigned",
                "batch": "accepted unsigned",
            },
        ),
        (
            {"segment_shared_secrets": (SECRET,)},
            {
                "single": "X-Signature of the body",
                "array": "one message: X-Signature of it; several: refused (401), "
                "they need WEBHOOK_BEARER_TOKEN",
                "batch": "X-Signature of the body",
            },
        ),
        (
            {"webhook_bearer_tokens": (TOKEN,)},
            {
                "single": "Authorization: Bearer",
                "array": "Authorization: Bearer",
                "batch": "Authorization: Bearer",
            },
        ),
        (
            {"segment_shared_secrets": (SECRET,), "webhook_bearer_tokens": (TOKEN,)},
            {
                "single": "Authorization: Bearer and X-Signature of the body",
                "array": "Authorization: Bearer and X-Signature of the first message",
                "batch": "Authorization: Bearer and X-Signature of the body",
            },
        ),
    ],
)
def test_healthz_tells_the_operator_what_each_delivery_shape_needs(make_app, settings, deliveries):
    assert health(make_app(**settings))["deliveries"] == deliveries


# --- JSON.stringify of the first message: the bytes Segment signs --------------------------


def test_an_actions_message_is_verified_as_javascript_serializes_it(make_app):
    """Integer-like keys first, in ascending order ("0" included, "01" not); lone
    surrogates escaped (lower-case \\u, well-formed JSON.stringify), every other character
    as it is, up to and including U+DFFF / from U+E000."""
    app = make_app(segment_shared_secrets=(SECRET,))
    client = app.test_client()
    # As the sender's JSON encoder wrote it: keys in this order, surrogates escaped.
    raw = (
        '[{"type":"track","event":"Product Viewed","messageId":"m-1","userId":"user-1",'
        '"timestamp":"2024-05-01T10:00:00.000Z","properties":{"product_id":"p-1",'
        '"b":1,"10":2,"01":3,"0":4,"2":5,"low":"\\udfff","high":"\\ud800","private":"\ue000"}}]'
    ).encode("utf-8")
    # What JSON.stringify(body[0]) gives for it.
    javascript = (
        '{"type":"track","event":"Product Viewed","messageId":"m-1","userId":"user-1",'
        '"timestamp":"2024-05-01T10:00:00.000Z","properties":{"0":4,"2":5,"10":2,'
        '"product_id":"p-1","b":1,"01":3,"low":"\\udfff","high":"\\ud800","private":"\ue000"}}'
    ).encode("utf-8")
    stored(post(client, raw, **{"X-Signature": sign(javascript)}))
