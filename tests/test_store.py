"""The local store, through POST /segment, on SQLite and on PostgreSQL: idempotency under
concurrent redelivery, merge order of traits and catalog fields, deletion, repeated
records in one batch, and 503 + Retry-After while the database is unreachable.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from datetime import UTC

import pytest
import sqlalchemy as sa

from tests import deliveries
from tests.conftest import applied, raw_client, store_of
from tests.waiting import wait_until


@pytest.fixture
def app(make_app, database_url):
    return make_app(database_url=database_url)


def iso(second: int) -> str:
    return f"2024-05-01T10:00:{second:02d}.000Z"


def track(
    message_id,
    product_id="p-1",
    *,
    user="user-1",
    anon=None,
    second=0,
    event="Product Viewed",
    **properties,
):
    return deliveries.track(
        event,
        product_id,
        message_id=message_id,
        user_id=user,
        anonymous_id=anon,
        timestamp=iso(second),
        properties=properties,
    )


def identify(message_id, traits, *, user="user-1", anon=None, second=0):
    return deliveries.message(
        "identify",
        message_id=message_id,
        user_id=user,
        anonymous_id=anon,
        timestamp=iso(second),
        traits=traits,
    )


def post(client, payload, status=200):
    response = client.post("/segment", data=json.dumps(payload), content_type="application/json")
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    return response.get_json()


def _json(value):
    return json.loads(value) if isinstance(value, str) else value


def rows(app, sql):
    with store_of(app).engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(sql))]


def interactions(app):
    return {
        r["event_id"]: (r["user_id"], r["anonymous_id"], r["item_id"])
        for r in rows(app, "SELECT * FROM interactions")
    }


def profiles(app):
    return {
        r["profile_id"]: _json(r["traits"])
        for r in rows(app, "SELECT profile_id, traits FROM profiles")
    }


def items(app):
    return {r["item_id"]: r for r in rows(app, "SELECT * FROM items")}


def links(app):
    return {
        r["anonymous_id"]: r["user_id"]
        for r in rows(app, "SELECT anonymous_id, user_id FROM identity_links")
    }


# --- idempotency ----------------------------------------------------------------------------


def test_concurrent_redelivery_stores_one_copy(app):
    rounds, size = 4, 40
    for round_number in range(rounds):
        batch = [
            track(f"r{round_number}-m{i}", f"p-{i % 7}", second=i % 60, name=f"Produkt {i % 7}")
            for i in range(size)
        ]
        batch.append(identify(f"r{round_number}-id", {"round": round_number}))
        body = json.dumps(batch)
        barrier = threading.Barrier(2)
        answers: list = [None, None]

        def deliver(slot, barrier=barrier, body=body, answers=answers):
            client = app.test_client()
            barrier.wait()
            response = client.post("/segment", data=body, content_type="application/json")
            answers[slot] = (response.status_code, response.get_json())

        threads = [threading.Thread(target=deliver, args=(slot,)) for slot in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert [a[0] for a in answers] == [200, 200], answers
        assert sorted(a[1]["accepted"] for a in answers) == [0, size + 1]
        assert sorted(a[1]["duplicates"] for a in answers) == [0, size + 1]
        assert sum(a[1]["interactions"] for a in answers) == size
    counts = store_of(app).counts()
    assert counts["interactions"] == rounds * size
    assert counts["inbox"] == rounds * (size + 1)
    assert counts["items"] == 7


def test_concurrent_deliveries_at_normal_claim_each_message_once(make_app, sqlite_url):
    # At SQLITE_SYNCHRONOUS=NORMAL each request thread commits on a connection of its own,
    # SQLite's lock ordering them: every messageId is still accepted exactly once across
    # threads that race with the same messages.
    app = make_app(database_url=sqlite_url, sqlite_synchronous="NORMAL")
    threads_count, messages = 6, 25
    barrier = threading.Barrier(threads_count)
    answers: list[list] = [[] for _ in range(threads_count)]

    def deliver(slot):
        client = raw_client(app)
        barrier.wait()
        for i in range(messages):
            # Every thread sends every message, each starting at another one.
            n = (i + slot * 4) % messages
            response = client.post(
                "/segment", data=json.dumps(track(f"race-{n}")), content_type="application/json"
            )
            answers[slot].append((response.status_code, response.get_json()))

    threads = [threading.Thread(target=deliver, args=(slot,)) for slot in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    flat = [answer for per_thread in answers for answer in per_thread]
    assert len(flat) == threads_count * messages
    assert {status for status, _ in flat} == {200}
    assert sum(body["accepted"] for _, body in flat) == messages
    assert sum(body["duplicates"] for _, body in flat) == (threads_count - 1) * messages
    assert store_of(app).counts()["inbox"] == messages
    applied(app)
    assert set(interactions(app)) == {f"race-{n}" for n in range(messages)}


def _open_files(prefix: str) -> int:
    """File descriptors of this process open on files whose path starts with ``prefix``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(prefix)
        except OSError:
            continue  # closed meanwhile
    return count


def test_a_thread_per_request_server_leaves_no_connection_open(make_app, sqlite_url, tmp_path):
    # A server that starts a thread for each request (``flask run``): at NORMAL each thread
    # writes on a connection of its own, closed when the thread ends, not piling up.
    app = make_app(database_url=sqlite_url, sqlite_synchronous="NORMAL")
    post(raw_client(app), track("first"))
    inbox_file = str(tmp_path / "segment.db-inbox")
    before = _open_files(inbox_file)

    def deliver(n):
        post(raw_client(app), track(f"thread-{n}"))

    for n in range(30):
        thread = threading.Thread(target=deliver, args=(n,))
        thread.start()
        thread.join(timeout=30)
    assert store_of(app).counts()["inbox"] == 31
    # Two files a connection (the database and its WAL): at most the pool's one more.
    assert _open_files(inbox_file) <= before + 2


def test_same_message_twice_in_one_delivery_is_stored_once(app):
    client = app.test_client()
    summary = post(client, [track("twice", "p-1"), track("twice", "p-1"), track("once", "p-2")])
    assert (summary["accepted"], summary["duplicates"], summary["interactions"]) == (2, 1, 2)
    assert set(interactions(app)) == {"twice", "once"}


def test_a_large_batch_with_old_and_new_messages_claims_each_once(app):
    # More messages than one claim statement holds (SQLite claims in chunks): the
    # already-known ones, spread across the chunks, are duplicates; the rest are stored.
    client = app.test_client()
    known = [track(f"big-{i}", f"p-{i % 9}") for i in range(0, 1300, 7)]
    assert post(client, known)["accepted"] == len(known)
    summary = post(client, [track(f"big-{i}", f"p-{i % 9}") for i in range(1300)])
    assert (summary["accepted"], summary["duplicates"]) == (1300 - len(known), len(known))
    assert summary["interactions"] == 1300 - len(known)
    assert set(interactions(app)) == {f"big-{i}" for i in range(1300)}
    assert store_of(app).counts()["inbox"] == 1300


def test_redelivery_after_a_change_of_content_keeps_the_first(app):
    """Segment redelivers the same messageId with the same content; a second message with
    the same id is a duplicate whatever it says."""
    client = app.test_client()
    post(client, track("m-1", "p-1", name="Erste"))
    summary = post(client, track("m-1", "p-2", name="Zweite"))
    assert summary["duplicates"] == 1
    assert interactions(app) == {"m-1": ("user-1", None, "p-1")}
    assert set(items(app)) == {"p-1"}


# --- merge order -------------------------------------------------------------------------------


def test_traits_newer_wins_older_fills_gaps(app):
    client = app.test_client()
    post(client, identify("i-2", {"plan": "pro", "city": "Bern"}, second=20))
    post(client, identify("i-1", {"plan": "free", "email": "old@example.com"}, second=10))
    assert profiles(app)["user-1"] == {"plan": "pro", "city": "Bern", "email": "old@example.com"}
    post(client, identify("i-3", {"city": "Zürich", "name": "José"}, second=30))
    assert profiles(app)["user-1"] == {
        "plan": "pro",
        "city": "Zürich",
        "name": "José",
        "email": "old@example.com",
    }


def test_traits_out_of_order_within_one_batch(app):
    client = app.test_client()
    post(client, identify("i-mid", {"plan": "pro"}, second=20))
    post(
        client,
        [
            identify("i-new", {"city": "Zürich"}, second=30),
            identify("i-old", {"plan": "free", "city": "Bern", "lang": "de"}, second=10),
        ],
    )
    assert profiles(app)["user-1"] == {"plan": "pro", "city": "Zürich", "lang": "de"}


def test_catalog_newer_wins_older_fills_gaps(app):
    client = app.test_client()
    post(client, track("v-2", "p-1", second=20, name="Stuhl", price=20))
    post(client, track("v-1", "p-1", second=10, name="Alter Stuhl", price=10, brand="Möbel & Co"))
    item = items(app)["p-1"]
    assert (item["name"], item["price"], item["brand"]) == ("Stuhl", 20, "Möbel & Co")
    post(client, track("v-3", "p-1", second=30, price=25))
    item = items(app)["p-1"]
    assert (item["name"], item["price"], item["brand"]) == ("Stuhl", 25, "Möbel & Co")


def test_catalog_older_message_in_a_batch_does_not_overwrite_a_newer_stored_value(app):
    client = app.test_client()
    post(client, track("v-2", "p-1", second=20, name="Stuhl (neu)"))
    # One delivery: an older message naming the item, and a newer one without a name.
    post(
        client,
        [
            track("v-1", "p-1", second=10, name="Stuhl (alt)", brand="Möbel & Co"),
            track("v-3", "p-1", second=30, price=25),
        ],
    )
    item = items(app)["p-1"]
    assert (item["name"], item["brand"], item["price"]) == ("Stuhl (neu)", "Möbel & Co", 25)


# --- deletion ---------------------------------------------------------------------------------


def _two_users(client):
    post(
        client,
        [
            # user-1: anonymous history first, then sign-in (identify + alias), then known.
            track("u1-a1", "p-1", user=None, anon="anon-1", second=1),
            track("u1-a2", "p-2", user=None, anon="anon-1", second=2),
            identify("u1-anon-traits", {"seen": "anonymously"}, user=None, anon="anon-1", second=3),
            identify(
                "u1-id", {"name": "José", "email": "jose@example.com"}, anon="anon-1", second=4
            ),
            {
                "type": "alias",
                "messageId": "u1-alias",
                "previousId": "anon-1",
                "userId": "user-1",
                "timestamp": iso(5),
            },
            track("u1-k1", "p-3", second=6, name="Tisch"),
            track("u1-k2", "p-1", user="user-1", anon="anon-1b", second=7),
            # user-2, on another device.
            track("u2-a1", "p-1", user=None, anon="anon-2", second=8),
            identify("u2-id", {"name": "Zoë"}, user="user-2", anon="anon-2", second=9),
            track("u2-k1", "p-2", user="user-2", second=10),
        ],
    )


def test_delete_forgets_the_user_and_their_anonymous_history_only(app):
    client = app.test_client()
    _two_users(client)
    assert links(app) == {"anon-1": "user-1", "anon-1b": "user-1", "anon-2": "user-2"}
    catalog = items(app)

    summary = post(client, {"type": "delete", "userId": "user-1", "messageId": "del-1"})
    assert summary["accepted"] == 1

    assert interactions(app) == {
        "u2-a1": (None, "anon-2", "p-1"),
        "u2-k1": ("user-2", None, "p-2"),
    }
    assert profiles(app) == {"user-2": {"name": "Zoë"}}
    assert links(app) == {"anon-2": "user-2"}
    assert items(app) == catalog  # the catalog is not about the user

    # Segment redelivering the old messages does not bring the user back.
    _two_users(client)
    assert set(interactions(app)) == {"u2-a1", "u2-k1"}
    assert "user-1" not in profiles(app)


def test_delete_in_the_middle_of_a_batch(app):
    client = app.test_client()
    summary = post(
        client,
        [
            track("before", "p-1"),
            identify("traits-before", {"plan": "pro"}),
            {"type": "delete", "userId": "user-1", "messageId": "del-1", "timestamp": iso(1)},
            track("after", "p-2", second=2),
        ],
    )
    assert summary["accepted"] == 4
    assert interactions(app) == {"after": ("user-1", None, "p-2")}
    assert "user-1" not in profiles(app)


def test_delete_of_an_unknown_user_changes_nothing_else(app):
    client = app.test_client()
    _two_users(client)
    before = store_of(app).counts()
    post(client, {"type": "delete", "userId": "nobody", "messageId": "del-x", "timestamp": iso(0)})
    after = store_of(app).counts()
    assert after["inbox"] == before["inbox"] + 1
    assert {k: v for k, v in after.items() if k != "inbox"} == {
        k: v for k, v in before.items() if k != "inbox"
    }


# --- the same item / user many times in one batch (PostgreSQL upserts) -------------------------


def test_one_batch_mentioning_the_same_item_and_user_many_times(app):
    client = app.test_client()
    batch = []
    for i in range(60):
        batch.append(
            track(
                f"t-{i}",
                "p-same",
                user="user-1",
                anon="anon-1",
                second=i,
                name=f"Name {i}",
                price=i,
            )
        )
        batch.append(
            identify(f"i-{i}", {"n": i, f"k{i % 3}": i}, user="user-1", anon="anon-1", second=i)
        )
        batch.append(
            {
                "type": "alias",
                "messageId": f"a-{i}",
                "previousId": "anon-1",
                "userId": "user-1",
                "timestamp": iso(i),
            }
        )
    batch.append(
        track(
            "order",
            event="Order Completed",
            second=59,
            user="user-1",
            products=[
                {"product_id": "p-same", "name": "Name 59"},
                {"product_id": "p-same", "quantity": 2},
            ],
        )
    )
    summary = post(client, batch)
    assert summary["accepted"] == len(batch)
    assert summary["interactions"] == 62
    item = items(app)["p-same"]
    assert (item["name"], item["price"]) == ("Name 59", 59)
    assert profiles(app) == {"user-1": {"n": 59, "k0": 57, "k1": 58, "k2": 59}}
    assert links(app) == {"anon-1": "user-1"}
    assert {eid for eid in interactions(app) if eid.startswith("order")} == {"order#0", "order#1"}


# --- the database unreachable -------------------------------------------------------------------


def _assert_503(response, retry_after: str):
    assert response.status_code == 503, response.get_data(as_text=True)[:300]
    assert response.is_json and response.get_json()["error"]["message"]
    assert response.headers.get("Retry-After") == retry_after


def test_postgresql_unreachable_is_503_with_retry_after(make_app):
    app = make_app(
        database_url="postgresql+psycopg://postgres@127.0.0.1:1/test", retry_after_seconds=7
    )
    client = raw_client(app)  # nothing to apply: the store is not there
    for payload in (track("m-1"), [track("m-2"), track("m-3")]):
        response = client.post(
            "/segment", data=json.dumps(payload), content_type="application/json"
        )
        _assert_503(response, "7")


def test_sqlite_unreachable_is_503_then_recovers(make_app, tmp_path):
    folder = tmp_path / "not-yet"
    app = make_app(database_url=f"sqlite:///{folder}/segment.db")
    response = raw_client(app).post(
        "/segment", data=json.dumps(track("m-1")), content_type="application/json"
    )
    _assert_503(response, "30")

    folder.mkdir()  # the volume is mounted: the same process recovers by itself
    summary = post(app.test_client(), track("m-1"))
    assert summary["accepted"] == 1
    assert store_of(app).counts()["interactions"] == 1


def test_sqlite_locked_by_another_writer_is_503_and_nothing_stored(make_app, sqlite_url, tmp_path):
    app = make_app(database_url=sqlite_url)
    client = app.test_client()
    post(client, track("m-0"))
    # Deliveries are written into the inbox's own file, beside the database.
    blocker = sqlite3.connect(str(tmp_path / "segment.db-inbox"), isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        response = client.post(
            "/segment", data=json.dumps(track("m-1")), content_type="application/json"
        )
        _assert_503(response, "30")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store_of(app).counts()["inbox"] == 1
    # Segment's retry of the same delivery goes through, once.
    assert post(client, track("m-1"))["accepted"] == 1
    assert store_of(app).counts()["interactions"] == 2


def test_sqlite_deliveries_do_not_wait_for_a_writer_holding_the_database(
    make_app, sqlite_url, tmp_path
):
    """The inbox has a file of its own: while another writer (an applier's batch, say)
    holds the database, deliveries are still acknowledged, and applied once it lets go."""
    app = make_app(database_url=sqlite_url)
    post(app.test_client(), track("m-0"))
    client = raw_client(app)  # apply nothing in the request: that waits for the database
    blocker = sqlite3.connect(str(tmp_path / "segment.db"), isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        summary = post(client, track("m-held", "p-held"))
        assert summary["accepted"] == 1
        assert time.monotonic() - started < 1.0  # not after a busy timeout
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    applied(app)
    assert "m-held" in interactions(app)


def test_sqlite_deliveries_after_the_inbox_lost_its_newest_rows_are_applied(
    make_app, sqlite_url, tmp_path
):
    """The inbox's file lost its newest rows while the database kept the appliers'
    positions (a power loss at SQLITE_SYNCHRONOUS=NORMAL, or one file restored from a
    backup): after a restart, new deliveries reuse those seqs and must still be applied."""
    app = make_app(database_url=sqlite_url)
    client = app.test_client()
    for n in range(5):
        post(client, track(f"kept-{n}", f"p-{n}"))
    assert len(interactions(app)) == 5
    lost = sqlite3.connect(str(tmp_path / "segment.db-inbox"), isolation_level=None)
    try:
        lost.execute("DELETE FROM inbox WHERE seq > (SELECT min(seq) + 1 FROM inbox)")
    finally:
        lost.close()
    restarted = make_app(database_url=sqlite_url)
    summary = post(restarted.test_client(), [track(f"after-{n}", "p-after") for n in range(3)])
    assert summary["accepted"] == 3
    applied(restarted)
    assert {f"after-{n}" for n in range(3)} <= set(interactions(restarted))


# --- a database from before the inbox -------------------------------------------------------


def test_sqlite_inbox_kept_in_the_database_moves_into_its_own_file(make_app, sqlite_url, tmp_path):
    """A SQLite deployment upgraded from the version that kept the inbox inside the
    database: rows already applied stay claims (a redelivery is a duplicate), rows not yet
    applied are applied after the upgrade, and each applier keeps its position."""
    from webhook.ingest import canonical_json
    from webhook.storage.schema import inbox, inbox_consumers, metadata

    engine = sa.create_engine(sqlite_url)
    metadata.create_all(engine)  # the old layout: every table, the inbox too, in one file
    with engine.begin() as conn:
        conn.execute(
            inbox.insert(),
            [
                {
                    "seq": n,
                    "txid": 0,
                    "message_id": f"old-{n}",
                    "type": "track",
                    "received_at": 1.0,
                    "body": canonical_json(track(f"old-{n}", f"p-old-{n}")),
                }
                for n in (1, 2, 3)
            ],
        )
        conn.execute(
            inbox_consumers.insert(),
            [
                {
                    "name": name,
                    "position_txid": 0,
                    "position_seq": 2,
                    "applied": 2,
                    "updated_at": 1.0,
                }
                for name in ("local", "attribution")
            ],
        )
    engine.dispose()
    app = make_app(database_url=sqlite_url)
    client = app.test_client()
    assert post(client, track("old-1"))["duplicates"] == 1
    applied(app)
    assert set(interactions(app)) == {"old-3"}  # 1 and 2 were applied before the upgrade
    with sqlite3.connect(str(tmp_path / "segment.db")) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "inbox" not in tables and "inbox_consumers" in tables
    assert store_of(app).counts()["inbox"] == 3


def test_claims_from_before_the_inbox_still_make_redeliveries_duplicates(make_app, database_url):
    """A deployment upgraded from the version that kept claims in ``segment_messages``:
    a message received before the upgrade and redelivered after it is a duplicate."""
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE segment_messages (message_id VARCHAR(256) "
                "PRIMARY KEY, type VARCHAR(16) NOT NULL, received_at FLOAT "
                "NOT NULL)"
            )
        )
        conn.execute(sa.text("INSERT INTO segment_messages VALUES ('old-1', 'track', 1.0)"))
    engine.dispose()
    app = make_app(database_url=database_url)
    client = app.test_client()
    again = post(client, [track("old-1"), track("new-1")])
    assert (again["accepted"], again["duplicates"]) == (1, 1)
    assert set(interactions(app)) == {"new-1"}  # the claim alone: nothing to apply
    with store_of(app).engine.connect() as conn:
        assert not sa.inspect(conn).has_table("segment_messages")


def test_old_interactions_are_pruned_and_newer_ones_kept(make_app, database_url):
    """INTERACTION_RETENTION_DAYS: every interaction older than the window goes (2,500,
    sharing one timestamp: more than one pruning batch), a newer one stays."""
    from datetime import datetime

    app = make_app(database_url=database_url, interaction_retention_days=30.0)
    client = app.test_client()
    today = time.time()

    def at(when: float) -> str:
        return datetime.fromtimestamp(when, UTC).isoformat().replace("+00:00", "Z")

    old = [track(f"old-{n}", f"p-{n % 7}", user=f"u-{n}") for n in range(2500)]
    for message in old:
        message["timestamp"] = at(today - 86400)
    response = client.post("/segment", json={"batch": old})
    assert response.status_code == 200 and response.get_json()["interactions"] == 2500
    new = track("new-1")
    new["timestamp"] = at(today)
    assert client.post("/segment", json=new).status_code == 200
    # 29.5 days on: yesterday's interactions are 30.5 days old, today's 29.5.
    deleted = app.extensions["segment"].retention.run_once(now=today + 29.5 * 86400)
    assert deleted["interactions"] == 2500
    assert store_of(app).counts()["interactions"] == 1


def _rows_in_file(path, table: str) -> int:
    """Rows of ``table`` in the database file itself, leaving out what is still only in
    the WAL (``immutable=1``: SQLite reads the main file and nothing else)."""
    conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:  # not even the table is in the file yet
        return 0
    except sqlite3.DatabaseError:  # "malformed": a checkpoint is writing pages right now
        return -1
    finally:
        conn.close()


def test_sqlite_wal_is_copied_into_the_database_file_in_the_background(make_app, sqlite_url):
    """Acknowledged deliveries reach the files themselves (the inbox's, and the
    database's for what they meant) without a commit doing the checkpoint (SQLite's own
    is set far off: it would hold the write lock meanwhile)."""
    path = sqlite_url.removeprefix("sqlite:///")
    inbox_path = path + "-inbox"  # the inbox's own file
    app = make_app()
    client = app.test_client()
    for n in range(20):
        post(client, track(f"wal-{n}"))

    def copied():
        return _rows_in_file(inbox_path, "inbox"), _rows_in_file(path, "interactions")

    assert max(copied()) < 20  # still in the WALs: no commit checkpointed
    services = app.extensions["segment"]
    services.start_worker()
    try:
        wait_until(
            lambda: copied() == (20, 20),
            10,
            "every row checkpointed into the database files",
            detail=copied,
        )
    finally:
        services.stop()


def test_postgresql_rows_committed_out_of_order_wait_and_are_applied_in_order(
    make_app, postgresql_url
):
    """The inbox's central guarantee on PostgreSQL, made to happen: a delivery takes a
    lower sequence number and is still committing while a later one (a higher number)
    has committed. An applier must not pass the later one by (it would skip the earlier
    one for ever); it waits, then takes both, earlier first."""
    app = make_app(database_url=postgresql_url)
    parts = app.extensions["segment"]
    early, late = track("early-1", "p-early"), track("late-1", "p-late")
    engine = sa.create_engine(postgresql_url)
    try:
        with engine.connect() as slow:
            slow.begin()
            slow.execute(
                sa.text(
                    "INSERT INTO inbox (txid, message_id, type, received_at, body) VALUES "
                    "(pg_current_xact_id()::text::bigint, :id, 'track', :at, :body)"
                ),
                {"id": early["messageId"], "at": time.time(), "body": json.dumps(early)},
            )
            assert raw_client(app).post("/segment", json=late).status_code == 200
            with engine.connect() as probe:
                seqs = dict(probe.execute(sa.text("SELECT message_id, seq FROM inbox")).all())
            assert seqs == {"late-1": seqs["late-1"]}  # the early row is not visible yet
            assert parts.runners["local"].run_once() == 0  # nothing may be taken yet
            assert not interactions(app)
            slow.commit()
        with engine.connect() as probe:
            seqs = dict(probe.execute(sa.text("SELECT message_id, seq FROM inbox")).all())
        assert seqs["early-1"] < seqs["late-1"]
        owner = "test:out-of-order"
        claimed = parts.inbox.claim("local", owner, 100, 30.0)
        assert claimed not in (None, "busy")
        _, entries = claimed
        assert [e.message_id for e in entries] == ["early-1", "late-1"]
        parts.inbox.release_lease("local", owner)
        applied(app)
        assert sorted(interactions(app)) == ["early-1", "late-1"]
    finally:
        engine.dispose()


def test_an_inbox_row_pruned_before_it_was_applied_is_counted_as_expired(
    make_app, database_url, caplog
):
    """MESSAGE_RETENTION_HOURS prunes the inbox. Rows the appliers have applied go
    silently (they are only pruned); a row no applier reached yet is lost to it: counted
    in inbox_expired_total{applier} and logged. (The newest row is always kept.)"""
    import logging

    from tests.conftest import metric

    app = make_app(database_url=database_url, message_retention_hours=1.0)
    services = app.extensions["segment"]
    reader = raw_client(app)  # reading /metrics applies nothing

    def expired() -> float:
        return metric(reader, "inbox_expired_total", applier="local")

    before = expired()
    applied_ones = [track(f"applied-{n}", f"p-{n}") for n in range(3)]
    assert app.test_client().post("/segment", json=applied_ones).status_code == 200
    later = time.time() + 7200  # two hours on: every row is older than the hour
    with caplog.at_level(logging.ERROR, logger="webhook.inbox"):
        assert services.retention.run_once(now=later)["inbox"] == 2  # all but the newest
        assert expired() == before  # applied, then pruned: nothing expired
        assert not [r for r in caplog.records if "expired" in r.getMessage()]

        waiting = [track(f"waiting-{n}", f"q-{n}") for n in range(3)]
        assert raw_client(app).post("/segment", json=waiting).status_code == 200
        assert services.retention.run_once(now=later)["inbox"] == 3  # the kept one, two new
    assert expired() == before + 2  # the two unapplied ones; the newest waits still
    logged = {
        r.applier: r.getMessage()
        for r in caplog.records
        if "expired before they were applied" in r.getMessage()
    }
    assert "2 message(s)" in logged["local"]  # (and for each other applier behind)
    applied(app)
    with store_of(app).read() as conn:
        stored = {r[0] for r in conn.execute(sa.text("SELECT event_id FROM interactions"))}
    assert stored == {"applied-0", "applied-1", "applied-2", "waiting-2"}  # two were lost


def test_postgresql_a_transaction_after_deliveries_still_rolls_back(make_app, postgresql_url):
    """A delivery's insert runs in autocommit (on a connection kept apart from the pool);
    the pool's connections must never be left in autocommit, or a later transaction there
    would commit each of its statements at once and a rollback would leave half of it
    written."""
    app = make_app(database_url=postgresql_url)
    parts = app.extensions["segment"]
    for n in range(3):
        assert raw_client(app).post("/segment", json=track(f"ac-{n}")).status_code == 200

    class Abort(Exception):
        pass

    with pytest.raises(Abort), parts.store.write() as tx:
        tx.conn.execute(sa.text("INSERT INTO items (item_id, updated_at) VALUES ('half', 0)"))
        raise Abort()
    with parts.store.read() as conn:
        kept = conn.execute(sa.text("SELECT count(*) FROM items WHERE item_id = 'half'"))
        assert kept.scalar_one() == 0
    with parts.store.inbox_store.read() as conn:
        stored = conn.execute(sa.text("SELECT count(*) FROM inbox WHERE message_id LIKE 'ac-%'"))
        assert stored.scalar_one() == 3
