"""Activation: recommendations written back to the profile as a trait.

The Tracking API stand-in (``tests/fake_segment_apis.FakeTrackingAPI``) is a real HTTP
server; the service reaches it with segment-analytics-python through SEGMENT_API_HOST and
SEGMENT_WRITE_KEY. What is asserted is what Segment receives (identify calls, their
traits, auth, gzip) and, without a write key, what lands in the local profile store.

Activation runs off the request path; ``settle(app)`` waits until the service's background
work is done (its activation queue drained, the Segment client flushed), so a test can
also assert that *nothing* was sent.
"""

from __future__ import annotations

import json
import logging
import time

import pytest
import sqlalchemy as sa

from tests.conftest import raw_client, store_of
from tests.deliveries import deliver, order_completed, product_viewed
from tests.fake_segment_apis import MAX_EVENT_BYTES, FakeTrackingAPI
from tests.test_recommendations import (  # noqa: F401  (fixtures)
    get,
    ids,
    items,
    personalize_app,
    profile_api,
    runtime,
)
from tests.waiting import wait_until
from webhook.storage.schema import activations, profiles

WRITE_KEY = "wk-shop-0123"


@pytest.fixture
def tracking():
    with FakeTrackingAPI(write_key=WRITE_KEY) as fake:
        yield fake


@pytest.fixture(autouse=True)
def segment_knows_everyone(profile_api):
    """The visitors of these tests have a profile at Segment (a Profile API 404 is never
    written back: the test of it says so)."""
    profile_api.know_everyone({})


@pytest.fixture
def activating_app(personalize_app, tracking):
    def factory(**settings):
        values = dict(
            segment_write_key=WRITE_KEY,
            segment_api_host=tracking.url,
            activation_interval_seconds=3600,
        )
        values.update(settings)
        return personalize_app(**values)

    return factory


def settle(app, timeout: float = 10.0) -> None:
    """Wait for the service's background activation work, then for the Segment client's
    queue to be sent (its flush returns once each queued call's request has been
    answered, so the stand-in has recorded it)."""
    services = app.extensions["segment"]
    assert services.activation.wait_idle(timeout)
    flush = getattr(services.activation.publisher, "flush", None)
    if flush is not None:
        flush()


def published_lists(tracking, user_id: str) -> list[list[str]]:
    return [m["traits"].get("recommended_products") for m in tracking.identifies(user_id)]


# --- what Segment receives ----------------------------------------------------------------


def test_identify_carries_the_recommended_item_ids_in_order(
    activating_app, runtime, tracking, database_url
):
    app = activating_app(database_url=database_url)
    runtime.set_ranking("u-1", ["sku-3", "sku-1", "sku-2", "sku-7"])
    body = get(app.test_client(), "userId=u-1&numResults=3")
    assert ids(body) == ["sku-3", "sku-1", "sku-2"]

    (message,) = tracking.wait_for_identifies(1, "u-1")
    assert message["type"] == "identify"
    assert message["userId"] == "u-1"
    assert message["traits"] == {"recommended_products": ["sku-3", "sku-1", "sku-2"]}
    (batch,) = tracking.batches
    assert batch.write_key == WRITE_KEY and batch.gzipped
    assert tracking.refused == 0


def test_the_request_does_not_wait_for_the_tracking_api(activating_app, tracking):
    app = activating_app()
    client = app.test_client()
    get(client, "userId=warm-up&numResults=1")
    tracking.delay(2.0)
    started = time.perf_counter()
    get(client, "userId=u-1&numResults=3")
    assert time.perf_counter() - started < 1.0
    assert published_lists(tracking, "u-1") == []
    tracking.wait_for_identifies(1, "u-1", timeout=10)
    assert published_lists(tracking, "u-1") == [items(1, 3)]


def test_the_trait_name_is_configurable(activating_app, tracking):
    app = activating_app(activation_trait="shop_recs")
    get(app.test_client(), "userId=u-1&numResults=2")
    (message,) = tracking.wait_for_identifies(1, "u-1")
    assert message["traits"] == {"shop_recs": ["item-1", "item-2"]}


# --- de-duplication -----------------------------------------------------------------------


def test_the_same_list_twice_is_published_once(activating_app, tracking, database_url):
    app = activating_app(database_url=database_url, activation_interval_seconds=0)
    client = app.test_client()
    for _ in range(3):
        get(client, "userId=u-1&numResults=3")
        settle(app)
    assert published_lists(tracking, "u-1") == [items(1, 3)]


def test_a_changed_list_within_the_interval_is_not_published(
    activating_app, runtime, tracking, database_url
):
    app = activating_app(database_url=database_url, activation_interval_seconds=3600)
    client = app.test_client()
    get(client, "userId=u-1&numResults=3")
    settle(app)
    runtime.set_ranking("u-1", ["new-1", "new-2", "new-3"])
    assert ids(get(client, "userId=u-1&numResults=3")) == ["new-1", "new-2", "new-3"]
    settle(app)
    assert published_lists(tracking, "u-1") == [items(1, 3)]


def test_a_changed_list_after_the_interval_is_published(
    activating_app, runtime, tracking, database_url
):
    app = activating_app(database_url=database_url, activation_interval_seconds=1.0)
    client = app.test_client()
    get(client, "userId=u-1&numResults=3")
    settle(app)
    runtime.set_ranking("u-1", ["new-1", "new-2", "new-3"])
    time.sleep(1.2)
    get(client, "userId=u-1&numResults=3")
    settle(app)
    assert published_lists(tracking, "u-1") == [items(1, 3), ["new-1", "new-2", "new-3"]]
    # After another interval, an unchanged list is still not sent again.
    time.sleep(1.2)
    get(client, "userId=u-1&numResults=3")
    settle(app)
    assert len(published_lists(tracking, "u-1")) == 2


def test_each_user_has_their_own_interval(activating_app, tracking):
    app = activating_app()
    client = app.test_client()
    for user in ("u-1", "u-2", "u-3"):
        get(client, f"userId={user}&numResults=2")
    settle(app)
    assert sorted(m["userId"] for m in tracking.identifies()) == ["u-1", "u-2", "u-3"]


def test_the_decision_holds_across_workers(activating_app, tracking, database_url):
    """Two app instances on one database (two gunicorn workers): one identify."""
    first = activating_app(database_url=database_url)
    second = activating_app(database_url=database_url)
    get(first.test_client(), "userId=u-1&numResults=3")
    settle(first)
    get(second.test_client(), "userId=u-1&numResults=3")
    settle(second)
    assert published_lists(tracking, "u-1") == [items(1, 3)]


# --- who is not activated -----------------------------------------------------------------


def test_anonymous_visitors_and_related_items_are_not_activated(activating_app, tracking):
    app = activating_app()
    client = app.test_client()
    get(client, "anonymousId=anon-1&numResults=3")
    get(client, "itemId=item-9&numResults=3")
    settle(app)
    assert tracking.identifies() == []
    # The positive control: a known user's answer from the same app is written back.
    get(client, "userId=u-1&numResults=3")
    settle(app)
    assert [m["userId"] for m in tracking.identifies()] == ["u-1"]


def test_popular_fallbacks_and_opt_outs_are_not_activated(
    activating_app, runtime, profile_api, tracking
):
    app = activating_app()
    client = app.test_client()
    deliver(client, product_viewed("pop-a"), product_viewed("pop-b"))
    profile_api.set_traits("user_id:u-out", {"recommendations_opt_out": True})
    assert get(client, "userId=u-out&numResults=2")["source"] == "popular"
    runtime.fail_next(1)
    assert get(client, "userId=u-down&numResults=2")["source"] == "popular"
    settle(app)
    assert tracking.identifies() == []
    # The positive control: Personalize's answer for a user who did not opt out is.
    assert get(client, "userId=u-in&numResults=2")["source"] == "personalize"
    settle(app)
    assert [m["userId"] for m in tracking.identifies()] == ["u-in"]


def test_an_opted_out_user_is_not_activated_even_without_popular_items(
    activating_app, profile_api, tracking
):
    app = activating_app()
    profile_api.set_traits("user_id:u-out", {"recommendations_opt_out": True})
    app.test_client().get("/recommendations?userId=u-out&numResults=2")
    settle(app)
    assert tracking.identifies("u-out") == []
    # The positive control: the same app writes back for a user who did not opt out.
    get(app.test_client(), "userId=u-in&numResults=2")
    settle(app)
    assert [m["userId"] for m in tracking.identifies()] == ["u-in"]


# --- after an Order Completed -------------------------------------------------------------


def test_order_completed_publishes_fresh_recommendations_without_a_request(
    activating_app, tracking, database_url
):
    app = activating_app(database_url=database_url)
    deliver(app.test_client(), order_completed(["item-1", "item-4"], user_id="u-7"))
    (message,) = tracking.wait_for_identifies(1, "u-7")
    published = message["traits"]["recommended_products"]
    assert published == ["item-2", "item-3"] + items(5, 27)  # 25, purchases left out


def test_order_completed_republishes_a_changed_list(activating_app, tracking, database_url):
    app = activating_app(database_url=database_url, activation_interval_seconds=0)
    client = app.test_client()
    get(client, "userId=u-1&numResults=25")
    tracking.wait_for_identifies(1, "u-1")
    deliver(client, order_completed(["item-1"], user_id="u-1"))
    tracking.wait_for_identifies(2, "u-1")
    settle(app)
    assert published_lists(tracking, "u-1") == [items(1, 25), items(2, 26)]


def test_an_anonymous_order_is_not_activated(activating_app, tracking):
    app = activating_app()
    deliver(app.test_client(), order_completed(["item-1"], anonymous_id="anon-3"))
    settle(app)
    assert tracking.identifies() == []
    # The positive control: the same order by a known user is followed by a write-back.
    deliver(app.test_client(), order_completed(["item-1"], user_id="u-3"))
    settle(app)
    assert [m["userId"] for m in tracking.identifies()] == ["u-3"]


# --- without a write key: the local profile store -----------------------------------------


def test_without_a_write_key_the_trait_goes_into_the_local_profile_store(
    personalize_app, runtime, database_url
):
    app = personalize_app(database_url=database_url, activation_interval_seconds=0)
    runtime.set_ranking("u-1", ["sku-5", "sku-2", "sku-9"])
    get(app.test_client(), "userId=u-1&numResults=3")
    settle(app)
    with store_of(app).read() as conn:
        traits = conn.execute(
            sa.select(profiles.c.traits).where(profiles.c.profile_id == "u-1")
        ).scalar()
    assert traits == {"recommended_products": ["sku-5", "sku-2", "sku-9"]}


def test_local_activation_keeps_other_traits_and_deduplicates(
    personalize_app, runtime, database_url
):
    from tests.deliveries import identify

    app = personalize_app(database_url=database_url, activation_interval_seconds=3600)
    client = app.test_client()
    deliver(client, identify("u-1", {"plan": "pro"}))
    get(client, "userId=u-1&numResults=2")
    settle(app)
    runtime.set_ranking("u-1", ["x", "y"])
    get(client, "userId=u-1&numResults=2")  # changed within the interval: not written
    settle(app)
    with store_of(app).read() as conn:
        traits = conn.execute(
            sa.select(profiles.c.traits).where(profiles.c.profile_id == "u-1")
        ).scalar()
    assert traits == {"plan": "pro", "recommended_products": ["item-1", "item-2"]}


def test_a_wrong_write_key_loses_the_write_backs_and_the_service_cannot_tell(
    activating_app, tracking, caplog
):
    """Segment answers 200 to a wrong SEGMENT_WRITE_KEY (its HTTP API documentation: 200
    for everything but a request too large or not JSON), so neither Segment's client nor
    the service can tell: the identify goes out, is counted as published, nothing is
    logged, and nothing arrives under the shop's key. What the shop notices is the trait
    never appearing on the profile (Segment's debugger shows no event). The same service
    with the right key, the positive control, gets its write-back through."""
    from tests.conftest import metric

    wrong = activating_app(segment_write_key="wk-typo")
    published_before = metric(wrong, "activations_total", outcome="published")
    failed_before = metric(wrong, "activations_total", outcome="failed")
    with caplog.at_level(logging.WARNING, logger="webhook"):
        get(wrong.test_client(), "userId=u-1&numResults=3")
        settle(wrong)
    assert tracking.identifies() == []
    (dropped,) = tracking.discarded()
    assert (dropped.reason, dropped.write_key) == ("write_key", "wk-typo")
    assert dropped.message["userId"] == "u-1"
    assert dropped.message["traits"] == {"recommended_products": items(1, 3)}
    assert metric(wrong, "activations_total", outcome="published") == published_before + 1
    assert metric(wrong, "activations_total", outcome="failed") == failed_before
    assert not [r for r in caplog.records if r.name.startswith("webhook.activation")]
    assert tracking.refused == 0

    right = activating_app()
    get(right.test_client(), "userId=u-2&numResults=3")
    tracking.wait_for_identifies(1, "u-2")


def test_a_write_back_too_big_for_segment_is_cut_to_the_best_items_that_fit(
    activating_app, runtime, tracking, caplog
):
    """500 recommended ids of 130 characters make an identify of 67 KB, over the 32 KB
    an event Segment takes (the stand-in refuses it with 400, as Segment does; Segment's
    own client refuses to send it). The write-back arrives cut to the best items that
    fit, nearly 32 KB of them; the answer itself stays whole, and the log says what was
    cut without naming the visitor or the items."""
    app = activating_app()
    long_ids = [f"sku-{n:03d}-" + "x" * 122 for n in range(500)]
    runtime.set_ranking("u-big", long_ids)
    with caplog.at_level(logging.INFO, logger="webhook"):
        body = get(app.test_client(), "userId=u-big&numResults=500")
        settle(app)
    assert ids(body) == long_ids
    (message,) = tracking.identifies("u-big")
    sent = message["traits"]["recommended_products"]
    assert sent == long_ids[: len(sent)] and 200 < len(sent) < 500
    size = len(json.dumps(message).encode())
    assert MAX_EVENT_BYTES - 2048 < size <= MAX_EVENT_BYTES, size  # cut no more than needed
    assert tracking.refused == 0 and tracking.discarded() == []
    logged = [
        (r.getMessage(), r.exc_text or "")
        for r in caplog.records
        if r.name.startswith("webhook.activation")
    ]
    assert any(f"{len(sent)} of 500 items" in text for text, _ in logged), logged
    assert not [entry for entry in logged if "u-big" in str(entry) or "sku-" in str(entry)]


def test_fit_traits_cuts_only_the_longest_list_and_only_when_needed():
    from webhook.activation import TooLarge, fit_traits

    small = {"recommended_products": ["a", "b"], "plan": "pro"}
    assert fit_traits("u-1", small) is small
    big = {"recommended_products": [f"{n:04d}" * 10 for n in range(100)], "other": ["x"]}
    cut = fit_traits("u-1", big, budget=1000)
    assert cut["other"] == ["x"]
    kept = cut["recommended_products"]
    assert kept == big["recommended_products"][: len(kept)] and 0 < len(kept) < 100
    assert len(json.dumps({"userId": "u-1", "traits": cut}).encode()) <= 1000
    longer = {**cut, "recommended_products": big["recommended_products"][: len(kept) + 1]}
    assert len(json.dumps({"userId": "u-1", "traits": longer}).encode()) > 1000
    with pytest.raises(TooLarge):
        fit_traits("u-1", {"note": "x" * 2000}, budget=1000)  # nothing to cut
    with pytest.raises(TooLarge):
        fit_traits("u-1", {"note": "x" * 2000, "recommended_products": ["a"]}, budget=1000)


def test_a_failing_tracking_api_does_not_affect_answers(activating_app, tracking):
    app = activating_app()
    tracking.fail(500)
    client = app.test_client()
    for n in range(3):
        body = get(client, f"userId=u-{n}&numResults=2")
        assert ids(body) == ["item-1", "item-2"]


# --- consent fails closed -------------------------------------------------------------------


@pytest.mark.parametrize("outage", ["timeout", "error", "429", "unreachable"])
def test_profile_api_down_or_429_with_opt_out_true_gets_popular_items_and_no_write_back(
    activating_app, profile_api, tracking, outage
):
    """The visitor opted out; the Profile API cannot say so right now. Fail closed:
    popular items, "degraded" saying why, nothing written back."""
    from tests.gunicorn_server import free_port

    url = f"http://127.0.0.1:{free_port()}" if outage == "unreachable" else profile_api.url
    app = activating_app(segment_profile_api_url=url, profile_api_timeout_seconds=0.3)
    client = app.test_client()
    deliver(client, product_viewed("pop-a"), product_viewed("pop-a"), product_viewed("pop-b"))
    profile_api.set_traits(
        "user_id:u-out", {"recommendations_opt_out": True, "purchased_products": []}
    )
    if outage == "timeout":
        profile_api.delay(2.0)
    elif outage == "error":
        profile_api.fail(503)
    elif outage == "429":
        profile_api.fail(429, retry_after=1)
    try:
        for _ in range(2):  # the first call fails; the second is paused after a 429
            body = get(client, "userId=u-out&numResults=5")
            assert body["source"] == "popular", body
            assert ids(body) == ["pop-a", "pop-b"]
            assert body["degraded"]["profile"] and body["degraded"]["consent"]
            assert "optedOut" not in body
    finally:
        profile_api.delay(0)
        profile_api.fail(None)
    settle(app)
    assert tracking.identifies() == []
    with store_of(app).read() as conn:  # nothing was even considered for write-back
        assert conn.execute(sa.select(sa.func.count()).select_from(activations)).scalar() == 0
    # The positive control: the same setup with the Profile API answering writes back
    # for a user who did not opt out (once a 429's pause, shared by the hosts, is over).
    answering = activating_app(profile_api_timeout_seconds=0.3)
    wait_until(
        lambda: get(answering.test_client(), "userId=u-in&numResults=5")["source"] == "personalize",
        5,
        "a personalized answer with the Profile API answering",
        interval=0.2,
    )
    settle(answering)
    assert [m["userId"] for m in tracking.identifies()] == ["u-in"]


def test_a_purchase_while_the_profile_api_is_down_writes_nothing_back(
    activating_app, profile_api, tracking
):
    """The after-purchase recomputation goes through the same pipeline and the same gate."""
    app = activating_app()
    profile_api.set_traits("user_id:u-7", {"recommendations_opt_out": True})
    profile_api.fail(500)
    deliver(app.test_client(), order_completed(["item-1"], user_id="u-7"))
    settle(app)
    assert tracking.identifies() == []
    # The positive control: with the Profile API answering again, a purchase by a user
    # who did not opt out is written back, and still nothing for the one who did.
    profile_api.fail(None)
    deliver(app.test_client(), order_completed(["item-1"], user_id="u-8"))
    deliver(app.test_client(), order_completed(["item-2"], user_id="u-7"))
    settle(app)
    assert [m["userId"] for m in tracking.identifies()] == ["u-8"]


# --- bounded activation ---------------------------------------------------------------------


@pytest.mark.slow
def test_activation_flood_keeps_memory_bounded_and_counts_the_drops(personalize_app, runtime):
    """Write-backs cannot keep up (the database is busy: another writer holds it): the
    queue stops at ACTIVATION_QUEUE_MAX, the rest is dropped and counted, requests never
    wait, and the memory held for pending write-backs stops growing."""
    import tracemalloc

    from tests.conftest import metric

    # The answers' records for /insights are off: they have their own bounded buffer,
    # which grows while the writer is held (tests/test_insights.py measures it).
    app = personalize_app(
        activation_queue_max=20, activation_interval_seconds=0, insights_retention_days=0.0
    )
    # Only reads: nothing to apply after each (applying would wait for the writer this
    # test holds).
    client = raw_client(app)
    activation = app.extensions["segment"].activation
    get(client, "userId=warm-up&numResults=1")
    assert activation.wait_idle(10)
    outcomes = ("dropped", "store_unavailable", "published", "error")
    before = {o: metric(client, "activations_total", outcome=o) for o in outcomes}

    def flood(first: int, n: int) -> float:
        slowest = 0.0
        for user in range(first, first + n):
            started = time.perf_counter()
            assert len(ids(get(client, f"userId=flood-{user}&numResults=500"))) == 500
            slowest = max(slowest, time.perf_counter() - started)
        return slowest

    with store_of(app).write():  # the database's writer is taken while the flood lasts
        tracemalloc.start()
        try:
            flood(0, 40)
            after_first, _ = tracemalloc.get_traced_memory()
            slowest = flood(40, 120)
            after_second, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        pending = activation.pending()
        counted = {o: metric(client, "activations_total", outcome=o) - before[o] for o in outcomes}

    print(
        f"\npending {pending}, counted {counted}, memory after 40 requests "
        f"{after_first / 1e6:.1f} MB, after 160 {after_second / 1e6:.1f} MB, "
        f"slowest request {slowest * 1000:.0f} ms"
    )
    assert pending <= 20
    assert counted["dropped"] >= 160 - 20 - 20
    # Every offer is pending, was handled (the store was busy), or was counted as dropped;
    # at most one is in the worker's hands right now.
    assert 160 - 1 <= pending + sum(counted.values()) <= 160
    # 120 more pending lists of 500 ids would hold ~4 MB; bounded, the memory stays flat.
    assert after_second - after_first < 2_000_000, (after_first, after_second)
    assert slowest < 1.0  # nobody waited for the queue


def test_a_profile_segment_does_not_know_is_answered_but_never_written_back(
    activating_app, tracking, profile_api, runtime
):
    """A Profile API 404 (no profile, or a wrong SEGMENT_SPACE_ID): the visitor gets a
    personalized answer, but no identify creates data at Segment about them. The known
    visitor beside them is written back (the positive control)."""
    profile_api.know_everyone(None)
    profile_api.set_traits("user_id:known", {})
    app = activating_app()
    client = app.test_client()
    unknown = get(client, "userId=stranger&numResults=2")
    known = get(client, "userId=known&numResults=2")
    assert unknown["source"] == known["source"] == "personalize"
    assert "degraded" not in unknown
    tracking.wait_for_identifies(1, "known")
    settle(app)
    assert published_lists(tracking, "known") == [ids(known)]
    assert tracking.identifies("stranger") == []
