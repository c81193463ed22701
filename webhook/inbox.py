"""The inbox's consumer side: positions, leases, batches, lag and retention.

A delivery is acknowledged once its messages are in the ``inbox`` table (one short
transaction: the messageId claim and the message's canonical JSON; see ``ingest.py``).
Everything a message means is done afterwards by *appliers* (``appliers/``), each
consuming the inbox in arrival order from a position of its own, in bulk:

* An applier reads the rows after its position, takes the **lease** of its name (a row in
  ``inbox_consumers``: owner, until when, which batch), applies the batch, then advances
  its position and lets go of the lease in one transaction. At most one process applies a
  given applier's rows at a time, across workers and hosts; a slow applier never holds
  back another.
* A process that dies mid-batch leaves its lease behind, naming it and the batch. The
  next process takes the lease over at once if the owner ran on the same host and is gone,
  otherwise when the lease expires; the batch is applied again (at-least-once; the
  effects are idempotent: event ids, upserts).
* **Order.** SQLite has one writer at a time, so ``seq`` grows in commit order and is the
  position. On PostgreSQL, concurrent transactions commit out of ``seq`` order: a reader
  could see seq 11 before seq 10 commits and skip 10. Each row therefore also carries the
  id of the transaction that wrote it (``txid``); a reader takes only rows of transactions
  older than every transaction still running (``pg_snapshot_xmin``), in (txid, seq) order,
  so no row can later appear behind its position.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

import sqlalchemy as sa

from .storage import Store, StoreUnavailable, Transaction
from .storage.database import arrays, dbapi_connection, insert, insert_unnested
from .storage.leases import holder_is_gone
from .storage.schema import inbox, inbox_consumers, tombstones

log = logging.getLogger("webhook.inbox")

_COLUMNS = ("message_id", "type", "received_at", "body")
_CHUNK = 200  # rows an insert statement: 800 parameters, well under SQLite's limit

Position = tuple[int, int]  # (txid, seq)


class Entry(NamedTuple):
    """One inbox row, as an applier gets it (a tuple: built straight from the cursor's
    rows, a thousand at a time)."""

    seq: int
    txid: int
    message_id: str | None
    type: str
    received_at: float
    body: str | None  # None: a claim carried over from before the inbox; nothing to apply

    @property
    def position(self) -> Position:
        return (self.txid, self.seq)


@dataclass(frozen=True)
class Lag:
    pending: int  # rows after the position
    oldest_seconds: float  # age of the oldest of them (0 when none)
    owner: str | None  # the process holding the lease, if any
    applying_since: float | None  # when the batch in flight was taken


class LostLease(Exception):
    """Another process took this applier's lease: the batch must not be committed."""


BUSY: Final = "busy"  # claim(): another process holds the applier's lease


class Inbox:
    """``store`` holds the appliers' positions and leases (they commit with the local
    store's effects); its ``inbox_store`` holds the rows (on SQLite a file of its own,
    see ``Store``)."""

    def __init__(self, store: Store):
        self.store = store
        self.rows = store.inbox_store
        self.postgresql = store.dialect == "postgresql"
        self._build_statements()
        self._build_writes()

    def _build_statements(self) -> None:
        """The applier's statements, built once, not per batch."""
        c = inbox_consumers
        name = c.c.name == sa.bindparam("applier")
        columns = (
            inbox.c.seq,
            inbox.c.txid,
            inbox.c.message_id,
            inbox.c.type,
            inbox.c.received_at,
            inbox.c.body,
        )
        if self.postgresql:
            # Only rows of transactions older than every running one (module docstring).
            horizon: sa.ColumnElement = sa.literal_column(
                "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
            )
            after = sa.and_(
                inbox.c.txid < horizon,
                sa.tuple_(inbox.c.txid, inbox.c.seq)
                > sa.tuple_(sa.bindparam("txid"), sa.bindparam("seq")),
            )
            order: tuple[sa.Column, ...] = (inbox.c.txid, inbox.c.seq)
        else:
            after = inbox.c.seq > sa.bindparam("seq")
            order = (inbox.c.seq,)
        lease = (c.c.owner, c.c.lease_until, c.c.position_txid, c.c.position_seq)
        self._peek = sa.select(*lease).where(name)
        # The same row, read again inside the lease's write transaction (locked on PostgreSQL).
        self._lock = self._peek.with_for_update() if self.postgresql else self._peek
        self._read = self.rows.compile(
            sa.select(*columns)
            .where(after)
            .order_by(*order)
            .limit(sa.bindparam("limit", type_=sa.Integer))
        )
        self._take = (
            c.update()
            .where(name)
            .values(
                owner=sa.bindparam("holder"),
                lease_until=sa.bindparam("until"),
                batch_from_seq=sa.bindparam("first"),
                batch_to_seq=sa.bindparam("last"),
                batch_size=sa.bindparam("size"),
                batch_started=sa.bindparam("now"),
                updated_at=sa.bindparam("now"),
            )
        )
        mine = sa.and_(name, c.c.owner == sa.bindparam("holder"))
        self._renew = (
            c.update()
            .where(mine)
            .values(lease_until=sa.bindparam("until"), updated_at=sa.bindparam("now"))
        )
        self._advance = (
            c.update()
            .where(mine)
            .values(
                position_txid=sa.bindparam("to_txid"),
                position_seq=sa.bindparam("to_seq"),
                applied=c.c.applied + sa.bindparam("count", type_=sa.BigInteger),
                owner=None,
                lease_until=None,
                batch_from_seq=None,
                batch_to_seq=None,
                batch_size=None,
                batch_started=None,
                updated_at=sa.bindparam("now"),
            )
        )
        self._release = (
            c.update()
            .where(mine)
            .values(
                owner=None,
                lease_until=None,
                batch_from_seq=None,
                batch_to_seq=None,
                batch_size=None,
                batch_started=None,
                updated_at=sa.bindparam("now"),
            )
        )

    # -- the request path's one write --------------------------------------------------

    def _build_writes(self) -> None:
        rows = self.rows
        # PostgreSQL: each row carries the id of the transaction that wrote it (above).
        txid: sa.ColumnElement = (
            sa.literal_column("pg_current_xact_id()::text::bigint")
            if rows.dialect == "postgresql"
            else sa.literal_column("0")
        )
        # A message whose messageId the inbox holds already is left out: a duplicate.
        add = insert(rows.dialect, inbox).on_conflict_do_nothing(index_elements=["message_id"])
        self._txid = txid
        self._add = add
        self._add_one = rows.compile(
            add.values(
                txid=txid,
                message_id=sa.bindparam("message_id"),
                type=sa.bindparam("type"),
                received_at=sa.bindparam("received_at"),
                body=sa.bindparam("body"),
            )
        )
        self._add_many: dict[int, Any] = {}  # SQLite: a VALUES list of n rows
        if rows.dialect == "postgresql":  # any number of rows, one statement
            self._add_arrays = rows.compile(
                insert_unnested(
                    inbox,
                    ["message_id", "type", "body"],
                    {"txid": txid, "received_at": sa.bindparam("received_at", type_=sa.Float)},
                )
                .on_conflict_do_nothing(index_elements=["message_id"])
                .returning(inbox.c.message_id)
            )
        self._add_tombstone = rows.compile(
            insert(rows.dialect, tombstones)
            .on_conflict_do_nothing(index_elements=["id_hash", "deleted_at"])
            .values(id_hash=sa.bindparam("id_hash"), deleted_at=sa.bindparam("deleted_at"))
        )

    def _many(self, n: int):
        """``n`` rows in one statement (compiled once per ``n``, at most _CHUNK)."""
        raw = self._add_many.get(n)
        if raw is None:
            stmt = self._add.values(
                [
                    {"txid": self._txid, **{name: sa.bindparam(f"{name}{i}") for name in _COLUMNS}}
                    for i in range(n)
                ]
            ).returning(inbox.c.message_id)
            raw = self._add_many[n] = self.rows.compile(stmt)
        return raw

    def add(
        self, rows: Sequence[tuple[str | None, str, str]], graves: Sequence[dict] = ()
    ) -> set[str]:
        """Write (message_id, type, canonical JSON) rows into the inbox, in this order, in
        one transaction; a row whose messageId is there already is left out. ``graves``
        (a delete's tombstones, ``Tombstones.rows``) are written in the same transaction.
        Returns the messageIds that were new: the others are duplicates (also when two
        processes race for one). StoreUnavailable: nothing was written.

        Run on the DBAPI connection, transaction control included, with the statements
        SQLAlchemy compiled: this is every delivery's write."""
        if not rows:
            return set()
        with self.rows.raw_write() as dbapi:
            if self.postgresql:
                if not graves:
                    # Any number of rows is one statement (_add_arrays), atomic on its
                    # own: one round trip in autocommit, no BEGIN and COMMIT.
                    return self._insert(dbapi.cursor(), rows, graves)
                with dbapi.transaction():
                    return self._insert(dbapi.cursor(), rows, graves)
            if len(rows) <= _CHUNK and not graves:
                # One statement: SQLite runs it as its own transaction (autocommit).
                return self._insert(dbapi.cursor(), rows, graves)
            dbapi.execute("BEGIN IMMEDIATE")
            try:
                fresh = self._insert(dbapi.cursor(), rows, graves)
                dbapi.execute("COMMIT")
            except BaseException:
                if dbapi.in_transaction:
                    dbapi.execute("ROLLBACK")
                raise
            return fresh

    def _insert(self, cursor, rows, graves) -> set[str]:
        now = time.time()
        if graves:
            raw = self._add_tombstone
            cursor.executemany(raw.sql, [raw.params(dict(row)) for row in graves])
        if len(rows) == 1:
            # One row: whether it went in is the statement's row count.
            message_id, kind, body = rows[0]
            raw = self._add_one
            cursor.execute(
                raw.sql,
                raw.params(
                    {"message_id": message_id, "type": kind, "received_at": now, "body": body}
                ),
            )
            return {message_id} if cursor.rowcount == 1 else set()
        if self.postgresql:
            raw = self._add_arrays
            params: dict[str, Any] = {"received_at": now}
            params.update(arrays(rows, ("message_id", "type", "body")))
            cursor.execute(raw.sql, params)
            return {row[0] for row in cursor.fetchall()}
        fresh: set[str] = set()
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start : start + _CHUNK]
            values: dict[str, Any] = {}
            for i, (message_id, kind, body) in enumerate(chunk):
                values[f"message_id{i}"] = message_id
                values[f"type{i}"] = kind
                values[f"received_at{i}"] = now
                values[f"body{i}"] = body
            raw = self._many(len(chunk))
            cursor.execute(raw.sql, raw.params(values))
            fresh.update(row[0] for row in cursor.fetchall())
        return fresh

    # -- positions and batches ---------------------------------------------------------

    def ensure_consumers(self, names: Iterable[str]) -> None:
        """Create the position rows of these appliers (at the start of the inbox)."""
        names = list(names)
        with self.store.write() as tx:
            known = {
                row[0]
                for row in tx.conn.execute(
                    sa.select(inbox_consumers.c.name).where(inbox_consumers.c.name.in_(names))
                )
            }
            missing = [name for name in names if name not in known]
            if missing:
                tx.conn.execute(
                    tx.insert(inbox_consumers).on_conflict_do_nothing(index_elements=["name"]),
                    [
                        {
                            "name": name,
                            "position_txid": 0,
                            "position_seq": 0,
                            "applied": 0,
                            "updated_at": time.time(),
                        }
                        for name in missing
                    ],
                )
        if self.rows is not self.store:
            self._no_position_past_the_inbox()

    def _no_position_past_the_inbox(self) -> None:
        """SQLite, the inbox in a file of its own: an applier's position may never be past
        the inbox's last row. It can be after a power loss at SQLITE_SYNCHRONOUS=NORMAL
        (the inbox's newest commits lost, the database's kept) or a restore of one file
        without the other; SQLite would then give the next deliveries seqs at or below
        the position, and the appliers would pass them by. Such a position is moved back
        to the last row (run at start). Under the database's write lock, which every
        applier's advance takes: no position moves meanwhile, and the last row read then
        is at or past every position that points at a row."""
        with self.store.write() as tx:
            with self.rows.read() as conn:
                last = conn.execute(sa.select(sa.func.max(inbox.c.seq))).scalar() or 0
            moved = tx.conn.execute(
                inbox_consumers.update()
                .where(inbox_consumers.c.position_seq > last)
                .values(position_seq=last, position_txid=0, updated_at=time.time())
            ).rowcount
        if moved:
            log.warning(
                "inbox: %d applier position(s) were past the inbox's last row "
                "(lost from its file?) and were moved back to it",
                moved,
            )

    # -- leases ------------------------------------------------------------------------

    def claim(
        self, name: str, owner: str, limit: int, ttl: float
    ) -> tuple[tuple[int, int], list[Entry]] | Literal["busy"] | None:
        """The next batch of ``name``, with its lease: ``(position, entries)``; None when
        nothing is pending; BUSY when another live process holds the lease. The lease is
        committed at once: while the batch is applied, the row says who applies what,
        since when.

        The batch is read before the write transaction that takes the lease, outside the
        write lock (on SQLite every writer and the webhook's inserts wait for it, and
        reading a thousand rows is most of a claim); under the lock the position is
        checked again, so a batch another process applied meanwhile is never taken."""
        with self.store.read() as conn:  # the cheap look first: no write lock when idle
            row = conn.execute(self._peek, {"applier": name}).first()
        if row is None:
            return None
        at = (row.position_txid, row.position_seq)
        if self._held_by_another(row, owner, name, warn=False):
            return BUSY
        with self.rows.read() as conn:  # the batch itself (none: nothing pending)
            cursor = dbapi_connection(conn).cursor()
            try:
                cursor.execute(
                    self._read.sql,
                    self._read.params(
                        {**self._read.defaults, "txid": at[0], "seq": at[1], "limit": limit}
                    ),
                )
                entries = list(map(Entry._make, cursor.fetchall()))
            finally:
                cursor.close()
        if not entries:
            return None
        now = time.time()
        with self.store.write(durable=False) as tx:
            row = tx.conn.execute(self._lock, {"applier": name}).first()
            if row is None:
                return None
            if self._held_by_another(row, owner, name, warn=True):
                return BUSY
            if (row.position_txid, row.position_seq) != at:
                return BUSY  # another process applied a batch meanwhile: read again later
            tx.conn.execute(
                self._take,
                {
                    "applier": name,
                    "holder": owner,
                    "until": now + ttl,
                    "first": entries[0].seq,
                    "last": entries[-1].seq,
                    "size": len(entries),
                    "now": now,
                },
            )
        return at, entries

    @staticmethod
    def _held_by_another(row, owner: str, name: str, warn: bool) -> bool:
        holder = row.owner
        if not holder or holder == owner:
            return False
        if (row.lease_until or 0) > time.time() and not holder_is_gone(holder):
            return True
        if warn:
            log.warning(
                "inbox: taking over the lease of a process that is gone or expired",
                extra={"applier": name},
            )
        return False

    def renew_lease(self, name: str, owner: str, ttl: float) -> None:
        """Extend the lease; LostLease if another process has it now."""
        now = time.time()
        with self.store.write(durable=False) as tx:
            result = tx.conn.execute(
                self._renew, {"applier": name, "holder": owner, "until": now + ttl, "now": now}
            )
            if result.rowcount != 1:
                raise LostLease(name)

    def advance(self, tx: Transaction, name: str, owner: str, to: Position, count: int) -> None:
        """In the applier's transaction: move the position past the batch and let go of
        the lease. LostLease (the transaction must roll back) if it is not ours."""
        result = tx.conn.execute(
            self._advance,
            {
                "applier": name,
                "holder": owner,
                "to_txid": to[0],
                "to_seq": to[1],
                "count": count,
                "now": time.time(),
            },
        )
        if result.rowcount != 1:
            raise LostLease(name)

    def release_lease(self, name: str, owner: str) -> None:
        """Give the lease back without moving (a batch that failed); best effort."""
        try:
            with self.store.write(durable=False) as tx:
                tx.conn.execute(
                    self._release, {"applier": name, "holder": owner, "now": time.time()}
                )
        except StoreUnavailable:
            pass  # it expires, or this process takes it again as its owner

    # -- what is left to do --------------------------------------------------------------

    def lag(self, names: Iterable[str]) -> dict[str, Lag]:
        """For each applier: rows not yet applied, the age of the oldest, the lease.

        From positions, never a count over the backlog (``/metrics`` and ``/healthz`` ask
        on every scrape): ``pending`` is the latest sequence number minus the applier's
        position, and the oldest row is the first one after the position (two index
        lookups however long the backlog). On PostgreSQL sequence numbers have gaps (a
        duplicate's insert takes one too), so ``pending`` is an estimate there; it is 0
        exactly when no row is left."""
        names = list(names)
        now = time.time()
        out: dict[str, Lag] = {}
        with self.store.read() as conn:
            rows = {
                row.name: row
                for row in conn.execute(
                    sa.select(inbox_consumers).where(inbox_consumers.c.name.in_(names))
                )
            }
        with self.rows.read() as conn:
            latest = conn.execute(sa.select(sa.func.max(inbox.c.seq))).scalar() or 0
            for name in names:
                row = rows.get(name)
                at = (row.position_txid, row.position_seq) if row else (0, 0)
                if self.postgresql:
                    after = sa.tuple_(inbox.c.txid, inbox.c.seq) > sa.tuple_(*at)
                    order: tuple = (inbox.c.txid, inbox.c.seq)
                else:
                    after, order = inbox.c.seq > at[1], (inbox.c.seq,)
                first = conn.execute(
                    sa.select(inbox.c.received_at).where(after).order_by(*order).limit(1)
                ).scalar()
                out[name] = Lag(
                    pending=max(1, latest - at[1]) if first is not None else 0,
                    oldest_seconds=max(0.0, now - first) if first else 0.0,
                    owner=row.owner if row else None,
                    applying_since=row.batch_started if row else None,
                )
        return out

    # -- retention -----------------------------------------------------------------------

    def prune(self, older_than: float, consumers: Iterable[str], limit: int = 1000) -> int:
        """Delete up to ``limit`` of the oldest rows received before ``older_than`` (epoch
        seconds), in one short transaction. Rows an applier had not reached yet are gone
        for it: counted and logged as expired. Returns the rows deleted."""
        consumers = list(consumers)
        with self.store.read() as conn:  # where each applier is (for the expired count)
            positions = {
                row.name: (row.position_txid, row.position_seq)
                for row in conn.execute(
                    sa.select(inbox_consumers).where(inbox_consumers.c.name.in_(consumers))
                )
            }
        behind = min(positions.get(name, (0, 0)) for name in consumers) if consumers else None
        with self.rows.write() as tx:
            head = tx.conn.execute(
                sa.select(inbox.c.seq, inbox.c.txid, inbox.c.received_at, inbox.c.type)
                .order_by(inbox.c.seq)
                .limit(limit)
            ).all()
            doomed = []
            for row in head:  # rows arrive in time order: stop at the first young one
                if row.received_at >= older_than:
                    break
                # A deletion request is never pruned before every applier applied it:
                # the person would stay where it was not applied yet.
                if row.type == "delete" and behind is not None and (row.txid, row.seq) > behind:
                    break
                doomed.append(row)
            if not doomed:
                return 0
            newest = tx.conn.execute(sa.select(sa.func.max(inbox.c.seq))).scalar()
            # The newest row stays: without it SQLite would give its seq to the next row,
            # behind the appliers' positions.
            doomed = [row for row in doomed if row.seq != newest]
            if not doomed:
                return 0
            last = doomed[-1].seq
            for name in consumers:
                at = positions.get(name, (0, 0))
                expired = sum(1 for row in doomed if (row.txid, row.seq) > at)
                if expired:
                    log.error(
                        "inbox: %d message(s) expired before they were applied",
                        expired,
                        extra={"applier": name},
                    )
                    from . import metrics

                    metrics.INBOX_EXPIRED.labels(applier=name).inc(expired)
            deleted = tx.conn.execute(
                inbox.delete().where(inbox.c.seq <= last, inbox.c.received_at < older_than)
            ).rowcount
        return deleted
