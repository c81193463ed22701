"""Insights: impressions, attribution from Segment events, experiments, the report.

Everything goes through the real endpoints (POST /segment, GET /recommendations,
POST /recommendations/rank, GET /insights) on SQLite and PostgreSQL; counts are exact.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from tests import deliveries
from tests.conftest import applied, metric, raw_client
from tests.conftest import health as health_of
from webhook.appliers import NOT_READY
from webhook.experiments import bucket
from webhook.insights_stats import two_proportion_test, wilson
from webhook.settings import ConfigError, Settings
from webhook.storage.schema import attributions, impressions

CATALOG = [("p1", 10.0), ("p2", 20.0), ("p3", 30.0), ("p4", 40.0)]


def iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_iso(offset: timedelta = timedelta()) -> str:
    return iso(datetime.now(UTC) + offset)


def track(
    event: str,
    properties: dict,
    *,
    user_id: str | None = None,
    anonymous_id: str | None = None,
    message_id: str | None = None,
    timestamp: str | None = None,
) -> dict:
    return deliveries.track(
        event,
        None,
        properties=properties,
        user_id=user_id,
        anonymous_id=anonymous_id,
        message_id=message_id,
        timestamp=timestamp or now_iso(),
    )


def deliver(client, *messages) -> dict:
    body = messages[0] if len(messages) == 1 else {"batch": list(messages)}
    response = client.post("/segment", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def seed_catalog(client, views: int = 3) -> None:
    """Popular items p1 > p2 > p3 > p4 (more views each), with prices."""
    deliver(
        client,
        *[
            track("Product Viewed", {"product_id": item, "price": price}, anonymous_id=f"seed-{n}")
            for rank, (item, price) in enumerate(CATALOG)
            for n in range(views * (len(CATALOG) - rank))
        ],
    )


def recommend(client, query: str) -> dict:
    response = client.get(f"/recommendations?{query}")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def insights(client, days: int = 7, **headers) -> dict:
    response = client.get(
        f"/insights?days={days}", headers={"Accept": "application/json", **headers}
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def of(report: dict, variant: str) -> dict:
    return next(v for v in report["variants"] if v["variant"] == variant)


@pytest.fixture
def shop(make_app, database_url):
    """An embedded-default app on SQLite or PostgreSQL (one process: its own answers are
    written before its attribution reads them, so nothing needs to be held back)."""

    def factory(**settings):
        settings.setdefault("database_url", database_url)
        settings.setdefault("attribution_hold_seconds", 0.0)
        return make_app(**settings)

    return factory


# --- the scripted session --------------------------------------------------------------------


def test_a_scripted_session_is_counted_exactly(shop):
    app = shop()
    client = app.test_client()
    seed_catalog(client)
    answer = recommend(client, "userId=shopper&numResults=3")
    shown = [i["itemId"] for i in answer["itemList"]]
    assert shown == ["p1", "p2", "p3"] and answer["variant"] == "local"
    rid = answer["recommendationId"]

    # One click on a recommended item, with the answer's id.
    deliver(
        client,
        track("Product Clicked", {"product_id": "p2", "recommendation_id": rid}, user_id="shopper"),
    )
    # A click naming an answer that does not exist: not a click.
    deliver(
        client,
        track(
            "Product Clicked",
            {"product_id": "p1", "recommendation_id": "rid-nobody-gave"},
            user_id="shopper",
        ),
    )
    # One add-to-cart of a shown item (no recommendation_id: found by person and item).
    deliver(
        client,
        track(
            "Product Added", {"product_id": "p2", "price": 20.0, "quantity": 1}, user_id="shopper"
        ),
    )
    # One order of two products, one of them recommended (p2 × 2), the other never shown.
    order = track(
        "Order Completed",
        {
            "order_id": "o-1",
            "products": [
                {"product_id": "p2", "price": 20.0, "quantity": 2},
                {"product_id": "p9", "price": 99.0, "quantity": 1},
            ],
        },
        user_id="shopper",
    )
    deliver(client, order)
    # Segment redelivers the order: a duplicate, counted once.
    assert deliver(client, order)["duplicates"] == 1
    # An order of a shown item a day and more after it was shown: outside the window.
    deliver(
        client,
        track(
            "Order Completed",
            {"order_id": "o-2", "products": [{"product_id": "p1", "price": 10.0, "quantity": 1}]},
            user_id="shopper",
            timestamp=now_iso(timedelta(hours=25)),
        ),
    )

    local = of(insights(client), "local")
    assert {
        k: local[k]
        for k in ("impressions", "visitors", "clicks", "addToCarts", "orders", "revenue")
    } == {
        "impressions": 1,
        "visitors": 1,
        "clicks": 1,
        "addToCarts": 1,
        "orders": 1,
        "revenue": 40.0,
    }
    assert local["revenuePer1000"] == 40000.0
    assert local["ctr"]["value"] == 1.0 and local["visitorOrderRate"]["value"] == 1.0
    today = local["days"][-1]
    assert today["date"] == datetime.now(UTC).strftime("%Y-%m-%d")
    assert today["impressions"] == 1 and today["clicks"] == 1 and today["orders"] == 1
    # The same event applied again (a crash between apply and commit) counts once too.
    with app.extensions["segment"].store.read() as conn:
        rows = conn.execute(
            sa.select(
                attributions.c.kind,
                attributions.c.item_id,
                attributions.c.revenue,
                attributions.c.recommendation_id,
            ).order_by(attributions.c.kind)
        ).all()
    assert [tuple(r) for r in rows] == [
        ("add", "p2", 0.0, rid),
        ("click", "p2", 0.0, rid),
        ("order", "p2", 40.0, rid),
    ]


def test_an_event_is_attributed_once_even_when_applied_again(shop):
    app = shop()
    client = app.test_client()
    seed_catalog(client)
    rid = recommend(client, "userId=u-1&numResults=2")["recommendationId"]
    click = track("Product Clicked", {"product_id": "p1", "recommendation_id": rid}, user_id="u-1")
    deliver(client, click)
    # The attribution applier starts over from the beginning, as after a lost commit.
    services = app.extensions["segment"]
    with services.store.write() as tx:
        tx.conn.execute(
            sa.text(
                "UPDATE inbox_consumers SET position_txid = 0, "
                "position_seq = 0 WHERE name = 'attribution'"
            )
        )
    applied(app)
    assert of(insights(client), "local")["clicks"] == 1


def test_conversions_follow_the_person_through_alias_and_the_last_answer_wins(shop):
    app = shop()
    client = app.test_client()
    seed_catalog(client)
    first = recommend(client, "anonymousId=a-7&numResults=2")  # p1, p2
    second = recommend(client, "anonymousId=a-7&numResults=3")  # p1, p2, p3: the last
    deliver(
        client,
        {
            "type": "alias",
            "previousId": "a-7",
            "userId": "u-7",
            "messageId": "alias-1",
            "timestamp": now_iso(),
        },
    )
    deliver(
        client,
        track(
            "Order Completed",
            {
                "products": [
                    {"product_id": "p1", "price": 10.0},
                    {"product_id": "p4", "price": 40.0},
                ]
            },
            user_id="u-7",
        ),
    )
    with app.extensions["segment"].store.read() as conn:
        rows = conn.execute(
            sa.select(attributions.c.item_id, attributions.c.recommendation_id)
        ).all()
    assert [tuple(r) for r in rows] == [("p1", second["recommendationId"])]
    assert first["recommendationId"] != second["recommendationId"]
    local = of(insights(client), "local")
    assert local["orders"] == 1 and local["revenue"] == 10.0 and local["visitors"] == 1


def test_rank_answers_are_impressions_and_write_back_recomputations_are_not(shop):
    app = shop()
    client = app.test_client()
    seed_catalog(client)
    response = client.post("/recommendations/rank", json={"userId": "u-1", "itemIds": ["p3", "p1"]})
    assert response.status_code == 200
    assert response.get_json()["variant"] == "local"
    # A purchase recomputes the buyer's list for write-back: nobody sees that one.
    deliver(client, track("Order Completed", {"products": [{"product_id": "p4"}]}, user_id="u-1"))
    app.extensions["segment"].activation.wait_idle(10)
    applied(app)
    with app.extensions["segment"].store.read() as conn:
        kinds = conn.execute(sa.select(impressions.c.kind, impressions.c["items"])).all()
    assert [(k, i) for k, i in kinds] == [("rank", ["p1", "p3"])]


# --- experiments -------------------------------------------------------------------------


def test_visitors_are_split_by_a_stable_hash_and_keep_their_variant_after_alias(shop):
    app = shop(experiment=(("local", 50.0), ("popular", 50.0)))
    client = app.test_client()
    seed_catalog(client)
    seen = {}
    for n in range(200):
        seen[n] = recommend(client, f"anonymousId=anon-{n}&numResults=2")["variant"]
    assert 70 <= sum(v == "local" for v in seen.values()) <= 130
    # The same visitor asks again: the same variant.
    assert all(
        recommend(client, f"anonymousId=anon-{n}&numResults=2")["variant"] == seen[n]
        for n in range(20)
    )
    # Logged in after alias: whatever the userId's own hash says, the variant stays.
    moved = next(n for n in range(200) if (bucket(f"user-{n}") < 5000) != (seen[n] == "local"))
    deliver(
        client,
        {
            "type": "alias",
            "previousId": f"anon-{moved}",
            "userId": f"user-{moved}",
            "messageId": f"alias-{moved}",
            "timestamp": now_iso(),
        },
    )
    assert recommend(client, f"userId=user-{moved}&numResults=2")["variant"] == seen[moved]
    # Not linked: the userId's own hash.
    other = next(
        n for n in range(200) if (bucket(f"user-{n}") < 5000) != (seen[n] == "local") and n != moved
    )
    assert recommend(client, f"userId=user-{other}&numResults=2")["variant"] != seen[other]


def test_consent_and_the_trait_checks_apply_to_every_variant(shop):
    app = shop(experiment=(("local", 50.0), ("popular", 50.0)))
    client = app.test_client()
    seed_catalog(client)
    variants = set()
    for n in range(40):
        user = f"buyer-{n}"
        deliver(
            client, track("Order Completed", {"products": [{"product_id": "p1"}]}, user_id=user)
        )
        answer = recommend(client, f"userId={user}&numResults=3")
        variants.add(answer["variant"])
        # The popular variant knows nothing of the buyer: the purchase, excluded at once.
        assert "p1" not in [i["itemId"] for i in answer["itemList"]]
    assert variants == {"local", "popular"}


@pytest.mark.parametrize(
    "value, message",
    [
        ("local:50", "at least two"),
        ("local:50,bandit:50", "unknown variant"),
        ("local:50,local:50", "listed twice"),
        ("local:0,popular:50", "greater than 0"),
        ("local,popular", "variant:share"),
        ("local:50,personalize:50", "PERSONALIZE_CAMPAIGN_ARN"),
        ("local:50,personalize:arn:aws:s3:::bucket:50", "ARN"),
    ],
)
def test_a_bad_experiment_stops_the_start_naming_the_setting(value, message):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"EXPERIMENT": value})
    assert str(caught.value).startswith("EXPERIMENT:") and message in str(caught.value)


def test_an_experiment_with_a_named_personalize_campaign_is_accepted():
    arn = "arn:aws:personalize:us-east-1:123456789012:campaign/new-model"
    settings = Settings.from_env({"EXPERIMENT": f"local:90,personalize:{arn}:10"})
    assert settings.experiment == (("local", 90.0), (f"personalize:{arn}", 10.0))


# --- the statistics --------------------------------------------------------------------------


def test_wilson_intervals_and_the_two_proportion_test_match_textbook_values():
    # Wilson (1927) as given by Newcombe (1998), table I: 81/263 -> 0.2553 to 0.3662.
    interval = wilson(81, 263)
    assert interval["low"] == pytest.approx(0.2553, abs=1e-4)
    assert interval["high"] == pytest.approx(0.3662, abs=1e-4)
    assert wilson(0, 10)["low"] == 0.0 and wilson(0, 0)["value"] is None
    # 60/100 vs 40/100: z = 2.83, two-sided p = 0.0047.
    test = two_proportion_test(40, 100, 60, 100)
    assert test["z"] == pytest.approx(2.8284, abs=1e-3)
    assert test["pValue"] == pytest.approx(0.00468, abs=1e-4)


# --- a simulated shop -------------------------------------------------------------------


def simulate(client, app, rates: dict, visitors: int = 2000, seed: int = 11) -> dict:
    """``visitors`` anonymous visitors each get one answer; a visitor in variant v clicks
    its first item with probability rates[v]. Returns the report."""
    rng = random.Random(seed)
    raw = raw_client(app)
    clicks = []
    for n in range(visitors):
        answer = raw.get(f"/recommendations?anonymousId=sim-{seed}-{n}&numResults=4")
        assert answer.status_code == 200
        body = answer.get_json()
        if rng.random() < rates[body["variant"]]:
            clicks.append(
                track(
                    "Product Clicked",
                    {
                        "product_id": body["itemList"][0]["itemId"],
                        "recommendation_id": body["recommendationId"],
                    },
                    anonymous_id=f"sim-{seed}-{n}",
                )
            )
    for start in range(0, len(clicks), 200):
        deliver(raw, *clicks[start : start + 200])
    applied(app)
    report = insights(client)
    assert sum(v["impressions"] for v in report["variants"]) == visitors
    assert sum(v["clicks"] for v in report["variants"]) == len(clicks)
    return report


@pytest.mark.slow
def test_a_simulated_shop_finds_the_variant_clicked_twice_as_often(shop):
    app = shop(experiment=(("local", 50.0), ("popular", 50.0)))
    client = app.test_client()
    seed_catalog(client)
    counted = {
        name: metric(client, name, **labels)
        for name, labels in (
            ("recommendation_impressions_total", {"variant": "popular"}),
            ("recommendation_attributions_total", {"variant": "popular", "kind": "click"}),
        )
    }
    report = simulate(client, app, {"local": 0.06, "popular": 0.12})
    clicks = next(c for c in report["comparisons"] if c["metric"] == "visitorClickRate")
    assert clicks["variant"] == "popular" and clicks["baseline"] == "local"
    assert clicks["fixed"]["pValue"] < 0.01 and clicks["fixed"]["significant"]
    # The always-valid result finds it too, with a wider interval than one planned look's.
    sequential, fixed = clicks["sequential"], clicks["fixed"]
    assert sequential["discovery"] and 0 < sequential["low"] < fixed["low"]
    assert sequential["high"] > fixed["high"] and sequential["pValue"] > fixed["pValue"]
    # Nobody added to the cart or ordered: nothing to compare there, and not counted.
    assert report["analysis"]["comparisons"] == 1
    assert report["verdict"]["leader"] == "popular" and report["verdict"]["enough"]
    assert report["verdict"]["text"].startswith("popular is ahead")
    local, popular = of(report, "local"), of(report, "popular")
    assert 900 <= local["visitors"] <= 1100 and local["visitors"] + popular["visitors"] == 2000
    assert popular["visitorClickRate"]["low"] > local["visitorClickRate"]["value"]
    # /metrics counts the same, per variant (counters of this process: the difference).
    assert (
        metric(client, "recommendation_impressions_total", variant="popular")
        - counted["recommendation_impressions_total"]
        == popular["impressions"]
    )
    assert (
        metric(client, "recommendation_attributions_total", variant="popular", kind="click")
        - counted["recommendation_attributions_total"]
        == popular["clicks"]
    )


@pytest.mark.slow
def test_an_a_a_split_of_the_same_size_finds_no_difference(shop):
    app = shop(experiment=(("local", 50.0), ("popular", 50.0)))
    client = app.test_client()
    seed_catalog(client)
    report = simulate(client, app, {"local": 0.09, "popular": 0.09})
    clicks = next(c for c in report["comparisons"] if c["metric"] == "visitorClickRate")
    assert clicks["fixed"]["pValue"] >= 0.01 and not clicks["sequential"]["discovery"]
    assert report["verdict"]["leader"] is None and not report["verdict"]["enough"]
    assert report["verdict"]["text"].startswith("Too close to call")


# --- several workers: an answer recorded a moment after the click arrives -----------------


def test_a_click_waits_for_an_answer_another_worker_has_not_written_yet(make_app, database_url):
    """Two workers on one database. Worker A gives an answer (its record still in A's
    buffer); the click reaches worker B, whose attribution holds it back until A's record
    lands, then counts it. A click naming an answer nobody gave is given up after the
    hold."""
    worker_a = make_app(database_url=database_url)
    worker_b = make_app(database_url=database_url, attribution_hold_seconds=2.0)
    seed_catalog(worker_a.test_client())
    answer = recommend(raw_client(worker_a), "userId=u-1&numResults=2")
    services_a, services_b = (w.extensions["segment"] for w in (worker_a, worker_b))
    assert services_a.impressions.pending() == 1
    deliver(
        raw_client(worker_b),
        track(
            "Product Clicked",
            {"product_id": "p1", "recommendation_id": answer["recommendationId"]},
            user_id="u-1",
        ),
    )
    attribution = services_b.runners["attribution"]
    assert attribution.run_once() == NOT_READY  # held back: nothing applied, not moved
    services_a.impressions.flush()
    assert attribution.run_once() == 1
    deliver(
        raw_client(worker_b),
        track(
            "Product Clicked",
            {"product_id": "p1", "recommendation_id": "rid-never-given"},
            user_id="u-1",
        ),
    )
    started = time.monotonic()
    assert attribution.drain(timeout=10)
    assert 1.5 <= time.monotonic() - started < 8
    assert of(insights(worker_b.test_client()), "local")["clicks"] == 1


# --- access, retention, the command line ---------------------------------------------------


def test_insights_need_the_token_when_one_is_set(shop):
    app = shop(insights_token="insights-token-0123456789")
    client = app.test_client()
    refused = client.get("/insights", headers={"Accept": "application/json"})
    assert refused.status_code == 401 and refused.get_json()["error"]["code"] == "token_required"
    wrong = client.get(
        "/insights", headers={"Accept": "application/json", "Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401 and wrong.get_json()["error"]["code"] == "token_invalid"
    assert insights(client, Authorization="Bearer insights-token-0123456789")["days"] == 7
    # A token in the address is not taken (addresses end up in logs and history).
    assert client.get("/insights?format=json&token=insights-token-0123456789").status_code == 401
    # The page holds no data: it is served, and asks for the token itself.
    page = client.get("/insights", headers={"Accept": "text/html"})
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]


def test_without_a_token_insights_are_open_and_a_warning_says_so(shop):
    app = shop()
    health = health_of(app)
    assert any("GET /insights IS OPEN" in w for w in health["warnings"])
    response = app.test_client().get("/insights?days=0", headers={"Accept": "application/json"})
    assert response.status_code == 400 and response.get_json()["details"] == {"parameter": "days"}


def test_old_impressions_and_attributions_are_pruned(shop):
    app = shop(insights_retention_days=1.0)
    client = app.test_client()
    seed_catalog(client)
    rid = recommend(client, "userId=u-1&numResults=2")["recommendationId"]
    deliver(
        client,
        track("Product Clicked", {"product_id": "p1", "recommendation_id": rid}, user_id="u-1"),
    )
    services = app.extensions["segment"]
    assert services.retention.run_once(now=time.time() + 3600)["impressions"] == 0
    deleted = services.retention.run_once(now=time.time() + 2 * 86400)
    assert deleted["impressions"] == 1 and deleted["attributions"] == 1


def test_with_insights_off_nothing_is_recorded(shop):
    app = shop(insights_retention_days=0.0)
    client = app.test_client()
    seed_catalog(client)
    assert recommend(client, "userId=u-1")["variant"] == "local"
    assert "attribution" not in app.extensions["segment"].runners
    assert client.get("/insights", headers={"Accept": "application/json"}).status_code == 404
    with app.extensions["segment"].store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(impressions)).scalar() == 0


def test_the_command_line_prints_the_same_figures(shop):
    app = shop()
    client = app.test_client()
    seed_catalog(client)
    rid = recommend(client, "userId=u-1&numResults=2")["recommendationId"]
    deliver(
        client,
        track("Product Clicked", {"product_id": "p2", "recommendation_id": rid}, user_id="u-1"),
    )
    result = app.test_cli_runner().invoke(args=["insights", "--days", "3"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("Insights ") and "3 days" in lines[0]
    row = next(line for line in lines if line.startswith("local "))
    assert row.split()[1:4] == ["1", "1", "1"]  # impressions, visitors, clicks
    assert "No experiment" in lines[-1]


def test_the_answer_buffer_is_bounded_while_the_store_cannot_be_written(make_app):
    """With SQLite's one writer held elsewhere, answers wait in the worker's buffer,
    bounded in answers and in the item ids they hold; the rest is dropped and counted,
    and what was kept is written once the store can be."""
    from webhook.impressions import ImpressionRecorder
    from webhook.storage import StoreUnavailable

    app = make_app()
    store = app.extensions["segment"].store
    # (Its thread writes every hour here: the test does the writing it watches.)
    recorder = ImpressionRecorder(
        store, max_pending=1000, max_pending_items=10_000, flush_seconds=3600
    )
    client = app.test_client()
    dropped = metric(client, "recommendation_impressions_dropped_total")
    items = [f"item-{n}" for n in range(500)]
    with store.write():  # another writer holds the database
        kept = [
            recorder.record(
                recommendation_id=f"rid-{n}",
                visitor=f"v-{n}",
                variant="local",
                source="local",
                kind="recommend",
                items=items,
            )
            for n in range(30)
        ]
        assert kept == [True] * 20 + [False] * 10
        assert recorder.pending() == 20
        with pytest.raises(StoreUnavailable):
            recorder.flush()  # waits for the writer (2 s), then keeps the rows
        assert recorder.pending() == 20
    assert metric(client, "recommendation_impressions_dropped_total") - dropped == 10
    assert recorder.flush() == 20 and recorder.pending() == 0
    with store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(impressions)).scalar() == 20


# --- the sample-ratio check ------------------------------------------------------------------


def test_a_split_that_is_off_is_flagged_everywhere_and_gives_no_verdict(shop):
    """Answers given under a 40/60 split, read by a service configured 50/50 (as when
    something drops one variant's visitors): the JSON, the command line and /metrics say
    the comparison cannot be trusted, and the verdict names no winner. Under the split
    that was really used, nothing is flagged."""
    given = shop(experiment=(("local", 40.0), ("popular", 60.0)))
    raw = raw_client(given)
    seed_catalog(raw)
    for n in range(1000):
        assert raw.get(f"/recommendations?anonymousId=srm-{n}&numResults=2").status_code == 200
    given.extensions["segment"].impressions.flush()
    configured = shop(experiment=(("local", 50.0), ("popular", 50.0)))

    report = insights(configured.test_client())
    split = report["sampleRatio"]
    visitors = {v["variant"]: v["visitors"] for v in split["variants"]}
    assert sum(visitors.values()) == 1000 and visitors["local"] < 450
    assert split["mismatch"] and split["pValue"] < 0.001
    for cause in ("bots", "redirects", "caching", "merged"):
        assert cause in split["warning"]
    assert "cannot be trusted" in split["warning"]
    assert report["verdict"]["leader"] is None and not report["verdict"]["enough"]
    assert report["verdict"]["text"].startswith("No verdict")

    output = configured.test_cli_runner().invoke(args=["insights", "--days", "7"]).output
    assert "WARNING: Sample-ratio mismatch" in output and "cannot be trusted" in output
    assert metric(configured, "experiment_sample_ratio_p_value") == split["pValue"]

    honest = insights(given.test_client())["sampleRatio"]
    assert not honest["mismatch"] and honest["warning"] is None and honest["pValue"] > 0.001
    assert metric(given, "experiment_sample_ratio_p_value") == honest["pValue"]


def test_without_an_experiment_there_is_no_split_to_check(shop):
    app = shop()
    seed_catalog(app.test_client())
    recommend(app.test_client(), "userId=u-1")
    report = insights(app.test_client())
    assert report["sampleRatio"] is None and report["comparisons"] == []
    assert "experiment_sample_ratio_p_value" not in app.test_client().get("/metrics").get_data(
        as_text=True
    )
