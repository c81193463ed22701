"""The anchors for bench/webhook_throughput.py: the smallest honest receiver on our stack.

``POST /segment``: the bearer token (when ``WEBHOOK_BEARER_TOKEN`` is set, as the service
checks it), HMAC-SHA1 check of the raw body, ``json.loads``, a messageId and type check,
one insert of (messageId, body) committed before the 200: ``INSERT OR IGNORE`` into SQLite
(WAL), or on PostgreSQL ``INSERT … ON CONFLICT DO NOTHING`` in autocommit
(``synchronous_commit`` on, the server's default) on a connection of the server thread's
own. Nothing else: no Spec validation, no summary, no log line, no metrics. It is what the
service's request path cannot go below on the same stack, served by the same gunicorn.

An Actions batch (a JSON array) is the same job for many messages: the HMAC is checked
over the first message as ``JSON.stringify`` writes it (compact ``json.dumps``: the same
bytes for the benchmark's ASCII messages), each message needs a messageId, and every
message is one row, all inserted in one transaction committed before the 200.

Environment:

* ``SEGMENT_SHARED_SECRET``: the HMAC key.
* ``WEBHOOK_BEARER_TOKEN``: if set, ``Authorization: Bearer`` must name it.
* ``DATABASE_URL``: ``sqlite:///<path>`` or ``postgresql://…``.
* ``SQLITE_SYNCHRONOUS``: ``FULL`` (default, an fsync per commit) or ``NORMAL``.
* ``ANCHOR_COMMIT``: ``request`` (default: each request commits its own insert, one SQLite
  connection per server thread) or ``group`` (one writer thread per process takes every
  insert waiting and commits them together; the request waits for that commit). SQLite
  only: on PostgreSQL each request commits its own insert.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import queue
import sqlite3
import threading

from flask import Flask, request

SECRET = os.environ.get("SEGMENT_SHARED_SECRET", "").encode()
BEARER = os.environ.get("WEBHOOK_BEARER_TOKEN", "").encode()
URL = os.environ.get("DATABASE_URL", "sqlite:///anchor.db")
POSTGRES = URL.startswith(("postgresql://", "postgres://"))
PATH = URL.removeprefix("sqlite:///")
SYNCHRONOUS = os.environ.get("SQLITE_SYNCHRONOUS", "FULL").upper()
COMMIT = os.environ.get("ANCHOR_COMMIT", "request")
TYPES = frozenset({"track", "identify", "page", "screen", "group", "alias"})
TABLE = "CREATE TABLE IF NOT EXISTS inbox (message_id TEXT PRIMARY KEY, body TEXT)"
INSERT = "INSERT OR IGNORE INTO inbox (message_id, body) VALUES (?, ?)"

app = Flask(__name__)


def _connect() -> sqlite3.Connection:
    conn = sqlite3.connect(PATH, isolation_level=None, check_same_thread=False, timeout=5)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
    return conn


_local = threading.local()
if POSTGRES:
    import psycopg

    PG_INSERT = "INSERT INTO inbox (message_id, body) VALUES (%s, %s) ON CONFLICT DO NOTHING"
    with psycopg.connect(URL, autocommit=True) as _setup_pg:
        try:
            _setup_pg.execute(TABLE)
        except psycopg.errors.UniqueViolation:
            pass  # the other worker, importing the app at the same moment, created it
else:
    _setup = _connect()
    _setup.execute(TABLE)
    _setup.close()


def _store_pg(rows: list[tuple[str, str]]) -> None:
    conn = getattr(_local, "pg", None)
    if conn is None or conn.closed:
        conn = _local.pg = psycopg.connect(URL, autocommit=True)
    if len(rows) == 1:
        conn.execute(PG_INSERT, rows[0])  # autocommit: its own transaction
        return
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(PG_INSERT, rows)


def _store_own(rows: list[tuple[str, str]]) -> None:
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = _connect()
    if len(rows) == 1:
        conn.execute(INSERT, rows[0])  # autocommit: its own transaction
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(INSERT, rows)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class _GroupWriter:
    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pid = 0
        self._lock = threading.Lock()

    def store(self, rows: list[tuple[str, str]]) -> None:
        if self._pid != os.getpid():  # started in each worker, after the fork
            with self._lock:
                if self._pid != os.getpid():
                    threading.Thread(target=self._run, daemon=True).start()
                    self._pid = os.getpid()
        done = threading.Event()
        slot = [rows, done, None]
        self._queue.put(slot)
        done.wait()
        if slot[2] is not None:
            raise slot[2]

    def _run(self) -> None:
        conn = _connect()
        while True:
            group = [self._queue.get()]
            while True:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            error = None
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(INSERT, [row for s in group for row in s[0]])
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                error = exc
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            for slot in group:
                slot[2] = error
                slot[1].set()


_group = _GroupWriter()
_store = _store_pg if POSTGRES else _group.store if COMMIT == "group" else _store_own
_STORE_ERRORS: tuple[type[Exception], ...] = (
    (sqlite3.Error, psycopg.Error) if POSTGRES else (sqlite3.Error,)
)


@app.post("/segment")
def segment():
    raw = request.get_data()
    if BEARER and not _bearer():
        return "bad bearer token", 401
    batch = raw[:1] == b"["
    if not batch and not _signed(raw):
        return "bad signature", 401
    try:
        data = json.loads(raw)
    except ValueError:
        return "not JSON", 400
    messages = data if batch and isinstance(data, list) and data else [data]
    if batch and not _signed(
        json.dumps(messages[0], separators=(",", ":"), ensure_ascii=False).encode()
    ):
        return "bad signature", 401
    rows = []
    for message in messages:
        message_id = message.get("messageId") if isinstance(message, dict) else None
        if not isinstance(message_id, str) or not message_id:
            return "no messageId", 400
        if message.get("type") not in TYPES:
            return "unknown type", 400
        rows.append((message_id, json.dumps(message) if batch else raw.decode()))
    try:
        _store(rows)
    except _STORE_ERRORS:
        return "store unavailable", 503
    return "ok"


def _bearer() -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), BEARER)


def _signed(signed_bytes: bytes) -> bool:
    expected = hmac.new(SECRET, signed_bytes, hashlib.sha1).hexdigest()
    return hmac.compare_digest(expected, request.headers.get("X-Signature", ""))
