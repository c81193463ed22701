"""Amazon Personalize mode, end to end: Segment deliveries into the webhook's inbox, the
Personalize applier with the real boto3 ``personalize-events`` client, and a local server
speaking that service's rest-json protocol (tests/fake_personalize.py), reached through
AWS_ENDPOINT_URL_PERSONALIZE_EVENTS. boto3 and the code under test are not patched.

What is asserted is what a user notices: the PutEvents/PutUsers/PutItems payloads
Personalize receives, how many calls a delivery costs, that Personalize's trouble never
reaches the webhook's answer, the dead-letter list, /metrics, the log, and the local
store. The test client applies the inbox after each request (tests/conftest.py); tests
that look at what happens before that use ``raw_client``.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections import Counter
from datetime import datetime

import pytest
import sqlalchemy as sa

from tests import deliveries
from tests.conftest import aws_stand_ins, metric, raw_client, store_of
from tests.deliveries import sign
from tests.fake_personalize import FakePersonalizeEvents
from tests.prerequisites import have
from tests.segment_wire import (
    ADDED,
    ANON_ID,
    CLICKED,
    ORDER,
    USER_ID,
    V1_ORDER,
    V1_VIEWED,
    VIEWED,
    WISHLIST,
    CaptureServer,
    actions_headers,
    node_deliveries,
)
from tests.waiting import wait_until
from webhook.appliers.personalize import PersonalizeApplier
from webhook.settings import Settings
from webhook.storage import StoreUnavailable

TRACKING_ID = "tracking-0123"
USERS_ARN = "arn:aws:personalize:us-east-1:123456789012:dataset/shop/USERS"
ITEMS_ARN = "arn:aws:personalize:us-east-1:123456789012:dataset/shop/ITEMS"
SECRET = "personalize-shared-secret"
TOKEN = "personalize-bearer-token"  # an Actions batch of several needs it
SEGMENT_DEADLINE = 5.0  # what Segment gives a webhook


# Mappings as an operator writes them in the environment, parsed by the service's own
# settings reader (so "image_url" becomes the schema field "imageUrl").
CONFIGURED = Settings.from_env(
    {
        "EVENT_TYPE_MAP": "Product Viewed=View,Order Completed=Purchase",
        "EVENT_VALUE_PROPERTY": "price",
        "EVENT_PROPERTIES": "currency,image_url,quantity",
        "USER_TRAITS_MAP": "plan,purchased_products,city",
        "ITEM_PROPERTIES_MAP": "category,price,brand,name",
    }
)
MAPPING = dict(
    event_type_map=CONFIGURED.event_type_map,
    event_value_property=CONFIGURED.event_value_property,
    event_properties=CONFIGURED.event_properties,
    user_traits_map=CONFIGURED.user_traits_map,
    item_properties_map=CONFIGURED.item_properties_map,
)


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def fake():
    with FakePersonalizeEvents(tracking_ids=[TRACKING_ID]) as server:
        yield server


@pytest.fixture
def aws_env(monkeypatch, fake):
    """Where boto3 finds the stand-in and (dummy) credentials; read when the forwarder
    makes its client, on first use."""
    aws_stand_ins(monkeypatch, personalize_events=fake.url)


@pytest.fixture
def personalize_app(make_app, aws_env):
    """make_app in Personalize mode; keyword settings override the defaults here."""

    def factory(**settings):
        values = dict(
            personalize_tracking_id=TRACKING_ID,
            personalize_users_dataset_arn=USERS_ARN,
            personalize_items_dataset_arn=ITEMS_ARN,
            **MAPPING,
        )
        values.update(settings)
        return make_app(**values)

    return factory


LONG_RECOMMENDATION_ID = "rid-" + "x" * 37  # 41 characters: over Personalize's 40
GOOD_RECOMMENDATION_ID = "RID-" + "a" * 36  # 40 characters: the maximum
IMPRESSION_30 = [f"imp-{k}" for k in range(30)]


def _emit_extras(client) -> None:
    """More genuine messages: recommendations attribution, and a profile with list traits."""
    client.track(
        anonymous_id="anon-2",
        event="Product Viewed",
        properties={
            "product_id": "sku-7",
            "price": "12.50",
            "currency": "USD",
            "recommendation_id": LONG_RECOMMENDATION_ID,
            "impression": IMPRESSION_30,
        },
    )
    client.track(
        anonymous_id="anon-2",
        event="Product Clicked",
        properties={
            "product_id": "sku-8",
            "recommendation_id": GOOD_RECOMMENDATION_ID,
            "impression": "sku-8|sku-9|sku-1",
        },
    )  # Personalize's own "a|b" notation
    client.identify(
        user_id="user-2",
        anonymous_id="anon-2",
        traits={
            "plan": "free",
            "purchased_products": ["sku-1", "sku-2", "sku-3"],
            "email": "someone@example.com",
        },
    )


@pytest.fixture(scope="module")
def extras():
    """Messages serialized by segment-analytics-python itself (not hand-written JSON)."""
    from segment.analytics import Client

    with CaptureServer(status=200, json_body={}) as srv:
        client = Client(
            write_key="w", host=srv.url, sync_mode=True, proxies={"http": None, "https": None}
        )
        _emit_extras(client)
        posts = srv.requests
    messages = [m for req in posts for m in req.json()["batch"]]
    assert [m.get("event") or m["type"] for m in messages] == [
        "Product Viewed",
        "Product Clicked",
        "identify",
    ]
    return messages


# --- helpers ----------------------------------------------------------------------------


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def post(app, messages):
    return app.test_client().post("/segment", json=messages)


def track(
    message_id: str,
    *,
    anonymous_id: str | None = None,
    user_id: str | None = None,
    event: str = "Product Viewed",
    product: str = "p-1",
    **properties,
) -> dict:
    """A track message shaped as Segment delivers it, at a fixed time."""
    return deliveries.track(
        event,
        product,
        message_id=message_id,
        user_id=user_id,
        anonymous_id=anonymous_id,
        timestamp="2026-11-27T10:00:00.000Z",
        properties=properties,
    )


def grouped_batch(sizes: dict[tuple[str, str | None], int], prefix: str) -> list[dict]:
    """Messages for several (session, user) pairs, interleaved as real traffic is."""
    left = dict(sizes)
    messages, n = [], 0
    while any(left.values()):
        for (session, user), count in left.items():
            if count:
                anonymous = None if session == user else session
                messages.append(
                    track(
                        f"{prefix}-{n}",
                        anonymous_id=anonymous,
                        user_id=user,
                        product=f"p-{n % 37}",
                        price=(n % 50) + 0.5,
                    )
                )
                left[(session, user)] -= 1
                n += 1
    return messages


def sent_event_ids(fake) -> Counter:
    return Counter(e["eventId"] for e in fake.events())


def throttled(fake) -> bool:
    """The stand-in has answered a ThrottlingException."""
    return any(a.error_code == "ThrottlingException" for a in fake.attempt_log)


def lag(app, applier: str = "personalize") -> int:
    services = app.extensions["segment"]
    return services.inbox.lag([applier])[applier].pending


def dead_letters(app) -> dict[tuple[str, str], str]:
    """(kind, record id) -> reason, for every record on the dead-letter list."""
    return {
        (d.kind, d.record_id): d.reason
        for d in app.extensions["segment"].dead_letters.list(limit=1000)
    }


# --- the genuine corpus -----------------------------------------------------------------


def expected_events(corpus, extras) -> dict[str, dict]:
    """Every event Personalize must receive for corpus + extras, by eventId, exactly."""
    mid = [m["messageId"] for m in corpus]

    def ev(
        index,
        suffix,
        event_type,
        item,
        session,
        user,
        value=None,
        props=None,
        source=corpus,
        **extra,
    ):
        event = {
            "eventId": source[index]["messageId"] + suffix,
            "eventType": event_type,
            "itemId": item,
            "sentAt": epoch(source[index]["timestamp"]),
            "trackingId": TRACKING_ID,
            "sessionId": session,
            "userId": user,
        }
        if value is not None:
            event["eventValue"] = value
        if props is not None:
            event["properties"] = props
        event.update(extra)
        return event

    events = [
        # Anonymous browsing: the session is the anonymousId, no userId.
        ev(
            VIEWED,
            "",
            "View",
            "sku-1",
            ANON_ID,
            None,
            199.5,
            {"imageUrl": "https://shop.example/i/sku-1.jpg"},
        ),
        ev(CLICKED, "", "Product Clicked", "sku-2", ANON_ID, None, 35.0),
        ev(ADDED, "", "Product Added", "sku-1", ANON_ID, None, 199.5, {"quantity": 1}),
        # After identify: the userId is set (analytics-python sends no anonymousId here).
        ev(WISHLIST, "", "Product Added to Wishlist", "sku-3", USER_ID, USER_ID),
        # Order Completed fans out: one event a product, ids messageId#i.
        ev(
            ORDER,
            "#0",
            "Purchase",
            "sku-1",
            USER_ID,
            USER_ID,
            199.5,
            {"currency": "EUR", "quantity": 1},
        ),
        ev(
            ORDER,
            "#1",
            "Purchase",
            "sku-2",
            USER_ID,
            USER_ID,
            35.0,
            {"currency": "EUR", "quantity": 1},
        ),
        ev(V1_VIEWED, "", "Viewed Product", "SKU-4", USER_ID, USER_ID),
        ev(V1_ORDER, "#0", "Completed Order", "SKU-5", USER_ID, USER_ID),
    ]
    if extras:
        events += [
            # Attribution: a 41-character recommendationId is left out, a 30-id impression
            # trimmed to Personalize's 25; a string price still gives a float eventValue.
            ev(
                0,
                "",
                "View",
                "sku-7",
                "anon-2",
                None,
                12.5,
                {"currency": "USD"},
                source=extras,
                impression=IMPRESSION_30[:25],
            ),
            ev(
                1,
                "",
                "Product Clicked",
                "sku-8",
                "anon-2",
                None,
                None,
                None,
                source=extras,
                recommendationId=GOOD_RECOMMENDATION_ID,
                impression=["sku-8", "sku-9", "sku-1"],
            ),
        ]
    assert len({e["eventId"] for e in events}) == len(events) == 8 + 2 * bool(extras)
    assert mid[VIEWED] in {e["eventId"] for e in events}
    return {e["eventId"]: e for e in events}


def deliver_story(app, corpus, extras):
    """The corpus and the extras as one signed Webhooks (Actions) batch, serialized and
    signed by Node.js as Segment's JavaScript does (the signature covers the first
    message). Without Node.js the test fails under CI (tests/prerequisites.py); on a
    developer's machine the batch is serialized by Python's json and signed by the
    tests' Python signer instead."""
    messages = corpus + extras
    if have("node"):
        wire = node_deliveries(messages, SECRET)
        body, signature = wire["batch_body"], wire["batch_signature"]
    else:

        def compact(value) -> bytes:
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

        body, signature = compact(messages), sign(compact(messages[0]), SECRET)
    return app.test_client().post(
        "/segment", data=body, headers=actions_headers(signature, bearer=TOKEN)
    )


def test_corpus_becomes_exactly_the_expected_putevents(personalize_app, fake, corpus, extras):
    app = personalize_app(segment_shared_secrets=(SECRET,), webhook_bearer_tokens=(TOKEN,))
    trimmed_before = metric(app, "personalize_records_total", kind="event", outcome="trimmed")

    response = deliver_story(app, corpus, extras)

    assert response.status_code == 200, response.get_json()
    expected = expected_events(corpus, extras)
    events = fake.events()
    assert len(events) == len(expected), [e["eventId"] for e in events]
    for event in events:
        want = dict(expected[event["eventId"]])
        got = dict(event)
        # properties is a JSON *string* (the stand-in also checks it parses to an object).
        if "properties" in want:
            assert isinstance(got["properties"], str)
            assert json.loads(got.pop("properties")) == want.pop("properties")
        if "eventValue" in want:
            assert isinstance(got["eventValue"], float)
        assert got.pop("sentAt") == pytest.approx(want.pop("sentAt"), abs=1e-3)
        assert got == want
    # Events of one (session, user) go out together; no call carries a userId it has not.
    for call in fake.calls_for("PutEvents"):
        body = call.body
        assert 1 <= len(body["eventList"]) <= 10
        assert {expected[e["eventId"]]["sessionId"] for e in body["eventList"]} == {
            body["sessionId"]
        }
        if body["sessionId"] in (ANON_ID, "anon-2"):
            assert "userId" not in body
    assert len(fake.calls_for("PutEvents")) == 3  # anon-1, user-1, anon-2

    summary = response.get_json()
    assert summary["accepted"] == 16 and summary["interactions"] == 10
    assert "personalize" not in summary  # sent after the answer, from the inbox
    assert dead_letters(app) == {}
    # The two trims of one event (recommendationId over 40, impression over 25) counted.
    assert (
        metric(app, "personalize_records_total", kind="event", outcome="trimmed")
        == trimmed_before + 2
    )


def test_order_completed_fans_out_into_one_event_a_product(personalize_app, fake, corpus):
    app = personalize_app()
    order = corpus[ORDER]
    response = post(app, [order])
    assert response.status_code == 200
    events = fake.events()
    assert [(e["eventId"], e["itemId"], e["eventType"], e["eventValue"]) for e in events] == [
        (order["messageId"] + "#0", "sku-1", "Purchase", 199.5),
        (order["messageId"] + "#1", "sku-2", "Purchase", 35.0),
    ]
    assert [e["sentAt"] for e in events] == [pytest.approx(epoch(order["timestamp"]), abs=1e-3)] * 2
    assert len(fake.calls_for("PutEvents")) == 1
    # The products also describe the catalog.
    assert sorted(i["itemId"] for i in fake.items()) == ["sku-1", "sku-2"]


def test_identify_becomes_putusers_with_list_traits_joined(personalize_app, fake, corpus, extras):
    app = personalize_app()
    response = post(app, corpus + extras)
    assert response.status_code == 200
    users = {u["userId"]: u for u in fake.users()}
    assert set(users) == {USER_ID, "user-2"}
    for user in users.values():
        assert user["datasetArn"] == USERS_ARN
        assert isinstance(user["properties"], str)
    assert json.loads(users[USER_ID]["properties"]) == {
        "plan": "pro",
        "purchasedProducts": "sku-9",
        "city": "Zürich",
    }
    # A list trait becomes Personalize's categorical "a|b|c"; unmapped traits (email) stay out.
    assert json.loads(users["user-2"]["properties"]) == {
        "plan": "free",
        "purchasedProducts": "sku-1|sku-2|sku-3",
    }


def test_no_users_or_items_calls_without_their_dataset_arns(personalize_app, fake, corpus):
    app = personalize_app(personalize_users_dataset_arn="", personalize_items_dataset_arn="")
    assert post(app, corpus).status_code == 200
    assert {c.operation for c in fake.calls} == {"PutEvents"}
    assert len(fake.events()) == 8


def test_product_properties_become_putitems(personalize_app, fake, corpus):
    app = personalize_app()
    assert post(app, corpus).status_code == 200
    items = {i["itemId"]: i for i in fake.items()}
    assert {i["datasetArn"] for i in items.values()} == {ITEMS_ARN}
    props = {
        k: json.loads(v["properties"]) if "properties" in v else None for k, v in items.items()
    }
    assert props == {
        # Everything the delivery said about sku-1 (Product Viewed, Added, the order line).
        "sku-1": {
            "category": "Furniture",
            "price": 199.5,
            "brand": "Möbel & Co",
            "name": "Chaise longue",
        },
        "sku-2": {"price": 35, "name": "Lampe 💡"},
        "sku-3": {"name": "Tisch"},
        "SKU-4": {"name": "Hocker"},
    }
    assert all(1 <= len(c.body["items"]) <= 10 for c in fake.calls_for("PutItems"))

    # A later delivery changing a price updates that item.
    response = post(
        app,
        [track("price-change", anonymous_id="a-9", product="sku-2", price=29.0, name="Lampe 💡")],
    )
    assert response.status_code == 200
    last = fake.calls_for("PutItems")[-1].body["items"]
    assert [(i["itemId"], json.loads(i["properties"])) for i in last] == [
        ("sku-2", {"price": 29.0, "name": "Lampe 💡"})
    ]


def test_many_users_and_items_go_out_ten_a_call(personalize_app, fake):
    app = personalize_app()
    messages = [
        {
            "type": "identify",
            "userId": f"u-{n}",
            "messageId": f"id-{n}",
            "timestamp": "2026-11-27T10:00:00.000Z",
            "traits": {"plan": "pro", "purchased_products": [f"s-{n}", f"s-{n + 1}"]},
        }
        for n in range(23)
    ]
    messages += [
        track(f"v-{n}", anonymous_id="a-1", product=f"item-{n}", name=f"Item {n}")
        for n in range(25)
    ]
    response = post(app, messages)
    assert response.status_code == 200
    assert sorted(len(c.body["users"]) for c in fake.calls_for("PutUsers")) == [3, 10, 10]
    assert sorted(len(c.body["items"]) for c in fake.calls_for("PutItems")) == [5, 10, 10]
    assert sorted(u["userId"] for u in fake.users()) == sorted(f"u-{n}" for n in range(23))
    assert json.loads(fake.users()[0]["properties"])["purchasedProducts"].count("|") == 1
    assert len(fake.items()) == 25


def test_redelivery_of_a_forwarded_delivery_sends_nothing_again(personalize_app, fake, corpus):
    app = personalize_app()
    assert post(app, corpus).status_code == 200
    calls = len(fake.calls)
    again = post(app, corpus)
    assert again.status_code == 200
    assert again.get_json()["duplicates"] == len(corpus)
    assert len(fake.calls) == calls


# --- the local store is still kept ------------------------------------------------------


def test_local_store_keeps_catalog_and_profiles_in_personalize_mode(
    personalize_app, fake, corpus, database_url
):
    app = personalize_app(database_url=database_url)
    assert post(app, corpus).status_code == 200
    assert len(fake.events()) == 8
    with store_of(app).engine.connect() as conn:
        items = {r.item_id: r for r in conn.execute(sa.text("SELECT * FROM items"))}
        profiles = {
            r.profile_id: r.traits
            for r in conn.execute(sa.text("SELECT profile_id, traits FROM profiles"))
        }
        interactions = {
            r.event_id for r in conn.execute(sa.text("SELECT event_id FROM interactions"))
        }
    assert {"sku-1", "sku-2", "sku-3", "SKU-4"} <= set(items)
    assert (items["sku-1"].name, items["sku-1"].price) == ("Chaise longue", 199.5)
    traits = profiles[USER_ID]
    traits = json.loads(traits) if isinstance(traits, str) else traits
    assert traits["plan"] == "pro" and traits["purchased_products"] == ["sku-9"]
    assert interactions == {e["eventId"] for e in fake.events()}
    assert store_of(app).counts()["inbox"] == len(corpus)


# --- big batches ------------------------------------------------------------------------


@pytest.mark.slow
def test_4000_event_actions_batch_is_sent_in_calls_of_ten(personalize_app, fake):
    app = personalize_app()
    sizes = {
        ("anon-a", None): 1234,
        ("anon-b", "user-b"): 997,
        ("user-c", "user-c"): 805,
        ("anon-d", None): 9,
        ("anon-e", "user-e"): 11,
        ("anon-f", None): 944,
    }
    messages = grouped_batch(sizes, "big")
    assert len(messages) == 4000
    expected_calls = sum(math.ceil(n / 10) for n in sizes.values())

    response = post(app, messages)
    assert response.status_code == 200, response.get_json()
    calls = fake.calls_for("PutEvents")
    # About 403 calls, not 4000: the applier takes the inbox in batches of
    # PersonalizeApplier.batch_size, and a session's last call of a batch may not be full.
    batches = math.ceil(len(messages) / PersonalizeApplier.batch_size)
    assert expected_calls <= len(calls) <= expected_calls + len(sizes) * (batches - 1)
    assert all(1 <= len(c.body["eventList"]) <= 10 for c in calls)
    per_group = Counter((c.body["sessionId"], c.body.get("userId")) for c in calls)
    for group, n in sizes.items():
        assert math.ceil(n / 10) <= per_group[group] <= math.ceil(n / 10) + batches - 1
    ids = sent_event_ids(fake)
    assert set(ids) == {m["messageId"] for m in messages}
    assert set(ids.values()) == {1}
    # Each session's events arrive in the order Segment sent them.
    sent_order = [e["eventId"] for e in fake.events()]
    for session in sizes:
        mine = [
            m["messageId"]
            for m in messages
            if (m.get("anonymousId") or m["userId"], m.get("userId")) == session
        ]
        assert [i for i in sent_order if i in set(mine)] == mine


def warm_up(app, fake) -> None:
    """One event sent, then the stand-in's record cleared: the calls are made by a child
    process started at the first call, which a test of timing must not count."""
    assert post(app, grouped_batch({("anon-warm", None): 1}, "warm")).status_code == 200
    fake.wait_for_calls(1)
    fake.reset()


def test_calls_run_concurrently_within_the_configured_bound(personalize_app, fake):
    app = personalize_app(personalize_max_concurrency=4, personalize_items_dataset_arn="")
    warm_up(app, fake)
    fake.delay(0.2)
    messages = grouped_batch({(f"anon-{k}", None): 10 for k in range(12)}, "conc")
    started = time.perf_counter()
    response = post(app, messages)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200
    assert len(fake.calls_for("PutEvents")) == 12
    # 12 calls of 0.2 s: one at a time would take 2.4 s; 4 at a time, about 0.6 s.
    assert 0.55 < elapsed < 1.6, elapsed


def wait_claimed(services, timeout: float = 10.0) -> None:
    """Until the Personalize applier holds a batch (its calls are then on their way)."""
    wait_until(
        lambda: services.inbox.lag(["personalize"])["personalize"].owner is not None,
        timeout,
        "the Personalize applier claimed a batch",
        interval=0.01,
    )


def test_a_batch_applied_again_after_a_failed_commit_sends_nothing_twice(
    personalize_app, fake, tmp_path
):
    """The batch's calls went out, then its commit failed (another writer held the
    database past a writer's wait): the batch is applied again, and what had reached
    Personalize is not sent a second time."""
    app = personalize_app(personalize_items_dataset_arn="", personalize_users_dataset_arn="")
    services = app.extensions["segment"]
    runner = services.runners["personalize"]
    warm_up(app, fake)
    messages = grouped_batch({(f"anon-{k}", None): 10 for k in range(3)}, "busy")
    assert raw_client(app).post("/segment", json=messages).status_code == 200
    fake.delay(0.5)  # the calls are in flight for half a second after the claim
    failure: list[BaseException] = []

    def apply_once():
        try:
            runner.run_once()
        except BaseException as exc:  # noqa: BLE001 - asserted below
            failure.append(exc)

    applying = threading.Thread(target=apply_once)
    applying.start()
    wait_claimed(services)
    blocker = sqlite3.connect(str(tmp_path / "segment.db"), isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        applying.join(30)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert not applying.is_alive()
    assert [type(e) for e in failure] == [StoreUnavailable]
    assert len(sent_event_ids(fake)) == len(messages)  # sent, but not committed
    assert lag(app) == len(messages)

    fake.delay(0)
    assert runner.drain(30)
    ids = sent_event_ids(fake)
    assert set(ids) == {m["messageId"] for m in messages}
    assert set(ids.values()) == {1}, "an event was sent twice"
    assert lag(app) == 0


def test_a_shutdown_mid_batch_leaves_the_batch_for_later_without_an_error(
    personalize_app, fake, caplog
):
    app = personalize_app(personalize_items_dataset_arn="", personalize_users_dataset_arn="")
    services = app.extensions["segment"]
    warm_up(app, fake)
    fake.throttle_for(30)  # the batch's calls are retried, with pauses between them
    messages = grouped_batch({(f"anon-{k}", None): 10 for k in range(3)}, "stop")
    assert raw_client(app).post("/segment", json=messages).status_code == 200
    services.start_worker()  # as the worker process does
    wait_claimed(services)
    wait_until(lambda: throttled(fake), 10, "the applier tried", interval=0.02)
    with caplog.at_level(logging.INFO, logger="webhook"):
        services.stop()  # the worker told to stop, calls in flight
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("shutting down mid-batch" in r.getMessage() for r in caplog.records)
    assert lag(app) == len(messages)  # applied after the restart


# --- throttling, server errors, timeouts: absorbed, never passed on to Segment ---------


@pytest.mark.parametrize("status", [400, 429])
def test_throttling_then_recovery_delivers_every_event_once(personalize_app, fake, status):
    """AWS throttles with 400 ThrottlingException or with 429: both are retried."""
    app = personalize_app()
    messages = grouped_batch(
        {("anon-1", None): 25, ("anon-2", "u-2"): 17, ("u-3", "u-3"): 8}, "thr"
    )
    throttled_before = metric(
        app, "personalize_calls_total", operation="put_events", outcome="throttled"
    )
    warm_up(app, fake)
    fake.throttle_for(1.0, status=status)
    response = post(app, messages)

    assert response.status_code == 200, response.get_json()
    ids = sent_event_ids(fake)
    assert set(ids) == {m["messageId"] for m in messages}
    assert set(ids.values()) == {1}, "an event was delivered twice"
    assert {(a.status, a.error_code) for a in fake.attempt_log if a.status != 200} == {
        (status, "ThrottlingException")
    }
    assert dead_letters(app) == {}  # throttled is never refused for good
    assert (
        metric(app, "personalize_calls_total", operation="put_events", outcome="throttled")
        > throttled_before
    )
    assert store_of(app).counts()["interactions"] == len(messages) + 1  # and the warm-up's


def test_server_errors_then_recovery(personalize_app, fake, corpus):
    app = personalize_app()
    errors_before = metric(app, "personalize_calls_total", operation="put_events", outcome="error")
    ok_before = metric(app, "personalize_calls_total", operation="put_events", outcome="ok")
    fake.fail_next(2, status=500)
    response = post(app, corpus)
    assert response.status_code == 200, response.get_json()
    assert sorted(sent_event_ids(fake).elements()) == sorted(expected_ids_of_corpus(corpus))
    five_xx = [a for a in fake.attempt_log if a.status >= 500]
    assert len(five_xx) == 2
    errors = metric(app, "personalize_calls_total", operation="put_events", outcome="error")
    errors += metric(app, "personalize_calls_total", operation="put_items", outcome="error")
    errors += metric(app, "personalize_calls_total", operation="put_users", outcome="error")
    assert errors - errors_before == 2
    # Two PutEvents calls (anon-1, user-1) succeeded in the end.
    assert (
        metric(app, "personalize_calls_total", operation="put_events", outcome="ok")
        == ok_before + 2
    )


def test_503_from_the_service_is_retried(personalize_app, fake):
    app = personalize_app()
    fake.fail_next(3, status=503)
    messages = grouped_batch({("anon-1", None): 12}, "svc")
    response = post(app, messages)
    assert response.status_code == 200
    assert set(sent_event_ids(fake)) == {m["messageId"] for m in messages}


def expected_ids_of_corpus(corpus) -> list[str]:
    mid = [m["messageId"] for m in corpus]
    return [
        mid[VIEWED],
        mid[CLICKED],
        mid[ADDED],
        mid[WISHLIST],
        mid[ORDER] + "#0",
        mid[ORDER] + "#1",
        mid[V1_VIEWED],
        mid[V1_ORDER] + "#0",
    ]


def test_a_call_slower_than_the_call_timeout_is_retried(personalize_app, fake, corpus):
    app = personalize_app(
        personalize_call_timeout_seconds=0.3,
        personalize_users_dataset_arn="",
        personalize_items_dataset_arn="",
    )
    timeouts_before = metric(
        app, "personalize_calls_total", operation="put_events", outcome="timeout"
    )
    fake.delay(1.0, n=1)  # the first request hangs past the client's timeout
    response = post(app, corpus)
    assert response.status_code == 200, response.get_json()
    assert (
        metric(app, "personalize_calls_total", operation="put_events", outcome="timeout")
        == timeouts_before + 1
    )
    # The stand-in still takes the timed-out call (like a real service whose answer is
    # lost): its events then arrive twice, under the same eventIds, never under others.
    expected = set(expected_ids_of_corpus(corpus))
    wait_until(
        lambda: sum(sent_event_ids(fake).values()) > len(expected),
        5,
        "the timed-out call's events arrived a second time",
    )
    ids = sent_event_ids(fake)
    assert set(ids) == expected
    assert max(ids.values()) == 2


def test_throttled_for_long_the_delivery_is_answered_at_once_and_sent_later(
    personalize_app, fake, database_url
):
    app = personalize_app(database_url=database_url)
    client = raw_client(app)
    messages = grouped_batch({("anon-1", None): 15, ("anon-2", "u-2"): 6}, "late")
    fake.throttle_for(600)
    started = time.perf_counter()
    response = client.post("/segment", json=messages)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["accepted"] == len(messages)
    assert elapsed < 1.0  # nothing of Personalize's on the request path
    services = app.extensions["segment"]
    assert services.drain(["local"])  # the local store does not wait for Personalize
    assert store_of(app).counts()["interactions"] == len(messages)
    assert lag(app) == len(messages)

    # The applier keeps trying while throttled, never dropping anything.
    applier = threading.Thread(target=services.drain, args=(["personalize"], 30.0))
    applier.start()
    try:
        wait_until(lambda: throttled(fake), 5, "the applier tried", interval=0.02)
        assert fake.events() == [] and lag(app) == len(messages)
        fake.reset()  # Personalize recovers
        applier.join(30)
    finally:
        if applier.is_alive():  # a failed assertion above: let the thread end
            fake.reset()
            applier.join(30)
    assert lag(app) == 0
    ids = sent_event_ids(fake)
    assert set(ids) == {m["messageId"] for m in messages} and set(ids.values()) == {1}
    again = post(app, messages)  # Segment's retry of a 200 would be a duplicate, sent never
    assert again.get_json()["duplicates"] == len(messages)
    assert sum(sent_event_ids(fake).values()) == len(messages)


@pytest.mark.parametrize("trouble", ["throttled", "hanging", "unreachable"])
def test_personalize_trouble_never_delays_or_refuses_a_delivery(personalize_app, fake, trouble):
    app = personalize_app()
    client = raw_client(app)
    messages = grouped_batch({(f"anon-{k}", None): 30 for k in range(10)}, trouble)
    if trouble == "throttled":
        fake.throttle_for(60)
    elif trouble == "hanging":
        fake.delay(30)  # the service accepts connections and never answers in time
    else:
        fake.stop()
    services = app.extensions["segment"]
    services.start_worker()  # as the worker process: the appliers run meanwhile
    try:
        for part in range(3):
            started = time.perf_counter()
            response = client.post("/segment", json=messages[part * 100 : (part + 1) * 100])
            assert response.status_code == 200, response.get_json()
            assert time.perf_counter() - started < 1.0
        assert lag(app) == len(messages)
        assert fake.events() == []
    finally:
        services.stop()


def test_an_unknown_tracking_id_holds_the_events_until_the_tracker_exists(
    personalize_app, fake, caplog
):
    """PERSONALIZE_TRACKING_ID names no event tracker (a typo, or one not ACTIVE yet), so
    Personalize answers ResourceNotFoundException. Nothing is dropped or dead-lettered:
    the events wait in the inbox while the operator is told (an error naming the tracking
    id as a suspect, the calls counted as fatal, the lag), and once the tracker exists
    they all go out, once each, under that tracking id."""
    app = personalize_app(
        personalize_tracking_id="tracking-not-yet",
        personalize_users_dataset_arn="",
        personalize_items_dataset_arn="",
    )
    assert "tracking-not-yet" not in fake.tracking_ids
    messages = grouped_batch({("anon-1", None): 12, ("anon-2", "u-2"): 5}, "trk")
    fatal_before = metric(app, "personalize_calls_total", operation="put_events", outcome="fatal")
    assert raw_client(app).post("/segment", json=messages).status_code == 200
    services = app.extensions["segment"]
    assert services.drain(["local"])
    assert lag(app) == len(messages)

    def not_found() -> list:
        return [a for a in fake.attempt_log if a.error_code == "ResourceNotFoundException"]

    with caplog.at_level(logging.ERROR, logger="webhook.personalize"):
        applier = threading.Thread(target=services.drain, args=(["personalize"], 60.0))
        applier.start()
        try:
            wait_until(  # tried, refused, and tried again
                lambda: len(not_found()) >= 3,
                10,
                "three ResourceNotFoundException answers",
                interval=0.02,
                detail=lambda: fake.attempt_log,
            )
            assert fake.events() == [] and lag(app) == len(messages)
            assert {a.status for a in not_found()} == {404}
            fake.add_tracking_ids(["tracking-not-yet"])  # the tracker is ACTIVE now
        finally:
            applier.join(60)
    assert not applier.is_alive(), "the events never went out"
    assert lag(app) == 0
    ids = sent_event_ids(fake)
    assert set(ids) == {m["messageId"] for m in messages} and set(ids.values()) == {1}
    assert {e["trackingId"] for e in fake.events()} == {"tracking-not-yet"}
    assert dead_letters(app) == {}
    assert (
        metric(app, "personalize_calls_total", operation="put_events", outcome="fatal")
        >= fatal_before + 3
    )
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("ResourceNotFoundException" in e and "tracking id" in e for e in errors), errors


# --- permanent errors -------------------------------------------------------------------


def test_invalid_input_for_some_events_drops_only_those(personalize_app, fake, caplog):
    app = personalize_app()
    messages = grouped_batch({("anon-1", None): 7, ("anon-2", "u-2"): 5}, "inv")
    bad = {messages[0]["messageId"], messages[5]["messageId"]}  # anon-1's 1st, anon-2's 3rd
    fake.reject_event_ids(bad)
    dropped_before = metric(app, "personalize_records_total", kind="event", outcome="dropped")
    invalid_before = metric(
        app, "personalize_calls_total", operation="put_events", outcome="invalid"
    )

    with caplog.at_level(logging.WARNING, logger="webhook.personalize"):
        response = post(app, messages)

    assert response.status_code == 200, response.get_json()
    summary = response.get_json()
    letters = dead_letters(app)
    assert set(letters) == {("event", i) for i in bad}
    assert all("InvalidInputException" in reason for reason in letters.values())
    # The rest of the delivery is delivered, and stored locally.
    assert set(sent_event_ids(fake)) == {m["messageId"] for m in messages} - bad
    assert summary["accepted"] == len(messages)
    assert store_of(app).counts()["interactions"] == len(messages)
    assert metric(
        app, "personalize_records_total", kind="event", outcome="dropped"
    ) == dropped_before + len(bad)
    assert (
        metric(app, "personalize_calls_total", operation="put_events", outcome="invalid")
        > invalid_before
    )
    # Permanent: never retried as such. A refused call of n records is split in halves to
    # find the bad ones, so a bad record costs at most 1 + ceil(log2(10)) = 5 refusals.
    refused = [a for a in fake.attempt_log if a.error_code == "InvalidInputException"]
    assert len(refused) <= 5 * len(bad)
    assert any("dead-letter" in r.getMessage() for r in caplog.records)
    assert lag(app) == 0  # refused records do not hold the applier back


def test_dead_letters_past_the_cap_drop_the_oldest_and_say_so(personalize_app, fake, caplog):
    """DEAD_LETTERS_MAX: the list never holds more; the oldest letters go first, counted
    in dead_letters_dropped_total and logged (without the letters' contents)."""
    app = personalize_app(dead_letters_max=3)
    services = app.extensions["segment"]
    dropped_before = metric(app, "dead_letters_dropped_total")
    one_by_one = [track(f"cap-{n}", anonymous_id="anon-cap", product=f"p-{n}") for n in range(5)]
    batch = [track(f"cap-b{n}", anonymous_id="anon-cap", product=f"p-{n}") for n in range(4)]
    fake.reject_event_ids(m["messageId"] for m in one_by_one + batch)

    with caplog.at_level(logging.ERROR, logger="webhook.deadletters"):
        for n, message in enumerate(one_by_one):  # one refusal a delivery, oldest first
            assert post(app, [message]).status_code == 200
            assert services.dead_letters.count() == min(n + 1, 3)
        assert [d.record_id for d in services.dead_letters.list()] == ["cap-2", "cap-3", "cap-4"]
        assert metric(app, "dead_letters_dropped_total") == dropped_before + 2
        full = [r.getMessage() for r in caplog.records if "the list is full" in r.getMessage()]
        assert (
            full
            == ["dead letters: the list is full (DEAD_LETTERS_MAX=3); the 1 oldest were dropped"]
            * 2
        )

        assert post(app, batch).status_code == 200  # four refusals in one delivery
    kept = [d.record_id for d in services.dead_letters.list()]
    assert len(kept) == 3 and set(kept) <= {m["messageId"] for m in batch}
    assert metric(app, "dead_letters_dropped_total") == dropped_before + 2 + 4
    assert not [r for r in caplog.records if "anon-cap" in str(r.__dict__)]
    assert fake.events() == []


def test_invalid_input_for_an_item_is_reported_and_the_rest_goes_through(
    personalize_app, fake, corpus
):
    app = personalize_app()
    fake.reject_items({"sku-3"})
    response = post(app, corpus)
    assert response.status_code == 200, response.get_json()
    assert set(dead_letters(app)) == {("item", "sku-3")}
    assert "sku-3" not in {i["itemId"] for i in fake.items()}
    assert {"sku-1", "sku-2", "SKU-4"} <= {i["itemId"] for i in fake.items()}
    assert len(fake.events()) == 8


def test_event_properties_over_1024_chars_are_trimmed_and_reported(personalize_app, fake, caplog):
    app = personalize_app(
        event_properties=(("currency", "currency"), ("description", "description"))
    )
    message = track("long-props", anonymous_id="a-1", currency="EUR", description="Ä" * 1100)
    with caplog.at_level(logging.WARNING, logger="webhook.personalize"):
        response = post(app, [message])
    assert response.status_code == 200
    (event,) = fake.events()
    assert json.loads(event["properties"]) == {"currency": "EUR"}
    logged = [r for r in caplog.records if r.name == "webhook.personalize"]
    reasons = [reason for r in logged for reason in getattr(r, "trimmed", [])]
    assert any("description" in reason and "1024" in reason for reason in reasons)
    assert "Ä" not in json.dumps(reasons)  # the reason names the field, not its value


# --- the other mode ---------------------------------------------------------------------


def test_embedded_mode_calls_nothing_even_with_aws_configured(make_app, aws_env, fake, corpus):
    app = make_app()
    assert post(app, corpus).status_code == 200
    assert fake.attempts == 0
    assert "personalize" not in post(app, [track("emb-1", anonymous_id="a")]).get_json()
