"""What each Segment message becomes, as the sender and the recommender see it: the
delivery's answer (accepted, skipped and why, notes), and the interactions, catalog
details, profiles and identity links stored.

Written for the gaps that mutation testing (``make mutation``, docs/mutation.md) found in
webhook/routing.py.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime

import sqlalchemy as sa

from tests.conftest import store_of
from webhook.storage.schema import identity_links, interactions, items, profiles

WHEN = "2024-05-01T10:00:00Z"
EPOCH = datetime.fromisoformat("2024-05-01T10:00:00+00:00").timestamp()


def message(kind: str, message_id: str, **fields) -> dict:
    raw = {"type": kind, "messageId": message_id, "timestamp": WHEN, **fields}
    return {key: value for key, value in raw.items() if value is not None}


def track(message_id: str, properties: dict, event: str = "Product Viewed", **fields) -> dict:
    fields.setdefault("userId", "u-1")
    return message("track", message_id, event=event, properties=properties, **fields)


def post(client, *messages: dict) -> dict:
    response = client.post(
        "/segment", data=json.dumps(list(messages)), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def rows(app, table) -> list:
    with store_of(app).read() as conn:
        return list(conn.execute(sa.select(table)))


def stored_interactions(app) -> dict[str, tuple]:
    return {
        row.event_id: (row.item_id, row.user_id, row.anonymous_id, row.event_type)
        for row in rows(app, interactions)
    }


def test_a_product_event_becomes_one_interaction_at_the_messages_time(app):
    answer = post(
        app.test_client(),
        track("m-1", {"product_id": "p-1", "colour": "red"}, anonymousId="a-1"),
    )
    assert (answer["accepted"], answer["interactions"], answer["skipped"]) == (1, 1, [])
    (row,) = rows(app, interactions)
    assert (row.event_id, row.message_id, row.item_id) == ("m-1", "m-1", "p-1")
    assert (row.user_id, row.anonymous_id, row.event_type) == ("u-1", "a-1", "Product Viewed")
    assert row.timestamp == EPOCH
    assert row.properties == {"product_id": "p-1", "colour": "red"}


def test_an_event_that_is_not_an_interaction_gives_none_but_its_product_is_catalogued(app):
    answer = post(
        app.test_client(), track("m-1", {"product_id": "p-1", "name": "Chair"}, event="Searched")
    )
    assert (answer["accepted"], answer["interactions"], answer["skipped"]) == (1, 0, [])
    assert rows(app, interactions) == []
    assert [(row.item_id, row.name) for row in rows(app, items)] == [("p-1", "Chair")]


def test_an_interaction_without_a_product_id_is_skipped_saying_which_properties_it_needs(app):
    answer = post(app.test_client(), track("m-1", {"name": "Chair"}), track("m-2", {}))
    assert answer["accepted"] == 0
    assert answer["skipped"] == [
        {"index": 0, "messageId": "m-1", "reason": "properties has no product_id or sku"},
        {"index": 1, "messageId": "m-2", "reason": "properties has no product_id or sku"},
    ]
    assert rows(app, interactions) == []


def test_a_products_array_gives_one_interaction_per_product_and_notes_the_others(app):
    products = [
        {"product_id": "p-1", "price": 3},
        "not an object",
        {"name": "no id"},
        {"sku": "s-4", "quantity": 2},
    ]
    answer = post(
        app.test_client(),
        track(
            "m-1", {"products": products, "order_id": "o-1", "quantity": 1}, event="Order Completed"
        ),
    )
    assert answer["interactions"] == 2
    assert answer["notes"] == [
        {"index": 0, "messageId": "m-1", "reason": "products[1] is not an object"},
        {"index": 0, "messageId": "m-1", "reason": "products[2] has no product_id or sku"},
    ]
    by_id = {row.event_id: row for row in rows(app, interactions)}
    assert set(by_id) == {"m-1#0", "m-1#3"}
    assert by_id["m-1#0"].item_id == "p-1"
    assert by_id["m-1#3"].item_id == "s-4"
    # The event's own properties (without the array), each product's over them.
    assert by_id["m-1#0"].properties == {
        "order_id": "o-1",
        "quantity": 1,
        "product_id": "p-1",
        "price": 3,
    }
    assert by_id["m-1#3"].properties == {"order_id": "o-1", "quantity": 2, "sku": "s-4"}


def test_a_products_array_with_no_usable_product_is_skipped_saying_so(app):
    answer = post(
        app.test_client(),
        track("m-1", {"products": [{"name": "x"}, 7], "product_id": "p-top"}),
        track("m-2", {"products": []}),
    )
    assert answer["skipped"] == [
        {"index": 0, "messageId": "m-1", "reason": "no product in products has product_id or sku"},
        {"index": 1, "messageId": "m-2", "reason": "no product in products has product_id or sku"},
    ]
    assert rows(app, interactions) == []


def test_products_of_an_event_that_is_not_an_interaction_are_still_noted(app):
    answer = post(app.test_client(), track("m-1", {"products": [{"name": "x"}]}, event="Searched"))
    assert answer["accepted"] == 1
    assert answer["skipped"] == []
    assert answer["notes"] == [
        {"index": 0, "messageId": "m-1", "reason": "products[0] has no product_id or sku"}
    ]


def test_which_value_is_taken_as_the_product_id(app):
    client = app.test_client()
    post(
        client,
        track("n-1", {"product_id": 42}),  # a number: its text
        track("n-2", {"product_id": True, "sku": "s-2"}),  # a boolean is no id: the next one
        track("n-3", {"product_id": "  p-3  "}),  # spaces around it do not count
        track("n-4", {"product_id": "   ", "sku": "s-4"}),  # blank: the next one
        track("n-5", {"product_id": None, "sku": "s-5"}),
        track("n-6", {"product_id": ["p"], "sku": "s-6"}),
        track("n-7", {"product_id": "p" * 256}),  # the longest id kept
    )
    assert {event: item for event, (item, *_) in stored_interactions(app).items()} == {
        "n-1": "42",
        "n-2": "s-2",
        "n-3": "p-3",
        "n-4": "s-4",
        "n-5": "s-5",
        "n-6": "s-6",
        "n-7": "p" * 256,
    }


def test_an_unstorable_product_id_is_no_id_at_all(app):
    """Too long, or holding a NUL: the message is skipped, not routed to the next property."""
    answer = post(
        app.test_client(),
        track("m-1", {"product_id": "p" * 257, "sku": "s-1"}),
        track("m-2", {"product_id": "p\x00", "sku": "s-2"}),
    )
    assert [entry["reason"] for entry in answer["skipped"]] == [
        "properties has no product_id or sku",
        "properties has no product_id or sku",
    ]


def test_event_ids_are_the_message_id_hashed_only_when_too_long(app):
    """``messageId`` for one product, ``messageId#i`` for the i-th of an array; beyond 256
    characters (a long messageId with an index), its SHA-1, the same on every redelivery."""
    client = app.test_client()
    exact = "m" * 256
    long_array = "a" * 253  # "#0" to "#9" make 255: kept; "#10" makes 256: kept
    longer_array = "b" * 254  # "#10" makes 257: hashed
    products = [{"product_id": f"p-{i}"} for i in range(11)]
    post(
        client,
        track(exact, {"product_id": "p-1"}),
        track(long_array, {"products": products}),
        track(longer_array, {"products": products}),
    )
    ids = set(stored_interactions(app))
    assert exact in ids
    assert {f"{long_array}#{i}" for i in range(11)} <= ids
    assert {f"{longer_array}#{i}" for i in range(10)} <= ids
    hashed = "sha1:" + hashlib.sha1(f"{longer_array}#10".encode()).hexdigest()
    assert hashed in ids
    assert len(ids) == 23
    # Redelivered: the same ids, nothing new.
    post(client, track(longer_array, {"products": products}))
    assert set(stored_interactions(app)) == ids


def test_catalog_details_keep_what_a_catalog_can_use(app):
    client = app.test_client()
    post(
        client,
        track(
            "c-1",
            {
                "product_id": "p-1",
                "name": "Chair",
                "price": "12.50",
                "category": "Seats",
                "brand": "Acme",
                "url": "https://shop.example/p-1",
                "image_url": "https://shop.example/p-1.jpg",
                "colour": "red",
            },
        ),
        track("c-2", {"product_id": "p-2", "name": 2024, "price": 7, "brand": True}),
        track("c-3", {"product_id": "p-3", "name": "", "price": "cheap", "category": ["a"]}),
        track("c-4", {"product_id": "p-4", "name": "N\x00", "price": "nan", "brand": "B"}),
        track("c-5", {"product_id": "p-5", "price": "inf", "category": {"x": 1}, "url": "u"}),
        track("c-6", {"product_id": "p-6", "price": False, "name": "Six"}),
        track("c-7", {"product_id": "p-7", "price": "-1e999", "brand": "Seven"}),
        track("c-8", {"product_id": "p-8", "price": 2.5}),
    )
    catalog = {
        row.item_id: {
            field: getattr(row, field)
            for field in ("name", "price", "category", "brand", "url", "image_url")
            if getattr(row, field) is not None
        }
        for row in rows(app, items)
    }
    assert catalog == {
        "p-1": {
            "name": "Chair",
            "price": 12.5,
            "category": "Seats",
            "brand": "Acme",
            "url": "https://shop.example/p-1",
            "image_url": "https://shop.example/p-1.jpg",
        },
        "p-2": {"name": "2024", "price": 7.0, "brand": "True"},
        "p-4": {"brand": "B"},
        "p-5": {"url": "u"},
        "p-6": {"name": "Six"},
        "p-7": {"brand": "Seven"},
        "p-8": {"price": 2.5},
    }


def test_identify_stores_traits_under_the_user_or_the_anonymous_id(app):
    client = app.test_client()
    post(
        client,
        message("identify", "i-1", userId="u-1", traits={"plan": "pro"}),
        message("identify", "i-2", anonymousId="a-2", traits={"plan": "free"}),
        message("identify", "i-3", userId="u-3", traits={}),
        message("identify", "i-4", userId="u-4"),
    )
    assert {row.profile_id: row.traits for row in rows(app, profiles)} == {
        "u-1": {"plan": "pro"},
        "a-2": {"plan": "free"},
    }
    assert {row.profile_id: row.traits_at for row in rows(app, profiles)}["u-1"] == EPOCH


def test_identity_links_come_from_any_message_with_both_ids_and_from_alias(app):
    client = app.test_client()
    post(
        client,
        track("l-1", {"product_id": "p-1"}, userId="u-1", anonymousId="a-1"),
        message("page", "l-2", userId="u-2", anonymousId="a-2"),
        message("alias", "l-3", previousId="a-3", userId="u-3"),
        message("alias", "l-4", previousId="u-4", userId="u-4"),  # itself: nothing to link
        message("group", "l-5", userId="u-5", groupId="g-1"),
    )
    assert {(row.anonymous_id, row.user_id) for row in rows(app, identity_links)} == {
        ("a-1", "u-1"),
        ("a-2", "u-2"),
        ("a-3", "u-3"),
    }


def test_a_delete_forgets_the_person_but_links_nobody(app):
    client = app.test_client()
    post(client, track("d-1", {"product_id": "p-1"}, userId="u-1"))
    post(client, track("d-2", {"product_id": "p-1"}, userId="u-2"))
    answer = post(
        client,
        message("delete", "d-3", userId="u-1", anonymousId="a-9", timestamp="2030-01-01T00:00:00Z"),
    )
    assert answer["accepted"] == 1
    assert {user for _, user, *_ in stored_interactions(app).values()} == {"u-2"}
    assert rows(app, identity_links) == []


def test_page_screen_and_group_are_accepted_and_record_nothing(app):
    answer = post(
        app.test_client(),
        message("page", "g-1", userId="u-1", name="Home", properties={"product_id": "p-1"}),
        message("screen", "g-2", userId="u-1", name="Home"),
        message("group", "g-3", userId="u-1", groupId="g", traits={"plan": "x"}),
    )
    assert (answer["accepted"], answer["interactions"]) == (3, 0)
    assert rows(app, interactions) == []
    assert rows(app, profiles) == []
