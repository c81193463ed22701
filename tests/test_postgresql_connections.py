"""PostgreSQL: the connections a delivery's insert runs on (``storage.database``'s
autocommit connections, kept apart from SQLAlchemy's pool).

What a user would notice: a connection the server dropped (a restart, a failover, an idle
timeout of a proxy) costs one 503 that Segment retries, never a lost or half-written
delivery, and the next delivery is 200 again; a burst of concurrent deliveries leaves a
bounded number of connections open; a deletion request's tombstones and its inbox row
commit together or not at all.
"""

from __future__ import annotations

import logging
import threading

import psutil
import pytest
import sqlalchemy as sa

from tests import deliveries
from tests.conftest import PG_URL, applied, raw_client, store_of
from webhook.storage import StoreUnavailable
from webhook.storage.database import AUTOCOMMIT_IDLE_MAX, dbapi_connection

pytestmark = pytest.mark.usefixtures("postgresql_url")


def _track(message_id: str) -> dict:
    return deliveries.track("Product Viewed", "p-1", message_id=message_id, user_id="u-1")


def _inbox_ids(app) -> set[str]:
    """Read on a connection of its own (the app's pooled ones may be the dropped ones)."""
    engine = sa.create_engine(store_of(app).url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return {row[0] for row in conn.execute(sa.text("SELECT message_id FROM inbox"))}
    finally:
        engine.dispose()


def _our_connections() -> set[int]:
    """Local ports of this process's connections to the PostgreSQL server."""
    return {
        c.laddr.port
        for c in psutil.Process().net_connections("tcp")
        if c.raddr and c.raddr.port == 5432 and c.status == psutil.CONN_ESTABLISHED
    }


def _drop_our_connections() -> int:
    """What a server restart does to this process's connections: each is terminated."""
    admin = sa.create_engine(PG_URL, poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        own = conn.execute(sa.text("SELECT inet_client_port()")).scalar_one()
        ports = sorted(_our_connections() - {own})
        dropped = conn.execute(
            sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE client_port = ANY(:ports) AND pid <> pg_backend_pid()"
            ),
            {"ports": ports},
        ).scalar_one()
    admin.dispose()
    return dropped


def test_a_dropped_connection_costs_one_503_and_loses_nothing(make_app, postgresql_url):
    app = make_app(database_url=postgresql_url, retry_after_seconds=9)
    client = raw_client(app)
    assert client.post("/segment", json=_track("before-drop")).status_code == 200

    assert _drop_our_connections() >= 1
    first = client.post("/segment", json=_track("after-drop"))
    assert first.status_code in (200, 503), first.get_data(as_text=True)
    if first.status_code == 503:  # the dropped connection was the one taken: retry
        assert first.get_json()["error"]["code"] == "store_unavailable"
        assert first.headers["Retry-After"] == "9"
        assert "after-drop" not in _inbox_ids(app)
        retried = client.post("/segment", json=_track("after-drop"))
        assert retried.status_code == 200
        assert retried.get_json()["accepted"] == 1  # nothing of the 503 was kept
    assert client.post("/segment", json=_track("next")).status_code == 200
    assert _inbox_ids(app) == {"before-drop", "after-drop", "next"}


def test_a_burst_of_concurrent_deliveries_leaves_few_connections_open(make_app, postgresql_url):
    app = make_app(database_url=postgresql_url)
    raw_client(app).post("/segment", json=_track("warm"))  # the schema, the pool's first
    before = _our_connections()
    statuses: list[int] = []
    start = threading.Barrier(24)

    def send(n: int) -> None:
        client = raw_client(app)
        start.wait()
        for k in range(5):
            statuses.append(client.post("/segment", json=_track(f"burst-{n}-{k}")).status_code)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert statuses == [200] * 120
    assert len(_inbox_ids(app)) == 121
    opened = _our_connections() - before
    assert 1 <= len(opened) <= AUTOCOMMIT_IDLE_MAX, len(opened)


def test_a_deletion_and_its_tombstones_commit_together(make_app, postgresql_url):
    """A deletion request is the one delivery that writes more than its inbox rows (its
    tombstones): a transaction on the autocommit connection. A redelivery of it finds
    both and is a duplicate."""
    app = make_app(database_url=postgresql_url)
    client = raw_client(app)
    delete = deliveries.message("delete", message_id="del-1", user_id="u-1")
    body = client.post("/segment", json=[_track("t-1"), delete])
    assert body.status_code == 200, body.get_data(as_text=True)
    assert body.get_json()["accepted"] == 2
    with store_of(app).read() as conn:
        graves = conn.execute(sa.text("SELECT count(*) FROM tombstones")).scalar_one()
    assert graves >= 1
    again = client.post("/segment", json=delete)
    assert again.status_code == 200
    assert again.get_json()["duplicates"] == 1
    assert _inbox_ids(app) == {"t-1", "del-1"}


def test_a_connection_dropped_while_the_worker_reads_a_batch_is_retried_without_a_traceback(
    make_app, postgresql_url, caplog
):
    """The worker reads a batch of the inbox on the DBAPI's own cursor. A connection the
    server drops right then (a restart) is "the store is unavailable, apply later" like
    any other, and the pool does not log a traceback resetting the dead connection; the
    delivery is applied on the next pass."""
    app = make_app(database_url=postgresql_url)
    assert raw_client(app).post("/segment", json=_track("read-drop")).status_code == 200
    rows = app.extensions["segment"].inbox.rows  # the store the batches are read from
    admin = sa.create_engine(PG_URL, poolclass=sa.pool.NullPool)
    try:
        with pytest.raises(StoreUnavailable), rows.read() as conn:
            raw = dbapi_connection(conn)
            with admin.connect() as other:
                other.execute(
                    sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": raw.info.backend_pid}
                )
            cursor = raw.cursor()
            cursor.execute("SELECT message_id FROM inbox")
    finally:
        admin.dispose()
    tracebacks = [r for r in caplog.records if r.exc_info and r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
    applied(app)
    with store_of(app).read() as conn:
        ids = conn.execute(sa.text("SELECT message_id FROM interactions")).scalars().all()
    assert ids == ["read-drop"]
