"""Segment records → Personalize records, and the forwarder's retry rules, as unit tests.

The mapping is pure (webhook/destinations/personalize_mapping.py); the forwarder is given
a real boto3 client wrapped in botocore's Stubber, which checks every request against the
personalize-events model, and a recording ``sleep`` so that backoff takes no time.
"""
from __future__ import annotations

import json
import time

import boto3
import pytest
from botocore.stub import Stubber

from webhook.destinations.base import DestinationError
from webhook.destinations.personalize import PersonalizeForwarder
from webhook.destinations.personalize_mapping import (
    MappingConfig,
    event_calls,
    map_event,
    map_items,
    map_users,
)
from webhook.routing import Interaction, ItemDetails, Routed, UserTraits

CONFIG = MappingConfig(
    tracking_id="trk",
    event_type_map={"Product Viewed": "View"},
    event_value_property="price",
    event_properties=(("currency", "currency"), ("image_url", "imageUrl")),
    user_traits_map=(("plan", "plan"), ("tags", "tags")),
    item_properties_map=(("category", "category"), ("price", "price")),
)


def interaction(event_id="m-1", *, anonymous_id="anon-1", user_id=None, item_id="sku-1",
                event_type="Product Viewed", timestamp=1_790_000_000.5, **properties):
    return Interaction(event_id=event_id, message_id=event_id.split("#")[0], user_id=user_id,
                       anonymous_id=anonymous_id, item_id=item_id, event_type=event_type,
                       timestamp=timestamp, properties=properties)


def mapped(record, config=CONFIG):
    problems = []
    result = map_event(record, config, problems)
    return result, problems


# --- events -----------------------------------------------------------------------------

def test_event_fields():
    (session, user, event), problems = mapped(interaction(
        price=19.99, currency="EUR", image_url="https://x/i.jpg", other="not mapped"))
    assert (session, user) == ("anon-1", None)
    assert event == {"eventId": "m-1", "eventType": "View", "itemId": "sku-1",
                     "sentAt": 1_790_000_000.5, "eventValue": 19.99,
                     "properties": '{"currency":"EUR","imageUrl":"https://x/i.jpg"}'}
    assert problems == []


def test_session_falls_back_to_user_id_and_unmapped_event_keeps_its_name():
    (session, user, event), _ = mapped(interaction(anonymous_id=None, user_id="u-1",
                                                   event_type="Product Added"))
    assert (session, user, event["eventType"]) == ("u-1", "u-1", "Product Added")


@pytest.mark.parametrize("raw, value", [(5, 5.0), ("12.50", 12.5), (0, 0.0)])
def test_event_value_is_a_float(raw, value):
    (_, _, event), problems = mapped(interaction(price=raw))
    assert event["eventValue"] == value and isinstance(event["eventValue"], float)
    assert problems == []


@pytest.mark.parametrize("raw", ["free", True, float("nan"), {"amount": 3}])
def test_event_value_that_is_not_a_number_is_left_out_and_reported(raw):
    (_, _, event), problems = mapped(interaction(price=raw))
    assert "eventValue" not in event
    assert [(p.action, p.id) for p in problems] == [("trimmed", "m-1")]
    assert "price" in problems[0].reason


def test_recommendation_id_of_40_is_kept_41_is_left_out():
    (_, _, event), problems = mapped(interaction(recommendation_id="r" * 40))
    assert event["recommendationId"] == "r" * 40 and problems == []
    (_, _, event), problems = mapped(interaction(recommendation_id="r" * 41))
    assert "recommendationId" not in event
    assert [p.action for p in problems] == ["trimmed"]
    assert "recommendationId" in problems[0].reason


def test_impression_of_25_is_kept_more_is_trimmed_to_the_first_25():
    ids = [f"i-{n}" for n in range(30)]
    (_, _, event), problems = mapped(interaction(impression=ids[:25]))
    assert event["impression"] == ids[:25] and problems == []
    (_, _, event), problems = mapped(interaction(impression=ids))
    assert event["impression"] == ids[:25]
    assert [p.action for p in problems] == ["trimmed"]
    assert "25" in problems[0].reason and "30" in problems[0].reason


def test_impression_in_pipe_notation_and_bad_entries():
    (_, _, event), problems = mapped(interaction(impression="a|b|c"))
    assert event["impression"] == ["a", "b", "c"] and problems == []
    (_, _, event), problems = mapped(interaction(impression=["a", {"x": 1}, "", "x" * 257, 7]))
    assert event["impression"] == ["a", "7"]
    assert [p.action for p in problems] == ["trimmed"]


def test_event_properties_over_1024_characters_leave_out_fields_and_say_which():
    config = MappingConfig(tracking_id="t", event_properties=(
        ("currency", "currency"), ("description", "description")))
    (_, _, event), problems = mapped(interaction(currency="EUR", description="d" * 1100),
                                     config)
    assert json.loads(event["properties"]) == {"currency": "EUR"}
    assert len(problems) == 1 and "description" in problems[0].reason
    # Exactly at the limit it still fits.
    text_len = len(json.dumps({"currency": "EUR", "description": ""}, separators=(",", ":")))
    (_, _, event), problems = mapped(interaction(
        currency="EUR", description="d" * (1024 - text_len)), config)
    assert len(event["properties"]) == 1024 and problems == []


def test_non_ascii_properties_count_characters_not_bytes():
    config = MappingConfig(tracking_id="t", event_properties=(("note", "note"),))
    (_, _, event), problems = mapped(interaction(note="ä" * 1000), config)
    assert json.loads(event["properties"]) == {"note": "ä" * 1000} and problems == []


@pytest.mark.parametrize("field, record", [
    ("eventType", interaction(event_type="E" * 257)),
    ("sessionId", interaction(anonymous_id="a" * 257)),
    ("userId", interaction(user_id="u" * 257)),
])
def test_ids_over_256_characters_drop_the_event_with_the_reason(field, record):
    result, problems = mapped(record)
    assert result is None
    assert [(p.kind, p.action) for p in problems] == [("event", "dropped")]
    assert field in problems[0].reason and "256" in problems[0].reason


def test_event_without_any_session_is_dropped():
    result, problems = mapped(interaction(anonymous_id=None, user_id=None))
    assert result is None and problems[0].action == "dropped"


def test_event_calls_group_by_session_and_user_ten_at_most_in_order():
    records = [interaction(f"a-{n}", anonymous_id="s-1") for n in range(23)]
    records += [interaction(f"b-{n}", anonymous_id="s-1", user_id="u-1") for n in range(4)]
    records += [interaction(f"c-{n}", anonymous_id=None, user_id="u-1") for n in range(11)]
    calls = event_calls(records, CONFIG, [])
    shape = [(c.session_id, c.user_id, len(c.events)) for c in calls]
    assert shape == [("s-1", None, 10), ("s-1", None, 10), ("s-1", None, 3),
                     ("s-1", "u-1", 4), ("u-1", "u-1", 10), ("u-1", "u-1", 1)]
    assert [e["eventId"] for c in calls[:3] for e in c.events] == [f"a-{n}" for n in range(23)]


# --- users and items --------------------------------------------------------------------

def test_users_merge_traits_in_time_order_and_join_lists():
    records = [UserTraits("u-1", {"plan": "pro", "tags": ["a", "b"]}, 2.0),
               UserTraits("u-1", {"plan": "free", "email": "x@y.z"}, 1.0),
               UserTraits("u-2", {"email": "only@unmapped.example"}, 1.0)]
    problems = []
    users = map_users(records, CONFIG, problems)
    assert users == [{"userId": "u-1", "properties": '{"plan":"pro","tags":"a|b"}'}]
    assert problems == []


def test_items_map_properties():
    records = [ItemDetails("sku-1", {}, {"category": "Furniture", "price": 10, "x": 1}, 1.0),
               ItemDetails("sku-1", {}, {"price": 12.5}, 2.0),
               ItemDetails("sku-2", {}, {"name": "No mapped field"}, 1.0)]
    items = map_items(records, CONFIG, [])
    assert items == [{"itemId": "sku-1", "properties": '{"category":"Furniture","price":12.5}'},
                     {"itemId": "sku-2"}]


# --- the forwarder, with botocore's Stubber ---------------------------------------------

@pytest.fixture
def stubbed():
    client = boto3.session.Session().client(
        "personalize-events", region_name="us-east-1",
        aws_access_key_id="x", aws_secret_access_key="y")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def _forwarder(client, sleeps):
    return PersonalizeForwarder(CONFIG, client=client, sleep=sleeps.append,
                                max_concurrency=1)


def _routed(n=3):
    return Routed(interactions=[interaction(f"m-{k}", price=1.5) for k in range(n)])


def _expected_params(n=3):
    return {"trackingId": "trk", "sessionId": "anon-1", "eventList": [
        {"eventId": f"m-{k}", "eventType": "View", "itemId": "sku-1",
         "sentAt": 1_790_000_000.5, "eventValue": 1.5} for k in range(n)]}


def test_forwarder_retries_throttling_with_backoff(stubbed):
    client, stubber = stubbed
    for _ in range(3):
        stubber.add_client_error("put_events", service_error_code="ThrottlingException",
                                 http_status_code=400, expected_params=_expected_params())
    stubber.add_response("put_events", {}, _expected_params())
    sleeps = []
    report = _forwarder(client, sleeps).forward(_routed(), time.monotonic() + 10)
    assert (report.events, report.calls, report.retries) == (3, 1, 3)
    assert len(sleeps) == 3 and all(0 <= s <= 1.0 for s in sleeps)


def test_forwarder_treats_invalid_input_as_permanent(stubbed):
    client, stubber = stubbed
    stubber.add_client_error("put_events", service_error_code="InvalidInputException",
                             service_message="bad", http_status_code=400,
                             expected_params=_expected_params(1))
    sleeps = []
    report = _forwarder(client, sleeps).forward(_routed(1), time.monotonic() + 10)
    assert report.events == 0 and sleeps == []  # not retried
    assert [p.id for p in report.problems] == ["m-0"]
    assert all(p.action == "dropped" and "InvalidInputException" in p.reason
               for p in report.problems)


def test_forwarder_gives_up_at_the_deadline_with_retry_after():
    client = boto3.session.Session().client(
        "personalize-events", region_name="us-east-1",
        aws_access_key_id="x", aws_secret_access_key="y")
    with Stubber(client) as stubber:  # more throttling answers than it can use in time
        for _ in range(200):
            stubber.add_client_error("put_events", service_error_code="ThrottlingException",
                                     http_status_code=400)
        forwarder = PersonalizeForwarder(CONFIG, client=client, max_concurrency=1)
        started = time.monotonic()
        with pytest.raises(DestinationError) as info:
            forwarder.forward(_routed(), started + 0.5)
        assert time.monotonic() - started < 1.1
    assert info.value.retry_after and info.value.retry_after > 0


def test_forwarder_does_not_retry_access_denied(stubbed):
    client, stubber = stubbed
    stubber.add_client_error("put_events", service_error_code="AccessDeniedException",
                             http_status_code=403)
    sleeps = []
    with pytest.raises(DestinationError):
        _forwarder(client, sleeps).forward(_routed(), time.monotonic() + 10)
    assert sleeps == []
