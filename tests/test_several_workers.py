"""Several worker processes on one database (``heroku ps:scale worker=3``, or a worker on
each of several hosts): the leases make one process apply an applier's rows at a time, so
the work is shared and nothing is applied twice or skipped.

Three ``flask --app webhook worker`` processes beside one gunicorn, on PostgreSQL, in
Personalize mode against the stand-in: while deliveries stream in, the test watches the
leases and sees more than one worker hold them; afterwards every applier counted every row
once, every interaction is stored, and the stand-in received every event exactly once, in
inbox order per session.
"""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from tests.deliveries import (
    Ledger,
    assert_in_order_per_session,
    assert_stored,
    inbox_order,
    make_message,
    stream,
    wait_applied,
)
from tests.fake_personalize import FakePersonalizeEvents
from tests.gunicorn_server import gunicorn
from tests.test_failures import (
    TRACKING_ID,
    assert_every_event_reached_personalize,
    personalize_env,
)

pytestmark = [pytest.mark.slow, pytest.mark.requires("postgresql")]


def test_three_workers_share_the_inbox_and_apply_each_row_once(postgresql_url, tmp_path):
    messages = [make_message(n, "several") for n in range(900)]
    ledger = Ledger()
    engine = sa.create_engine(postgresql_url)
    holders: set[tuple[str, int]] = set()  # (applier, pid) seen holding a batch
    done = threading.Event()

    def watch_leases() -> None:
        while not done.is_set():
            try:
                with engine.connect() as conn:
                    rows = conn.execute(
                        sa.text("SELECT name, owner FROM inbox_consumers WHERE owner IS NOT NULL")
                    ).all()
            except sa.exc.OperationalError:
                rows = []
            holders.update((name, int(owner.split(":")[1])) for name, owner in rows)
            time.sleep(0.005)

    with FakePersonalizeEvents(tracking_ids=[TRACKING_ID]) as fake:
        fake.delay(0.01)  # batches take a while, so the workers overlap
        env = personalize_env(fake, postgresql_url, tmp_path)
        with gunicorn(env, workers=1) as (base, process):
            others = [process.add_worker() for _ in range(2)]
            workers = {process.worker.pid, *(w.pid for w in others)}
            watcher = threading.Thread(target=watch_leases)
            watcher.start()
            try:
                failed = stream(base, ledger, messages, threads=6, stop_after=120)
                assert not failed, f"{len(failed)} deliveries got no 2xx"
                wait_applied(base, timeout=120)
            finally:
                done.set()
                watcher.join(10)
            order = inbox_order(postgresql_url)
            with engine.connect() as conn:
                applied = dict(
                    conn.execute(sa.text("SELECT name, applied FROM inbox_consumers")).all()
                )
            log_text = process.log_path.read_text(errors="replace")
        events = fake.events()
    engine.dispose()

    by_applier: dict[str, set[int]] = {}
    for name, pid in holders:
        by_applier.setdefault(name, set()).add(pid)
    print(f"\nlease holders by applier: {by_applier}; workers {sorted(workers)}")
    assert {pid for _, pid in holders} <= workers, (holders, workers)  # only workers apply
    assert len({pid for _, pid in holders}) >= 2, by_applier  # the work was shared
    assert applied == {name: len(messages) for name in ("local", "personalize", "attribution")}
    assert_stored(postgresql_url, messages, ledger.ok)
    assert_every_event_reached_personalize(events, messages, ledger.ok, once=True)
    assert_in_order_per_session(events, order)
    assert "Traceback" not in log_text
