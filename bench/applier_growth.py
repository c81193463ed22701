#!/usr/bin/env python3
"""Does applying a message cost more as the local store grows?  (SQLite, in-process)

A helper for the throughput benchmark, whose later rounds find the service dearer a
request than its first. The service is built as ``profile_service.py`` builds it (the
benchmark's secrets, a fresh SQLite file at ``--synchronous``, no background threads). It
grows the database in ``--steps`` steps of ``--step-rows`` messages (Actions batches of
100, applied), and at the start and after each step ingests ``--count`` single deliveries
``--rounds`` times and times the appliers on them (``drain``), after a TRUNCATE
checkpoint of both files (outside the timing: where SQLite's own checkpoint would fall
is luck). It prints the appliers' thread CPU a message and, of it, each bulk insert's
(timed by wrapping ``Transaction.bulk``). ``--writer-cache-kib`` sets the page cache of
the process's write connection (``PRAGMA cache_size``) before each timing.

    .venv/bin/python bench/applier_growth.py [--steps 3] [--step-rows 250000]
        [--count 5000] [--rounds 4] [--writer-cache-kib N] [--synchronous NORMAL|FULL]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from profile_service import call, deliveries, in_process_service  # noqa: E402
from webhook_throughput import BATCH_SIZE  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--step-rows", type=int, default=250_000)
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--writer-cache-kib", type=int, default=0, help="0: as configured")
    p.add_argument("--synchronous", default="NORMAL", choices=["FULL", "NORMAL"])
    args = p.parse_args()
    app, tmp = in_process_service("applier-growth-", args.synchronous)
    out = sys.__stdout__

    from webhook.storage import database

    parts = app.extensions["segment"]
    store = parts.store

    spent: collections.Counter = collections.Counter()
    bulk = database.Transaction.bulk

    def timed_bulk(self, statement, params):
        started = time.thread_time()
        try:
            return bulk(self, statement, params)
        finally:
            spent[statement.raw.sql.split("(")[0].strip()] += time.thread_time() - started

    database.Transaction.bulk = timed_bulk  # type: ignore[method-assign]

    def checkpoint() -> None:
        for each in store.stores:
            raw = each.engine.raw_connection()
            try:
                raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                raw.close()

    def measure(rows: int) -> None:
        spent.clear()
        total = 0.0
        for rnd in range(args.rounds):
            call(app, deliveries(args.count, f"m{rows}-{rnd}", False))
            checkpoint()
            if args.writer_cache_kib:
                store._writer_dbapi().execute(f"PRAGMA cache_size=-{args.writer_cache_kib}")
            started = time.thread_time()
            parts.drain()
            total += time.thread_time() - started
        messages = args.count * args.rounds
        size = sum(os.path.getsize(f) for f in tmp.glob("service.db*") if f.is_file())
        print(
            f"~{rows:>9,} rows ({size >> 20} MiB): appliers {total / messages * 1e6:6.1f} µs "
            "a message; bulk inserts: "
            + ", ".join(
                f"{name.removeprefix('INSERT INTO ')} {seconds / messages * 1e6:.1f}"
                for name, seconds in spent.most_common(4)
            ),
            file=out,
            flush=True,
        )

    call(app, deliveries(300, "warm", False))
    parts.drain()
    cache = f"{args.writer_cache_kib} KiB" if args.writer_cache_kib else "as configured"
    print(f"SQLITE_SYNCHRONOUS={args.synchronous}, writer's page cache {cache}:", file=out)
    measure(0)
    batches = max(1, args.step_rows // BATCH_SIZE)
    for step in range(1, args.steps + 1):
        call(app, deliveries(batches, f"grow{step}", True))
        parts.drain()
        measure(step * batches * BATCH_SIZE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
