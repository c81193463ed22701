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

import pytest
import sqlalchemy as sa

from tests.conftest import OPERATOR, health, metric
from tests.fake_segment_apis import deliver, identify
from tests.test_recommendations import (  # noqa: F401  (fixtures)
    get,
    personalize_app,
    popular_catalog,
    profile_api,
    runtime,
)

# --- consent: the opt-out vocabulary -------------------------------------------------------

OPTED_OUT = [True, 1, 2.5, "true", "TRUE", "1", "yes", "on", "opted_out", "opt-out", "Y",
             "opted out", "unsubscribed", "x", ["anything"], {"a": 1}]
CONSENTING = [None, False, 0, 0.0, "false", "FALSE", " No ", "off", "0", ""]


@pytest.mark.parametrize("value", OPTED_OUT, ids=repr)
def test_every_value_but_the_consenting_ones_counts_as_opted_out(personalize_app, profile_api,
                                                                 value):
    client = personalize_app().test_client()
    popular_catalog(client)
    profile_api.set_traits("user_id:u-1", {"recommendations_opt_out": value})
    body = get(client, "userId=u-1&numResults=2")
    assert body["source"] == "popular", (value, body)
    assert "degraded" not in body


@pytest.mark.parametrize("value", CONSENTING, ids=repr)
def test_absent_null_false_zero_and_their_words_count_as_consent(personalize_app, profile_api,
                                                                 value):
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


@pytest.mark.parametrize("authorization", ["Bearer wrong-token-xxxxxxxx", "Bearer "
                                           + "operator-token-for-the-tests"[:-1]])
def test_healthz_details_with_a_wrong_token_are_refused(make_app, authorization):
    response = make_app().test_client().get("/healthz",
                                            headers={"Authorization": authorization})
    assert response.status_code == 401
    assert "METRICS_TOKEN" in response.get_json()["error"]["message"]


def test_without_metrics_token_healthz_details_are_served_to_nobody(make_app):
    app = make_app(metrics_token="")
    assert app.test_client().get("/healthz").get_json() == {"status": "ok"}
    assert app.test_client().get("/healthz", headers=OPERATOR).status_code == 401


def test_metrics_need_the_operators_token_when_it_is_set(make_app):
    client = make_app().test_client()
    deliver(client, identify("u-1", {"plan": "pro"}))
    refused = client.get("/metrics")
    assert refused.status_code == 401
    assert "segment_messages_total" not in refused.get_data(as_text=True)
    assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert metric(client, "segment_messages_total", type="identify", outcome="accepted") == 1


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
