"""The service as deployed: gunicorn with several workers."""
import hashlib
import hmac
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import sample
from tests.gunicorn_server import gunicorn

pytestmark = pytest.mark.slow  # each test starts gunicorn

SECRET = "gunicorn-test-secret"


def _signed(message):
    body = json.dumps(message, separators=(",", ":")).encode()
    signature = hmac.new(SECRET.encode(), body, hashlib.sha1).hexdigest()
    return body, {"Content-Type": "application/json", "X-Signature": signature}


def _message(n):
    return {"type": "track", "event": "Product Viewed", "messageId": f"gm-{n}",
            "anonymousId": f"anon-{n % 7}", "timestamp": "2026-11-27T10:00:00.000Z",
            "properties": {"product_id": f"p-{n % 13}", "price": 9.5}}


def _counter(text, kind, outcome):
    return sample(text, "segment_messages_total", outcome=outcome, type=kind)


def test_message_counter_is_correct_across_workers(tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {"SEGMENT_SHARED_SECRET": SECRET, "DATABASE_URL": f"sqlite:///{tmp_path}/g.db",
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "_LOG_DIR": str(tmp_path)}
    with gunicorn(env, workers=2) as (base, _):
        def post(n):
            body, headers = _signed(_message(n))
            # A new connection each time, so both workers take requests.
            return requests.post(base + "/segment", data=body,
                                 headers={**headers, "Connection": "close"}, timeout=10)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(120)))
        assert all(a.status_code == 200 for a in answers)
        # Redeliver 30 of them: duplicates.
        with ThreadPoolExecutor(8) as pool:
            again = list(pool.map(post, range(30)))
        assert all(a.json()["duplicates"] == 1 for a in again)

        def scrape():
            return requests.get(base + "/metrics", headers={"Connection": "close"},
                                timeout=5).text

        def complete(text):
            return (_counter(text, "track", "accepted") == 120
                    and _counter(text, "track", "duplicate") == 30
                    and sample(text, "segment_deliveries_total", status="200") == 150
                    and sample(text, "segment_delivery_seconds_count") == 150)

        # Each worker hands its delivery counts over within a second (metrics._Tally):
        # by then every scrape, whichever worker answers it, sees the sum over all.
        deadline = time.monotonic() + 10
        text = scrape()
        while not complete(text) and time.monotonic() < deadline:
            time.sleep(0.1)
            text = scrape()
        assert _counter(text, "track", "accepted") == 120
        assert _counter(text, "track", "duplicate") == 30
        assert sample(text, "segment_deliveries_total", status="200") == 150
        # Each delivery is one observation of its time, in its bucket.
        assert sample(text, "segment_delivery_seconds_count") == 150
        assert sample(text, "segment_delivery_seconds_bucket", le="+Inf") == 150
        assert 0 < sample(text, "segment_delivery_seconds_sum") < 150 * 5
        bounds = ("0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0")
        cumulative = [sample(text, "segment_delivery_seconds_bucket", le=b) for b in bounds]
        assert cumulative == sorted(cumulative)  # cumulative, as the text format says
        assert cumulative[-1] == 150  # every delivery answered within Segment's 5 s
        for _ in range(10):
            text = scrape()
            assert _counter(text, "track", "accepted") == 120
            assert _counter(text, "track", "duplicate") == 30
            assert sample(text, "segment_delivery_seconds_count") == 150
        writers = {name.rsplit("_", 1)[-1] for name in os.listdir(metrics_dir)
                   if name.startswith("counter_")}
        assert len(writers) >= 2, "both workers should have counted messages"


def test_healthz_under_gunicorn_says_signatures_are_not_enforced(tmp_path):
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/g.db", "_LOG_DIR": str(tmp_path)}
    with gunicorn(env, workers=1) as (base, process):
        health = requests.get(base + "/healthz", timeout=5).json()
        assert health["signatures_enforced"] is False
        assert any("UNSIGNED" in w for w in health["warnings"])
    assert "UNSIGNED DELIVERIES ARE ACCEPTED" in process.log_path.read_text()


def test_bad_setting_stops_gunicorn_naming_the_variable(tmp_path):
    env = {"MAX_BODY_BYTES": "eight megabytes", "_LOG_DIR": str(tmp_path)}
    with pytest.raises(RuntimeError, match="gunicorn exited") as stopped:
        with gunicorn(env, workers=1):
            pass
    assert "exited with 0:" not in str(stopped.value)
    assert "configuration error: MAX_BODY_BYTES" in str(stopped.value)
