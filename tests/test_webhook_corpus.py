"""The genuine corpus (messages serialized by segment-analytics-python) delivered the way
both Segment webhook destinations deliver it, with bodies and X-Signature values computed
by Node.js — on SQLite and on PostgreSQL.

What is asserted is what a user of the service would see in the store: the interactions
(event types, item ids, fan-out of a products array, e-commerce v1 names, sku fallback),
the item catalog, the profile traits, the identity links, and the answer's counts.
"""

from __future__ import annotations

import json
from datetime import datetime

import pytest
import sqlalchemy as sa

from tests.conftest import store_of
from tests.segment_wire import (
    ADDED,
    ANON_ID,
    CLICKED,
    IDENTIFY_TRAITS,
    ORDER,
    STORY,
    USER_ID,
    V1_ORDER,
    V1_VIEWED,
    VIEWED,
    WISHLIST,
    actions_headers,
    classic_headers,
    node_deliveries,
    node_sign,
    node_stringify,
)

pytestmark = pytest.mark.requires("node")  # computes the signatures

SECRET = "corpus-shared-secret"
# Actions batches of several need a whole-body credential; with it set, every delivery
# carries it (the destination adds the header).
TOKEN = "corpus-bearer-token"


# Interactions each message of the story makes, in story order.
INTERACTIONS_PER_MESSAGE = [0, 1, 1, 1, 0, 0, 1, 2, 1, 1, 0, 0, 0]


@pytest.fixture(scope="module")
def wire(corpus):
    return node_deliveries(corpus, SECRET)


@pytest.fixture
def app(make_app, database_url):
    return make_app(
        database_url=database_url, segment_shared_secrets=(SECRET,), webhook_bearer_tokens=(TOKEN,)
    )


# --- reading the store back (plain SQL, independent of the code's table objects) -------


def _json(value):
    return json.loads(value) if isinstance(value, str) else value


def dump(app) -> dict:
    """Everything the store holds, as plain data (for before/after comparisons)."""
    with store_of(app).inbox_store.engine.connect() as conn:
        messages = {
            r.message_id: r.type
            for r in conn.execute(sa.text("SELECT message_id, type FROM inbox"))
        }
    with store_of(app).engine.connect() as conn:

        def rows(sql):
            return [dict(r._mapping) for r in conn.execute(sa.text(sql))]

        return {
            "messages": messages,
            "interactions": {
                r["event_id"]: {**r, "properties": _json(r["properties"])}
                for r in rows("SELECT * FROM interactions")
            },
            "items": {r["item_id"]: r for r in rows("SELECT * FROM items")},
            "profiles": {
                r["profile_id"]: _json(r["traits"])
                for r in rows("SELECT profile_id, traits FROM profiles")
            },
            "links": {
                r["anonymous_id"]: r["user_id"]
                for r in rows("SELECT anonymous_id, user_id FROM identity_links")
            },
        }


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def assert_story_stored(app, corpus):
    mid = [m["messageId"] for m in corpus]
    state = dump(app)

    # Every message id is remembered, page/screen/group included (nothing else of them).
    assert set(state["messages"]) == set(mid)

    got = {
        eid: (r["event_type"], r["item_id"], r["user_id"], r["anonymous_id"])
        for eid, r in state["interactions"].items()
    }
    assert got == {
        mid[VIEWED]: ("Product Viewed", "sku-1", None, ANON_ID),
        mid[CLICKED]: ("Product Clicked", "sku-2", None, ANON_ID),
        mid[ADDED]: ("Product Added", "sku-1", None, ANON_ID),
        mid[WISHLIST]: ("Product Added to Wishlist", "sku-3", USER_ID, None),
        # Order Completed fans out: one interaction per product, stable ids.
        mid[ORDER] + "#0": ("Order Completed", "sku-1", USER_ID, None),
        mid[ORDER] + "#1": ("Order Completed", "sku-2", USER_ID, None),
        # E-commerce v1 names, products identified by sku only.
        mid[V1_VIEWED]: ("Viewed Product", "SKU-4", USER_ID, None),
        mid[V1_ORDER] + "#0": ("Completed Order", "SKU-5", USER_ID, None),
    }
    # The message's own time, not the time of arrival.
    for index, event_id in ((VIEWED, mid[VIEWED]), (ORDER, mid[ORDER] + "#1")):
        assert state["interactions"][event_id]["timestamp"] == pytest.approx(
            epoch(corpus[index]["timestamp"]), abs=1e-3
        )
    # A product of a fan-out carries the order's properties and its own, not the array.
    order_line = state["interactions"][mid[ORDER] + "#1"]["properties"]
    assert order_line["order_id"] == "o-1"
    assert order_line["product_id"] == "sku-2"
    assert "products" not in order_line

    items = state["items"]
    assert set(items) - {"SKU-5"} == {"sku-1", "sku-2", "sku-3", "SKU-4"}
    assert {
        k: items["sku-1"][k] for k in ("name", "brand", "category", "price", "url", "image_url")
    } == {
        "name": "Chaise longue",
        "brand": "Möbel & Co",
        "category": "Furniture",
        "price": 199.5,
        "url": "https://shop.example/p/sku-1",
        "image_url": "https://shop.example/i/sku-1.jpg",
    }
    # Order Completed's product 2 has no name: the name from Product Clicked stays.
    assert (items["sku-2"]["name"], items["sku-2"]["price"]) == ("Lampe 💡", 35)
    assert items["sku-3"]["name"] == "Tisch"
    assert items["SKU-4"]["name"] == "Hocker"

    assert state["profiles"] == {USER_ID: IDENTIFY_TRAITS}
    assert state["links"] == {ANON_ID: USER_ID}
    return state


# --- Webhooks (Classic): one POST a message -------------------------------------------


def test_classic_delivery_of_the_corpus_then_redelivery(app, corpus, wire):
    client = app.test_client()
    for index, (_message, delivery) in enumerate(zip(corpus, wire["messages"])):
        response = client.post(
            "/segment",
            data=delivery["body"],
            headers=classic_headers(delivery["signature"], bearer=TOKEN),
        )
        assert response.status_code == 200, (index, response.get_json())
        assert response.get_json() == {
            "received": 1,
            "accepted": 1,
            "duplicates": 0,
            "skipped": [],
            "rejected": [],
            "interactions": INTERACTIONS_PER_MESSAGE[index],
        }, STORY[index]
    stored = assert_story_stored(app, corpus)

    # Segment redelivers (a timeout on its side): everything is a duplicate, nothing moves.
    for delivery in wire["messages"]:
        response = client.post(
            "/segment",
            data=delivery["body"],
            headers=classic_headers(delivery["signature"], bearer=TOKEN),
        )
        assert response.status_code == 200
        assert response.get_json() == {
            "received": 1,
            "accepted": 0,
            "duplicates": 1,
            "skipped": [],
            "rejected": [],
            "interactions": 0,
        }
    assert dump(app) == stored

    # The same messages arriving through the other destination are duplicates as well.
    response = client.post(
        "/segment",
        data=wire["batch_body"],
        headers=actions_headers(wire["batch_signature"], bearer=TOKEN),
    )
    assert response.status_code == 200
    assert (response.get_json()["duplicates"], response.get_json()["accepted"]) == (13, 0)
    assert dump(app) == stored


# --- Webhooks (Actions): one POST, a bare array -----------------------------------------


def test_actions_batch_of_the_corpus_then_redelivery(app, corpus, wire):
    client = app.test_client()
    response = client.post(
        "/segment",
        data=wire["batch_body"],
        headers=actions_headers(wire["batch_signature"], bearer=TOKEN),
    )
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {
        "received": 13,
        "accepted": 13,
        "duplicates": 0,
        "skipped": [],
        "rejected": [],
        "interactions": 8,
    }
    stored = assert_story_stored(app, corpus)

    response = client.post(
        "/segment",
        data=wire["batch_body"],
        headers=actions_headers(wire["batch_signature"], bearer=TOKEN),
    )
    assert response.status_code == 200
    assert response.get_json() == {
        "received": 13,
        "accepted": 0,
        "duplicates": 13,
        "skipped": [],
        "rejected": [],
        "interactions": 0,
    }
    assert dump(app) == stored

    for delivery in wire["messages"]:
        response = client.post(
            "/segment",
            data=delivery["body"],
            headers=classic_headers(delivery["signature"], bearer=TOKEN),
        )
        assert response.get_json()["duplicates"] == 1
    assert dump(app) == stored


def test_tracking_api_batch_shape_is_signed_over_the_raw_body(app, corpus):
    body = node_stringify({"batch": corpus, "sentAt": corpus[-1]["timestamp"]})
    client = app.test_client()
    response = client.post(
        "/segment", data=body, headers=classic_headers(node_sign(body, SECRET), bearer=TOKEN)
    )
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["accepted"] == 13
    assert response.get_json()["interactions"] == 8
    assert_story_stored(app, corpus)

    # The first element's signature (the Actions rule) does not sign this shape.
    first_only = node_sign(node_stringify(corpus[0]), SECRET)
    before = store_of(app).counts()
    response = client.post("/segment", data=body, headers=classic_headers(first_only, bearer=TOKEN))
    assert response.status_code == 401
    assert store_of(app).counts() == before


def test_a_later_identify_merges_into_the_profile(app, corpus, wire):
    client = app.test_client()
    assert (
        client.post(
            "/segment",
            data=wire["batch_body"],
            headers=actions_headers(wire["batch_signature"], bearer=TOKEN),
        ).status_code
        == 200
    )
    later = {
        "type": "identify",
        "messageId": "identify-later",
        "userId": USER_ID,
        "timestamp": "2099-01-01T00:00:00.000Z",
        "traits": {"plan": "enterprise", "language": "Deutsch (Schweiz) 🇨🇭"},
    }
    body = node_stringify(later)
    response = client.post(
        "/segment", data=body, headers=classic_headers(node_sign(body, SECRET), bearer=TOKEN)
    )
    assert response.status_code == 200
    assert dump(app)["profiles"][USER_ID] == {
        **IDENTIFY_TRAITS,
        "plan": "enterprise",
        "language": "Deutsch (Schweiz) 🇨🇭",
    }
