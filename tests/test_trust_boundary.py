"""The trust boundary, tried as an attacker would: each finding of issue 26 written as the
attack, then what a user of the service must see instead.

Who may do what (docs/architecture.md): Segment's deliveries write everything (``delete``
included); a browser with the public write key (``/v1``) writes what a browser may; a
visitor's token reads that subject's own recommendations; the operator's tokens read
metrics, insights and health details; anyone reads the status and the page shell.

The forged Actions array is in tests/test_webhook_auth.py; deletions in
tests/test_deletions.py.
"""

from __future__ import annotations

from datetime import UTC

import pytest
import sqlalchemy as sa

from tests import deliveries
from tests.conftest import OPERATOR, health, metric
from tests.deliveries import deliver, identify, sign
from tests.test_recommendations import (  # noqa: F401  (fixtures)
    get,
    personalize_app,
    popular_catalog,
    profile_api,
    runtime,
)

# --- consent: the opt-out vocabulary -------------------------------------------------------

OPTED_OUT = [
    True,
    1,
    2.5,
    "true",
    "TRUE",
    "1",
    "yes",
    "on",
    "opted_out",
    "opt-out",
    "Y",
    "opted out",
    "unsubscribed",
    "x",
    ["anything"],
    {"a": 1},
]
CONSENTING = [None, False, 0, 0.0, "false", "FALSE", " No ", "off", "0", ""]


@pytest.mark.parametrize("value", OPTED_OUT, ids=repr)
def test_every_value_but_the_consenting_ones_counts_as_opted_out(
    personalize_app, profile_api, value
):
    client = personalize_app().test_client()
    popular_catalog(client)
    profile_api.set_traits("user_id:u-1", {"recommendations_opt_out": value})
    body = get(client, "userId=u-1&numResults=2")
    assert body["source"] == "popular", (value, body)
    assert "degraded" not in body


@pytest.mark.parametrize("value", CONSENTING, ids=repr)
def test_absent_null_false_zero_and_their_words_count_as_consent(
    personalize_app, profile_api, value
):
    client = personalize_app().test_client()
    popular_catalog(client)
    profile_api.set_traits("user_id:u-1", {"recommendations_opt_out": value})
    assert get(client, "userId=u-1&numResults=2")["source"] == "personalize", value


def test_opt_out_values_names_more_opted_out_values(personalize_app, profile_api):
    client = personalize_app(opt_out_values=("0", "No")).test_client()
    popular_catalog(client)
    for user, value in (("u-zero", 0), ("u-no", "no"), ("u-false", False)):
        profile_api.set_traits(f"user_id:{user}", {"recommendations_opt_out": value})
    assert get(client, "userId=u-zero&numResults=2")["source"] == "popular"
    assert get(client, "userId=u-no&numResults=2")["source"] == "popular"
    assert get(client, "userId=u-false&numResults=2")["source"] == "personalize"


# --- operations data ------------------------------------------------------------------------


def test_public_healthz_gives_the_status_and_nothing_of_the_configuration(make_app):
    app = make_app(segment_shared_secrets=("a-secret",), insights_token="insights-token-123")
    response = app.test_client().get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}
    details = health(app)  # the operator's token
    assert details["status"] == "ok" and details["mode"] == "embedded"
    assert details["signatures_enforced"] is True
    assert "inbox" in details and "configured" in details and "warnings" in details


@pytest.mark.parametrize(
    "authorization",
    ["Bearer wrong-token-xxxxxxxx", "Bearer " + "operator-token-for-the-tests"[:-1]],
)
def test_healthz_details_with_a_wrong_token_are_refused(make_app, authorization):
    response = make_app().test_client().get("/healthz", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert "METRICS_TOKEN" in response.get_json()["error"]["message"]


def test_without_metrics_token_healthz_details_are_served_to_nobody(make_app):
    app = make_app(metrics_token="")
    assert app.test_client().get("/healthz").get_json() == {"status": "ok"}
    assert app.test_client().get("/healthz", headers=OPERATOR).status_code == 401


def test_metrics_need_the_operators_token_when_it_is_set(make_app):
    client = make_app().test_client()
    before = metric(client, "segment_messages_total", type="identify", outcome="accepted")
    deliver(client, identify("u-1", {"plan": "pro"}))
    refused = client.get("/metrics")
    assert refused.status_code == 401
    assert "segment_messages_total" not in refused.get_data(as_text=True)
    assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert (
        metric(client, "segment_messages_total", type="identify", outcome="accepted") == before + 1
    )


def test_without_metrics_token_metrics_are_open(make_app):
    client = make_app(metrics_token="").test_client()
    assert client.get("/metrics").status_code == 200


def test_lag_is_read_from_positions_not_counted_over_the_backlog(make_app):
    """/metrics and /healthz are asked on every scrape: no COUNT over the inbox."""
    from tests.conftest import raw_client, store_of

    app = make_app()
    client = raw_client(app)  # nothing applied: a backlog
    deliver(client, *[identify(f"u-{n}", {"n": n}) for n in range(30)])
    statements: list[str] = []
    engines = [store.engine for store in store_of(app).stores]

    def seen(conn, cursor, statement, *args):
        statements.append(statement.lower())

    for engine in engines:
        sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        details = health(client)
        client.get("/metrics", headers=OPERATOR)
    finally:
        for engine in engines:
            sa.event.remove(engine, "before_cursor_execute", seen)
    assert details["inbox"]["appliers"]["local"]["pending"] == 30
    assert details["inbox"]["appliers"]["local"]["oldest_seconds"] >= 0
    over_inbox = [s for s in statements if "from inbox" in s and "count(" in s]
    assert over_inbox == [], over_inbox


# --- the public write key (/v1) -------------------------------------------------------------

WRITE_KEY = "wk-public-0123456789"


def _basic(key: str) -> dict:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def _traits(app, profile_id: str) -> dict:
    from tests.conftest import store_of
    from webhook.storage.schema import profiles

    with store_of(app).read() as conn:
        return (
            conn.execute(
                sa.select(profiles.c.traits).where(profiles.c.profile_id == profile_id)
            ).scalar()
            or {}
        )


def _interactions_of(app, user_id: str) -> int:
    from tests.conftest import store_of
    from webhook.storage.schema import interactions

    with store_of(app).read() as conn:
        return conn.execute(
            sa.select(sa.func.count())
            .select_from(interactions)
            .where(interactions.c.user_id == user_id)
        ).scalar_one()


def test_the_public_write_key_cannot_delete_anyone(make_app):
    """The attack: POST /v1/batch with the page's write key and a delete for a victim."""
    from tests.deliveries import product_viewed

    app = make_app(ingest_write_keys=(WRITE_KEY,))
    client = app.test_client()
    deliver(
        client,
        product_viewed("p-1", user_id="victim"),
        identify("victim", {"email": "victim@example.com"}),
    )
    assert _interactions_of(app, "victim") == 1
    attack = {
        "batch": [
            {"type": "delete", "userId": "victim", "messageId": "del-1"},
            {
                "type": "track",
                "event": "Product Viewed",
                "messageId": "ok-1",
                "anonymousId": "a-1",
                "timestamp": "2026-11-27T10:00:00Z",
                "properties": {"product_id": "p-2"},
            },
        ]
    }
    response = client.post("/v1/batch", json=attack, headers=_basic(WRITE_KEY))
    assert response.status_code == 200, response.get_json()
    answer = response.get_json()
    assert answer["accepted"] == 1
    (rejected,) = answer["rejected"]
    assert rejected["index"] == 0 and "delete" in rejected["reason"]
    alone = client.post(
        "/v1/batch", json={"batch": [attack["batch"][0]]}, headers=_basic(WRITE_KEY)
    )
    assert alone.status_code == 400
    assert _interactions_of(app, "victim") == 1
    assert _traits(app, "victim") == {"email": "victim@example.com"}


@pytest.mark.parametrize("where", ["traits", "context.traits"])
@pytest.mark.parametrize("value", [False, "false", 0, None, ""])
def test_the_public_write_key_cannot_clear_an_opt_out(make_app, where, value):
    """The attack: an identify through /v1 that sets the victim's opt-out back to false.
    Opting out through /v1 works; opting back in does not."""
    app = make_app(ingest_write_keys=(WRITE_KEY,))
    client = app.test_client()
    deliver(client, identify("victim", {"recommendations_opt_out": True, "plan": "pro"}))

    def v1_identify(n, traits):
        message = {
            "type": "identify",
            "userId": "victim",
            "messageId": f"v1-{n}",
            "timestamp": "2099-01-01T00:00:00Z",
        }
        if where == "traits":
            message["traits"] = traits
        else:
            message["context"] = {"traits": traits}
        return client.post("/v1/identify", json=message, headers=_basic(WRITE_KEY))

    response = v1_identify(1, {"recommendations_opt_out": value, "plan": "free"})
    assert response.status_code == 200, response.get_json()
    assert "opted out" in response.get_json()["notes"][0]["reason"]
    assert _traits(app, "victim") == {"recommendations_opt_out": True, "plan": "free"}

    # A browser may opt out, on the other hand: the positive control.
    deliver(client, identify("other", {"recommendations_opt_out": False}))
    message = deliveries.message(
        "identify",
        user_id="other",
        message_id="v1-out",
        timestamp="2099-01-01T00:00:00Z",
        traits={"recommendations_opt_out": "yes"},
    )
    response = client.post("/v1/identify", json=message, headers=_basic(WRITE_KEY))
    assert response.status_code == 200 and "notes" not in response.get_json()
    assert _traits(app, "other") == {"recommendations_opt_out": "yes"}


# --- a visitor's token reads exactly its subject ---------------------------------------------

SECRET_KEY = "trust-boundary-secret-key-0123"


def _bearer(**subject) -> dict:
    from webhook.tokens import mint_token

    return {"Authorization": f"Bearer {mint_token(SECRET_KEY, **subject)}"}


def _shop(make_app):
    """The embedded default with tokens required and the public write key on; alice and a
    victim with purchases and traits, catalogue items seen by others."""
    from tests.deliveries import order_completed, product_viewed

    app = make_app(secret_key=SECRET_KEY, ingest_write_keys=(WRITE_KEY,))
    client = app.test_client()
    deliver(
        client,
        *[
            product_viewed(f"sku-{n}", anonymous_id=f"crowd-{k}")
            for n in range(6)
            for k in range(6 - n)
        ],
        identify(
            "victim",
            {"purchased_products": ["sku-5"], "plan": "gold", "email": "victim@example.com"},
        ),
        order_completed(["sku-4"], user_id="victim"),
        product_viewed("sku-3", anonymous_id="victim-anon"),
        identify("alice", {"plan": "basic"}),
    )
    return app, client


def test_a_user_token_with_someone_elses_anonymous_id_is_refused(make_app):
    """The attack: alice's own token, with ?userId=alice&anonymousId=<victim's id>."""
    app, client = _shop(make_app)
    response = client.get(
        "/recommendations?userId=alice&anonymousId=victim-anon", headers=_bearer(user_id="alice")
    )
    assert response.status_code == 403, response.get_json()
    assert "itemList" not in response.get_json()
    # Once the store links the anonymous id to alice (her own browser), it counts.
    deliver(
        client,
        {
            "type": "alias",
            "previousId": "alice-anon",
            "userId": "alice",
            "messageId": "alias-alice",
            "timestamp": "2026-11-27T10:00:00Z",
        },
    )
    response = client.get(
        "/recommendations?userId=alice&anonymousId=alice-anon", headers=_bearer(user_id="alice")
    )
    assert response.status_code == 200, response.get_json()


def test_an_alias_forged_with_the_write_key_discloses_nothing_to_an_anonymous_token(make_app):
    """The attack: alias the attacker's anonymous id to the victim's userId through /v1
    (anyone holds the write key), then read recommendations with the attacker's own
    anonymous token."""
    app, client = _shop(make_app)
    before = client.get(
        "/recommendations?anonymousId=attacker-anon&numResults=6",
        headers=_bearer(anonymous_id="attacker-anon"),
    ).get_json()
    forged = {
        "type": "alias",
        "previousId": "attacker-anon",
        "userId": "victim",
        "messageId": "forged-alias",
        "timestamp": "2026-11-27T11:00:00Z",
    }
    assert client.post("/v1/alias", json=forged, headers=_basic(WRITE_KEY)).status_code == 200
    after = client.get(
        "/recommendations?anonymousId=attacker-anon&numResults=6",
        headers=_bearer(anonymous_id="attacker-anon"),
    )
    assert after.status_code == 200
    body = after.get_json()
    text = str(body)
    for private in ("victim@example.com", "traitValues", "traitsUsed", "filtered"):
        assert private not in text, body
    # The answer is what it was before the alias: nothing of the victim's history, traits
    # or purchases went into it.
    assert [i["itemId"] for i in body["itemList"]] == [i["itemId"] for i in before["itemList"]]
    # The victim's own token still sees the victim's checks (the positive control).
    own = client.get(
        "/recommendations?userId=victim&numResults=6", headers=_bearer(user_id="victim")
    ).get_json()
    assert set(own["traitValues"]["purchased_products"]) == {"sku-4", "sku-5"}
    assert {"sku-4", "sku-5"}.isdisjoint(i["itemId"] for i in own["itemList"])


def test_without_secret_key_rank_is_no_oracle_of_purchases_or_opt_out(make_app):
    """The attack: POST /recommendations/rank for a victim with candidate items, reading
    which were filtered and why, and whether traitsUsed names the opt-out."""
    from tests.deliveries import order_completed, product_viewed

    app = make_app()
    client = app.test_client()
    deliver(
        client,
        product_viewed("sku-1", anonymous_id="crowd"),
        order_completed(["sku-2"], user_id="victim"),
        identify("quiet", {"recommendations_opt_out": True}),
    )
    for user in ("victim", "quiet", "nobody"):
        response = client.post(
            "/recommendations/rank", json={"userId": user, "itemIds": ["sku-1", "sku-2", "sku-3"]}
        )
        assert response.status_code == 200
        body = response.get_json()
        for private in ("filtered", "traitsUsed", "traitValues", "optedOut"):
            assert private not in body, (user, body)


# --- replays, retention, consent categories: nothing accepted only to be thrown away -------


def _at(days_ago: float) -> str:
    import time
    from datetime import datetime

    return (
        datetime.fromtimestamp(time.time() - days_ago * 86400, UTC)
        .isoformat()
        .replace("+00:00", "Z")
    )


def _view(message_id: str, days_ago: float, **extra) -> dict:
    message = {
        "type": "track",
        "event": "Product Viewed",
        "messageId": message_id,
        "userId": "u-replay",
        "timestamp": _at(days_ago),
        "properties": {"product_id": "sku-1"},
    }
    message.update(extra)
    return message


def test_an_eight_day_old_signed_message_is_too_old_with_the_defaults(make_app):
    """The attack: a signed delivery captured (or Replayed) after its claim was pruned
    (MESSAGE_RETENTION_HOURS, 168 h) would be taken again. By default
    MAX_MESSAGE_AGE_HOURS is the retention: it is either a duplicate or too old."""
    import json

    secret = "replay-shared-secret"
    app = make_app(segment_shared_secrets=(secret,), max_message_age_hours=None)
    assert app.extensions["segment"].settings.max_message_age_seconds == 168 * 3600
    client = app.test_client()
    for message_id, days, outcome in (("week-old", 6.9, "accepted"), ("old", 8, "skipped")):
        body = json.dumps(_view(message_id, days)).encode()
        signature = sign(body, secret)
        answer = client.post(
            "/segment",
            data=body,
            headers={"Content-Type": "application/json", "X-Signature": signature},
        ).get_json()
        if outcome == "accepted":
            assert answer["accepted"] == 1, answer
        else:
            assert answer["skipped"] == [{"index": 0, "messageId": "old", "reason": "too_old"}]


def test_an_interaction_older_than_retention_is_skipped_and_said_so(make_app):
    app = make_app(interaction_retention_days=730.0)
    client = app.test_client()
    answer = deliver(
        client,
        _view("ancient", 800),
        _view("recent", 10),
        {
            "type": "identify",
            "userId": "u-replay",
            "messageId": "id-old",
            "timestamp": _at(800),
            "traits": {"plan": "pro"},
        },
    )
    assert answer["accepted"] == 2  # the identify still counts: traits are not pruned
    assert answer["skipped"] == [
        {"index": 0, "messageId": "ancient", "reason": "older_than_retention"}
    ]
    assert answer["interactions"] == 1


def test_an_import_of_old_history_says_what_fell_outside_retention(make_app, tmp_path):
    import json

    app = make_app(interaction_retention_days=730.0)
    archive = tmp_path / "history.jsonl"
    archive.write_text(
        "\n".join(json.dumps(_view(f"h-{n}", 800 + n)) for n in range(5))
        + "\n"
        + json.dumps(_view("h-new", 3))
        + "\n"
    )
    result = app.test_cli_runner().invoke(args=["import", str(archive)])
    assert result.exit_code == 0, result.output
    assert "1 new interactions" in result.output
    assert "5 interaction(s) fell outside retention" in result.output
    assert "INTERACTION_RETENTION_DAYS" in result.output


def test_a_message_denying_a_consent_category_is_not_used(make_app):
    app = make_app(consent_categories=("Personalization",))
    client = app.test_client()
    denied = _view(
        "denied",
        1,
        context={
            "consent": {"categoryPreferences": {"Personalization": False, "Advertising": True}}
        },
    )
    allowed = _view(
        "allowed", 1, context={"consent": {"categoryPreferences": {"personalization": True}}}
    )
    silent = _view("silent", 1)
    answer = deliver(client, denied, allowed, silent)
    assert answer["accepted"] == 2
    assert answer["skipped"] == [{"index": 0, "messageId": "denied", "reason": "no_consent"}]
    from tests.conftest import store_of
    from webhook.storage.schema import interactions

    with store_of(app).read() as conn:
        assert {r[0] for r in conn.execute(sa.select(interactions.c.event_id))} == {
            "allowed",
            "silent",
        }
    # A deletion request is never held back by consent.
    delete = {
        "type": "delete",
        "userId": "u-replay",
        "timestamp": _at(0),
        "context": {"consent": {"categoryPreferences": {"Personalization": False}}},
    }
    assert deliver(client, delete)["accepted"] == 1


def test_a_deleted_persons_cached_profile_is_not_served(personalize_app, profile_api):
    """Every worker caches Profile API answers for PROFILE_CACHE_SECONDS; after a
    deletion the person's cached traits go within the tombstones' refresh (a second)."""
    import time
    from datetime import datetime

    client = personalize_app(profile_cache_seconds=600).test_client()
    profile_api.set_traits("user_id:cached-1", {"purchased_products": ["item-1"]})
    get(client, "userId=cached-1&numResults=2")
    get(client, "userId=cached-1&numResults=2")
    assert len(profile_api.requests_for("user_id:cached-1")) == 1  # the second was cached
    deliver(
        client, {"type": "delete", "userId": "cached-1", "timestamp": datetime.now(UTC).isoformat()}
    )
    time.sleep(1.1)
    get(client, "userId=cached-1&numResults=2")
    assert len(profile_api.requests_for("user_id:cached-1")) == 2
