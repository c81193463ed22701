"""The Segment Spec as the sender sees it: each malformed message is refused with a reason
that says what is wrong (in the delivery's answer), each malformed body with a 400 that
says why, and what is accepted is stored at the time the message says.

Written for the gaps that mutation testing (``make mutation``, docs/mutation.md) found in
webhook/segment.py.
"""

from __future__ import annotations

import json
import time
from datetime import datetime

import pytest
import sqlalchemy as sa

from tests.conftest import store_of
from webhook.storage.schema import interactions, profiles

WHEN = "2024-05-01T10:00:00.000Z"


def track(message_id: str = "m-1", **fields) -> dict:
    message = {
        "type": "track",
        "event": "Product Viewed",
        "messageId": message_id,
        "userId": "user-1",
        "timestamp": WHEN,
        "properties": {"product_id": "p-1"},
    }
    message.update(fields)
    return {key: value for key, value in message.items() if value is not None}


def post(client, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
    return client.post("/segment", data=data, headers={"Content-Type": "application/json"})


def body_error(response) -> str:
    assert response.status_code == 400, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == "invalid_body"
    return error["message"]


def stored_times(app) -> dict[str, float]:
    with store_of(app).read() as conn:
        rows = conn.execute(sa.select(interactions.c.event_id, interactions.c.timestamp))
        return {row.event_id: row.timestamp for row in rows}


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# Each malformed message next to the reason the delivery's answer gives for it.
LONG = "x" * 257
REJECTED = [
    ("not an object", "a message must be a JSON object, got str"),
    ({"messageId": "r-1"}, "missing type"),
    (track("r-2", type=""), "missing type"),
    (track("r-3", type=5), "missing type"),
    (track("r-4", type="click"), "unknown type 'click'"),
    (track(None), "missing messageId"),
    (track("", userId=""), "missing messageId"),
    (track("r-5", userId=None), "missing userId and anonymousId: one is required"),
    (track("r-6", userId="", anonymousId=""), "missing userId and anonymousId: one is required"),
    (track("r-7", timestamp=None), "no timestamp, originalTimestamp, sentAt or receivedAt"),
    (track("r-8", timestamp=""), "no timestamp, originalTimestamp, sentAt or receivedAt"),
    (track("r-9", timestamp="2024-05-01"), "timestamp: timestamp is not ISO-8601: '2024-05-01'"),
    (track("r-10", timestamp="yesterday"), "timestamp: timestamp is not ISO-8601: 'yesterday'"),
    (
        track("r-11", timestamp="2024-05-01T10:00:00.000Zjunk"),
        "timestamp: timestamp is not ISO-8601: '2024-05-01T10:00:00.000Zjunk'",
    ),
    (track("r-12", timestamp=1714557600), "timestamp: timestamp must be an ISO-8601 string"),
    (
        track("r-13", timestamp="", originalTimestamp="soon"),
        "originalTimestamp: timestamp is not ISO-8601: 'soon'",
    ),
    (track("r-14", timestamp=None, sentAt="soon"), "sentAt: timestamp is not ISO-8601: 'soon'"),
    (
        track("r-15", timestamp=None, receivedAt="2024/05/01 10:00:00"),
        "receivedAt: timestamp is not ISO-8601: '2024/05/01 10:00:00'",
    ),
    (
        track("r-16", timestamp="9999-12-31T23:59:59-05:00"),
        "timestamp: timestamp is out of range",
    ),
    (track("r-17", event=None), "a track needs an event name"),
    (track("r-18", event="   "), "a track needs an event name"),
    (track("r-19", event=7), "a track needs an event name"),
    (
        track("r-20", event=LONG),
        "the event name is longer than 256 characters or holds a NUL character or a lone surrogate",
    ),
    (
        track("r-21", event="View\x00ed"),
        "the event name is longer than 256 characters or holds a NUL character or a lone surrogate",
    ),
    (track("r-22", userId=True), "userId must be a string"),
    (track("r-23", userId=["u"]), "userId must be a string"),
    (track("r-24", userId=LONG), "userId is longer than 256 characters"),
    (track("r-25", userId="u\x00"), "userId holds a NUL character or a lone surrogate"),
    (track("r-26", anonymousId=3.5), "anonymousId must be a string"),
    (track("r-27", properties=["p-1"]), "properties must be an object"),
    (
        {"type": "identify", "messageId": "r-28", "userId": "u", "timestamp": WHEN, "traits": 1},
        "traits must be an object",
    ),
    (
        {"type": "alias", "messageId": "r-29", "userId": "u", "timestamp": WHEN},
        "an alias needs previousId and userId",
    ),
    (
        {
            "type": "alias",
            "messageId": "r-30",
            "previousId": "a",
            "anonymousId": "b",
            "timestamp": WHEN,
        },
        "an alias needs previousId and userId",
    ),
    (
        {"type": "group", "messageId": "r-31", "userId": "u", "timestamp": WHEN, "traits": "x"},
        "traits must be an object",
    ),
    ({"type": "delete", "messageId": "r-32"}, "a delete needs a userId or an anonymousId"),
]


def test_each_malformed_message_is_refused_with_its_reason(app):
    client = app.test_client()
    good = track("good-1")
    response = post(client, [good] + [raw for raw, _ in REJECTED])
    assert response.status_code == 200, response.get_data(as_text=True)
    answer = response.get_json()
    assert answer["accepted"] == 1
    reasons = {entry["index"]: entry["reason"] for entry in answer["rejected"]}
    expected = {index: reason for index, (_, reason) in enumerate(REJECTED, start=1)}
    assert reasons == expected
    assert stored_times(app) == {"good-1": epoch("2024-05-01T10:00:00+00:00")}


def test_a_lone_surrogate_in_an_id_is_refused(app):
    # JSON may escape a lone surrogate; no database can hold it.
    raw = json.dumps(track("m-1", userId="PLACEHOLDER")).replace("PLACEHOLDER", "u\\ud800")
    response = post(app.test_client(), raw.encode("ascii"))
    assert response.status_code == 400
    (entry,) = response.get_json()["details"]["rejected"]
    assert entry["reason"] == "userId holds a NUL character or a lone surrogate"


def test_a_delivery_of_only_malformed_messages_is_a_400_that_lists_them(app):
    response = post(app.test_client(), [track("m-1", event=None), track(None)])
    assert response.status_code == 400
    body = response.get_json()
    assert body["error"]["code"] == "no_valid_messages"
    assert [entry["reason"] for entry in body["details"]["rejected"]] == [
        "a track needs an event name",
        "missing messageId",
    ]
    assert store_of(app).counts()["interactions"] == 0


@pytest.mark.parametrize(
    ("timestamp", "meant"),
    [
        ("2024-05-01T10:00:00.000Z", "2024-05-01T10:00:00+00:00"),
        ("2024-05-01T10:00:00.000z", "2024-05-01T10:00:00+00:00"),
        ("2024-05-01T10:00:00.123z", "2024-05-01T10:00:00.123+00:00"),
        ("2024-05-01T10:00:00z", "2024-05-01T10:00:00+00:00"),
        ("2024-05-01T10:00", "2024-05-01T10:00:00+00:00"),  # the shortest accepted
        ("2024-05-01T10:00Z", "2024-05-01T10:00:00+00:00"),
        ("2024-05-01 10:00:00.123456Z", "2024-05-01T10:00:00.123456+00:00"),
        ("2024-05-01T12:00:00+02:00", "2024-05-01T10:00:00+00:00"),
        ("2024-05-01T05:30:00-04:30", "2024-05-01T10:00:00+00:00"),
        ("2024-05-01T10:00:00", "2024-05-01T10:00:00+00:00"),  # no offset: UTC
        ("  2024-05-01T10:00:00Z  ", "2024-05-01T10:00:00+00:00"),
    ],
)
def test_an_iso_timestamp_is_stored_as_the_moment_it_names(app, timestamp, meant):
    response = post(app.test_client(), track("m-1", timestamp=timestamp))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert stored_times(app) == {"m-1": epoch(meant)}


def test_a_timestamp_without_an_offset_is_utc_whatever_the_servers_time_zone(app, monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        post(app.test_client(), track("m-1", timestamp="2024-05-01T10:00:00"))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert stored_times(app) == {"m-1": epoch("2024-05-01T10:00:00+00:00")}


def test_a_long_malformed_timestamp_is_quoted_up_to_40_characters(app):
    bad = "2024-05-01T10:00:00.000Z and then a long tail of text"
    response = post(app.test_client(), track("m-1", timestamp=bad))
    (entry,) = response.get_json()["details"]["rejected"]
    assert entry["reason"] == f"timestamp: timestamp is not ISO-8601: {bad[:40]!r}"


def test_the_first_time_field_present_gives_the_time(app):
    client = app.test_client()
    later = "2024-05-02T10:00:00Z"
    messages = [
        track("t-1", timestamp=None, originalTimestamp=WHEN, sentAt=later, receivedAt=later),
        track("t-2", timestamp="", sentAt=WHEN, receivedAt=later),
        track("t-3", timestamp=None, receivedAt=WHEN),
    ]
    assert post(client, messages).get_json()["accepted"] == 3
    assert set(stored_times(app).values()) == {epoch("2024-05-01T10:00:00+00:00")}


def test_ids_sent_as_numbers_are_kept_as_their_text_and_the_type_is_read_loosely(app):
    client = app.test_client()
    message = track(12345, userId=42, type=" Track ")
    response = post(client, message)
    assert response.get_json()["accepted"] == 1, response.get_data(as_text=True)
    with store_of(app).read() as conn:
        row = conn.execute(sa.select(interactions)).one()
    assert (row.message_id, row.user_id, row.event_type) == ("12345", "42", "Product Viewed")


def test_an_event_name_is_stored_without_surrounding_spaces(app):
    post(app.test_client(), track("m-1", event="  Product Viewed "))
    with store_of(app).read() as conn:
        assert conn.execute(sa.select(interactions.c.event_type)).scalar_one() == ("Product Viewed")


def test_an_id_of_exactly_256_characters_is_accepted(app):
    user = "u" * 256
    response = post(app.test_client(), track("m-1", userId=user))
    assert response.get_json()["accepted"] == 1, response.get_data(as_text=True)


def test_identify_traits_are_read_from_context_traits_when_traits_are_absent(app):
    client = app.test_client()
    identify = {"type": "identify", "userId": "u-1", "timestamp": WHEN}
    post(client, {**identify, "messageId": "i-1", "context": {"traits": {"plan": "pro"}}})
    post(
        client,
        {
            **identify,
            "userId": "u-2",
            "messageId": "i-2",
            "traits": {"plan": "free"},
            "context": {"traits": {"plan": "pro"}},
        },
    )
    with store_of(app).read() as conn:
        rows = conn.execute(sa.select(profiles.c.profile_id, profiles.c.traits)).all()
    assert {row.profile_id: row.traits for row in rows} == {
        "u-1": {"plan": "pro"},
        "u-2": {"plan": "free"},
    }


def test_a_delete_without_a_time_takes_effect_when_received(app):
    response = post(app.test_client(), {"type": "delete", "messageId": "d-1", "userId": "u-1"})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["accepted"] == 1


# --- bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "the body is empty; expected a Segment message as JSON"),
        (b"  \n ", "the body is empty; expected a Segment message as JSON"),
        (b'{"type": "track", "event": "\xff"}', "the body is not UTF-8 (byte 28)"),
        (
            b'"a string"',
            "expected a Segment message (a JSON object) or an array of them, got a JSON str",
        ),
        (b"42", "expected a Segment message (a JSON object) or an array of them, got a JSON int"),
        (b"[]", "the batch is empty: it holds no Segment messages"),
        (b'{"batch": []}', "the batch is empty: it holds no Segment messages"),
    ],
)
def test_a_malformed_body_is_a_400_that_says_why(app, body, reason):
    assert body_error(post(app.test_client(), body)) == reason


@pytest.mark.parametrize(
    ("body", "start"),
    [
        (b'{"type": "track",', "the body is not valid JSON: "),
        (b'{"price": NaN}', "the body is not valid JSON: NaN is not JSON"),
        (b'{"price": -Infinity}', "the body is not valid JSON: -Infinity is not JSON"),
        (b'{"price": 1e400}', "the body is not valid JSON: the number 1e400"),
    ],
)
def test_json_that_is_not_plain_json_is_a_400(app, body, start):
    assert body_error(post(app.test_client(), body)).startswith(start)


def test_nesting_beyond_64_levels_is_refused_and_64_are_accepted(app):
    client = app.test_client()

    def nested(depth: int, siblings: int = 0) -> dict:
        """A message ``depth`` objects deep (itself, its properties, then the rest), with
        ``siblings`` more shallow objects beside them (more brackets, no more depth)."""
        value: object = "leaf"
        for _ in range(depth - 2):
            value = {"k": value}
        shallow = [{"n": n} for n in range(siblings)]
        return track("deep", properties={"product_id": "p-1", "extra": value, "more": shallow})

    assert body_error(post(client, nested(65))) == "the body is nested more than 64 levels deep"
    assert post(client, nested(64)).status_code == 200
    assert post(client, nested(64, siblings=40)).status_code == 200
    assert body_error(post(client, nested(65, siblings=40))) == (
        "the body is nested more than 64 levels deep"
    )
    # Arrays count as levels too.
    deep_list = track(
        "deep-list", properties={"product_id": "p-2", "x": json.loads("[" * 63 + "]" * 63)}
    )
    assert body_error(post(client, deep_list)) == "the body is nested more than 64 levels deep"
    assert body_error(post(client, b"[" * 5000 + b"]" * 5000)) == "the body is nested too deeply"
    # Brackets inside text are not nesting.
    text = track("brackets", properties={"product_id": "p-3", "note": "[{" * 100})
    assert post(client, text).status_code == 200


def test_a_number_too_large_for_a_float_is_named_in_the_refusal(app):
    long_number = b"1234567890.1234567890e400"
    body = b'{"type": "track", "price": ' + long_number + b"}"
    assert body_error(post(app.test_client(), body)) == (
        "the body is not valid JSON: the number 1234567890.123456789... is out of range"
    )
    assert body_error(post(app.test_client(), b'{"price": -1e999}')) == (
        "the body is not valid JSON: the number -1e999... is out of range"
    )


def test_a_batch_of_more_than_4000_messages_is_refused(app):
    body = {"batch": [track(f"m-{i}") for i in range(4001)]}
    assert body_error(post(app.test_client(), body)) == (
        "the batch holds 4001 messages; at most 4000"
    )


def test_a_tracking_api_batch_and_an_object_with_a_batch_field_are_told_apart(app):
    client = app.test_client()
    response = post(client, {"batch": [track("b-1"), track("b-2")]})
    assert response.get_json()["received"] == 2
    # A message that happens to carry a "batch" property is one message.
    response = post(client, track("b-3", batch=[1, 2]))
    assert response.get_json()["received"] == 1
    # An object whose "batch" is not a list is one (malformed) message.
    response = post(client, {"batch": {"messages": []}})
    assert response.status_code == 400
    assert response.get_json()["details"]["rejected"][0]["reason"] == "missing type"


def test_big_integers_keep_every_digit(app):
    """Integers beyond 64 bits are read exactly (the slow path), not rounded as floats."""
    client = app.test_client()
    big = 123456789012345678901234567890
    raw = json.dumps(track("m-1", properties={"product_id": big})).encode()
    assert post(client, raw).get_json()["interactions"] == 1
    with store_of(app).read() as conn:
        assert conn.execute(sa.select(interactions.c.item_id)).scalar_one() == str(big)


def test_non_ascii_text_is_stored_as_sent(app):
    client = app.test_client()
    properties = {"product_id": "stühl-1", "name": "Stuhl „Ü“", "note": "\u2028"}
    post(client, track("m-1", properties=properties))
    with store_of(app).read() as conn:
        row = conn.execute(sa.select(interactions)).one()
    assert (row.item_id, row.properties) == ("stühl-1", properties)


def test_a_delete_by_anonymous_id_forgets_that_visitor(app):
    client = app.test_client()
    post(client, [track("m-1", userId=None, anonymousId="a-1"), track("m-2", userId="u-2")])
    response = post(client, {"type": "delete", "messageId": "d-1", "anonymousId": "a-1"})
    assert response.get_json()["accepted"] == 1
    assert set(stored_times(app)) == {"m-2"}


def test_an_event_name_of_exactly_256_characters_is_accepted(app):
    event = "E" * 256
    app_client = app.test_client()
    response = post(app_client, track("m-1", event=event))
    assert response.get_json()["accepted"] == 1, response.get_data(as_text=True)


def test_a_redelivered_identify_is_answered_as_a_duplicate(app):
    client = app.test_client()
    identify = {"type": "identify", "messageId": "i-1", "userId": "u-1", "timestamp": WHEN}
    assert post(client, {**identify, "traits": {"plan": "pro"}}).get_json()["accepted"] == 1
    answer = post(client, {**identify, "traits": {"plan": "pro"}}).get_json()
    assert (answer["accepted"], answer["duplicates"]) == (0, 1)
