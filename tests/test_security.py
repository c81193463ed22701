"""Security: constant-time comparisons, body size limits before parsing, token tampering
and replay across users, and no secret (shared secret, bearer token, write keys, profile
token, AWS keys, SECRET_KEY, database password) and no email address in any log line of a
full run under gunicorn.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
import time

import pytest
import requests

from tests import deliveries, pg_server
from tests.deliveries import sign, wait_applied
from tests.fake_personalize import FakePersonalizeEvents, FakePersonalizeRuntime
from tests.fake_segment_apis import FakeProfileAPI, FakeTrackingAPI
from tests.gunicorn_server import gunicorn
from tests.waiting import wait_until
from webhook import signature as signature_module
from webhook.tokens import mint_token

SECRET = "sec-shared-secret-7f3a"
BEARER = "sec-bearer-token-91c2"
KEY = "sec-secret-key-for-tokens-0d5e8a1b"
EMAIL_RE = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")


# --- constant-time comparisons ------------------------------------------------------------

_COMPARE = hmac.compare_digest


class CountingCompare:
    def __init__(self):
        self.calls = 0

    def __call__(self, a, b):
        self.calls += 1
        return _COMPARE(a, b)


@pytest.mark.parametrize("which", ["first", "last", "none"])
def test_signature_check_compares_every_secret_in_constant_time(monkeypatch, which):
    """No early exit: the time taken does not tell whether, or which, secret matched."""
    counter = CountingCompare()
    monkeypatch.setattr(signature_module.hmac, "compare_digest", counter)
    secrets = ["s-one", "s-two", "s-three"]
    payload = b'{"type":"track"}'
    key = {"first": "s-one", "last": "s-three", "none": "other"}[which]
    header = sign(payload, key)
    if which == "none":
        with pytest.raises(signature_module.SignatureError):
            signature_module.verify_signature(header, payload, secrets)
    else:
        signature_module.verify_signature(header, payload, secrets)
    assert counter.calls == len(secrets)


@pytest.mark.parametrize(
    "presented, accepted", [("tok-a", True), ("tok-c", True), ("tok-x", False), ("tok-", False)]
)
def test_bearer_check_compares_every_token_in_constant_time(monkeypatch, presented, accepted):
    counter = CountingCompare()
    monkeypatch.setattr(signature_module.hmac, "compare_digest", counter)
    if accepted:
        signature_module.verify_bearer(f"Bearer {presented}", ["tok-a", "tok-b", "tok-c"])
    else:
        with pytest.raises(signature_module.SignatureError):
            signature_module.verify_bearer(f"Bearer {presented}", ["tok-a", "tok-b", "tok-c"])
    assert counter.calls == 3


def test_no_secret_is_compared_with_plain_equality():
    """Source check: the modules that hold credentials compare them only with
    hmac.compare_digest (or itsdangerous, which does), never with == or !=."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "webhook"
    suspicious = re.compile(
        r"(secret|token|write_key|signature|bearer|expected|presented)\w*\s*[!=]=\s*"
        r"(?!None\b)(?!\"\")(?!'')",
        re.I,
    )
    offenders = []
    for path in root.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if suspicious.search(code) and "compare_digest" not in code:
                offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert not offenders, offenders


# --- body size limits before parsing ------------------------------------------------------


@pytest.fixture
def small_signed_app(make_app):
    return make_app(
        max_body_bytes=2048, segment_shared_secrets=(SECRET,), engine_background_training=False
    )


def _count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_above_the_limit_is_refused_before_parsing_or_hashing(
    small_signed_app, monkeypatch, chunked
):
    from webhook.views import segment as segment_view

    parsed = _count_calls(monkeypatch, segment_view, "decode_body")
    hashed = _count_calls(monkeypatch, segment_view, "verify_delivery")
    body = json.dumps({"type": "track", "event": "x" * 4000}).encode()
    client = small_signed_app.test_client()
    if chunked:
        response = client.post(
            "/segment",
            input_stream=__import__("io").BytesIO(body),
            headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"},
        )
    else:
        response = client.post(
            "/segment",
            data=body,
            content_type="application/json",
            headers={"X-Signature": "0" * 40},
        )
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "body_too_large"
    assert parsed == [] and hashed == []


def test_a_forged_single_message_is_refused_before_parsing(small_signed_app, monkeypatch):
    from webhook.views import segment as segment_view

    parsed = _count_calls(monkeypatch, segment_view, "decode_body")
    response = small_signed_app.test_client().post(
        "/segment",
        data=b'{"type": "track", ' + b'"a": [' * 30 + b"]" * 30 + b"}",
        content_type="application/json",
        headers={"X-Signature": "0" * 40},
    )
    assert response.status_code == 401 and parsed == []


def test_rank_refuses_a_body_above_its_limit_before_parsing(make_app, monkeypatch):
    from webhook.views import rank as rank_view

    parsed = _count_calls(monkeypatch, rank_view.json, "loads")
    app = make_app(engine_background_training=False)
    body = b'{"userId": "u", "itemIds": [' + b'"x",' * 70000 + b'"y"]}'
    response = app.test_client().post(
        "/recommendations/rank", data=body, content_type="application/json"
    )
    assert response.status_code == 413 and parsed == []


# --- tokens: tampering and replay across users --------------------------------------------


@pytest.fixture
def token_app(make_app):
    from tests.deliveries import deliver, product_viewed

    app = make_app(secret_key=KEY, engine_background_training=False)
    client = app.test_client()
    deliver(client, *[product_viewed(f"sku-{i}", anonymous_id=f"a-{i}") for i in range(5)])
    return app


def _tamper(token: str) -> list[str]:
    """Every single-character change of the token, at a few positions of each part."""
    out = []
    for at in sorted({0, 1, len(token) // 3, len(token) // 2, len(token) - 2, len(token) - 1}):
        char = token[at]
        for other in ("A", "b", "-", "_", "0"):
            if other != char:
                out.append(token[:at] + other + token[at + 1 :])
                break
    payload, _, rest = token.partition(".")
    forged_subject = (
        base64.urlsafe_b64encode(json.dumps({"u": "mallory"}).encode()).decode().rstrip("=")
    )
    out.append(forged_subject + "." + rest)  # someone else's subject, the same signature
    out.append(token + "x")
    out.append(token[:-1])
    return out


def test_a_tampered_token_is_refused(token_app):
    client = token_app.test_client()
    token = mint_token(KEY, user_id="alice")
    assert (
        client.get(
            "/recommendations?userId=alice", headers={"Authorization": f"Bearer {token}"}
        ).status_code
        == 200
    )
    for forged in _tamper(token):
        if forged == token:
            continue
        for how in ("header", "query"):
            kwargs = (
                {
                    "headers": {"Authorization": f"Bearer {forged}"},
                    "query_string": {"userId": "alice"},
                }
                if how == "header"
                else {"query_string": {"userId": "alice", "token": forged}}
            )
            response = client.get("/recommendations", **kwargs)
            assert response.status_code in (401, 403), (forged, response.get_json())
            assert "itemList" not in response.get_json()


@pytest.mark.parametrize("path", ["GET /recommendations", "POST /recommendations/rank"])
def test_a_token_is_not_replayable_for_another_visitor(token_app, path):
    client = token_app.test_client()
    alice = mint_token(KEY, user_id="alice")
    anon = mint_token(KEY, anonymous_id="a-1")
    other_key = mint_token("another-secret-key-of-32-chars-xx", user_id="bob")

    def ask(token, **who):
        headers = {"Authorization": f"Bearer {token}"}
        if path.startswith("GET"):
            return client.get("/recommendations", query_string=who, headers=headers)
        return client.post(
            "/recommendations/rank", headers=headers, json={**who, "itemIds": ["sku-1", "sku-2"]}
        )

    assert ask(alice, userId="alice").status_code == 200
    assert ask(anon, anonymousId="a-1").status_code == 200
    assert ask(alice, userId="bob").status_code == 403  # Alice's token for Bob
    assert ask(anon, anonymousId="a-2").status_code == 403  # another anonymous visitor
    assert ask(anon, userId="a-1").status_code == 403  # anonymousId as a userId
    assert ask(alice, anonymousId="alice").status_code == 403  # userId as an anonymousId
    assert ask(other_key, userId="bob").status_code == 401  # minted with another key


def test_an_expired_token_is_refused(make_app):
    app = make_app(secret_key=KEY, token_max_age_seconds=1, engine_background_training=False)
    token = mint_token(KEY, user_id="alice")
    time.sleep(2.2)
    response = app.test_client().get(
        "/recommendations?userId=alice", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "token_expired"


def test_a_signed_delivery_replayed_for_another_user_is_refused(make_app):
    """The signature covers the user: the same signature with another userId is a 401."""
    app = make_app(segment_shared_secrets=(SECRET,), engine_background_training=False)
    client = app.test_client()
    message = deliveries.message(
        "identify",
        message_id="m-replay",
        user_id="alice",
        timestamp="2026-11-27T10:00:00Z",
        traits={"plan": "pro"},
    )
    body = json.dumps(message).encode()
    good = sign(body, SECRET)
    assert (
        client.post(
            "/segment", data=body, content_type="application/json", headers={"X-Signature": good}
        ).status_code
        == 200
    )
    replay = json.dumps({**message, "userId": "bob", "messageId": "m-replay-2"}).encode()
    assert (
        client.post(
            "/segment", data=replay, content_type="application/json", headers={"X-Signature": good}
        ).status_code
        == 401
    )
    # The genuine one again is only a duplicate.
    again = client.post(
        "/segment", data=body, content_type="application/json", headers={"X-Signature": good}
    )
    assert again.status_code == 200 and again.get_json()["duplicates"] == 1


# --- no secret and no email in any log line of a full run ---------------------------------

AWS_KEY_ID = "AKIASECURITYTEST7788"
AWS_SECRET = "sec/AwsSecretAccessKey+0123456789abcdefghij"
PROFILE_TOKEN = "sec-profile-api-token-4411"
WRITE_KEY = "sec-segment-write-key-2290"
INGEST_KEY = "sec-ingest-write-key-5566"
DB_PASSWORD = "sec-db-password-8080"
TRACKING_ID = "tracking-sec"
LATE_VISITOR = "late.visitor@example.net"


@pytest.mark.slow
@pytest.mark.requires("postgresql")
@pytest.mark.parametrize("log_format", ["json", "text"])
@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_a_full_run_logs_no_secret_and_no_email(tmp_path, level, log_format, corpus):
    emails = {"jose@example.com", "jane.doe@example.org", "buyer+tag@shop.example", LATE_VISITOR}
    with (
        pg_server.ThrowawayPostgres() as pg,
        FakePersonalizeEvents(tracking_ids=[TRACKING_ID]) as events,
        FakePersonalizeRuntime(default_ranking=["sku-1", "sku-2", "sku-3"]) as runtime,
        FakeProfileAPI(token=PROFILE_TOKEN) as profiles,
        FakeTrackingAPI(write_key=WRITE_KEY) as tracking,
    ):
        profiles.set_traits(
            "user_id:jane.doe@example.org",
            {"purchased_products": ["sku-9"], "email": "jane.doe@example.org"},
        )
        # Known to Segment: a write-back goes only to a profile Segment has.
        profiles.set_traits(f"user_id:{LATE_VISITOR}", {})
        # trust authentication ignores the password, but the service must still hide it
        database_url = pg.url.replace("postgres@", f"postgres:{DB_PASSWORD}@")
        env = {
            "_LOG_DIR": str(tmp_path),
            "LOG_LEVEL": level,
            "LOG_FORMAT": log_format,
            "DATABASE_URL": database_url,
            "SEGMENT_SHARED_SECRET": SECRET,
            "WEBHOOK_BEARER_TOKEN": BEARER,
            "SECRET_KEY": KEY,
            "INGEST_WRITE_KEYS": INGEST_KEY,
            "SEGMENT_WRITE_KEY": WRITE_KEY,
            "SEGMENT_API_HOST": tracking.url,
            "ACTIVATION_INTERVAL_SECONDS": "0",
            "SEGMENT_PROFILE_API_TOKEN": PROFILE_TOKEN,
            "SEGMENT_SPACE_ID": "spa_test",
            "SEGMENT_PROFILE_API_URL": profiles.url,
            "PERSONALIZE_TRACKING_ID": TRACKING_ID,
            "AWS_REGION": "us-east-1",
            "PERSONALIZE_CAMPAIGN_ARN": "arn:aws:personalize:us-east-1:123456789012:campaign/sec",
            "AWS_ENDPOINT_URL_PERSONALIZE_EVENTS": events.url,
            "AWS_ENDPOINT_URL_PERSONALIZE_RUNTIME": runtime.url,
            "AWS_ACCESS_KEY_ID": AWS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
            "ENGINE_BACKGROUND_TRAINING": "false",
            # Generous: a write-back follows only a personalized, non-degraded answer.
            "PROFILE_API_TIMEOUT_SECONDS": "2",
            "RECOMMENDER_TIMEOUT_SECONDS": "3",
        }
        with gunicorn(env, workers=2) as (base, process):
            _full_flow(base, corpus, events, profiles)
            _background_work_logged(base, process, tracking)
        log = process.log_path.read_text(errors="replace")

    secrets = {
        "shared secret": SECRET,
        "bearer token": BEARER,
        "SECRET_KEY": KEY,
        "ingest write key": INGEST_KEY,
        "segment write key": WRITE_KEY,
        "profile token": PROFILE_TOKEN,
        "AWS access key id": AWS_KEY_ID,
        "AWS secret key": AWS_SECRET,
        "database password": DB_PASSWORD,
        "basic auth of the write key": base64.b64encode(f"{INGEST_KEY}:".encode())
        .decode()
        .rstrip("="),
        "basic auth of the profile token": base64.b64encode(f"{PROFILE_TOKEN}:".encode())
        .decode()
        .rstrip("="),
    }
    leaks = {
        name: f"{log.count(value)} lines, e.g. "
        + next(
            line[max(0, line.index(value) - 200) : line.index(value) + 60]
            for line in log.splitlines()
            if value in line
        )
        for name, value in secrets.items()
        if value in log
    }
    assert not leaks, "\n".join(f"{name}: {where}" for name, where in leaks.items())
    found = sorted(set(EMAIL_RE.findall(log)))
    assert not found, [line[:300] for line in log.splitlines() if EMAIL_RE.search(line)][:3]
    assert not any(e in log for e in emails)
    # The run did happen, and was logged in the format asked for, the activation included.
    # (A delivery answered 2xx is logged at DEBUG only; a recommendation request at INFO.)
    assert (
        '"path": "/recommendations", "status": 200'
        if log_format == "json"
        else " path=/recommendations status=200 "
    ) in log
    assert "segment tracking api refused" in log


def _background_work_logged(base: str, process, tracking) -> None:
    """Wait until what the run set off in the background has happened, and what it logs
    is in the log: the appliers caught up (Personalize's retries included), write-backs
    reached the Tracking API, and one write-back refused by it, whose warning comes from
    the activation's own code, after Segment's client made (and, at DEBUG, would have
    logged) its request with the write key."""
    wait_applied(base)
    tracking.wait_for_identifies(1, timeout=30)
    # 400: what Segment refuses with (a request too large or not JSON); a wrong write key
    # gets 200 there, so nothing would be logged.
    tracking.fail(400)
    token = mint_token(KEY, user_id=LATE_VISITOR)

    def refused_and_logged() -> bool:
        # Asked again until an answer is personalized: only those are written back.
        assert (
            requests.get(
                base + "/recommendations",
                timeout=10,
                params={"userId": LATE_VISITOR},
                headers={"Authorization": f"Bearer {token}"},
            ).status_code
            == 200
        )
        return "segment tracking api refused" in process.log_path.read_text(errors="replace")

    wait_until(refused_and_logged, 60, "a write-back refused and logged", interval=3)


def _full_flow(base: str, corpus: list, events, profiles) -> None:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {BEARER}"}

    def post(body: bytes, sign_over: bytes | None = None, **extra):
        signature = sign(sign_over or body, SECRET)
        return requests.post(
            base + "/segment",
            data=body,
            timeout=10,
            headers={**headers, "X-Signature": signature, **extra},
        )

    from webhook.signature import js_stringify

    # Classic deliveries of the genuine corpus (its identify has an email in traits).
    for message in corpus:
        assert post(json.dumps(message).encode()).status_code == 200
    # Users whose id *is* an email; a purchase (activation publishes to the Tracking API).
    people = [
        {
            "type": "identify",
            "messageId": "sec-i1",
            "userId": "jane.doe@example.org",
            "timestamp": "2026-11-27T10:00:00Z",
            "traits": {"email": "jane.doe@example.org", "name": "Jane"},
        },
        {
            "type": "track",
            "event": "Order Completed",
            "messageId": "sec-o1",
            "userId": "buyer+tag@shop.example",
            "timestamp": "2026-11-27T10:01:00Z",
            "properties": {
                "products": [{"product_id": "sku-1"}],
                "email": "buyer+tag@shop.example",
            },
        },
    ]
    batch = json.dumps(people).encode()
    assert post(batch, sign_over=js_stringify(people[0]).encode()).status_code == 200
    # Refusals, which log: a wrong signature, a wrong bearer token close to the right one,
    # a body with an email that is not JSON.
    body = json.dumps(people[0]).encode()
    assert (
        requests.post(
            base + "/segment", data=body, timeout=10, headers={**headers, "X-Signature": "0" * 40}
        ).status_code
        == 401
    )
    assert (
        requests.post(
            base + "/segment", data=body, timeout=10, headers={"Authorization": f"Bearer {BEARER}x"}
        ).status_code
        == 401
    )
    assert post(b'{"userId": "jane.doe@example.org", oops').status_code == 400
    # Personalize failing for a moment: retries, warnings, a 503.
    events.fail_next(50, status=500)
    post(json.dumps({**people[1], "messageId": "sec-o2"}).encode())
    events.reset()
    # Recommendations with tokens: in the header; in the query string (refused: tokens
    # come from the header only, and it must not be logged either); a wrong one.
    jane = mint_token(KEY, user_id="jane.doe@example.org")
    as_jane = {"Authorization": f"Bearer {jane}"}
    assert (
        requests.get(
            base + "/recommendations",
            timeout=10,
            params={"userId": "jane.doe@example.org", "token": jane},
        ).status_code
        == 401
    )
    assert (
        requests.get(
            base + "/recommendations",
            timeout=10,
            params={"userId": "jane.doe@example.org"},
            headers=as_jane,
        ).status_code
        == 200
    )
    assert (
        requests.get(
            base + "/recommendations",
            timeout=10,
            params={"userId": "buyer+tag@shop.example"},
            headers=as_jane,
        ).status_code
        == 403
    )
    assert (
        requests.get(
            base + "/recommendations",
            timeout=10,
            params={"userId": "jane.doe@example.org"},
            headers={"Authorization": f"Bearer {KEY}"},
        ).status_code
        == 401
    )
    # The Profile API failing: degraded answers, a logged warning.
    profiles.fail(500)
    requests.get(
        base + "/recommendations",
        timeout=10,
        params={"userId": "jane.doe@example.org"},
        headers=as_jane,
    )
    profiles.fail(None)
    rank = requests.post(
        base + "/recommendations/rank",
        timeout=10,
        headers={"Authorization": f"Bearer {jane}"},
        json={"userId": "jane.doe@example.org", "itemIds": ["sku-1", "sku-2"]},
    )
    assert rank.status_code == 200, rank.text
    # The Tracking API: the write key as Basic auth, in the body, and a wrong one.
    basic = "Basic " + base64.b64encode(f"{INGEST_KEY}:".encode()).decode()
    track = {
        "type": "track",
        "event": "Product Viewed",
        "userId": "jane.doe@example.org",
        "messageId": "sec-t1",
        "timestamp": "2026-11-27T10:02:00Z",
        "properties": {"product_id": "sku-2"},
    }
    assert (
        requests.post(
            base + "/v1/batch",
            timeout=10,
            headers={"Authorization": basic},
            json={"batch": [track]},
        ).status_code
        == 200
    )
    assert (
        requests.post(
            base + "/v1/track",
            timeout=10,
            json={**track, "messageId": "sec-t2", "writeKey": INGEST_KEY},
        ).status_code
        == 200
    )
    assert (
        requests.post(
            base + "/v1/track", timeout=10, json={**track, "writeKey": INGEST_KEY + "x"}
        ).status_code
        == 401
    )
    # Secrets and emails where they do not belong: a query string, a request id.
    requests.get(base + f"/segment?token={SECRET}&key={AWS_SECRET}", timeout=10)
    requests.get(base + "/healthz", timeout=10, headers={"X-Request-Id": "jane.doe@example.org"})
