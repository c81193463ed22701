"""The database (SQLAlchemy Core): SQLite by default, PostgreSQL via DATABASE_URL.

``Store`` sets the engine up (SQLite's pragmas, one writer at a time across processes),
gives short transactions (``write()``, ``read()``), brings the schema up to date
(``ensure_schema``: the Alembic revisions of ``storage/migrations``) and, on SQLite, keeps
the inbox in a file of its own (``inbox_store``): a delivery's one write then never waits
for an applier's batch, which holds the database's lock while it writes thousands of rows.
What must commit together stays in one file: an applier's effects and its position. On
PostgreSQL the inbox's tables are tables like the others.

This package knows the tables and how to reach them, nothing of what the rows mean.
"""

from __future__ import annotations

import fcntl
import logging
import operator
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from ..background import BackgroundThread, StoreDown
from . import schema

log = logging.getLogger("webhook.storage")


class StoreUnavailable(StoreDown):
    """The database cannot be reached or is busy: try again later."""


# Errors that mean "the database is not there right now", as opposed to a bug.
UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)

SYNCHRONOUS = ("FULL", "NORMAL")
# SQLite's default is 1,000 pages (4 MiB). The WalCheckpointer keeps the WAL far below this
# many; it is the fallback where that thread does not run (CLI commands, tests).
WAL_AUTOCHECKPOINT_PAGES = 10_000
INBOX_FILE_SUFFIX = "-inbox"  # SQLite: the inbox's file is the database's, plus this
# PostgreSQL: idle connections a process keeps for the request path's write (one a
# request thread: gunicorn's GUNICORN_THREADS, 4 by default).
AUTOCOMMIT_IDLE_MAX = 8
CONNECT_TIMEOUT_SECONDS = 2  # PostgreSQL: a server that does not answer is unavailable


def sqlite_url_for(instance_path: str) -> str:
    os.makedirs(instance_path, exist_ok=True)
    return "sqlite:///" + os.path.join(instance_path, "segment.db")


def inbox_url_for(url: str) -> str:
    """The URL of the database that holds the inbox's tables, given ``DATABASE_URL``: the
    inbox's own file beside a SQLite file; the database itself otherwise."""
    parsed = sa.engine.make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return url
    return parsed.set(database=database + INBOX_FILE_SUFFIX).render_as_string(hide_password=False)


def insert(dialect: str, table: sa.Table):
    """An INSERT that knows ON CONFLICT, for this dialect (the one dialect switch)."""
    return (postgresql if dialect == "postgresql" else sqlite).insert(table)


def insert_unnested(
    table: sa.Table, columns: Sequence[str], values: dict[str, Any] | None = None
) -> postgresql.Insert:
    """PostgreSQL: an INSERT of rows given as one array a column (bind parameters named
    after the columns; ``arrays`` builds them), in the arrays' order, plus ``values``
    (expressions, the same for every row). Its text is the same for any number of rows,
    so psycopg parses it once and the server plans it once; a VALUES list of n rows is a
    statement of its own for every n, which psycopg parses again at each call once it is
    long."""
    typed = [sa.cast(sa.bindparam(name), postgresql.ARRAY(table.c[name].type)) for name in columns]
    rows = (
        sa.func.unnest(*typed)
        .table_valued(*columns, with_ordinality="ord")
        .render_derived(name="given")
    )
    extra = values or {}
    source = sa.select(*(rows.c[name] for name in columns), *extra.values()).order_by(rows.c.ord)
    return postgresql.insert(table).from_select([*columns, *extra], source)


def arrays(rows: Sequence[Sequence], columns: Sequence[str]) -> dict[str, list]:
    """The parameters of an ``insert_unnested`` statement: one list a column."""
    return {name: [row[i] for row in rows] for i, name in enumerate(columns)}


def describe(exc: BaseException) -> str:
    """The DBAPI's message, first line only: no SQL and no parameters (they hold ids)."""
    original = getattr(exc, "orig", None) or exc
    lines = str(original).strip().splitlines()
    return type(original).__name__ + (": " + lines[0][:200] if lines else "")


class _ThreadConnection:
    """A connection kept by one thread (``Store.raw_write`` on SQLite at NORMAL): closed
    once the thread is gone and its thread-local value with it, without waiting for the
    garbage collector (the pool's bookkeeping around a connection holds cycles)."""

    __slots__ = ("conn", "pid", "closing", "__weakref__")

    def __init__(self, conn: Any):
        self.conn = conn
        self.pid = os.getpid()
        self.closing = weakref.finalize(self, conn.close)


class _SqliteWriteLock:
    """One writer at a time, across threads and processes, handed over at once.

    SQLite serializes writers itself, but a waiting writer polls with sleeps of 1 ms and
    more, so under load the lock sits free while writers sleep. An flock() on a file beside
    the database is waited for in the kernel, which wakes the next writer the moment the
    holder lets go. No timeout is needed on that wait: every holder runs one transaction,
    itself bounded by SQLite's busy timeout, and a holder that dies releases the lock with
    its file descriptor. Threads of one process queue on a thread lock first (the flock
    belongs to the process). Every write takes it but the request path's at NORMAL
    (``Store.raw_write``)."""

    def __init__(self, database_path: str, timeout: float = 2.0):
        self.path = database_path + ".lock"
        self.timeout = timeout
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked process opens its own
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        return self._fd

    @contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def acquire(self) -> None:
        if not self._thread_lock.acquire(timeout=self.timeout):
            raise StoreUnavailable("the database is busy (write lock)")
        try:
            fcntl.flock(self._file(), fcntl.LOCK_EX)  # the GIL is released while it waits
        except BaseException:
            self._thread_lock.release()
            raise

    def release(self) -> None:
        try:
            fcntl.flock(self._file(), fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


def dbapi_connection(conn: Connection) -> Any:
    """The DBAPI connection under a SQLAlchemy connection that is open."""
    raw = conn.connection.dbapi_connection
    assert raw is not None
    return raw


def _make_engine(url: str, synchronous: str = "FULL") -> Engine:
    if synchronous not in SYNCHRONOUS:
        raise ValueError(f"synchronous must be one of {SYNCHRONOUS}")
    if url.startswith("sqlite"):
        # hide_parameters: an error's message never carries the values (ids, emails).
        engine = sa.create_engine(url, connect_args={"timeout": 2.0}, hide_parameters=True)

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
            # What is deleted is overwritten with zeros, not left in free space: a deleted
            # person's data is not in the file (many builds do this by default already).
            cursor.execute("PRAGMA secure_delete=ON")
            # Checkpoints (copying the WAL into the database file; at NORMAL the only
            # fsyncs) are the worker's WalCheckpointer's; a commit runs one itself only if
            # the WAL grew past this many pages without it.
            cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            # A small page cache per pooled connection (the OS caches the file anyway).
            cursor.execute("PRAGMA cache_size=-512")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            # A write transaction takes the write lock up front, so a read-modify-write
            # (merging traits) cannot interleave with another process's.
            mode = "BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN"
            conn.connection.driver_connection.execute(mode)

        return engine
    return sa.create_engine(
        url,
        hide_parameters=True,
        # No ping on every checkout: a connection the server dropped fails its statement,
        # is thrown away (``Raw``/``write``) and the request is answered 503 (Segment
        # retries it). A ping would cost a round trip on every delivery.
        pool_pre_ping=False,
        pool_recycle=POOL_RECYCLE_SECONDS,
        pool_size=5,
        max_overflow=5,
        pool_timeout=2.0,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS},
    )


POOL_RECYCLE_SECONDS = 1800  # a connection this old is closed, not used again


class _AutocommitConnections:
    """PostgreSQL: the connections of the request path's one write, kept in autocommit
    (one statement, atomic on its own: one round trip, no BEGIN or COMMIT). Idle ones wait
    in a list: taking one and giving it back are a pop and an append, where checking one
    out of SQLAlchemy's pool and switching it to autocommit and back cost a tenth of a
    delivery's CPU (bench/README.md). At most ``keep`` idle ones stay open; one older
    than POOL_RECYCLE_SECONDS is closed; a forked process starts with none of its
    parent's (and never closes them: they are the parent's)."""

    def __init__(self, engine: Engine, keep: int):
        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        self._connect = lambda: engine.dialect.loaded_dbapi.connect(
            *cargs, **cparams, connect_timeout=CONNECT_TIMEOUT_SECONDS, autocommit=True
        )
        self._keep = keep
        self._idle: list[tuple[Any, float]] = []
        self._pid = os.getpid()

    def take(self) -> tuple[Any, float]:
        if self._pid != os.getpid():
            self._idle, self._pid = [], os.getpid()
        while True:
            try:
                conn, born = self._idle.pop()  # atomic: no lock
            except IndexError:
                return self._connect(), time.monotonic()
            if time.monotonic() - born < POOL_RECYCLE_SECONDS and not conn.closed:
                return conn, born
            conn.close()

    def give_back(self, conn: Any, born: float) -> None:
        if conn.closed or conn.info.transaction_status != 0 or len(self._idle) >= self._keep:
            conn.close()  # broken, left in a transaction, or more than are needed
        else:
            self._idle.append((conn, born))

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()


_ARRAY_PARAMETER = re.compile(r"CAST\(%\((\w+)\)s AS (?=[^()]*(?:\(\d+\))?\[\])")


class Raw:
    """A statement compiled once by SQLAlchemy for one dialect, run on the DBAPI cursor:
    the request path's one write, and an applier's bulk writes, without SQLAlchemy's
    execution layer around each. The SQL is still SQLAlchemy's; only the execution is
    direct."""

    def __init__(self, stmt, dialect):
        compiled = stmt.compile(dialect=dialect)
        self.sql = compiled.string
        if dialect.name == "postgresql":
            # Arrays (insert_unnested) go in psycopg's binary format: its text format
            # quotes and escapes every element in Python, several times the cost.
            self.sql = _ARRAY_PARAMETER.sub(r"CAST(%(\1)b AS ", self.sql)
        self.names = compiled.positiontup  # positional paramstyles (SQLite's qmark)
        # Parameters the statement fills itself (SQLite's OFFSET of a LIMIT, say).
        self.defaults = {
            name: value for name, value in compiled.params.items() if value is not None
        }
        self._values = operator.itemgetter(*self.names) if self.names else None

    def params(self, row: dict):
        """The DBAPI parameters of one row given by name."""
        if self._values is not None:
            values = self._values(row)
            return values if len(self.names) > 1 else (values,)
        return row


class Bulk:
    """An INSERT of many rows, each a tuple in ``columns``' order, compiled once for a
    store's dialect; ``finish`` adds the ON CONFLICT clause. SQLite: the VALUES of one
    row, run by executemany (a loop in C). PostgreSQL: ``insert_unnested``, one statement
    with one array a column whatever the number of rows, where executemany would send,
    bind and execute every row on its own."""

    def __init__(
        self,
        store: Store,
        table: sa.Table,
        columns: Sequence[str],
        finish: Callable[[Any], Any] = lambda stmt: stmt,
    ):
        self.columns = list(columns)
        self.arrays = store.dialect == "postgresql"
        if self.arrays:
            stmt = insert_unnested(table, self.columns)
        else:
            stmt = insert(store.dialect, table).values({c: sa.bindparam(c) for c in columns})
        self.raw = store.compile(finish(stmt))
        # A float column's array must hold floats only (psycopg refuses a list of ints and
        # floats mixed, as JSON numbers come).
        self._floats = [c for c in self.columns if isinstance(table.c[c].type, sa.Float)]

    def params(self, rows: Sequence[tuple]) -> Any:
        """The DBAPI parameters of these rows (None for none)."""
        if not rows:
            return None
        if not self.arrays:
            if self.raw.names == self.columns:
                return list(rows)
            return [self.raw.params(dict(zip(self.columns, row))) for row in rows]
        params = arrays(rows, self.columns)
        for name in self._floats:
            params[name] = [None if value is None else float(value) for value in params[name]]
        return params


class Transaction:
    """One write transaction's connection, with the dialect's INSERT and a way to run a
    ``Raw`` statement on the same DBAPI cursor."""

    def __init__(self, conn: Connection, dialect: str):
        self.conn = conn
        self.dialect = dialect
        self._cursor: Any = None

    def insert(self, table: sa.Table):
        return insert(self.dialect, table)

    def bulk(self, statement: Bulk, params: Any) -> None:
        """Run a ``Bulk`` insert with the parameters its ``params`` gave."""
        if params is None:
            return
        if self._cursor is None:
            self._cursor = dbapi_connection(self.conn).cursor()
        dbapi = self.conn.dialect.dbapi
        assert dbapi is not None
        try:
            if statement.arrays:
                self._cursor.execute(statement.raw.sql, params)
            else:
                self._cursor.executemany(statement.raw.sql, params)
        except (dbapi.OperationalError, dbapi.InterfaceError) as exc:
            if self.dialect == "postgresql" and dbapi_connection(self.conn).closed:
                self.conn.invalidate()
            raise StoreUnavailable(describe(exc)) from exc


class Store:
    """The database (see the module's docstring)."""

    def __init__(self, url: str, synchronous: str = "FULL", *, inbox_only: bool = False):
        self.url = url
        self.synchronous = synchronous
        self.engine = _make_engine(url, synchronous)
        self.dialect = self.engine.dialect.name
        database = self.engine.url.database if self.dialect == "sqlite" else None
        self._write_lock = (
            _SqliteWriteLock(database) if database and database != ":memory:" else None
        )
        self._writer: Connection | None = None  # SQLite: this process's write connection
        self._writer_pid = 0
        # SQLite at NORMAL: the request path's write connection of each thread (raw_write);
        # closed when its thread ends (or by dispose(), for the calling thread).
        self._thread_writers = threading.local()
        dbapi = self.engine.dialect.dbapi
        assert dbapi is not None
        self.dbapi_unavailable = (dbapi.OperationalError, dbapi.InterfaceError)
        self.inbox_only = inbox_only
        # The store that holds the inbox's tables: this one, or the inbox's own file.
        self.inbox_store = self
        if self._write_lock is not None and not inbox_only:
            self.inbox_store = Store(inbox_url_for(url), synchronous, inbox_only=True)
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._autocommit = (
            _AutocommitConnections(self.engine, keep=AUTOCOMMIT_IDLE_MAX)
            if self.dialect == "postgresql"
            else None
        )

    @property
    def commit_syncs(self) -> bool:
        """Is a commit an fsync (SQLite at FULL)? Then deliveries that arrive together
        share one (``ingest._GroupCommit``); otherwise each commits its own."""
        return self._write_lock is not None and self.synchronous == "FULL"

    @property
    def in_memory(self) -> bool:
        """A SQLite database in this process's memory: no other process can reach it."""
        return self.dialect == "sqlite" and self.engine.url.database in (None, "", ":memory:")

    @property
    def stores(self) -> list[Store]:
        """This store and, on SQLite, the inbox's file: each with its own WAL and lock."""
        return [self] if self.inbox_store is self else [self, self.inbox_store]

    def compile(self, stmt) -> Raw:
        return Raw(stmt, self.engine.dialect)

    # -- the schema --------------------------------------------------------------------------

    def ensure_schema(self) -> None:
        """Bring the tables up to date (storage/migrate.py), once a process; safe when
        several processes start at once. StoreUnavailable: not now."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            from .migrate import upgrade

            try:
                upgrade(self)
            except UNAVAILABLE as exc:
                raise StoreUnavailable(describe(exc)) from exc
            self._schema_ready = True

    def dispose(self) -> None:
        if self._autocommit is not None:
            self._autocommit.close()
        if self.inbox_store is not self:
            self.inbox_store.dispose()
        if self._write_lock is not None:
            with self._write_lock.held():
                self._close_writer()
        self._drop_thread_writer()
        self.engine.dispose()

    # -- transactions ----------------------------------------------------------------------

    @contextmanager
    def write(self, durable: bool = True) -> Iterator[Transaction]:
        """One write transaction. ``durable=False``: bookkeeping whose loss in a power
        failure harms nothing (an applier's lease): SQLite skips the commit's fsync even
        under SQLITE_SYNCHRONOUS=FULL (the next durable commit syncs it anyway)."""
        if self._write_lock is None:
            try:
                with self.engine.connect() as conn:
                    conn = conn.execution_options(write=True)
                    with conn.begin():
                        yield Transaction(conn, self.dialect)
            except UNAVAILABLE as exc:
                raise StoreUnavailable(describe(exc)) from exc
            return
        # SQLite: one writer at a time (the lock), so each process keeps one connection
        # for its writes instead of taking one from the pool each time.
        relaxed = not durable and self.synchronous == "FULL"
        with self._write_lock.held():
            try:
                conn = self._writer_connection()
                if relaxed:
                    dbapi_connection(conn).execute("PRAGMA synchronous=NORMAL")
                try:
                    with conn.begin():
                        yield Transaction(conn, self.dialect)
                finally:
                    if relaxed:
                        dbapi_connection(conn).execute("PRAGMA synchronous=FULL")
            except UNAVAILABLE + self.dbapi_unavailable as exc:  # BEGIN runs on the DBAPI
                self._close_writer()  # whatever state it is in, the next write starts fresh
                raise StoreUnavailable(describe(exc)) from exc

    @contextmanager
    def raw_write(self) -> Iterator[Any]:
        """The DBAPI connection for the request path's one write, in autocommit.

        * PostgreSQL: an idle one of ``_AutocommitConnections``; several statements take
          ``transaction()``, psycopg's block.
        * SQLite at FULL (``commit_syncs``): this process's write connection, under the
          write lock; the caller groups deliveries into one commit (one fsync).
        * SQLite at NORMAL: a connection of the calling thread's own, with no lock of
          ours: a commit is a write to the WAL, and SQLite's own lock, taken and let go
          inside the statement with the GIL released, orders the writers. Holding our
          locks across the Python steps around the statement cost more than it saved
          (bench/README.md).

        Errors of an unavailable database become StoreUnavailable, and the connection is
        dropped."""
        if self._autocommit is not None:
            try:
                conn, born = self._autocommit.take()
            except self.dbapi_unavailable as exc:
                raise StoreUnavailable(describe(exc)) from exc
            try:
                yield conn
            except self.dbapi_unavailable as exc:
                conn.close()
                raise StoreUnavailable(describe(exc)) from exc
            finally:
                self._autocommit.give_back(conn, born)
            return
        if self._write_lock is None:  # SQLite in memory: its one pooled connection
            try:
                raw = self.engine.raw_connection()
            except UNAVAILABLE + self.dbapi_unavailable as exc:
                raise StoreUnavailable(describe(exc)) from exc
            try:
                yield raw.driver_connection
                raw.commit()
            except self.dbapi_unavailable as exc:
                raw.invalidate()
                raise StoreUnavailable(describe(exc)) from exc
            finally:
                raw.close()
            return
        if not self.commit_syncs:
            conn = self._thread_writer()
            try:
                yield conn
            except UNAVAILABLE + self.dbapi_unavailable as exc:
                self._drop_thread_writer()
                raise StoreUnavailable(describe(exc)) from exc
            return
        self._write_lock.acquire()
        try:
            try:
                yield self._writer_dbapi()
            except UNAVAILABLE + self.dbapi_unavailable as exc:
                self._close_writer()
                raise StoreUnavailable(describe(exc)) from exc
        finally:
            self._write_lock.release()

    def _thread_writer(self) -> Any:
        """This thread's SQLite connection for ``raw_write``: opened by the engine (so with
        its pragmas), then taken out of the pool, it stays with the thread and is closed
        when the thread ends (gunicorn's threads live as long as their worker). A forked
        process opens its own and leaves its parent's alone."""
        held = getattr(self._thread_writers, "held", None)
        if held is not None:
            if held.pid == os.getpid():
                return held.conn
            held.closing.detach()  # the parent's: never used, never closed here
        try:
            pooled = self.engine.raw_connection()
        except UNAVAILABLE + self.dbapi_unavailable as exc:
            raise StoreUnavailable(describe(exc)) from exc
        held = self._thread_writers.held = _ThreadConnection(pooled.dbapi_connection)
        pooled.detach()
        return held.conn

    def _drop_thread_writer(self) -> None:
        """Close this thread's connection (a parent's is let go, never closed here)."""
        held = getattr(self._thread_writers, "held", None)
        self._thread_writers.held = None
        if held is not None:
            if held.pid == os.getpid():
                held.closing()
            else:
                held.closing.detach()

    def _writer_dbapi(self):
        """The DBAPI connection under this process's write connection (SQLite)."""
        return self._writer_connection().connection.dbapi_connection

    def _writer_connection(self) -> Connection:
        if self._writer is None or self._writer_pid != os.getpid():
            # A forked process never uses its parent's connection (SQLite forbids it).
            self._writer = self.engine.connect().execution_options(write=True)
            self._writer_pid = os.getpid()
        return self._writer

    def _close_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None and self._writer_pid == os.getpid():
            try:
                writer.close()
            except Exception:  # closing a broken connection: nothing more to do
                log.debug("closing the write connection failed", exc_info=True)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                try:
                    yield conn
                except self.dbapi_unavailable:
                    # A raw cursor's error (the inbox reads its batches on one) that
                    # SQLAlchemy never saw: without this it would hand a dead connection
                    # back to the pool, whose reset then fails with a traceback.
                    conn.invalidate()
                    raise
        except UNAVAILABLE + self.dbapi_unavailable as exc:
            raise StoreUnavailable(describe(exc)) from exc

    def ping(self) -> bool:
        try:
            for store in self.stores:
                with store.read() as conn:
                    conn.execute(sa.text("SELECT 1"))
            return True
        except StoreUnavailable:
            return False

    def counts(self) -> dict[str, int]:
        """Rows of the main tables (for the CLI and tests)."""
        with self.inbox_store.read() as conn:
            out = {
                "inbox": conn.execute(
                    sa.select(sa.func.count()).select_from(schema.inbox)
                ).scalar_one()
            }
        with self.read() as conn:
            out.update(
                {
                    table.name: conn.execute(
                        sa.select(sa.func.count()).select_from(table)
                    ).scalar_one()
                    for table in (
                        schema.interactions,
                        schema.items,
                        schema.profiles,
                        schema.identity_links,
                    )
                }
            )
        return out


class WalCheckpointer(BackgroundThread):
    """Copies the WAL into the database file from a thread of its own (SQLite; the worker).

    With SQLite's automatic checkpoints, the commit that pushes the WAL past its limit
    runs the checkpoint itself, holding the write lock that every delivery and applier
    waits for. A PASSIVE checkpoint here does the same copying without taking the write
    lock, every ``interval`` seconds, in SQLite's C code (the GIL released)."""

    name = "wal-checkpointer"

    def __init__(self, store: Store, interval: float = 0.5):
        super().__init__()
        self.store = store
        self.interval = interval

    def step(self) -> None:
        self.checkpoint()

    def checkpoint(self) -> None:
        """Checkpoint the database's WAL and the inbox file's, each on its own."""
        for store in self.store.stores:
            try:
                raw = store.engine.raw_connection()  # autocommit: no transaction around it
                try:
                    driver = raw.driver_connection
                    assert driver is not None
                    driver.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                finally:
                    raw.close()
            except Exception as exc:  # busy or unavailable: the next round tries again
                log.debug("WAL checkpoint skipped: %s", type(exc).__name__)
