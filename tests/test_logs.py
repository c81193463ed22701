"""Log lines: JSON with a request id for machines, short text lines for people
(LOG_FORMAT), and in either format never a secret or an email address."""

import json
import logging
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
import requests

from tests.deliveries import sign
from tests.gunicorn_server import ROOT, gunicorn

SECRET = "log-test-shared-secret-0000"
BEARER = "log-test-bearer-token-1111"
TEXT_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) +\S")


def _run_deliveries(env: dict):
    """The service under gunicorn: a stored delivery, refusals that log, a secret in a
    query string and as a request id. Returns the log."""
    identify = {
        "type": "identify",
        "messageId": "log-1",
        "userId": "jane.doe@example.com",
        "anonymousId": "anon-log",
        "timestamp": "2026-11-27T10:00:00Z",
        "traits": {"email": "jane.doe@example.com", "name": "Jane"},
    }
    body = json.dumps(identify).encode()
    good = sign(body, SECRET)
    with gunicorn(env, workers=1) as (base, process):
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {BEARER}"}
        ok = requests.post(
            base + "/segment",
            data=body,
            headers={**headers, "X-Signature": good, "X-Request-Id": "req-from-caller-1"},
            timeout=5,
        )
        assert ok.status_code == 200
        assert ok.headers["X-Request-Id"] == "req-from-caller-1"
        # Failures log too: a wrong signature, a wrong bearer token that is almost the
        # right one, a body that is not JSON but holds an email address.
        assert (
            requests.post(
                base + "/segment",
                data=body,
                headers={**headers, "X-Signature": "0" * 40},
                timeout=5,
            ).status_code
            == 401
        )
        assert (
            requests.post(
                base + "/segment",
                data=body,
                timeout=5,
                headers={"Authorization": f"Bearer {BEARER}x", "X-Signature": good},
            ).status_code
            == 401
        )
        bad = b'{"userId": "jane.doe@example.com", oops'
        assert (
            requests.post(
                base + "/segment",
                data=bad,
                timeout=5,
                headers={
                    **headers,
                    "X-Signature": sign(bad, SECRET),
                },
            ).status_code
            == 400
        )
        assert requests.get(base + "/segment?token=" + SECRET, timeout=5).status_code == 405
        # A caller-chosen request id is logged, but never as a secret value.
        assert (
            requests.get(base + "/healthz", headers={"X-Request-Id": SECRET}, timeout=5).status_code
            == 200
        )
    return process.log_path.read_text()


def _env(tmp_path, **extra) -> dict:
    return {
        "SEGMENT_SHARED_SECRET": SECRET,
        "WEBHOOK_BEARER_TOKEN": BEARER,
        "DATABASE_URL": f"sqlite:///{tmp_path}/l.db",
        "_LOG_DIR": str(tmp_path),
        "LOG_LEVEL": "DEBUG",
        **extra,
    }


def _assert_no_secret_or_email(log: str) -> None:
    assert SECRET not in log and BEARER not in log
    assert "jane.doe@example.com" not in log and "@example.com" not in log


@pytest.mark.slow
def test_logs_are_json_with_request_ids_and_no_secrets_or_emails(tmp_path):
    # gunicorn's stderr is a file here, so the default (auto) must give JSON.
    log = _run_deliveries(_env(tmp_path))
    assert '"delivery": "stored"' in log
    _assert_no_secret_or_email(log)
    app_lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    requests_logged = [
        line
        for line in app_lines
        if line.get("message") == "request" and line["path"] == "/segment"
    ]
    assert len(requests_logged) == 5
    assert all(line["request_id"] for line in requests_logged)
    assert any(line["request_id"] == "req-from-caller-1" for line in requests_logged)
    started = [line for line in app_lines if line.get("message") == "started"]
    assert started and started[0]["configured"]["mode"] == "embedded"


@pytest.mark.slow
def test_text_lines_are_short_and_redacted_like_json(tmp_path):
    log = _run_deliveries(_env(tmp_path, LOG_FORMAT="text"))
    _assert_no_secret_or_email(log)
    ours = [line for line in log.splitlines() if TEXT_LINE.match(line)]
    assert not any(line.startswith("{") for line in log.splitlines())
    # The start-up line says what runs, in a few words; the configuration is not dumped.
    # (One line a process: the web process, and the worker once it has started.)
    started = [line for line in ours if re.search(r"INFO +started ", line)]
    assert len(started) in (1, 2), ours
    for line in started:
        assert "mode=embedded" in line and "recommender=local" in line
        assert len(line) < 100 and "interaction_events" not in line
    segment = [line for line in ours if "request method=POST path=/segment" in line]
    assert len(segment) == 4  # the fifth /segment request is a GET
    assert any("status=200" in line and "delivery=stored" in line for line in segment)
    assert sum("status=401" in line for line in segment) == 2
    assert all(len(line) < 200 for line in segment)


def _output_of_create_app(env: dict, terminal: bool) -> str:
    """stderr of a process that starts the application and serves one request, on a
    terminal (a pseudo-terminal) or on a pipe."""
    script = "from webhook import create_app\ncreate_app().test_client().get('/healthz')\n"
    command = [sys.executable, "-c", script]
    if not terminal:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stderr.decode()
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=follower,
    )
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the process closed the terminal: it has exited
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
        if process.poll() is None:
            process.kill()
    assert process.wait(timeout=30) == 0
    return b"".join(chunks).decode().replace("\r\n", "\n")


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
def test_auto_format_is_text_on_a_terminal_and_json_otherwise(tmp_path, terminal):
    env = {k: v for k, v in os.environ.items() if k != "LOG_FORMAT"}  # the default: auto
    env.update(DATABASE_URL=f"sqlite:///{tmp_path}/a.db", SEGMENT_SHARED_SECRET=SECRET)
    lines = [line for line in _output_of_create_app(env, terminal).splitlines() if line]
    assert lines
    if terminal:
        assert all(TEXT_LINE.match(line) for line in lines), lines
        assert any(
            re.search(r"INFO +started mode=embedded database=sqlite", line) for line in lines
        ), lines
        assert any("request method=GET path=/healthz status=200" in line for line in lines)
    else:
        records = [json.loads(line) for line in lines]
        assert any(
            r["message"] == "started" and r["configured"]["mode"] == "embedded" for r in records
        )
        assert any(r["message"] == "request" and r["path"] == "/healthz" for r in records)
    assert SECRET not in "\n".join(lines)


@pytest.mark.parametrize(
    "sent",
    [
        "req-1\n",  # a trailing newline: a forged second log line in a text log
        "req-1\r\nX-Injected: yes",
        "a" * 65,
        "not allowed/chars",
        "",
    ],
)
def test_a_request_id_that_is_not_a_plain_token_is_replaced_with_a_fresh_one(client, sent):
    # Real HTTP clients refuse such header values; a proxy or a hand-made request need not,
    # so the WSGI environ is where the attack arrives.
    answer = client.get("/healthz", environ_overrides={"HTTP_X_REQUEST_ID": sent})
    assert answer.status_code == 200
    given = answer.headers["X-Request-Id"]
    assert given != sent
    assert re.fullmatch(r"[0-9a-f]{16}", given)


def test_the_request_id_is_answered_on_errors_and_named_in_their_body(client):
    answer = client.get("/recommendations", headers={"X-Request-Id": "req-err-7"})
    assert answer.status_code == 400
    assert answer.headers["X-Request-Id"] == "req-err-7"
    assert answer.get_json()["error"]["requestId"] == "req-err-7"


def _pool_log_after_the_server_drops_a_connection(postgresql_url, handler_filter) -> str:
    """Check out a pooled PostgreSQL connection, have the server end it (as an outage or
    a restart does), give it back: what the pool logged, through a handler with
    ``handler_filter`` (or none)."""
    import io

    import sqlalchemy as sa

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    if handler_filter is not None:
        handler.addFilter(handler_filter)
    pool_logger = logging.getLogger("sqlalchemy.pool")
    pool_logger.addHandler(handler)
    engine = sa.create_engine(postgresql_url)
    try:
        pooled = engine.raw_connection()
        cursor = pooled.cursor()
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
        with engine.connect() as other:
            other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        pooled.close()  # back to the pool, whose rollback now fails
    finally:
        pool_logger.removeHandler(handler)
        engine.dispose()
    return stream.getvalue()


def test_a_connection_postgresql_dropped_is_one_warning_not_a_traceback(postgresql_url):
    from webhook.logs import PoolResetFilter

    plain = _pool_log_after_the_server_drops_a_connection(postgresql_url, None)
    assert plain.startswith("ERROR") and "Traceback" in plain  # what SQLAlchemy logs
    filtered = _pool_log_after_the_server_drops_a_connection(postgresql_url, PoolResetFilter())
    assert filtered.startswith("WARNING sqlalchemy.pool")
    assert "could not be reset and was dropped: terminating connection" in filtered
    assert "Traceback" not in filtered and filtered.count("\n") == 1
