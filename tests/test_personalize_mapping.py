"""Segment records → Personalize records, and the sender's retry rules, as unit tests.

The mapping is pure (webhook/personalize_mapping.py); the Personalize applier's sender is
given a real boto3 client wrapped in botocore's Stubber, which checks every request
against the personalize-events model.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import boto3
import pytest
from botocore.stub import Stubber

from webhook.appliers.personalize import Sender, plan_calls
from webhook.inbox import LostLease
from webhook.personalize_mapping import (
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


def interaction(
    event_id="m-1",
    *,
    anonymous_id="anon-1",
    user_id=None,
    item_id="sku-1",
    event_type="Product Viewed",
    timestamp=1_790_000_000.5,
    **properties,
):
    return Interaction(
        event_id=event_id,
        message_id=event_id.split("#")[0],
        user_id=user_id,
        anonymous_id=anonymous_id,
        item_id=item_id,
        event_type=event_type,
        timestamp=timestamp,
        properties=properties,
    )


def mapped(record, config=CONFIG):
    problems = []
    result = map_event(record, config, problems)
    return result, problems


# --- events -----------------------------------------------------------------------------


def test_event_fields():
    (session, user, event), problems = mapped(
        interaction(price=19.99, currency="EUR", image_url="https://x/i.jpg", other="not mapped")
    )
    assert (session, user) == ("anon-1", None)
    assert event == {
        "eventId": "m-1",
        "eventType": "View",
        "itemId": "sku-1",
        "sentAt": 1_790_000_000.5,
        "eventValue": 19.99,
        "properties": '{"currency":"EUR","imageUrl":"https://x/i.jpg"}',
    }
    assert problems == []


def test_session_falls_back_to_user_id_and_unmapped_event_keeps_its_name():
    (session, user, event), _ = mapped(
        interaction(anonymous_id=None, user_id="u-1", event_type="Product Added")
    )
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
    config = MappingConfig(
        tracking_id="t", event_properties=(("currency", "currency"), ("description", "description"))
    )
    (_, _, event), problems = mapped(interaction(currency="EUR", description="d" * 1100), config)
    assert json.loads(event["properties"]) == {"currency": "EUR"}
    assert len(problems) == 1 and "description" in problems[0].reason
    # Exactly at the limit it still fits.
    text_len = len(json.dumps({"currency": "EUR", "description": ""}, separators=(",", ":")))
    (_, _, event), problems = mapped(
        interaction(currency="EUR", description="d" * (1024 - text_len)), config
    )
    assert len(event["properties"]) == 1024 and problems == []


def test_non_ascii_properties_count_characters_not_bytes():
    config = MappingConfig(tracking_id="t", event_properties=(("note", "note"),))
    (_, _, event), problems = mapped(interaction(note="ä" * 1000), config)
    assert json.loads(event["properties"]) == {"note": "ä" * 1000} and problems == []


@pytest.mark.parametrize(
    "field, record",
    [
        ("eventType", interaction(event_type="E" * 257)),
        ("sessionId", interaction(anonymous_id="a" * 257)),
        ("userId", interaction(user_id="u" * 257)),
    ],
)
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
    assert shape == [
        ("s-1", None, 10),
        ("s-1", None, 10),
        ("s-1", None, 3),
        ("s-1", "u-1", 4),
        ("u-1", "u-1", 10),
        ("u-1", "u-1", 1),
    ]
    assert [e["eventId"] for c in calls[:3] for e in c.events] == [f"a-{n}" for n in range(23)]


def test_event_calls_keep_a_session_in_order_when_its_user_id_comes_and_goes():
    records = [
        interaction("v-1", anonymous_id="s-1"),
        interaction("o-1", anonymous_id="s-1", user_id="u-1"),
        interaction("v-2", anonymous_id="s-1"),
        interaction("v-3", anonymous_id="s-1"),
    ]
    calls = event_calls(records, CONFIG, [])
    assert [(c.user_id, [e["eventId"] for e in c.events]) for c in calls] == [
        (None, ["v-1"]),
        ("u-1", ["o-1"]),
        (None, ["v-2", "v-3"]),
    ]


# --- users and items --------------------------------------------------------------------


def test_users_merge_traits_in_time_order_and_join_lists():
    records = [
        UserTraits("u-1", {"plan": "pro", "tags": ["a", "b"]}, 2.0),
        UserTraits("u-1", {"plan": "free", "email": "x@y.z"}, 1.0),
        UserTraits("u-2", {"email": "only@unmapped.example"}, 1.0),
    ]
    problems = []
    users = map_users(records, CONFIG, problems)
    assert users == [{"userId": "u-1", "properties": '{"plan":"pro","tags":"a|b"}'}]
    assert problems == []


def test_items_map_properties():
    records = [
        ItemDetails("sku-1", {}, {"category": "Furniture", "price": 10, "x": 1}, 1.0),
        ItemDetails("sku-1", {}, {"price": 12.5}, 2.0),
        ItemDetails("sku-2", {}, {"name": "No mapped field"}, 1.0),
    ]
    items = map_items(records, CONFIG, [])
    assert items == [
        {"itemId": "sku-1", "properties": '{"category":"Furniture","price":12.5}'},
        {"itemId": "sku-2"},
    ]


# --- the sender, with botocore's Stubber ---------------------------------------------------


@pytest.fixture
def stubbed():
    client = boto3.session.Session().client(
        "personalize-events",
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="y",
    )
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def _sender(client, rate=1000.0):
    return Sender(client=client, max_concurrency=1, events_per_second=rate)


def _chains(n=3):
    return plan_calls(
        Routed(interactions=[interaction(f"m-{k}", price=1.5) for k in range(n)]),
        CONFIG,
        "",
        "",
        None,
        [],
    )


def _expected_params(ids):
    return {
        "trackingId": "trk",
        "sessionId": "anon-1",
        "eventList": [
            {
                "eventId": i,
                "eventType": "View",
                "itemId": "sku-1",
                "sentAt": datetime.fromtimestamp(1_790_000_000.5, UTC),
                "eventValue": 1.5,
            }
            for i in ids
        ],
    }


def _ok():
    pass


def test_sender_retries_throttling_until_the_call_goes_through(stubbed):
    client, stubber = stubbed
    ids = ["m-0", "m-1", "m-2"]
    for _ in range(3):
        stubber.add_client_error(
            "put_events",
            service_error_code="ThrottlingException",
            http_status_code=400,
            expected_params=_expected_params(ids),
        )
    stubber.add_response("put_events", {}, _expected_params(ids))
    report = _sender(client).send_chains(_chains(), _ok)
    assert (report.sent["event"], report.calls, report.retries) == (3, 1, 3)
    assert report.refused == []


def test_sender_splits_a_refused_call_down_to_the_bad_record(stubbed):
    client, stubber = stubbed
    refuse = dict(
        service_error_code="InvalidInputException", service_message="bad", http_status_code=400
    )
    stubber.add_client_error(
        "put_events", expected_params=_expected_params(["m-0", "m-1", "m-2"]), **refuse
    )
    stubber.add_response("put_events", {}, _expected_params(["m-0"]))
    stubber.add_client_error(
        "put_events", expected_params=_expected_params(["m-1", "m-2"]), **refuse
    )
    stubber.add_response("put_events", {}, _expected_params(["m-1"]))
    stubber.add_client_error("put_events", expected_params=_expected_params(["m-2"]), **refuse)
    report = _sender(client).send_chains(_chains(), _ok)
    assert report.sent["event"] == 2
    assert [(r.kind, r.record_id) for r in report.refused] == [("event", "m-2")]
    assert "InvalidInputException" in report.refused[0].reason
    assert report.retries == 0  # a refusal is not retried


def test_sender_keeps_retrying_a_configuration_error_instead_of_dropping(stubbed):
    client, stubber = stubbed
    stubber.add_client_error(
        "put_events", service_error_code="AccessDeniedException", http_status_code=403
    )
    stubber.add_response("put_events", {}, _expected_params(["m-0"]))
    report = _sender(client).send_chains(_chains(1), _ok)
    assert report.sent["event"] == 1 and report.refused == [] and report.retries == 1


def test_sender_gives_up_when_the_lease_is_lost(stubbed):
    client, stubber = stubbed
    for _ in range(2):
        stubber.add_client_error(
            "put_events", service_error_code="ThrottlingException", http_status_code=400
        )
    calls = []

    def keep_lease():
        calls.append(1)
        if len(calls) > 2:
            raise LostLease("personalize")

    with pytest.raises(LostLease):
        _sender(client).send_chains(_chains(1), keep_lease)


def test_sender_holds_the_rate(stubbed):
    client, stubber = stubbed
    chains = [
        [call]
        for chain in plan_calls(
            Routed(interactions=[interaction(f"m-{k}", anonymous_id=f"a-{k}") for k in range(6)]),
            CONFIG,
            "",
            "",
            None,
            [],
        )
        for call in chain
    ]
    for _ in chains:
        stubber.add_response("put_events", {})
    started = time.monotonic()
    report = _sender(client, rate=10.0).send_chains(chains, _ok)
    assert report.sent["event"] == 6
    # A new sender starts with an empty bucket: 6 calls at 10 a second take >= 0.5 s.
    assert time.monotonic() - started >= 0.5
