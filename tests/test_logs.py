"""Logs are JSON lines with a request id, and never hold a secret or an email address."""
import hashlib
import hmac
import json

import requests

from tests.gunicorn_server import gunicorn

SECRET = "log-test-shared-secret-0000"
BEARER = "log-test-bearer-token-1111"


def test_logs_are_json_with_request_ids_and_no_secrets_or_emails(tmp_path):
    env = {"SEGMENT_SHARED_SECRET": SECRET, "WEBHOOK_BEARER_TOKEN": BEARER,
           "DATABASE_URL": f"sqlite:///{tmp_path}/l.db", "_LOG_DIR": str(tmp_path),
           "LOG_LEVEL": "DEBUG"}
    identify = {"type": "identify", "messageId": "log-1", "userId": "jane.doe@example.com",
                "anonymousId": "anon-log", "timestamp": "2026-11-27T10:00:00Z",
                "traits": {"email": "jane.doe@example.com", "name": "Jane"}}
    body = json.dumps(identify).encode()
    good = hmac.new(SECRET.encode(), body, hashlib.sha1).hexdigest()
    with gunicorn(env, workers=1) as (base, process):
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {BEARER}"}
        ok = requests.post(base + "/segment", data=body,
                           headers={**headers, "X-Signature": good,
                                    "X-Request-Id": "req-from-caller-1"}, timeout=5)
        assert ok.status_code == 200
        assert ok.headers["X-Request-Id"] == "req-from-caller-1"
        # Failures log too: a wrong signature, a wrong bearer token that is almost the
        # right one, a body that is not JSON but holds an email address.
        assert requests.post(base + "/segment", data=body,
                             headers={**headers, "X-Signature": "0" * 40}, timeout=5
                             ).status_code == 401
        assert requests.post(base + "/segment", data=body, timeout=5,
                             headers={"Authorization": f"Bearer {BEARER}x",
                                      "X-Signature": good}).status_code == 401
        bad = b'{"userId": "jane.doe@example.com", oops'
        assert requests.post(base + "/segment", data=bad, timeout=5, headers={
            **headers, "X-Signature": hmac.new(SECRET.encode(), bad, hashlib.sha1).hexdigest(),
        }).status_code == 400
        assert requests.get(base + "/segment?token=" + SECRET, timeout=5).status_code == 405
        # A caller-chosen request id is logged, but never as a secret value.
        assert requests.get(base + "/healthz", headers={"X-Request-Id": SECRET},
                            timeout=5).status_code == 200
    log = process.log_path.read_text()
    assert "\"delivery\": \"stored\"" in log
    assert SECRET not in log and BEARER not in log
    assert "jane.doe@example.com" not in log and "@example.com" not in log
    app_lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    requests_logged = [line for line in app_lines
                       if line.get("message") == "request" and line["path"] == "/segment"]
    assert len(requests_logged) == 5
    assert all(line["request_id"] for line in requests_logged)
    assert any(line["request_id"] == "req-from-caller-1" for line in requests_logged)
