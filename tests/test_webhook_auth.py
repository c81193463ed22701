"""Who may write: X-Signature (shared secret, rotation), Authorization: Bearer, both.

Signatures are computed here, by Python's hmac written in this file or by Node.js
(tests/segment_wire.py) — never by webhook.signature. Every refusal is a 401 with a JSON
error and leaves the store exactly as it was.
"""

from __future__ import annotations

import json

import pytest

from tests import deliveries
from tests.conftest import AppliedClient, health, store_of
from tests.deliveries import sign
from tests.operator import TIMELESS_ENV
from tests.segment_wire import (
    actions_headers,
    classic_headers,
    node_sign,
    node_stringify,
)

needs_node = pytest.mark.requires("node")  # computes the signatures

SECRET = "s3cr3t-ünïcode"
OLD_SECRET, NEW_SECRET = "rotating-out", "rotating-in"
TOKEN = "bearer-token-1"


def compact(value) -> bytes:
    """JSON.stringify for plain ASCII-only test data (no floats): compact separators."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def track(message_id: str, product_id: str = "p-1", **extra) -> dict:
    """user-1's view at a fixed time; ``extra``: top-level fields, as they are."""
    message = deliveries.track(
        product_id=product_id,
        message_id=message_id,
        user_id="user-1",
        timestamp="2024-05-01T10:00:00.000Z",
        properties={"name": "Stuhl"},
    )
    message.update(extra)
    return message


def assert_refused(app, client, body, headers, *, contains: str | None = None):
    before = store_of(app).counts()
    response = client.post("/segment", data=body, headers=headers)
    assert response.status_code == 401, response.get_data(as_text=True)
    assert response.is_json
    error = response.get_json()["error"]
    assert error["message"]
    if contains:
        assert contains in error["message"].lower()
    assert store_of(app).counts() == before
    return response


def assert_stored(response, interactions: int):
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["accepted"] >= 1
    assert response.get_json()["interactions"] == interactions


# --- the shared secret, Classic (one message, the raw body is signed) --------------------


@pytest.fixture
def signed_app(make_app):
    return make_app(segment_shared_secrets=(SECRET,))


@pytest.fixture
def both_app(make_app):
    return make_app(segment_shared_secrets=(SECRET,), webhook_bearer_tokens=(TOKEN,))


def test_classic_signature_over_the_raw_body_is_accepted(signed_app):
    client = signed_app.test_client()
    # Not compact, keys in any order: the raw bytes are what is signed.
    body = json.dumps(track("c-1"), indent=2).encode()
    assert_stored(
        client.post("/segment", data=body, headers=classic_headers(sign(body, SECRET))), 1
    )
    assert store_of(signed_app).counts()["interactions"] == 1


def test_classic_wrong_secret_is_refused(signed_app):
    body = compact(track("c-1"))
    assert_refused(
        signed_app, signed_app.test_client(), body, classic_headers(sign(body, "not-the-secret"))
    )


def test_classic_missing_signature_is_refused(signed_app):
    body = compact(track("c-1"))
    response = assert_refused(signed_app, signed_app.test_client(), body, classic_headers())
    assert "signature" in response.get_json()["error"]["message"].lower()


@pytest.mark.parametrize("signature", ["", "not-hex", "0" * 40, "zz" * 20, "é" * 40])
def test_classic_garbage_signature_is_refused(signed_app, signature):
    body = compact(track("c-1"))
    assert_refused(signed_app, signed_app.test_client(), body, classic_headers(signature))


def test_classic_tampered_body_is_refused(signed_app):
    original = compact(track("c-1", product_id="p-1"))
    signature = sign(original, SECRET)
    tampered = original.replace(b'"p-1"', b'"p-2"')
    assert tampered != original
    assert_refused(signed_app, signed_app.test_client(), tampered, classic_headers(signature))
    # Appending whitespace changes the bytes too: still refused.
    assert_refused(
        signed_app, signed_app.test_client(), original + b" ", classic_headers(signature)
    )


def test_signature_of_another_message_is_refused(signed_app):
    client = signed_app.test_client()
    first = compact(track("c-1"))
    assert_stored(
        client.post("/segment", data=first, headers=classic_headers(sign(first, SECRET))), 1
    )
    second = compact(track("c-2"))
    assert_refused(signed_app, client, second, classic_headers(sign(first, SECRET)))


@pytest.mark.parametrize("shape", ["classic", "actions"])
def test_rotation_either_secret_works(make_app, shape):
    app = make_app(segment_shared_secrets=(OLD_SECRET, NEW_SECRET))
    client = app.test_client()
    for number, secret in enumerate((OLD_SECRET, NEW_SECRET)):
        message = track(f"rot-{shape}-{number}")
        if shape == "classic":
            body, signed = compact(message), compact(message)
        else:
            body, signed = compact([message]), compact(message)
        assert_stored(
            client.post("/segment", data=body, headers=classic_headers(sign(signed, secret))), 1
        )
    message = track(f"rot-{shape}-other")
    body, signed = (
        (compact(message),) * 2 if shape == "classic" else (compact([message]), compact(message))
    )
    assert_refused(app, client, body, classic_headers(sign(signed, "a-third-secret")))
    assert store_of(app).counts()["interactions"] == 2


def test_rotation_from_the_environment_comma_separated(monkeypatch, sqlite_url):
    from webhook import create_app  # the environment path: SEGMENT_SHARED_SECRET=a,b

    monkeypatch.setenv("SEGMENT_SHARED_SECRET", f" {OLD_SECRET} , {NEW_SECRET} ")
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    for name, value in TIMELESS_ENV.items():  # the story's fixed 2024 times
        monkeypatch.setenv(name, value)
    app = create_app()
    app.config["TESTING"] = True  # no background appliers: the client applies (conftest)
    app.test_client_class = AppliedClient
    try:
        client = app.test_client()
        for number, secret in enumerate((OLD_SECRET, NEW_SECRET)):
            body = compact(track(f"env-{number}"))
            assert_stored(
                client.post("/segment", data=body, headers=classic_headers(sign(body, secret))),
                1,
            )
        body = compact(track("env-x"))
        assert_refused(app, client, body, classic_headers(sign(body, f"{OLD_SECRET},{NEW_SECRET}")))
    finally:
        store_of(app).dispose()


# --- the shared secret, Actions (a bare array; JSON.stringify(first element) is signed) ---


@needs_node
def test_an_actions_batch_of_one_signed_by_node_is_accepted(signed_app):
    message = track("a-1", "p-1")
    body = node_stringify([message])
    signature = node_sign(node_stringify(message), SECRET)
    response = signed_app.test_client().post(
        "/segment", data=body, headers=actions_headers(signature)
    )
    assert_stored(response, 1)


@needs_node
def test_an_actions_batch_of_several_is_accepted_with_the_bearer_token(both_app):
    messages = [track("a-1", "p-1"), track("a-2", "p-2"), track("a-3", "p-3")]
    body = node_stringify(messages)
    signature = node_sign(node_stringify(messages[0]), SECRET)
    response = both_app.test_client().post(
        "/segment", data=body, headers=actions_headers(signature, bearer=TOKEN)
    )
    assert_stored(response, 3)


@needs_node
def test_an_actions_batch_of_several_under_the_shared_secret_alone_is_refused(signed_app):
    """Segment signs only the first event of an Actions batch: a body of several is not
    authenticated as a whole by X-Signature, so it is refused and the answer says what to
    add."""
    messages = [track("a-1", "p-1"), track("a-2", "p-2")]
    body = node_stringify(messages)
    signature = node_sign(node_stringify(messages[0]), SECRET)
    response = assert_refused(
        signed_app,
        signed_app.test_client(),
        body,
        actions_headers(signature),
        contains="webhook_bearer_token",
    )
    assert "authorization: bearer" in response.get_json()["error"]["message"].lower()


def test_one_captured_signature_does_not_authorize_a_forged_array(signed_app):
    """The attack: a signed single delivery, captured, sent again as the first element of
    an array that also orders for a victim and deletes alice, with the same signature."""
    client = signed_app.test_client()
    alice = compact(track("alice-1", "p-alice", userId="alice"))
    assert_stored(
        client.post("/segment", data=alice, headers=classic_headers(sign(alice, SECRET))), 1
    )
    captured = track("c-1", "p-1")
    captured_body = compact(captured)
    signature = sign(captured_body, SECRET)
    assert_stored(
        client.post("/segment", data=captured_body, headers=classic_headers(signature)), 1
    )
    forged = [
        captured,
        {
            "type": "track",
            "event": "Order Completed",
            "messageId": "forged-order",
            "userId": "victim",
            "timestamp": "2024-05-01T10:00:00.000Z",
            "properties": {"order_id": "o-1", "products": [{"product_id": "p-9"}]},
        },
        {"type": "delete", "userId": "alice", "messageId": "forged-delete"},
    ]
    assert_refused(
        signed_app, client, compact(forged), actions_headers(signature), contains="bearer"
    )
    store = store_of(signed_app)
    assert store.counts()["interactions"] == 2  # alice's view and the captured one
    with store.read() as conn:
        users = {row[0] for row in conn.exec_driver_sql("SELECT user_id FROM interactions")}
    assert users == {"alice", "user-1"}


@needs_node
def test_actions_batch_signed_over_the_whole_array_is_refused(signed_app):
    messages = [track("a-1"), track("a-2")]
    body = node_stringify(messages)
    assert_refused(
        signed_app, signed_app.test_client(), body, actions_headers(node_sign(body, SECRET))
    )


@needs_node
def test_actions_batch_with_altered_first_element_is_refused(signed_app):
    messages = [track("a-1", "p-1"), track("a-2", "p-2")]
    signature = node_sign(node_stringify(messages[0]), SECRET)
    altered = [track("a-1", "p-evil"), messages[1]]
    assert_refused(
        signed_app, signed_app.test_client(), node_stringify(altered), actions_headers(signature)
    )


@needs_node
def test_actions_altered_second_element_needs_the_bearer_token_too(make_app):
    app = make_app(segment_shared_secrets=(SECRET,), webhook_bearer_tokens=(TOKEN,))
    client = app.test_client()
    messages = [track("a-1", "p-1"), track("a-2", "p-forged")]
    body = node_stringify(messages)
    signature = node_sign(node_stringify(messages[0]), SECRET)
    assert_refused(app, client, body, actions_headers(signature))
    assert_refused(app, client, body, actions_headers(signature, bearer="guessed-token"))
    assert_refused(app, client, body, actions_headers(signature, bearer=TOKEN + "x"))
    assert_stored(
        client.post("/segment", data=body, headers=actions_headers(signature, bearer=TOKEN)), 2
    )


# --- the bearer token alone --------------------------------------------------------------


@pytest.fixture
def bearer_app(make_app):
    return make_app(webhook_bearer_tokens=(TOKEN, "second-token"))


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Basic {TOKEN}",
        f"Token {TOKEN}",
        "Bearer wrong",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}extra",
        f"{TOKEN}",
    ],
)
def test_bearer_only_missing_or_wrong_is_refused(bearer_app, authorization):
    headers = classic_headers()
    if authorization is not None:
        headers["Authorization"] = authorization
    assert_refused(bearer_app, bearer_app.test_client(), compact(track("b-1")), headers)


@pytest.mark.parametrize("token", [TOKEN, "second-token"])
def test_bearer_only_either_token_is_accepted_without_signature(bearer_app, token):
    client = bearer_app.test_client()
    assert_stored(
        client.post("/segment", data=compact(track("b-1")), headers=actions_headers(bearer=token)),
        1,
    )
    assert_stored(
        client.post(
            "/segment",
            data=compact([track("b-2"), track("b-3")]),
            headers=actions_headers(bearer=token),
        ),
        2,
    )


def test_bearer_scheme_is_case_insensitive(bearer_app):
    headers = classic_headers()
    headers["Authorization"] = f"bearer {TOKEN}"
    assert_stored(
        bearer_app.test_client().post("/segment", data=compact(track("b-1")), headers=headers), 1
    )


# --- both configured: both required ------------------------------------------------------


def test_both_configured_each_alone_is_refused(both_app):
    client = both_app.test_client()
    body = compact(track("both-1"))
    good_signature = sign(body, SECRET)
    assert_refused(both_app, client, body, actions_headers(good_signature))
    assert_refused(both_app, client, body, actions_headers(bearer=TOKEN))
    assert_refused(both_app, client, body, actions_headers(good_signature, bearer="nope"))
    assert_refused(both_app, client, body, actions_headers(sign(body, "nope"), bearer=TOKEN))
    assert_refused(both_app, client, body, actions_headers())
    assert_stored(
        client.post("/segment", data=body, headers=actions_headers(good_signature, bearer=TOKEN)), 1
    )


# --- tricky first elements: the body as Node writes it, signed by Node --------------------

TRICKY_PROPERTIES = {
    "product_id": "p-tricky",
    "name": "Lampe 💡 — Zürich «Möbel»",
    "floats": [
        1.0,
        100.0,
        1e21,
        1e20,
        1.5e-7,
        1e-6,
        0.1,
        0.30000000000000004,
        -0.0,
        5e-324,
        1.7976931348623157e308,
        123.456,
    ],
    "ints": [0, -1, 2**53, 2**53 + 1, 10**21, 12345678901234567890],
    # JavaScript lists integer-like keys first, ascending; these are not all such keys.
    "2": "two",
    "10": "ten",
    "b": "bee",
    "1": "one",
    "01": "not an index",
    "-1": "nor this",
    "4294967295": "nor this (2**32-1)",
    "4294967294": "an index",
    "٢": "Arabic-Indic 2",
    "²": "superscript 2",
    "1.5": "not an index",
    "escapes": 'quote" backslash\\ slash/ \b\f\n\r\t \x00\x01\x1f \x7f \u2028\u2029',
    "emoji": "😀👩‍👩‍👧 🇨🇭",
    "nested": {"z": None, "a": [True, False, [], {}], "9": {"8": "x", "a": "y"}},
}


def _tricky(message_id):
    message = track(message_id)
    message["properties"] = dict(TRICKY_PROPERTIES)
    message["context"] = {"traits": {"name": "José Müller", "city": "Zürich"}}
    return message


@needs_node
@pytest.mark.parametrize("body_from", ["node", "python"])
def test_tricky_first_element_signed_by_node_is_accepted(signed_app, body_from):
    first = _tricky("tricky-1")
    signature = node_sign(node_stringify(first), SECRET)
    if body_from == "node":
        body = node_stringify([first])  # what Segment sends
    else:
        # Same JSON, written differently (spaces, 1.0, \u escapes): the signature is
        # over JSON.stringify of the parsed first element, not over these bytes.
        body = json.dumps([first], ensure_ascii=True, indent=1).encode("ascii")
    response = signed_app.test_client().post(
        "/segment", data=body, headers=actions_headers(signature)
    )
    assert_stored(response, 1)


@needs_node
def test_tricky_first_element_tampered_number_is_refused(signed_app):
    first = _tricky("tricky-1")
    signature = node_sign(node_stringify(first), SECRET)
    tampered = _tricky("tricky-1")
    tampered["properties"]["floats"] = [1.0000000000000002] + TRICKY_PROPERTIES["floats"][1:]
    assert_refused(
        signed_app, signed_app.test_client(), node_stringify([tampered]), actions_headers(signature)
    )


@needs_node
def test_tricky_classic_message_signed_by_node_is_accepted(signed_app):
    body = node_stringify(_tricky("tricky-c"))
    response = signed_app.test_client().post(
        "/segment", data=body, headers=classic_headers(node_sign(body, SECRET))
    )
    assert_stored(response, 1)


def test_a_401_never_reads_like_success(both_app):
    response = both_app.test_client().post(
        "/segment", data=compact(track("x")), headers=classic_headers()
    )
    assert response.status_code == 401
    assert response.content_type.startswith("application/json")
    assert "accepted" not in response.get_json()


@pytest.mark.parametrize("number", [b"1" + b"0" * 400, b"-1" + b"0" * 400, b"1e400"])
def test_huge_number_in_first_element_with_a_bad_signature_is_a_clean_refusal(signed_app, number):
    """JSON.parse makes these Infinity (JSON.stringify: null). A forged batch must get a
    clean 4xx (401, or 400 where the number itself is refused), never a 500."""
    body = (
        b'[{"type":"track","event":"Product Viewed","messageId":"huge-1","userId":"u",'
        b'"timestamp":"2024-05-01T10:00:00Z","properties":{"product_id":"p","n":' + number + b"}}]"
    )
    client = signed_app.test_client()
    before = store_of(signed_app).counts()
    response = client.post("/segment", data=body, headers=actions_headers("0" * 40))
    assert response.status_code in (400, 401), response.get_data(as_text=True)
    assert response.is_json and response.get_json()["error"]["message"]
    assert store_of(signed_app).counts() == before


@needs_node
def test_huge_number_in_first_element_signed_as_node_sees_it_is_accepted(signed_app):
    first = (
        b'{"type":"track","event":"Product Viewed","messageId":"huge-2","userId":"u",'
        b'"timestamp":"2024-05-01T10:00:00Z","properties":{"product_id":"p","n":1'
        + b"0" * 400
        + b"}}"
    )
    # What Node signs: JSON.stringify(JSON.parse(first)), where the number became null.
    signature = node_sign(node_stringify(json.loads(first)), SECRET)
    assert b"null" in node_stringify(json.loads(first))
    response = signed_app.test_client().post(
        "/segment", data=b"[" + first + b"]", headers=actions_headers(signature)
    )
    # Python keeps the integer exactly (it is not JSON's business to round it): the
    # message is valid, and stored.
    assert_stored(response, 1)


@pytest.mark.parametrize(
    "settings, array",
    [
        ({}, "accepted unsigned"),
        ({"segment_shared_secrets": (SECRET,)}, "several: refused"),
        ({"webhook_bearer_tokens": (TOKEN,)}, "Authorization: Bearer"),
        (
            {"segment_shared_secrets": (SECRET,), "webhook_bearer_tokens": (TOKEN,)},
            "Authorization: Bearer and X-Signature of the first message",
        ),
    ],
)
def test_healthz_says_which_shapes_the_configuration_accepts(make_app, settings, array):
    app = make_app(**settings)
    shapes = health(app)["deliveries"]
    assert set(shapes) == {"single", "array", "batch"}
    assert array in shapes["array"]
