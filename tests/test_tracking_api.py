"""The Segment-compatible Tracking API, POST /v1/*.

End to end: the real segment-analytics-python Client pointed at the service under gunicorn
(``host=``), checked in the store against the same story sent through POST /segment.
"""

from __future__ import annotations

import base64
import gzip
import json

import pytest
import sqlalchemy as sa

from tests import deliveries
from tests.conftest import store_of
from tests.gunicorn_server import gunicorn
from tests.segment_wire import ANON_ID, USER_ID, emit_story
from webhook.storage import Store
from webhook.storage.schema import interactions, profiles

KEY = "wk-test-0123456789"
NO_PROXY = {"http": None, "https": None}


def basic(key: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def track(n: int = 1, **extra) -> dict:
    message = deliveries.track(
        product_id=f"sku-{n}",
        message_id=f"m-{n}",
        anonymous_id="anon-9",
        timestamp="2024-05-01T10:00:00Z",
    )
    message.update(extra)
    return message


def rows(app_or_store):
    store = app_or_store if isinstance(app_or_store, Store) else store_of(app_or_store)
    with store.read() as conn:
        return sorted(
            (
                tuple(r)
                for r in conn.execute(
                    sa.select(
                        interactions.c.user_id,
                        interactions.c.anonymous_id,
                        interactions.c.item_id,
                        interactions.c.event_type,
                    )
                )
            ),
            key=lambda r: tuple(v or "" for v in r),
        )


@pytest.fixture
def api(make_app):
    return make_app(ingest_write_keys=(KEY, "wk-second-key-000"))


# --- switched off, credentials -------------------------------------------------------------


def test_off_without_write_keys(client):
    response = client.post("/v1/batch", json={"batch": [track()]}, headers=basic(KEY))
    assert response.status_code == 404
    assert response.get_json()["code"] == "tracking_api_disabled"
    assert "INGEST_WRITE_KEYS" in response.get_json()["message"]


@pytest.mark.parametrize(
    "headers,body_key",
    [
        ({}, None),  # no key at all
        (basic("wrong"), None),  # wrong Basic user name
        ({}, "wrong"),  # wrong writeKey in the body
        (basic("wrong"), KEY),  # a wrong header is not rescued by the body
        ({"Authorization": "Bearer " + KEY}, None),  # not Basic
        ({"Authorization": "Basic !!!"}, None),  # not base64
    ],
)
def test_missing_or_wrong_write_key_is_401(api, headers, body_key):
    body = {"batch": [track()]}
    if body_key:
        body["writeKey"] = body_key
    response = api.test_client().post("/v1/batch", json=body, headers=headers)
    assert response.status_code == 401
    answer = response.get_json()
    assert answer["success"] is False and answer["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert rows(api) == []


def test_second_key_in_basic_auth_and_key_in_body_both_work(api):
    c = api.test_client()
    assert (
        c.post(
            "/v1/batch", json={"batch": [track(1)]}, headers=basic("wk-second-key-000")
        ).status_code
        == 200
    )
    # analytics.js: text/plain, writeKey in the body, the short path, no type.
    message = track(2, writeKey=KEY)
    message.pop("type")
    response = c.post("/v1/t", data=json.dumps(message), content_type="text/plain")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["success"] is True
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert [r[2] for r in rows(api)] == ["sku-1", "sku-2"]


# --- Segment's limits ---------------------------------------------------------------------


def test_a_call_over_32_kb_is_400_naming_the_limit(api):
    big = track(properties={"product_id": "sku-1", "blob": "x" * 33_000})
    response = api.test_client().post("/v1/track", json=big, headers=basic(KEY))
    assert response.status_code == 400
    answer = response.get_json()
    assert answer["code"] == "request_too_large" and "32 KB" in answer["message"]


def test_a_batch_over_500_kb_is_400_naming_the_limit(api):
    batch = {
        "batch": [track(n, properties={"product_id": "p", "blob": "y" * 20_000}) for n in range(30)]
    }
    response = api.test_client().post("/v1/batch", json=batch, headers=basic(KEY))
    assert response.status_code == 400
    assert "500 KB" in response.get_json()["message"]
    assert rows(api) == []


def test_gzip_is_accepted_and_its_limit_applies_decompressed(api):
    c = api.test_client()
    body = gzip.compress(json.dumps({"batch": [track(1)]}).encode())
    response = c.post(
        "/v1/batch",
        data=body,
        headers={**basic(KEY), "Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.get_json()
    bomb = gzip.compress(json.dumps({"batch": [track(2)], "pad": " " * 2_000_000}).encode())
    assert len(bomb) < 10_000
    response = c.post("/v1/batch", data=bomb, headers={**basic(KEY), "Content-Encoding": "gzip"})
    assert response.status_code == 400 and "500 KB" in response.get_json()["message"]
    assert [r[2] for r in rows(api)] == ["sku-1"]


def test_in_a_batch_a_message_over_32_kb_is_rejected_alone(api):
    batch = {"batch": [track(1, properties={"product_id": "p1", "blob": "z" * 33_000}), track(2)]}
    response = api.test_client().post("/v1/batch", json=batch, headers=basic(KEY))
    assert response.status_code == 200
    answer = response.get_json()
    assert answer["received"] == 2 and answer["accepted"] == 1
    assert answer["rejected"] == [
        {"index": 0, "messageId": "m-1", "reason": answer["rejected"][0]["reason"]}
    ]
    assert "32 KB" in answer["rejected"][0]["reason"]
    assert [r[2] for r in rows(api)] == ["sku-2"]


# --- bad input: the webhook's semantics ----------------------------------------------------


def test_bad_input(api):
    c = api.test_client()
    answer = c.post("/v1/batch", data=b"{nope", headers=basic(KEY))
    assert answer.status_code == 400 and answer.get_json()["code"] == "invalid_body"
    answer = c.post("/v1/batch", json={"batch": [{"type": "track"}, 3]}, headers=basic(KEY))
    assert answer.status_code == 400 and answer.get_json()["code"] == "no_valid_messages"
    assert [e["index"] for e in answer.get_json()["details"]["rejected"]] == [0, 1]
    answer = c.post("/v1/identify", json=track(), headers=basic(KEY))
    assert answer.status_code == 400 and "track" in answer.get_json()["message"]
    answer = c.post("/v1/track", json={"batch": [track()]}, headers=basic(KEY))
    assert answer.status_code == 400
    answer = c.post("/v1/nope", json=track(), headers=basic(KEY))
    assert answer.status_code == 404
    # A partly bad batch: the good ones are stored, the bad ones listed, indexes the caller's.
    answer = c.post("/v1/batch", json={"batch": [{"type": "track"}, track(5)]}, headers=basic(KEY))
    assert answer.status_code == 200
    assert [e["index"] for e in answer.get_json()["rejected"]] == [0]
    assert [r[2] for r in rows(api)] == ["sku-5"]


def test_message_id_and_time_are_filled_like_segments_api(api):
    message = {
        "userId": "u-curl",
        "event": "Product Viewed",
        "properties": {"product_id": "sku-curl"},
    }
    c = api.test_client()
    assert c.post("/v1/track", json=message, headers=basic(KEY)).status_code == 200
    assert c.post("/v1/track", json=message, headers=basic(KEY)).status_code == 200
    assert rows(api) == [("u-curl", None, "sku-curl", "Product Viewed")] * 2


def test_duplicates_and_batch_context(api):
    c = api.test_client()
    body = {"batch": [track(1), track(1)], "context": {"traits": {"plan": "pro"}}}
    answer = c.post("/v1/batch", json=body, headers=basic(KEY)).get_json()
    assert answer["accepted"] == 1 and answer["duplicates"] == 1
    identify = {
        "type": "identify",
        "messageId": "i-1",
        "userId": "u-ctx",
        "timestamp": "2024-05-01T10:00:00Z",
    }
    c.post(
        "/v1/batch",
        json={"batch": [identify], "context": {"traits": {"plan": "pro"}}},
        headers=basic(KEY),
    )
    with store_of(api).read() as conn:
        traits = conn.execute(
            sa.select(profiles.c.traits).where(profiles.c.profile_id == "u-ctx")
        ).scalar()
    assert traits == {"plan": "pro"}


# --- end to end: segment-analytics-python against gunicorn --------------------------------


@pytest.mark.slow
def test_segment_analytics_python_against_the_running_service(tmp_path, make_app, corpus):
    from segment.analytics import Client
    from segment.analytics.request import APIError

    url = f"sqlite:///{tmp_path}/g.db"
    env = {
        "DATABASE_URL": url,
        "INGEST_WRITE_KEYS": KEY,
        "ENGINE_BACKGROUND_TRAINING": "false",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "_LOG_DIR": str(tmp_path),
    }
    errors: list = []
    with gunicorn(env, workers=2) as (base, _):
        client = Client(
            write_key=KEY,
            host=base,
            sync_mode=True,
            proxies=NO_PROXY,
            on_error=lambda exc, batch: errors.append(exc),
        )
        emit_story(client)
        gz = Client(
            write_key=KEY,
            host=base,
            sync_mode=True,
            gzip=True,
            proxies=NO_PROXY,
            on_error=lambda exc, batch: errors.append(exc),
        )
        gz.track(user_id="user-gz", event="Product Viewed", properties={"product_id": "sku-gz"})
        bad = Client(
            write_key="not-the-key", host=base, sync_mode=True, proxies=NO_PROXY, max_retries=0
        )
        with pytest.raises(APIError) as refused:  # sync_mode raises what it gets
            bad.track(user_id="user-bad", event="Product Viewed", properties={"product_id": "x"})
    assert refused.value.status == 401 and refused.value.code == "unauthorized"
    assert errors == []

    store = Store(url)
    try:
        got = rows(store)
        with store.read() as conn:
            traits = conn.execute(
                sa.select(profiles.c.traits).where(profiles.c.profile_id == USER_ID)
            ).scalar()
    finally:
        store.dispose()

    # The same story through POST /segment, as Segment would deliver it.
    reference = make_app()
    assert reference.test_client().post("/segment", json=corpus).status_code == 200
    assert got == sorted(
        rows(reference) + [("user-gz", None, "sku-gz", "Product Viewed")],
        key=lambda r: tuple(v or "" for v in r),
    )
    assert any(r[1] == ANON_ID for r in got)
    assert traits["plan"] == "pro"
