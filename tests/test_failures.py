"""Failures, each shown end to end, and that nothing acknowledged is lost.

* PostgreSQL stopped in the middle of a stream of deliveries and started again (a
  throwaway server of this test's own, tests/pg_server.py; never the shared one).
* A gunicorn worker killed with SIGKILL under load (SQLite and PostgreSQL).
* Amazon Personalize throttling every call for 30 s (tests/fake_personalize.py).
* The Segment Profile API slow, failing or gone.

"Segment-style redelivery": every delivery that did not get a 2xx (a 5xx, a timeout, a
dropped connection) is sent again, unchanged, until it does (bounded in rounds and time).
The check that follows is always the same: every messageId that ever got a 2xx is stored,
exactly once, with everything it means (its interactions), and no answer was a 500.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from tests import pg_server
from tests.fake_personalize import FakePersonalizeEvents
from tests.gunicorn_server import ROOT, free_port

SEGMENT_DEADLINE = 5.0


@contextlib.contextmanager
def serve(env: dict, workers: int = 2, timeout: float = 90.0):
    """Like ``tests.gunicorn_server.gunicorn`` (same command, folder and log file), with a
    start-up probe that survives a busy machine: that helper's probe (GET /healthz, 1 s)
    catches only ConnectionError, and the master's socket accepts the connection before a
    worker has booted, so a slow boot ends in a ReadTimeout and the test never starts.
    Here any request error means "not yet", until ``timeout``."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_")}
    full_env.update({"WEB_CONCURRENCY": str(workers), "GUNICORN_BIND": f"127.0.0.1:{port}"})
    full_env.update(env)
    log_path = Path(env.get("_LOG_DIR", tempfile.gettempdir())) / f"gunicorn-{port}.log"
    with open(log_path, "w+b") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "gunicorn", "wsgi:app"], cwd=ROOT,
                                   env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
        process.log_path = log_path  # type: ignore[attr-defined]
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError("gunicorn exited:\n" + log_path.read_text(errors="replace"))
                try:
                    if requests.get(base + "/healthz", timeout=2).status_code in (200, 503):
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("gunicorn did not answer in time")
                time.sleep(0.1)
            yield base, process
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


# --- deliveries and Segment-style redelivery ----------------------------------------------

def make_message(n: int, prefix: str) -> dict:
    """A product event; every fifth an Order Completed of two products (two interactions)."""
    message = {"type": "track", "messageId": f"{prefix}-{n}", "anonymousId": f"anon-{n % 17}",
               "timestamp": "2026-11-27T10:00:00.000Z"}
    if n % 5 == 4:
        message.update(userId=f"user-{n % 11}", event="Order Completed",
                       properties={"order_id": f"o-{n}",
                                   "products": [{"product_id": f"p-{n % 23}", "price": 5},
                                                {"product_id": f"p-{(n + 1) % 23}"}]})
    else:
        message.update(event="Product Viewed",
                       properties={"product_id": f"p-{n % 23}", "price": 9.5})
    return message


def expected_event_ids(message: dict) -> list[str]:
    products = message["properties"].get("products")
    if products:
        return [f"{message['messageId']}#{i}" for i in range(len(products))]
    return [message["messageId"]]


@dataclass
class Ledger:
    """Every attempt's outcome, per messageId."""
    ok: set = field(default_factory=set)
    statuses: Counter = field(default_factory=Counter)
    attempts: Counter = field(default_factory=Counter)
    latencies: list = field(default_factory=list)
    bad_503: list = field(default_factory=list)  # 503s without Retry-After
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, base: str, message: dict | list, timeout: float = 10.0) -> bool:
        """POST one delivery: a message (Classic) or a list of them (an Actions batch)."""
        ids = [m["messageId"] for m in (message if isinstance(message, list) else [message])]
        body = json.dumps(message).encode()
        started = time.monotonic()
        try:
            response = requests.post(base + "/segment", data=body, timeout=timeout, headers={
                "Content-Type": "application/json", "Connection": "close"})
            status = response.status_code
        except requests.RequestException as exc:
            status, response = type(exc).__name__, None
        elapsed = time.monotonic() - started
        with self.lock:
            for mid in ids:
                self.attempts[mid] += 1
            self.statuses[status] += 1
            self.latencies.append(elapsed)
            if status == 503 and not response.headers.get("Retry-After", "").isdigit():
                self.bad_503.append(response.text[:200])
            if isinstance(status, int) and 200 <= status < 300:
                self.ok.update(ids)
                return True
        return False


def stream(base: str, ledger: Ledger, messages: list[dict], threads: int = 4,
           stop_after: float = 120.0) -> list[dict]:
    """Send each message once, from several threads; return those that got no 2xx."""
    failed: list[dict] = []
    lock = threading.Lock()
    deadline = time.monotonic() + stop_after

    def work(part: list[dict]) -> None:
        for message in part:
            if time.monotonic() > deadline:
                with lock:
                    failed.append(message)
                continue
            if not ledger.send(base, message):
                with lock:
                    failed.append(message)

    parts = [messages[i::threads] for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, parts))
    return failed


def redeliver(base: str, ledger: Ledger, pending: list[dict], rounds: int = 30,
              pause: float = 0.5, budget: float = 60.0) -> list[dict]:
    """Segment-style: resend what got no 2xx until it does; return what never did."""
    deadline = time.monotonic() + budget
    for _ in range(rounds):
        if not pending or time.monotonic() > deadline:
            break
        pending = stream(base, ledger, pending, threads=4, stop_after=deadline - time.monotonic())
        if pending:
            time.sleep(pause)
    return pending


def assert_stored_exactly_once(url: str, messages: list[dict], acknowledged: set) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            stored = Counter(row[0] for row in conn.execute(
                sa.text("SELECT message_id FROM segment_messages")))
            events = Counter(row[0] for row in conn.execute(
                sa.text("SELECT event_id FROM interactions")))
    finally:
        engine.dispose()
    by_id = {m["messageId"]: m for m in messages}
    missing = sorted(acknowledged - set(stored))
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:5]}"
    assert all(stored[mid] == 1 for mid in acknowledged)
    for mid in acknowledged:
        for event_id in expected_event_ids(by_id[mid]):
            assert events[event_id] == 1, f"interaction {event_id} stored {events[event_id]}x"
    # Nothing half-stored: an interaction exists only for a stored message.
    stray = [e for e in events if e.split("#")[0] not in stored]
    assert not stray, stray[:5]


def worker_pids(master_pid: int) -> set[int]:
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master_pid:
            children.add(int(entry))
    return children


def wait_for_workers(master_pid: int, count: int, timeout: float = 30.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = worker_pids(master_pid)
        if len(pids) >= count:
            return pids
        time.sleep(0.1)
    raise AssertionError(f"gunicorn has {worker_pids(master_pid)} workers, wanted {count}")


def no_unhandled_errors(log_text: str, tracebacks: bool = True) -> None:
    """No request ended in a 500 (``unhandled error``), and, with ``tracebacks``, nothing
    else logged a traceback either."""
    lines = [line for line in log_text.splitlines()
             if "unhandled error" in line or (tracebacks and "Traceback" in line)]
    assert not lines, "\n".join(line[:3000] for line in lines[:3])


# --- PostgreSQL stopped and started in the middle of a stream ------------------------------

needs_pg = pytest.mark.skipif(not pg_server.available(),
                              reason="PostgreSQL binaries or the postgres user are missing")


@pytest.fixture
def throwaway_pg():
    with pg_server.ThrowawayPostgres() as pg:
        yield pg


@needs_pg
def test_postgres_stopped_mid_stream_answers_503_and_redelivery_loses_nothing(
        throwaway_pg, tmp_path):
    pg = throwaway_pg
    messages = [make_message(n, "pgstop") for n in range(900)]
    ledger = Ledger()
    env = {"DATABASE_URL": pg.url, "_LOG_DIR": str(tmp_path),
           "ENGINE_BACKGROUND_TRAINING": "false", "RETRY_AFTER_SECONDS": "7"}
    outage: dict = {}
    with serve(env, workers=2) as (base, process):
        workers_before = wait_for_workers(process.pid, 2)

        def break_the_database():
            # Let the stream get going, then stop PostgreSQL hard and keep it down while
            # deliveries keep coming; probe the other endpoints meanwhile.
            deadline = time.monotonic() + 20
            while len(ledger.ok) < 150 and time.monotonic() < deadline:
                time.sleep(0.02)
            pg.stop(mode="immediate")
            outage["stopped_at_ok"] = len(ledger.ok)
            time.sleep(1.0)
            health = requests.get(base + "/healthz", timeout=5)
            outage["healthz"] = health.status_code
            time.sleep(2.0)
            outage["during"] = dict(ledger.statuses)
            pg.start()
            outage["restarted"] = True

        breaker = threading.Thread(target=break_the_database)
        breaker.start()
        failed = stream(base, ledger, messages, threads=4, stop_after=90)
        breaker.join(timeout=60)
        assert outage.get("restarted"), outage
        first_pass = dict(ledger.statuses)
        never = redeliver(base, ledger, failed)
        # Segment also redelivers some that did get a 2xx (a timeout on its side).
        acked_sample = [m for m in messages if m["messageId"] in ledger.ok][:50]
        stream(base, ledger, acked_sample)
        assert wait_for_workers(process.pid, 2) == workers_before, "a worker died"

    print(f"\nfirst pass {first_pass}; outage {outage}; after redelivery {dict(ledger.statuses)}")
    assert not never, f"{len(never)} deliveries never got a 2xx"
    assert 503 in first_pass, "the outage was not seen: stop came too late?"
    assert ledger.statuses[500] == 0 and not ledger.bad_503, ledger.bad_503[:3]
    assert set(ledger.statuses) <= {200, 503}, ledger.statuses  # never a dropped connection
    assert outage["healthz"] == 503
    assert ledger.ok == {m["messageId"] for m in messages}
    assert_stored_exactly_once(pg.url, messages, ledger.ok)
    # Also no traceback: the recommendations recomputed after a purchase meet the same
    # outage (they used to log one, through the bug the next test shows).
    no_unhandled_errors(process.log_path.read_text(errors="replace"))


@needs_pg
def test_recommendations_while_postgres_is_down_are_a_503_or_degraded_never_a_500(
        throwaway_pg, tmp_path):
    pg = throwaway_pg
    env = {"DATABASE_URL": pg.url, "_LOG_DIR": str(tmp_path),
           "ENGINE_BACKGROUND_TRAINING": "false", "RETRY_AFTER_SECONDS": "7"}
    with serve(env, workers=1) as (base, process):
        seeded = requests.post(base + "/segment", timeout=10,
                               json=[make_message(n, "recs") for n in range(30)])
        assert seeded.status_code == 200
        queries = ["anonymousId=anon-1", "userId=user-4", "itemId=p-1", "anonymousId=nobody"]
        for query in queries:
            assert requests.get(f"{base}/recommendations?{query}", timeout=5).status_code == 200
        pg.stop(mode="immediate")
        down = {}
        for query in queries:
            response = requests.get(f"{base}/recommendations?{query}", timeout=5)
            down[query] = (response.status_code, response.headers.get("Retry-After"),
                           response.json().get("degraded") or response.json().get("error"))
        pg.start()
        time.sleep(0.5)
        back = {q: requests.get(f"{base}/recommendations?{q}", timeout=5).status_code
                for q in queries}
    print(f"\nwhile down: {down}; back: {back}")
    for query, (status, retry_after, _) in down.items():
        assert status in (200, 503), (query, down)
        assert status == 200 or retry_after == "7", (query, down)
    assert set(back.values()) == {200}, back


# --- a worker killed with SIGKILL under load ----------------------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def kill_database(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/kill.db"
        return
    if not pg_server.available():
        pytest.skip("PostgreSQL binaries or the postgres user are missing")
    with pg_server.ThrowawayPostgres() as pg:
        yield pg.url


def test_worker_killed_with_sigkill_under_load_loses_no_acknowledged_message(
        kill_database, tmp_path):
    """Actions batches of 10 from 6 threads into 2 workers; a worker is killed three times
    (one of the two each time, once the last replacement is up) while the stream goes on."""
    messages = [make_message(n, "kill") for n in range(1500)]
    deliveries = [messages[i:i + 10] for i in range(0, len(messages), 10)]
    ledger = Ledger()
    env = {"DATABASE_URL": kill_database, "_LOG_DIR": str(tmp_path),
           "ENGINE_BACKGROUND_TRAINING": "false"}
    killed: list = []
    with serve(env, workers=2) as (base, process):
        first = wait_for_workers(process.pid, 2)

        def kill_three_times():
            for threshold in (200, 600, 1000):
                deadline = time.monotonic() + 20
                while len(ledger.ok) < threshold and time.monotonic() < deadline:
                    time.sleep(0.005)
                current = wait_for_workers(process.pid, 2)
                victim = min(current)
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
                time.sleep(0.3)

        killer = threading.Thread(target=kill_three_times)
        killer.start()
        failed = stream(base, ledger, deliveries, threads=6, stop_after=90)
        killer.join(timeout=60)
        first_pass = dict(ledger.statuses)
        never = redeliver(base, ledger, failed)
        after = wait_for_workers(process.pid, 2)
        assert len(killed) == 3 and not set(killed) & after and len(after) == 2, (
            first, killed, after)

    print(f"\nkilled {killed}; first pass {first_pass}; deliveries without a 2xx "
          f"{len(failed)}; after redelivery {dict(ledger.statuses)}")
    assert not never, f"{len(never)} deliveries never got a 2xx"
    assert ledger.statuses[500] == 0
    assert ledger.ok == {m["messageId"] for m in messages}
    assert_stored_exactly_once(kill_database, messages, ledger.ok)


# --- Personalize throttling every call for 30 s --------------------------------------------

THROTTLE_SECONDS = 30.0


def test_personalize_throttled_for_30s_answers_in_time_and_redelivery_completes(tmp_path):
    messages = [make_message(n, "thr") for n in range(2500)]
    ledger = Ledger()
    with FakePersonalizeEvents() as fake:
        env = {"DATABASE_URL": f"sqlite:///{tmp_path}/thr.db", "_LOG_DIR": str(tmp_path),
               "ENGINE_BACKGROUND_TRAINING": "false",
               "PERSONALIZE_TRACKING_ID": "tracking-throttle", "AWS_REGION": "us-east-1",
               "AWS_ENDPOINT_URL_PERSONALIZE_EVENTS": fake.url,
               "AWS_ACCESS_KEY_ID": "AKIDTHROTTLETEST", "AWS_SECRET_ACCESS_KEY": "x" * 40,
               "PERSONALIZE_DEADLINE_SECONDS": "3.5"}
        with serve(env, workers=2) as (base, process):
            warm = messages[:20]
            assert not stream(base, ledger, warm)  # working before the throttling
            fake.throttle_for(THROTTLE_SECONDS)
            throttled_from = time.monotonic()
            during: list[dict] = []
            rest = iter(messages[20:])
            lock = threading.Lock()

            def keep_sending():
                # New deliveries throughout the 30 s, as Segment keeps forwarding.
                while time.monotonic() - throttled_from < THROTTLE_SECONDS + 1:
                    with lock:
                        message = next(rest, None)
                    if message is None:
                        return
                    if not ledger.send(base, message, timeout=15):
                        with lock:
                            during.append(message)
                    time.sleep(0.1)  # a steady stream, not a flood: ~10/s a thread

            with ThreadPoolExecutor(6) as pool:
                list(pool.map(lambda _: keep_sending(), range(6)))
            statuses_during = dict(ledger.statuses)
            remaining = list(rest)
            never = redeliver(base, ledger, during + remaining, pause=1.0, budget=60)
            log_text = process.log_path.read_text(errors="replace")
        sent = fake.events()

    sent_messages = [m for m in messages if m["messageId"] in ledger.attempts]
    ordered = sorted(ledger.latencies)
    print(f"\nthrottled {THROTTLE_SECONDS}s: {statuses_during}; after redelivery "
          f"{dict(ledger.statuses)}; answers p50 {ordered[len(ordered) // 2]:.2f}s, "
          f"p99 {ordered[int(0.99 * (len(ordered) - 1))]:.2f}s, max {ordered[-1]:.2f}s; "
          f"events sent {len(sent)} for {len(sent_messages)} messages")
    assert max(ledger.latencies) < SEGMENT_DEADLINE, max(ledger.latencies)
    assert statuses_during.get(503, 0) > 0 and not ledger.bad_503
    assert ledger.statuses[500] == 0
    assert not never
    assert ledger.ok == {m["messageId"] for m in sent_messages}
    # Redelivery completed the data: every event of every message reached Personalize...
    expected = {eid for m in sent_messages for eid in expected_event_ids(m)}
    by_id = defaultdict(list)
    for event in sent:
        by_id[event["eventId"]].append(event)
    assert set(by_id) == expected
    # ...and what was sent twice (a call accepted before its delivery failed) is the very
    # same event, with the same id, so Personalize keeps one.
    for event_id, copies in by_id.items():
        assert all(c == copies[0] for c in copies), event_id
    assert_stored_exactly_once(f"sqlite:///{tmp_path}/thr.db", sent_messages, ledger.ok)
    no_unhandled_errors(log_text)


# --- the Profile API slow, failing or gone ------------------------------------------------

def _seeded_profile_app(make_app, profile_url: str):
    from tests.fake_segment_apis import deliver, order_completed, product_viewed

    app = make_app(segment_profile_api_token="profile-token", segment_space_id="spa_test",
                   segment_profile_api_url=profile_url, profile_api_timeout_seconds=0.25,
                   profile_cache_seconds=0.0, engine_background_training=False)
    client = app.test_client()
    deliver(client, *[product_viewed(f"sku-{i}", anonymous_id=f"a-{i}") for i in range(8)],
            order_completed(["sku-1"], user_id="buyer"))
    return app, client


@pytest.mark.parametrize("failure", ["slow", "error", "gone"])
def test_profile_api_slow_or_down_recommendations_served_in_time_marked_degraded(
        make_app, failure):
    from tests.fake_segment_apis import FakeProfileAPI

    profile_api = FakeProfileAPI().start()
    try:
        profile_api.set_traits("user_id:buyer", {"purchased_products": ["sku-2"]})
        # "gone": nothing listens on the port (connection refused).
        url = profile_api.url if failure != "gone" else f"http://127.0.0.1:{free_port()}"
        app, client = _seeded_profile_app(make_app, url)
        if failure != "gone":
            healthy = client.get("/recommendations?userId=buyer&numResults=5").get_json()
            assert "degraded" not in healthy
            assert not {"sku-1", "sku-2"} & {i["itemId"] for i in healthy["itemList"]}
        if failure == "slow":
            profile_api.delay(3.0)
        elif failure == "error":
            profile_api.fail(503)
        timings = []
        for _ in range(5):
            started = time.monotonic()
            response = client.get("/recommendations?userId=buyer&numResults=5")
            timings.append(time.monotonic() - started)
            answer = response.get_json()
            assert response.status_code == 200, answer
            assert "profile" in answer["degraded"], answer
            assert answer["itemList"], answer
            # The purchase this service saw itself is still excluded.
            assert "sku-1" not in {i["itemId"] for i in answer["itemList"]}
        # Within the Profile API timeout (0.25 s), plus the rest of the work.
        assert max(timings) < 1.0, timings
    finally:
        profile_api.delay(0)
        profile_api.stop()
