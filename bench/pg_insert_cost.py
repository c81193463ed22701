#!/usr/bin/env python3
"""What one single-message insert costs PostgreSQL's backend, by the shape of the table.

A helper for the throughput benchmark: is the inbox row (a primary key on ``seq``, the
unique messageId, the (txid, seq) index the appliers read in order, and the id of the
writing transaction) dearer for the server than the anchor's (messageId, body)? On a
database of its own on 127.0.0.1:5432, one connection in autocommit inserts ``--count``
rows of a benchmark message into each shape in turn (twice, interleaved), and prints the
backend's CPU a row (from ``/proc``), the client's, and the wall time.

    .venv/bin/python bench/pg_insert_cost.py [--count 20000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from webhook_throughput import event_json, pg_execute  # noqa: E402

DATABASE = f"pg_insert_cost_{os.getpid()}"
INBOX = (
    "seq BIGSERIAL PRIMARY KEY, txid BIGINT NOT NULL, message_id VARCHAR(256) UNIQUE, "
    "type VARCHAR(16) NOT NULL, received_at FLOAT NOT NULL, body TEXT"
)
INSERT_INBOX = (
    "INSERT INTO t (txid, message_id, type, received_at, body) "
    "VALUES ({txid}, %s, 'track', %s, %s) ON CONFLICT (message_id) DO NOTHING"
)
TXID = "pg_current_xact_id()::text::bigint"
# name: (table definition, insert, whether the insert takes the time as a parameter)
SHAPES = {
    "anchor": (
        "CREATE TABLE t (message_id TEXT PRIMARY KEY, body TEXT)",
        "INSERT INTO t (message_id, body) VALUES (%s, %s) ON CONFLICT DO NOTHING",
        False,
    ),
    "inbox": (
        f"CREATE TABLE t ({INBOX}); CREATE INDEX t_order ON t (txid, seq)",
        INSERT_INBOX.format(txid=TXID),
        True,
    ),
    "inbox, no (txid, seq) index": (
        f"CREATE TABLE t ({INBOX})",
        INSERT_INBOX.format(txid=TXID),
        True,
    ),
    "inbox, txid a constant": (
        f"CREATE TABLE t ({INBOX}); CREATE INDEX t_order ON t (txid, seq)",
        INSERT_INBOX.format(txid="0"),
        True,
    ),
}


def backend_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=20_000)
    count = p.parse_args().count
    body = event_json("m", 1)
    pg_execute(f'CREATE DATABASE "{DATABASE}"')
    try:
        url = f"postgresql://postgres@127.0.0.1:5432/{DATABASE}"
        print(f"{'shape':<30}{'backend ms':>11}{'client ms':>11}{'wall ms':>9}  (a row)")
        for name in list(SHAPES) * 2:
            table, insert, timed = SHAPES[name]

            def params(message_id: str, timed: bool = timed) -> tuple:
                return (message_id, time.time(), body) if timed else (message_id, body)

            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("DROP TABLE IF EXISTS t")
                conn.execute(table)
                for _ in range(500):  # warm: psycopg prepares the statement after 5
                    conn.execute(insert, params(uuid.uuid4().hex))
                (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()
                cpu, client, wall = backend_cpu(pid), time.process_time(), time.perf_counter()
                for _ in range(count):
                    conn.execute(insert, params(uuid.uuid4().hex))
                cpu, client = backend_cpu(pid) - cpu, time.process_time() - client
                wall = time.perf_counter() - wall
            print(
                f"{name:<30}{cpu / count * 1e3:11.4f}{client / count * 1e3:11.4f}"
                f"{wall / count * 1e3:9.4f}",
                flush=True,
            )
    finally:
        pg_execute(f'DROP DATABASE IF EXISTS "{DATABASE}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
