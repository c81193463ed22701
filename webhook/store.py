"""The local store (SQLAlchemy Core): SQLite by default, PostgreSQL via DATABASE_URL.

Holds the inbox (every accepted Segment message, with its messageId claim, written before
the 2xx and applied later: webhook/inbox.py), what the embedded default needs and what
every mode keeps: interactions, the item catalog, the local profile store (traits from
identify calls) and the links from anonymous ids to users.

Writes go through ``Store.write()``: one transaction, all or nothing.
"""
from __future__ import annotations

import fcntl
import logging
import operator
import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from . import pids
from .routing import ITEM_FIELDS, IdentityLink, Interaction, ItemDetails, UserTraits
from .segment import encode_json

log = logging.getLogger(__name__)

metadata = sa.MetaData()

ID = sa.String(256)

# Every accepted message, in arrival order: the claim of its messageId (a redelivery finds
# it and is a duplicate) and its canonical JSON, which the appliers consume (inbox.py).
# ``txid`` orders rows on PostgreSQL, where concurrent transactions commit out of ``seq``
# order (see inbox.py); SQLite has one writer at a time and leaves it 0.
inbox = sa.Table(
    "inbox", metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("txid", sa.BigInteger, nullable=False, default=0),
    sa.Column("message_id", ID, unique=True),  # NULL: a delete sent without one
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("body", sa.Text),  # NULL: a claim carried over from before the inbox existed
    # No AUTOINCREMENT (it costs a write to sqlite_sequence a statement): SQLite gives
    # max(seq) + 1, and pruning never deletes the newest row (inbox.py), so a seq is never
    # given twice and never falls behind an applier's position.
)
sa.Index("inbox_order", inbox.c.txid, inbox.c.seq).ddl_if(dialect="postgresql")

# Each applier's position in the inbox and its lease (who applies, until when, what).
inbox_consumers = sa.Table(
    "inbox_consumers", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("position_txid", sa.BigInteger, nullable=False, default=0),
    sa.Column("position_seq", sa.BigInteger, nullable=False, default=0),
    sa.Column("applied", sa.BigInteger, nullable=False, default=0),  # rows, ever
    sa.Column("owner", sa.String(160)),  # host:pid:token of the process applying, if any
    sa.Column("lease_until", sa.Float),
    sa.Column("batch_from_seq", sa.BigInteger),  # the batch in flight, while one is
    sa.Column("batch_to_seq", sa.BigInteger),
    sa.Column("batch_size", sa.Integer),
    sa.Column("batch_started", sa.Float),
    sa.Column("updated_at", sa.Float, nullable=False, default=0.0),
)

# Records an applier's destination refused for good (Personalize: InvalidInputException),
# with the message they came from, so they can be retried after a mapping change.
dead_letters = sa.Table(
    "dead_letters", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("applier", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # event, user, item
    sa.Column("record_id", sa.String(512), nullable=False),
    sa.Column("message_id", ID),
    sa.Column("body", sa.Text, nullable=False),  # the message's canonical JSON
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("failed_at", sa.Float, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=1),
)

interactions = sa.Table(
    "interactions", metadata,
    sa.Column("event_id", ID, primary_key=True),
    sa.Column("message_id", ID, nullable=False),
    sa.Column("user_id", ID, index=True),
    sa.Column("anonymous_id", ID, index=True),
    sa.Column("item_id", ID, nullable=False),  # no index: reads by item scan anyway
    sa.Column("event_type", sa.String(256), nullable=False),
    sa.Column("timestamp", sa.Float, nullable=False, index=True),  # retention, popularity
    sa.Column("properties", sa.JSON, nullable=False),
)
# A person's latest interactions, newest first, read by an index range (the local engine).
sa.Index("interactions_user_time", interactions.c.user_id, interactions.c.timestamp)
sa.Index("interactions_anonymous_time", interactions.c.anonymous_id, interactions.c.timestamp)

items = sa.Table(
    "items", metadata,
    sa.Column("item_id", ID, primary_key=True),
    *(sa.Column(name, sa.Float if name == "price" else sa.Text) for name in ITEM_FIELDS),
    sa.Column("updated_at", sa.Float, nullable=False),  # time of the newest message applied
)

profiles = sa.Table(
    "profiles", metadata,
    sa.Column("profile_id", ID, primary_key=True),  # userId, or anonymousId when anonymous
    sa.Column("traits", sa.JSON, nullable=False),
    sa.Column("traits_at", sa.Float, nullable=False),  # time of the newest identify applied
)

identity_links = sa.Table(
    "identity_links", metadata,
    sa.Column("anonymous_id", ID, primary_key=True),
    sa.Column("user_id", ID, nullable=False, index=True),
)


activations = sa.Table(
    "activations", metadata,
    sa.Column("user_id", ID, primary_key=True),
    sa.Column("digest", sa.String(64), nullable=False),  # of the list last published
    sa.Column("published_at", sa.Float, nullable=False),
)


# Every answer of GET /recommendations and POST /recommendations/rank, recorded off the
# request path (impressions.py): who saw which items, from which variant and source.
impressions = sa.Table(
    "impressions", metadata,
    sa.Column("recommendation_id", sa.String(64), primary_key=True),
    sa.Column("visitor", ID, nullable=False),  # the userId, else the anonymousId asked for
    sa.Column("variant", sa.String(300), nullable=False),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # recommend, rank
    sa.Column("items", sa.JSON, nullable=False),  # the item ids shown, in order
    sa.Column("shown_at", sa.Float, nullable=False, index=True),
)
sa.Index("impressions_visitor", impressions.c.visitor, impressions.c.shown_at)

# What Segment events tell about those answers (appliers/attribution.py): a click on a
# recommended item, an add-to-cart or an order of one. One row per event and kind, so a
# redelivered event counts once.
attributions = sa.Table(
    "attributions", metadata,
    sa.Column("event_id", ID, primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),  # click, add, order
    sa.Column("message_id", ID, nullable=False),  # an order of several products: one
    sa.Column("recommendation_id", sa.String(64), nullable=False),
    sa.Column("variant", sa.String(300), nullable=False),
    sa.Column("item_id", ID, nullable=False),
    sa.Column("revenue", sa.Float, nullable=False, default=0.0),
    sa.Column("at", sa.Float, nullable=False, index=True),  # the event's time
)


class StoreUnavailable(Exception):
    """The database cannot be reached or is busy: try again later."""


# Errors that mean "the database is not there right now", as opposed to a bug.
_UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)


class _SqliteWriteLock:
    """One writer at a time, across threads and gunicorn workers, handed over at once.

    SQLite serializes writers itself, but a waiting writer polls with sleeps of 1 ms and
    more, so under load the lock sits free while writers sleep (measured: the CPU went
    half idle and p99 reached the busy timeout). An flock() on a file beside the database
    is waited for in the kernel, which wakes the next writer the moment the holder lets
    go (a sleep-and-retry loop here had the same fault as SQLite's: measured, the service
    used 68 % of one core under a load that could use two). No timeout is needed on that
    wait: every holder runs one transaction, itself bounded by SQLite's busy timeout, and
    a holder that dies releases the lock with its file descriptor. Threads of one
    process queue on a thread lock first (the flock belongs to the process)."""

    def __init__(self, database_path: str, timeout: float = 2.0):
        self.path = database_path + ".lock"
        self.timeout = timeout
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0

    def _file(self) -> int:
        if self._fd is None or self._pid != pids.current():  # a forked worker opens its own
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = pids.current()
        return self._fd

    @contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def acquire(self) -> None:
        """``held()`` without a generator, for the request path's one write."""
        if not self._thread_lock.acquire(timeout=self.timeout):
            raise StoreUnavailable("the database is busy (write lock)")
        try:
            fcntl.flock(self._file(), fcntl.LOCK_EX)  # the GIL is released while it waits
        except BaseException:
            self._thread_lock.release()
            raise

    def release(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


def sqlite_url_for(instance_path: str) -> str:
    os.makedirs(instance_path, exist_ok=True)
    return "sqlite:///" + os.path.join(instance_path, "segment.db")


SYNCHRONOUS = ("FULL", "NORMAL")
# SQLite's default is 1,000 pages (4 MiB). The WalCheckpointer keeps the WAL far below this
# many; it is the fallback where that thread does not run (CLI commands, tests).
WAL_AUTOCHECKPOINT_PAGES = 10_000


class BackgroundThread:
    """A daemon thread of this process (started again in a forked worker), stopped by
    ``_stop``; a subclass names it and gives its ``_loop``."""

    thread_name = "background"

    def __init__(self):
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def start(self) -> None:
        if self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
            return
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(timeout)
        self._thread = None

    def _loop(self) -> None:
        raise NotImplementedError


class WalCheckpointer(BackgroundThread):
    """Copies the WAL into the database file from a thread of its own (SQLite).

    With SQLite's automatic checkpoints, the commit that pushes the WAL past its limit
    runs the checkpoint itself, holding the write lock that every worker's inserts and
    the appliers wait for; as the database grows, each batch dirties more scattered pages
    and those checkpoints grew long (measured in-process, local store applier: 36 µs a
    message at 30,000 interactions, 53 µs at 300,000, with commits of 11 ms). A PASSIVE
    checkpoint here does the same copying without taking the write lock, every
    ``interval`` seconds, in SQLite's C code (the GIL released)."""

    thread_name = "wal-checkpointer"

    def __init__(self, store: "Store", interval: float = 0.5):
        super().__init__()
        self.store = store
        self.interval = interval

    def checkpoint(self) -> None:
        """Checkpoint the database's WAL and the inbox file's, each on its own."""
        for store in self.store.stores:
            try:
                raw = store.engine.raw_connection()  # autocommit: no transaction around it
                try:
                    raw.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                finally:
                    raw.close()
            except Exception as exc:  # busy or unavailable: the next round tries again
                log.debug("WAL checkpoint skipped: %s", type(exc).__name__)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.checkpoint()


def _make_engine(url: str, synchronous: str = "FULL") -> Engine:
    if synchronous not in SYNCHRONOUS:
        raise ValueError(f"synchronous must be one of {SYNCHRONOUS}")
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 2.0})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record):
            # Let SQLAlchemy issue BEGIN itself (see _on_begin), and use WAL so that
            # readers never wait for the writer.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before it returns (an fsync of the WAL), so an
            # acknowledged delivery survives a power loss or an OS crash. NORMAL skips
            # that fsync: still safe if the process dies, not if the machine does.
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute("PRAGMA busy_timeout=2000")
            # Checkpoints (copying the WAL into the database file; at NORMAL the only
            # fsyncs) are run by a thread of their own (WalCheckpointer); a commit runs
            # one itself only if the WAL grew past this many pages without it.
            cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            # A small page cache per pooled connection (the OS caches the file anyway):
            # the default, 2 MiB for each of up to 15 pooled connections, is memory a
            # worker keeps gaining as the database grows.
            cursor.execute("PRAGMA cache_size=-512")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            # A write transaction takes the write lock up front, so a read-modify-write
            # (merging traits) cannot interleave with another worker's. Sent on the DBAPI
            # connection: through exec_driver_sql it cost more than the statement.
            mode = "BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN"
            conn.connection.driver_connection.execute(mode)

        return engine
    return sa.create_engine(
        url,
        pool_pre_ping=True,  # survive a database restart without a failed request
        pool_size=5,
        max_overflow=5,
        pool_timeout=2.0,
        connect_args={"connect_timeout": 2},
    )


INBOX_FILE_SUFFIX = "-inbox"  # SQLite: the inbox's file is the database's, plus this


def inbox_url_for(url: str) -> str:
    """The URL of the database that holds the inbox table, given ``DATABASE_URL``: the
    inbox's own file beside a SQLite file; the database itself otherwise."""
    parsed = sa.engine.make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return url
    return parsed.set(database=database + INBOX_FILE_SUFFIX).render_as_string(
        hide_password=False)


class Store:
    """The database. On SQLite (a file), the inbox is a file of its own beside the
    database (``inbox_store``, the database's name + ``-inbox``), with its own write lock:
    a delivery's one write, the inbox insert, then never waits for an applier's batch,
    which holds the database's lock while it writes thousands of rows (measured with
    Actions batches: the appliers' transactions held the one lock most of the time, and
    ingestion took 28,000 events/s with them running, 52,000 without). What must commit
    together stays in one file: an applier's effects and its position. On PostgreSQL
    (row locks, no database-wide writer) the inbox is a table like the others."""

    def __init__(self, url: str, synchronous: str = "FULL", *, inbox_only: bool = False):
        self.url = url
        self.synchronous = synchronous
        self.engine = _make_engine(url, synchronous)
        self.dialect = self.engine.dialect.name
        self.statements = _Statements(self.dialect, self.engine.dialect)
        database = self.engine.url.database if self.dialect == "sqlite" else None
        self._write_lock = (_SqliteWriteLock(database)
                            if database and database != ":memory:" else None)
        self._writer: Connection | None = None  # SQLite: this process's write connection
        dbapi = self.engine.dialect.dbapi
        self._dbapi_unavailable = (dbapi.OperationalError, dbapi.InterfaceError)
        self._writer_pid = 0
        self.inbox_only = inbox_only
        # The store that holds the inbox table: this one, or the inbox's own file.
        self.inbox_store = self
        if self._write_lock is not None and not inbox_only:
            self.inbox_store = Store(inbox_url_for(url), synchronous, inbox_only=True)

    @property
    def in_memory(self) -> bool:
        """A SQLite database in this process's memory: no other process can reach it."""
        return self.dialect == "sqlite" and self.engine.url.database in (None, "", ":memory:")

    @property
    def stores(self) -> list["Store"]:
        """This store and, on SQLite, the inbox's file: each with its own WAL and lock."""
        return [self] if self.inbox_store is self else [self, self.inbox_store]

    def _tables(self) -> list[sa.Table]:
        if self.inbox_only:
            return [inbox]
        return [table for table in metadata.sorted_tables
                if table is not inbox or self.inbox_store is self]

    def create_schema(self) -> None:
        """Create missing tables; safe when several workers start at once."""
        if self.inbox_store is not self:
            self.inbox_store.create_schema()
        tables = self._tables()
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(write=True)
                with conn.begin():
                    if self.dialect == "postgresql":
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(74201901)"))
                    metadata.create_all(conn, tables=tables, checkfirst=True)
                    for table in tables:  # indexes added since a table was made
                        for index in table.indexes:
                            index.create(conn, checkfirst=True)
                    if self.inbox_store is self and not self.inbox_only:
                        _carry_over_claims(conn)
            if self.inbox_store is not self:
                self._move_inbox_into_its_file()
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(str(exc.orig) if hasattr(exc, "orig") else str(exc)) from exc

    def _move_inbox_into_its_file(self) -> None:
        """A SQLite database from before the inbox had a file of its own kept the inbox
        (or, older still, the claims in ``segment_messages``) in the database: copy those
        rows into the inbox's file (seq, and so every applier's position, kept), then drop
        them here. Two transactions, the copy first: a crash between them leaves rows
        that the next start copies again (ignored: same seq) before dropping them."""
        with self.engine.connect() as probe:
            names = set(sa.inspect(probe).get_table_names())
        if not names & {"inbox", "segment_messages"}:
            return
        with self._write_lock.held():
            raw = self.engine.raw_connection()
            try:
                db = raw.driver_connection
                db.execute("ATTACH DATABASE ? AS inbox_file", (self.inbox_store.engine.url.database,))
                try:
                    for table, copy in (
                            ("inbox", "INSERT OR IGNORE INTO inbox_file.inbox (seq, txid, "
                             "message_id, type, received_at, body) SELECT seq, txid, "
                             "message_id, type, received_at, body FROM main.inbox"),
                            ("segment_messages",
                             _CARRY_OVER_CLAIMS.format(inbox="inbox_file.inbox"))):
                        present = db.execute(
                            "SELECT 1 FROM main.sqlite_master WHERE type = 'table' AND name = ?",
                            (table,)).fetchone()
                        if not present:
                            continue
                        db.execute("BEGIN IMMEDIATE")
                        db.execute(copy)
                        db.execute("COMMIT")
                        db.execute("BEGIN IMMEDIATE")
                        db.execute(f"DROP TABLE main.{table}")
                        db.execute("COMMIT")
                        log.info("%s rows moved into the inbox's own file", table)
                finally:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    db.execute("DETACH DATABASE inbox_file")
            finally:
                raw.close()

    def dispose(self) -> None:
        if self.inbox_store is not self:
            self.inbox_store.dispose()
        if self._write_lock is not None:
            with self._write_lock.held():
                self._close_writer()
        self.engine.dispose()

    @contextmanager
    def write(self, durable: bool = True) -> Iterator["Transaction"]:
        """One write transaction. ``durable=False``: bookkeeping whose loss in a power
        failure harms nothing (an applier's lease): SQLite skips the commit's fsync even
        under SQLITE_SYNCHRONOUS=FULL (the next durable commit syncs it anyway)."""
        if self._write_lock is None:
            try:
                with self.engine.connect() as conn:
                    conn = conn.execution_options(write=True)
                    with conn.begin():
                        yield Transaction(conn, self.dialect, self.statements)
            except _UNAVAILABLE as exc:
                raise StoreUnavailable(_describe(exc)) from exc
            return
        # SQLite: one writer at a time (the lock), so each process keeps one connection
        # for its writes instead of taking one from the pool each time (measured: the
        # checkout and its reset cost more than a single message's inserts).
        relaxed = not durable and self.synchronous == "FULL"
        with self._write_lock.held():
            try:
                conn = self._writer_connection()
                if relaxed:
                    conn.connection.dbapi_connection.execute("PRAGMA synchronous=NORMAL")
                try:
                    with conn.begin():
                        yield Transaction(conn, self.dialect, self.statements)
                finally:
                    if relaxed:
                        conn.connection.dbapi_connection.execute("PRAGMA synchronous=FULL")
            except _UNAVAILABLE + self._dbapi_unavailable as exc:  # BEGIN runs on the DBAPI
                self._close_writer()  # whatever state it is in, the next write starts fresh
                raise StoreUnavailable(_describe(exc)) from exc

    def add_to_inbox(self, rows: Sequence[tuple[str | None, str, str]]) -> set[str]:
        """Write (message_id, type, canonical JSON) rows into the inbox, in this order, in
        one transaction of their own; a row whose messageId is there already is left out.
        Returns the messageIds that were new: the others are duplicates (also when two
        workers race for one). StoreUnavailable: nothing was written.

        The request path's one write: run on the DBAPI connection, transaction control
        included (through SQLAlchemy's Connection, BEGIN and COMMIT alone cost about as
        much as the insert; measured), with the statements SQLAlchemy compiled."""
        if not rows:
            return set()
        if self.inbox_store is not self:
            return self.inbox_store.add_to_inbox(rows)
        if self._write_lock is None:
            try:
                raw = self.engine.raw_connection()  # PostgreSQL: from the pool, pre-pinged
            except _UNAVAILABLE + self._dbapi_unavailable as exc:
                raise StoreUnavailable(_describe(exc)) from exc
            try:
                fresh = _insert_into_inbox(raw.cursor(), self.statements, rows)
                raw.commit()
                return fresh
            except self._dbapi_unavailable as exc:
                raw.invalidate()
                raise StoreUnavailable(_describe(exc)) from exc
            finally:
                raw.close()  # back to the pool (rolled back there if not committed)
        self._write_lock.acquire()
        try:
            try:
                dbapi = self._writer_dbapi()
                if len(rows) <= _INBOX_CHUNK:
                    # One statement: SQLite runs it as its own transaction (autocommit),
                    # committed once its RETURNING rows are read.
                    return _insert_into_inbox(dbapi.cursor(), self.statements, rows)
                dbapi.execute("BEGIN IMMEDIATE")
                try:
                    fresh = _insert_into_inbox(dbapi.cursor(), self.statements, rows)
                    dbapi.execute("COMMIT")
                except BaseException:
                    if dbapi.in_transaction:
                        dbapi.execute("ROLLBACK")
                    raise
                return fresh
            except _UNAVAILABLE + self._dbapi_unavailable as exc:
                self._close_writer()  # whatever state it is in, the next write starts fresh
                raise StoreUnavailable(_describe(exc)) from exc
        finally:
            self._write_lock.release()

    def _writer_dbapi(self):
        """The DBAPI connection under this process's write connection (SQLite)."""
        writer = self._writer
        if writer is None or self._writer_pid != pids.current():
            writer = self._writer_connection()
        return writer.connection.dbapi_connection

    def _writer_connection(self) -> Connection:
        if self._writer is None or self._writer_pid != pids.current():
            # A forked worker never uses its parent's connection (SQLite forbids it).
            self._writer = self.engine.connect().execution_options(write=True)
            self._writer_pid = pids.current()
        return self._writer

    def _close_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None and self._writer_pid == pids.current():
            try:
                writer.close()
            except Exception:  # closing a broken connection: nothing more to do
                log.debug("closing the write connection failed", exc_info=True)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                yield conn
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(_describe(exc)) from exc

    def ping(self) -> bool:
        try:
            for store in self.stores:
                with store.read() as conn:
                    conn.execute(sa.text("SELECT 1"))
            return True
        except StoreUnavailable:
            return False

    def counts(self) -> dict[str, int]:
        with self.inbox_store.read() as conn:
            out = {"inbox": conn.execute(
                sa.select(sa.func.count()).select_from(inbox)).scalar_one()}
        with self.read() as conn:
            out.update({
                table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
                for table in (interactions, items, profiles, identity_links)
            })
        return out


def _insert_into_inbox(cursor, statements: "_Statements",
                       rows: Sequence[tuple[str | None, str, str]]) -> set[str]:
    now = time.time()
    if len(rows) == 1:
        # One row: whether it went in is the statement's row count, no RETURNING rows to
        # read back (measured: a fifth of the insert's cost on SQLite).
        message_id, kind, body = rows[0]
        raw = statements.raw_to_inbox_one
        cursor.execute(raw.sql, raw.params({"message_id": message_id, "type": kind,
                                            "received_at": now, "body": body}))
        return {message_id} if cursor.rowcount == 1 else set()
    fresh: set[str] = set()
    for start in range(0, len(rows), _INBOX_CHUNK):
        chunk = rows[start:start + _INBOX_CHUNK]
        values = {}
        for i, (message_id, kind, body) in enumerate(chunk):
            values[f"message_id{i}"] = message_id
            values[f"type{i}"] = kind
            values[f"received_at{i}"] = now
            values[f"body{i}"] = body
        raw = statements.raw_to_inbox_many(len(chunk))
        cursor.execute(raw.sql, raw.params(values))
        fresh.update(row[0] for row in cursor.fetchall())
    return fresh


# The claims of ``segment_messages`` as inbox rows with nothing to apply (body NULL), into
# the inbox table named ``{inbox}`` (in the same database, or the inbox's attached file).
_CARRY_OVER_CLAIMS = (
    "INSERT INTO {inbox} (txid, message_id, type, received_at, body) "
    "SELECT 0, message_id, type, received_at, NULL FROM segment_messages "
    "WHERE message_id NOT IN (SELECT message_id FROM {inbox} WHERE message_id IS NOT NULL)")


def _carry_over_claims(conn: Connection) -> None:
    """A database from before the inbox kept its claims in ``segment_messages``: move them
    into the inbox as rows with nothing to apply (body NULL), so that redeliveries of those
    messages are still duplicates, then drop the old table. Runs once, under the schema
    lock of ``create_schema``."""
    if not sa.inspect(conn).has_table("segment_messages"):
        return
    conn.execute(sa.text(_CARRY_OVER_CLAIMS.format(inbox="inbox")))
    conn.execute(sa.text("DROP TABLE segment_messages"))
    log.info("claims carried over from segment_messages into the inbox")


def _describe(exc: Exception) -> str:
    """The DBAPI's message, first line only: no SQL and no parameters (they hold ids)."""
    original = getattr(exc, "orig", None) or exc
    lines = str(original).strip().splitlines()
    return type(original).__name__ + (": " + lines[0][:200] if lines else "")


class _Raw:
    """A statement compiled once by SQLAlchemy for one dialect, run on the DBAPI cursor.

    The write path of a delivery runs a handful of statements; through SQLAlchemy's
    execution layer each cost ~30 µs more than the statement itself (measured: 29.5 µs vs
    6.8 µs on SQLite), which was most of a single-message delivery. The SQL is still
    SQLAlchemy's; only the execution is direct."""

    def __init__(self, stmt, dialect, json_columns=()):
        compiled = stmt.compile(dialect=dialect)
        self.sql = compiled.string
        self.names = compiled.positiontup  # positional paramstyles (SQLite's qmark)
        # Parameters the statement fills itself (SQLite's OFFSET of a LIMIT, say).
        self.defaults = {name: value for name, value in compiled.params.items()
                         if value is not None}
        self.json_columns = tuple(json_columns)
        self._values = operator.itemgetter(*self.names) if self.names else None

    def params(self, row: dict):
        """The DBAPI parameters of one row (a row dict built for this call: JSON columns
        are encoded in place). Built before the write transaction where possible
        (``Prepared``): the write lock is then held only for the statements."""
        for name in self.json_columns:
            row[name] = encode_json(row[name])
        return self._bind(row)

    def rows(self, rows: Sequence[tuple], columns: Sequence[str]) -> list:
        """The DBAPI parameters of many rows given as tuples in ``columns``' order, JSON
        columns already encoded. Where the statement takes exactly those columns
        positionally (SQLite's qmark), the tuples are the parameters as they are: no dict
        a row (measured, for an interaction and its identity link: 3.6 -> 0.7 us)."""
        if self.names == list(columns):
            return list(rows)
        return [self._bind(dict(zip(columns, row))) for row in rows]

    def _bind(self, row: dict):
        if self._values is not None:
            values = self._values(row)
            return values if len(self.names) > 1 else (values,)
        return row


def raw_statement(stmt, dialect) -> _Raw:
    """``stmt`` compiled once for ``dialect``, to run on a DBAPI cursor (``_Raw``)."""
    return _Raw(stmt, dialect)


class _Statements:
    """The write path's statements, built once per dialect: SQLAlchemy then reuses their
    compiled form, where building them per call cost more than running them (measured)."""

    def __init__(self, dialect: str, dialect_impl=None):
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        self.insert = insert
        # PostgreSQL: each row carries the id of the transaction that wrote it (inbox.py).
        self._inbox_txid = (sa.literal_column("pg_current_xact_id()::text::bigint")
                            if dialect == "postgresql" else sa.literal_column("0"))
        # A message whose messageId the inbox holds already is left out: a duplicate.
        self.to_inbox = insert(inbox).on_conflict_do_nothing(index_elements=["message_id"])
        self.add_interaction = insert(interactions).on_conflict_do_nothing(
            index_elements=["event_id"])
        link = insert(identity_links)
        self.link = link.on_conflict_do_update(
            index_elements=["anonymous_id"], set_={"user_id": link.excluded.user_id},
            where=identity_links.c.user_id != link.excluded.user_id)
        item = insert(items)
        newer = item.excluded.updated_at >= items.c.updated_at
        # A newer record overwrites the fields it carries; an older one only fills gaps.
        merge = {
            name: sa.case((newer, sa.func.coalesce(item.excluded[name], items.c[name])),
                          else_=sa.func.coalesce(items.c[name], item.excluded[name]))
            for name in ITEM_FIELDS
        }
        merge["updated_at"] = sa.case((newer, item.excluded.updated_at),
                                      else_=items.c.updated_at)
        self.upsert_item = item.on_conflict_do_update(index_elements=["item_id"], set_=merge)
        self.ensure_profile = insert(profiles).on_conflict_do_nothing(
            index_elements=["profile_id"])
        self.select_profiles = sa.select(profiles).where(
            profiles.c.profile_id.in_(sa.bindparam("ids", expanding=True)))
        if dialect == "postgresql":
            self.select_profiles = self.select_profiles.with_for_update()
        self.update_profile = (
            profiles.update().where(profiles.c.profile_id == sa.bindparam("pid"))
            .values(traits=sa.bindparam("traits"), traits_at=sa.bindparam("traits_at")))
        if dialect_impl is not None:
            self.raw_to_inbox_one = _Raw(self.to_inbox.values(
                txid=self._inbox_txid,
                message_id=sa.bindparam("message_id"), type=sa.bindparam("type"),
                received_at=sa.bindparam("received_at"), body=sa.bindparam("body")),
                dialect_impl)
            self._raw_to_inbox: dict[int, _Raw] = {}
            self._dialect_impl = dialect_impl
            self.raw_interaction = _Raw(self.add_interaction.values(
                **{c.name: sa.bindparam(c.name) for c in interactions.c}), dialect_impl,
                json_columns=("properties",))
            self.raw_link = _Raw(self.link.values(
                anonymous_id=sa.bindparam("anonymous_id"), user_id=sa.bindparam("user_id")),
                dialect_impl)
            self.raw_item = _Raw(self.upsert_item.values(
                **{c.name: sa.bindparam(c.name) for c in items.c}), dialect_impl)


    def raw_to_inbox_many(self, n: int) -> "_Raw":
        """``n`` inbox rows in one statement (compiled once per ``n``; n is at most
        _INBOX_CHUNK). Parameters: message_id<i>, type<i>, received_at<i>, body<i>."""
        raw = self._raw_to_inbox.get(n)
        if raw is None:
            stmt = self.to_inbox.values([
                {"txid": self._inbox_txid,
                 **{name: sa.bindparam(f"{name}{i}") for name in _INBOX_COLUMNS}}
                for i in range(n)]).returning(inbox.c.message_id)
            raw = self._raw_to_inbox[n] = _Raw(stmt, self._dialect_impl)
        return raw


_INBOX_COLUMNS = ("message_id", "type", "received_at", "body")
_INBOX_CHUNK = 200  # rows an inbox statement: 800 parameters, well under SQLite's limit


class Prepared:
    """The local store's writes for a batch of routed records, with their DBAPI
    parameters built in advance: building them (row dicts, JSON, the item rounds) is
    most of the Python work of a write, and doing it before the transaction keeps it out
    of the write lock, which every worker and the request path wait for (measured: about
    half the time a batch held the lock). ``Transaction.write_prepared`` runs them."""

    def __init__(self, statements: "_Statements", *, links: Sequence[IdentityLink] = (),
                 users: Sequence[UserTraits] = (), items: Sequence[ItemDetails] = (),
                 interactions: Sequence[Interaction] = ()):
        self.users = list(users)  # merged in the transaction (read-modify-write)
        latest = {link.anonymous_id: link.user_id for link in links}
        self.links = statements.raw_link.rows(sorted(latest.items()), _LINK_COLUMNS)
        self.item_rounds = [statements.raw_item.rows(
            [(record.item_id, *map(record.details.get, ITEM_FIELDS), record.timestamp)
             for record in round_records], _ITEM_COLUMNS)
            for round_records in _item_rounds(items)]
        # An interaction record is its row, in the same order, with its properties as JSON.
        self.interactions = statements.raw_interaction.rows(
            [r[:7] + (encode_json(r[7]),) for r in interactions], _INTERACTION_COLUMNS)

    def __bool__(self) -> bool:
        return bool(self.users or self.links or self.item_rounds or self.interactions)


_LINK_COLUMNS = ["anonymous_id", "user_id"]
_ITEM_COLUMNS = ["item_id", *ITEM_FIELDS, "updated_at"]
_INTERACTION_COLUMNS = list(Interaction._fields)
assert _INTERACTION_COLUMNS[7] == "properties"


class Transaction:
    """The write operations of one delivery, all in one database transaction."""

    def __init__(self, conn: Connection, dialect: str, statements: _Statements):
        self.conn = conn
        self.dialect = dialect
        self.sql = statements
        self._cursor = None

    def _run(self, raw: _Raw, params: Sequence, fetch: bool = False) -> list:
        """Run a precompiled statement on the DBAPI cursor, for one row's parameters
        (``raw.params``) or many."""
        if not params:
            return []
        if self._cursor is None:
            self._cursor = self.conn.connection.dbapi_connection.cursor()
        dbapi = self.conn.dialect.dbapi
        try:
            if len(params) == 1:
                self._cursor.execute(raw.sql, params[0])
                return self._cursor.fetchall() if fetch else []
            self._cursor.executemany(raw.sql, params)
            return []
        except (dbapi.OperationalError, dbapi.InterfaceError) as exc:
            if self.dialect == "postgresql" and self.conn.connection.dbapi_connection.closed:
                self.conn.invalidate()
            raise StoreUnavailable(_describe(exc)) from exc

    def _insert(self, table: sa.Table):
        return self.sql.insert(table)

    def write_prepared(self, prepared: Prepared) -> None:
        """Identity links, traits, catalog rows, interactions, in this order (a record
        written later may rely on an earlier kind). Catalog rows: each record applied in
        time order over the stored row, in SQL; a newer record overwrites the fields it
        carries, an older one only fills gaps. Interactions: once per event id."""
        self._run(self.sql.raw_link, prepared.links)
        if prepared.users:
            self.merge_traits(prepared.users)
        for round_params in prepared.item_rounds:
            self._run(self.sql.raw_item, round_params)
        self._run(self.sql.raw_interaction, prepared.interactions)

    def merge_traits(self, records: Sequence[UserTraits]) -> None:
        """Merge identify traits into profiles: newer values win, older ones fill gaps."""
        if not records:
            return
        by_profile: dict[str, list[UserTraits]] = {}
        for record in records:
            by_profile.setdefault(record.user_id, []).append(record)
        ids = sorted(by_profile)  # a fixed order: no deadlock between two deliveries
        self.conn.execute(self.sql.ensure_profile,
                          [{"profile_id": pid, "traits": {}, "traits_at": 0.0} for pid in ids])
        current = {row.profile_id: (dict(row.traits or {}), row.traits_at)
                   for row in self.conn.execute(self.sql.select_profiles, {"ids": ids})}
        updates = []
        for pid in ids:
            traits, traits_at = current.get(pid, ({}, 0.0))
            for record in sorted(by_profile[pid], key=lambda r: r.timestamp):
                if record.timestamp >= traits_at:
                    traits.update(record.traits)
                    traits_at = record.timestamp
                else:
                    for key, value in record.traits.items():
                        traits.setdefault(key, value)
            updates.append({"pid": pid, "traits": traits, "traits_at": traits_at})
        self.conn.execute(self.sql.update_profile, updates)

    def delete_user(self, user_id: str) -> None:
        """Forget everything held about a user: interactions, traits, identity links."""
        anonymous_ids = [row[0] for row in self.conn.execute(
            sa.select(identity_links.c.anonymous_id).where(identity_links.c.user_id == user_id))]
        who = sa.or_(interactions.c.user_id == user_id,
                     interactions.c.anonymous_id.in_(anonymous_ids))
        self.conn.execute(interactions.delete().where(who))
        self.conn.execute(profiles.delete().where(
            profiles.c.profile_id.in_([user_id, *anonymous_ids])))
        self.conn.execute(identity_links.delete().where(identity_links.c.user_id == user_id))
        self.conn.execute(activations.delete().where(activations.c.user_id == user_id))


def _item_rounds(records: Sequence[ItemDetails]) -> list[list[ItemDetails]]:
    """The records for the item upsert, in rounds that touch each item at most once
    (PostgreSQL refuses an upsert that touches a row twice), each item's records in time
    order.

    Consecutive records of an item with the same details collapse into the later one:
    applying both or only the later gives the same row, whatever is stored."""
    per_item: dict[str, list[ItemDetails]] = {}
    for record in sorted(records, key=lambda r: r.timestamp):
        chain = per_item.setdefault(record.item_id, [])
        if chain and chain[-1].details == record.details:
            chain[-1] = record
        else:
            chain.append(record)
    rounds: list[list[ItemDetails]] = []
    for item_id in sorted(per_item):
        for depth, record in enumerate(per_item[item_id]):
            if depth == len(rounds):
                rounds.append([])
            rounds[depth].append(record)
    return rounds
