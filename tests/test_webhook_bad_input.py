"""Bad input: every delivery that is not something Segment sends gets a clean 4xx with a
JSON error and leaves the store exactly as it was; never a 500 or an HTML page.

Also: what a valid message may look like (timestamp forms, fallbacks, version, unknown
fields) and how a batch mixing valid and invalid messages is answered.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import pytest
import requests
import sqlalchemy as sa

from tests import deliveries
from tests.conftest import store_of
from webhook.storage import inbox_url_for

INSTANT = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC).timestamp()


def track(message_id="m-1", product_id="p-1", **extra) -> dict:
    """user-1's view at a fixed time; ``extra``: top-level fields, as they are (wrong ones
    included)."""
    message = deliveries.track(
        product_id=product_id,
        message_id=message_id,
        user_id="user-1",
        timestamp="2024-05-01T10:00:00.000Z",
        properties={"name": "Stuhl", "price": 10},
    )
    message.update(extra)
    return message


def dumps(value) -> bytes:
    return json.dumps(value).encode("utf-8")


def seed(app):
    """One valid delivery already stored, so that 'unchanged' is not 'still empty'."""
    response = app.test_client().post(
        "/segment",
        data=dumps(
            [
                track("seed-1", "seed-item"),
                deliveries.message(
                    "identify",
                    message_id="seed-2",
                    user_id="seed-user",
                    anonymous_id="seed-anon",
                    timestamp="2024-01-01T00:00:00Z",
                    traits={"name": "Zoë"},
                ),
            ]
        ),
        content_type="application/json",
    )
    assert response.status_code == 200, response.get_json()
    counts = store_of(app).counts()
    assert all(counts.values()), counts
    return counts


def assert_clean_4xx(app, response, before, status=400):
    assert response.status_code == status, (
        response.status_code,
        response.get_data(as_text=True)[:500],
    )
    assert response.is_json, response.get_data(as_text=True)[:200]
    assert response.get_json()["error"]["message"]
    assert store_of(app).counts() == before


@pytest.fixture
def seeded(make_app):
    app = make_app()
    return app, app.test_client(), seed(app)


# --- bodies that are not Segment messages --------------------------------------------------

VALID = dumps(track())

BAD_BODIES = {
    "empty": b"",
    "whitespace": b" \r\n\t ",
    "truncated object": VALID[:-7],
    "truncated array": b"[" + VALID + b"," + VALID[:20],
    "not json": b"type=track&event=Product+Viewed",
    "html": b"<html><body>hello</body></html>",
    "two objects": VALID + VALID,
    "trailing garbage": VALID + b"x",
    "single quotes": VALID.replace(b'"', b"'"),
    "non-utf8 latin-1": json.dumps(track(userId="Zürich"), ensure_ascii=False).encode("latin-1"),
    "non-utf8 stray byte": VALID.replace(b'"user-1"', b'"user-\xff"'),
    "non-utf8 overlong": VALID.replace(b'"user-1"', b'"user-\xc0\xaf"'),
    "utf-16 with bom": json.dumps(track()).encode("utf-16"),
    "utf-16-le no bom": json.dumps(track()).encode("utf-16-le"),
    "utf-32": json.dumps(track()).encode("utf-32"),
    "NaN": VALID.replace(b'"price": 10', b'"price": NaN'),
    "Infinity": VALID.replace(b'"price": 10', b'"price": Infinity'),
    "-Infinity": VALID.replace(b'"price": 10', b'"price": -Infinity'),
    "empty array": b"[]",
    "empty array spaced": b" [ ] ",
    "empty batch": b'{"batch": []}',
    "json string": b'"track"',
    "json number": b"42",
    "json null": b"null",
    "json true": b"true",
    "array of non-objects": b'[1, "two", null, [], true]',
    "deep arrays unclosed": b"[" * 100_000,
    "deep arrays closed": b"[" * 100_000 + b"]" * 100_000,
    "deep objects": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "deep inside a message": VALID[:-1] + b', "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "integer with 5000 digits": VALID.replace(b'"price": 10', b'"price": ' + b"9" * 5000),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_body_is_a_clean_400(seeded, name):
    app, client, before = seeded
    response = client.post("/segment", data=BAD_BODIES[name], content_type="application/json")
    assert_clean_4xx(app, response, before)


def test_4001_messages_are_refused_whole(seeded):
    app, client, before = seeded
    messages = [track(f"many-{i}", f"p-{i}") for i in range(4001)]
    response = client.post("/segment", data=dumps(messages), content_type="application/json")
    assert_clean_4xx(app, response, before)


def test_4000_messages_are_accepted(make_app):
    app = make_app()
    messages = [track(f"many-{i}", f"p-{i % 50}") for i in range(4000)]
    response = app.test_client().post(
        "/segment", data=dumps(messages), content_type="application/json"
    )
    assert response.status_code == 200
    assert (response.get_json()["accepted"], response.get_json()["interactions"]) == (4000, 4000)
    assert store_of(app).counts()["interactions"] == 4000


# --- one message that breaks the Spec: rejected, so the delivery holds nothing valid -------


def _without(message, *keys):
    return {k: v for k, v in message.items() if k not in keys}


BAD_MESSAGES = {
    "type missing": _without(track(), "type"),
    "type number": track(type=1),
    "type null": track(type=None),
    "type unknown": track(type="purchase"),
    "type empty": track(type=""),
    "messageId missing": _without(track(), "messageId"),
    "messageId object": track(messageId={"id": "m-1"}),
    "messageId list": track(messageId=["m-1"]),
    "messageId float": track(messageId=1.5),
    "messageId bool": track(messageId=True),
    "messageId 257 chars": track(messageId="m" * 257),
    "userId bool": track(userId=True),
    "userId object": track(userId={"id": 1}),
    "userId 257 chars": track(userId="u" * 257),
    "no userId or anonymousId": _without(track(), "userId"),
    "userId and anonymousId empty": track(userId="", anonymousId=None),
    "anonymousId list": _without(track(anonymousId=["a"]), "userId"),
    "properties list": track(properties=[{"product_id": "p-1"}]),
    "properties string": track(properties="product_id=p-1"),
    "event missing": _without(track(), "event"),
    "event number": track(event=7),
    "event blank": track(event="   "),
    "timestamp unparseable": track(timestamp="yesterday at noon"),
    "timestamp epoch number": track(timestamp=1714557600),
    "timestamp date only": track(timestamp="2024-05-01"),
    "timestamp not a real date": track(timestamp="2024-02-30T10:00:00Z"),
    "timestamp hour 24": track(timestamp="2024-05-01T24:00:00Z"),
    "timestamp offset +25:00": track(timestamp="2024-05-01T10:00:00+25:00"),
    "timestamp out of range after offset": track(timestamp="9999-12-31T23:59:59-01:00"),
    "timestamp out of range before offset": track(timestamp="0001-01-01T00:00:00+01:00"),
    "no time at all": _without(track(), "timestamp"),
    "identify traits list": {
        "type": "identify",
        "messageId": "i-1",
        "userId": "u",
        "timestamp": "2024-05-01T10:00:00Z",
        "traits": ["a"],
    },
    "alias without previousId": {
        "type": "alias",
        "messageId": "al-1",
        "userId": "u",
        "timestamp": "2024-05-01T10:00:00Z",
    },
    "alias without userId": {
        "type": "alias",
        "messageId": "al-1",
        "previousId": "a",
        "anonymousId": "a",
        "timestamp": "2024-05-01T10:00:00Z",
    },
    "delete without any id": {
        "type": "delete",
        "messageId": "d-1",
        "timestamp": "2024-05-01T10:00:00Z",
    },
}


@pytest.mark.parametrize("shape", ["single", "array"])
@pytest.mark.parametrize("name", list(BAD_MESSAGES))
def test_invalid_message_is_a_clean_400(seeded, name, shape):
    app, client, before = seeded
    message = BAD_MESSAGES[name]
    body = dumps(message if shape == "single" else [message])
    response = client.post("/segment", data=body, content_type="application/json")
    assert_clean_4xx(app, response, before)


# --- too large ------------------------------------------------------------------------------

LIMIT = 2048


def _padded(size: int) -> bytes:
    """A valid single message of exactly ``size`` bytes (padding in a property)."""
    message = track("padded", properties={"product_id": "p-pad", "pad": ""})
    base = len(dumps(message))
    message["properties"]["pad"] = "x" * (size - base)
    body = dumps(message)
    assert len(body) == size
    return body


@pytest.fixture
def small_app(make_app):
    app = make_app(max_body_bytes=LIMIT)
    return app, app.test_client(), seed(app)


def test_body_at_the_limit_is_accepted(small_app):
    app, client, _ = small_app
    response = client.post("/segment", data=_padded(LIMIT), content_type="application/json")
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize(
    "body", [_padded(LIMIT + 1), b"[" + b"1," * 50_000 + b"1]", b"x" * 1_000_000]
)
def test_body_above_the_limit_is_a_413(small_app, body):
    app, client, before = small_app
    response = client.post("/segment", data=body, content_type="application/json")
    assert_clean_4xx(app, response, before, status=413)


def _chunked(client, body: bytes):
    # The test client sends no Content-Length for an input stream; a WSGI server that
    # de-chunks a request (gunicorn, werkzeug's dev server) says so with
    # wsgi.input_terminated. That is the environment a chunked upload arrives in.
    return client.post(
        "/segment",
        input_stream=io.BytesIO(body),
        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )


def test_chunked_body_under_the_limit_is_accepted(small_app):
    app, client, _ = small_app
    response = _chunked(client, _padded(LIMIT // 2))
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize(
    "body",
    [
        b"[" + b"1," * 50_000 + b"1]",
        # Valid JSON once cut at the limit: must not be stored either.
        _padded(LIMIT // 2) + b" " * (2 * LIMIT),
    ],
    ids=["invalid-when-cut", "valid-when-cut"],
)
def test_chunked_body_above_the_limit_is_a_413(small_app, body):
    app, client, before = small_app
    response = _chunked(client, body)
    assert_clean_4xx(app, response, before, status=413)


@pytest.mark.slow
def test_chunked_body_above_the_limit_under_gunicorn_is_a_413(tmp_path):
    from tests.gunicorn_server import gunicorn

    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/g.db",
        "MAX_BODY_BYTES": str(LIMIT),
        "_LOG_DIR": str(tmp_path),
    }
    body = _padded(LIMIT // 2) + b" " * (2 * LIMIT)
    with gunicorn(env, workers=1) as (base, _process):
        # A generator body: requests sends it with Transfer-Encoding: chunked.
        response = requests.post(
            base + "/segment",
            data=iter([body[:LIMIT], body[LIMIT:]]),
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
    assert response.status_code == 413, response.text
    engine = sa.create_engine(inbox_url_for(env["DATABASE_URL"]))
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM inbox")).scalar() == 0
    engine.dispose()


# --- a batch mixing valid and invalid messages ---------------------------------------------


def test_mixed_batch_keeps_the_valid_and_reports_the_rest(make_app, database_url):
    app = make_app(database_url=database_url)
    batch = [
        track("ok-1", "p-1"),
        _without(track("no-id"), "messageId"),
        {
            "type": "identify",
            "messageId": "ok-2",
            "userId": "user-1",
            "timestamp": "2024-05-01T10:00:00Z",
            "traits": {"city": "Zürich"},
        },
        42,
        track("bad-time", timestamp="not a time"),
        track("no-product", properties={"name": "no id here"}),
        track("ok-1", "p-1"),  # the same message twice in one delivery
        {
            "type": "page",
            "messageId": "ok-3",
            "anonymousId": "anon-9",
            "timestamp": "2024-05-01T10:00:00Z",
            "name": "Home",
        },
    ]
    response = app.test_client().post(
        "/segment", data=dumps(batch), content_type="application/json"
    )
    assert response.status_code == 200, response.get_json()
    summary = response.get_json()
    assert summary["received"] == 8
    assert [entry["index"] for entry in summary["rejected"]] == [1, 3, 4]
    assert summary["rejected"][2]["messageId"] == "bad-time"
    assert all(entry["reason"] for entry in summary["rejected"])
    assert [(s["index"], s["messageId"]) for s in summary["skipped"]] == [(5, "no-product")]
    assert summary["duplicates"] == 1
    assert summary["accepted"] == 3  # ok-1, ok-2, ok-3
    assert summary["interactions"] == 1
    with store_of(app).inbox_store.engine.connect() as conn:
        stored = {r[0] for r in conn.execute(sa.text("SELECT message_id FROM inbox"))}
    with store_of(app).engine.connect() as conn:
        events = conn.execute(sa.text("SELECT event_id, item_id FROM interactions")).all()
    assert stored == {"ok-1", "ok-2", "ok-3", "no-product"}
    assert [tuple(e) for e in events] == [("ok-1", "p-1")]


# --- bad values that reach the database: never a 500 -----------------------------------------


def _nested(depth: int) -> bytes:
    """A track whose properties hold `depth` nested arrays, written as text (encoding it
    with json.dumps would itself hit the recursion limit)."""
    head = dumps(track(f"deep-{depth}", properties={"product_id": "p-deep", "deep": 0}))
    return head.replace(b'"deep": 0', b'"deep": ' + b"[" * depth + b"]" * depth)


STORE_HOSTILE = {
    "NUL in userId": dumps(track("nul-1", userId="user\x00-1")),
    "NUL in messageId": dumps(track("nul\x00-2")),
    "NUL in item name": dumps(track("nul-3", properties={"product_id": "p", "name": "a\x00b"})),
    "NUL in trait": dumps(
        {
            "type": "identify",
            "messageId": "nul-4",
            "userId": "u",
            "timestamp": "2024-05-01T10:00:00Z",
            "traits": {"n": "a\x00b"},
        }
    ),
    "lone surrogate in userId": dumps(track("sur-1", userId="user-\ud800")),
    "lone surrogate in product_id": dumps(track("sur-2", properties={"product_id": "p\udc00"})),
    "lone surrogate in item name": dumps(
        track("sur-3", properties={"product_id": "p", "name": "\ud83d"})
    ),
    "1e400 in properties": VALID.replace(b'"price": 10', b'"price": 10, "big": 1e400'),
    "1e400 in traits": b'{"type": "identify", "messageId": "inf-2", "userId": "u", '
    b'"timestamp": "2024-05-01T10:00:00Z", "traits": {"score": 1e400}}',
    "400-digit price": VALID.replace(b'"price": 10', b'"price": 1' + b"0" * 400),
    "400-digit product_id": VALID.replace(b'"product_id": "p-1"', b'"product_id": 1' + b"0" * 400),
}


@pytest.mark.parametrize("name", list(STORE_HOSTILE))
def test_values_the_database_may_refuse_never_give_a_500(make_app, database_url, name):
    app = make_app(database_url=database_url)
    before = seed(app)
    response = app.test_client().post(
        "/segment", data=STORE_HOSTILE[name], content_type="application/json"
    )
    assert response.status_code < 500, response.get_json()
    assert response.is_json
    if response.status_code >= 400:
        assert store_of(app).counts() == before
    else:
        assert store_of(app).counts()["inbox"] == before["inbox"] + 1


def test_nesting_just_below_the_parser_limit_never_gives_a_500(make_app, database_url):
    """Python's json parser stops at about 1000 levels; storing needs a few more levels of
    stack than parsing. Every depth must be either stored or refused cleanly."""
    app = make_app(database_url=database_url)
    client = app.test_client()
    statuses = {}
    for depth in range(900, 1001, 2):
        before = store_of(app).counts()
        response = client.post("/segment", data=_nested(depth), content_type="application/json")
        statuses[depth] = response.status_code
        assert response.status_code in (200, 400), (depth, response.get_json())
        if response.status_code == 400:
            assert store_of(app).counts() == before
    assert 400 in statuses.values()  # the deepest ones are refused


# --- what a valid message may look like ------------------------------------------------------


def _times(app) -> dict[str, float]:
    with store_of(app).engine.connect() as conn:
        return {
            r[0]: r[1]
            for r in conn.execute(sa.text("SELECT message_id, timestamp FROM interactions"))
        }


SAME_INSTANT = [
    "2024-05-01T10:00:00Z",
    "2024-05-01T10:00:00z",
    "2024-05-01T10:00:00.000Z",
    "2024-05-01T10:00:00.000000Z",
    "2024-05-01T10:00:00.000000000Z",
    "2024-05-01T10:00:00+00:00",
    "2024-05-01T10:00:00.000+00:00",
    "2024-05-01T10:00:00+0000",
    "2024-05-01T10:00:00-00:00",
    "2024-05-01T12:00:00+02:00",
    "2024-05-01T05:30:00.000-04:30",
    "2024-05-01T10:00Z",
    "2024-05-01 10:00:00Z",
]


def test_timestamp_forms_give_the_same_instant(make_app):
    app = make_app()
    batch = [track(f"ts-{i}", timestamp=form) for i, form in enumerate(SAME_INSTANT)]
    response = app.test_client().post(
        "/segment", data=dumps(batch), content_type="application/json"
    )
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["accepted"] == len(SAME_INSTANT), response.get_json()
    times = _times(app)
    assert {f"ts-{i}": times[f"ts-{i}"] for i in range(len(SAME_INSTANT))} == {
        f"ts-{i}": pytest.approx(INSTANT, abs=1e-6) for i in range(len(SAME_INSTANT))
    }


@pytest.mark.parametrize(
    "forms",
    [
        [
            "2024-05-01T10:00:00.123Z",
            "2024-05-01T10:00:00.123000Z",
            "2024-05-01T10:00:00.123000000Z",
            "2024-05-01T10:00:00.123+00:00",
            "2024-05-01T11:00:00.123+01:00",
        ],
        [
            "2024-05-01T10:00:00.123456Z",
            "2024-05-01T10:00:00.123456+00:00",
            "2024-05-01T10:00:00.123456789Z",
        ],  # nanoseconds: the microseconds are kept
    ],
)
def test_fractions_of_3_6_9_digits(make_app, forms):
    app = make_app()
    batch = [track(f"fr-{i}", timestamp=form) for i, form in enumerate(forms)]
    response = app.test_client().post(
        "/segment", data=dumps(batch), content_type="application/json"
    )
    assert response.get_json()["accepted"] == len(forms), response.get_json()
    expected = datetime.fromisoformat(forms[0].replace("Z", "+00:00")).timestamp()
    times = _times(app)
    assert expected != pytest.approx(INSTANT, abs=1e-4)
    for i in range(len(forms)):
        assert times[f"fr-{i}"] == pytest.approx(expected, abs=2e-6), forms[i]


def test_time_falls_back_to_original_timestamp_sent_at_received_at(make_app):
    app = make_app()
    base = _without(track(), "timestamp")
    batch = [
        {
            **base,
            "messageId": "fb-orig",
            "originalTimestamp": "2024-05-01T10:00:00Z",
            "sentAt": "2024-06-01T00:00:00Z",
            "receivedAt": "2024-07-01T00:00:00Z",
        },
        {
            **base,
            "messageId": "fb-sent",
            "sentAt": "2024-05-01T10:00:00Z",
            "receivedAt": "2024-07-01T00:00:00Z",
        },
        {**base, "messageId": "fb-recv", "receivedAt": "2024-05-01T10:00:00Z"},
        {
            **base,
            "messageId": "fb-ts",
            "timestamp": "2024-05-01T10:00:00Z",
            "originalTimestamp": "2023-01-01T00:00:00Z",
        },
        {
            **base,
            "messageId": "fb-empty",
            "timestamp": "",
            "originalTimestamp": None,
            "sentAt": "2024-05-01T10:00:00Z",
        },
    ]
    response = app.test_client().post(
        "/segment", data=dumps(batch), content_type="application/json"
    )
    assert response.get_json()["accepted"] == 5, response.get_json()
    assert _times(app) == {m["messageId"]: pytest.approx(INSTANT) for m in batch}


@pytest.mark.parametrize("version", [1, 2, "1", "2", "2.0", None])
def test_version_as_number_or_string_is_accepted(make_app, version):
    app = make_app()
    message = track("v-1")
    if version is not None:
        message["version"] = version
    response = app.test_client().post(
        "/segment", data=dumps(message), content_type="application/json"
    )
    assert response.status_code == 200
    assert response.get_json()["interactions"] == 1


def test_unknown_fields_are_ignored(make_app):
    app = make_app()
    message = track(
        "unk-1",
        _metadata={"bundled": ["Segment.io"]},
        writeKey="wk",
        integrations={"All": False},
        projectId="p",
        channel="server",
        newSpecField={"nested": [1, 2, {"x": None}]},
        Type="TRACK",
    )
    response = app.test_client().post(
        "/segment", data=dumps(message), content_type="application/json"
    )
    assert response.status_code == 200
    assert response.get_json()["interactions"] == 1


def test_long_integers_and_non_ascii_text_are_kept_exactly(make_app):
    """Integers beyond 64 bits stay exact integers (a 23-digit numeric product_id is that
    product's id, not a rounded float), text outside ASCII stays as sent, and the inbox
    keeps the message as ASCII JSON."""
    app = make_app()
    message = track(
        "long-1",
        product_id=12345678901234567890123,
        properties={
            "product_id": 12345678901234567890123,
            "name": "Stühl 椅子",
            "order_ref": -98765432109876543210987,
            "price": 1.5,
        },
    )
    response = app.test_client().post(
        "/segment", data=dumps(message), content_type="application/json"
    )
    assert response.status_code == 200 and response.get_json()["interactions"] == 1
    with store_of(app).engine.connect() as conn:
        item_id, properties = conn.execute(
            sa.text("SELECT item_id, properties FROM interactions")
        ).one()
    assert item_id == "12345678901234567890123"
    properties = json.loads(properties) if isinstance(properties, str) else properties
    assert properties["order_ref"] == -98765432109876543210987
    assert properties["name"] == "Stühl 椅子"
    with store_of(app).inbox_store.engine.connect() as conn:
        body = conn.execute(sa.text("SELECT body FROM inbox")).scalar_one()
    assert body.isascii() and json.loads(body)["properties"] == message["properties"]
