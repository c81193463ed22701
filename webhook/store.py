"""The local store (SQLAlchemy Core): SQLite by default, PostgreSQL via DATABASE_URL.

Holds what the embedded default needs and what every mode keeps: the ids of messages
already received (idempotency), interactions, the item catalog, the local profile store
(traits from identify calls) and the links from anonymous ids to users.

Writes go through ``Store.write()``, one transaction a delivery: either everything a
delivery means is stored, together with its message ids, or nothing is.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from .routing import ITEM_FIELDS, IdentityLink, Interaction, ItemDetails, UserTraits

log = logging.getLogger(__name__)

metadata = sa.MetaData()

ID = sa.String(256)

messages = sa.Table(
    "segment_messages", metadata,
    sa.Column("message_id", ID, primary_key=True),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
)

interactions = sa.Table(
    "interactions", metadata,
    sa.Column("event_id", ID, primary_key=True),
    sa.Column("message_id", ID, nullable=False),
    sa.Column("user_id", ID, index=True),
    sa.Column("anonymous_id", ID, index=True),
    sa.Column("item_id", ID, nullable=False, index=True),
    sa.Column("event_type", sa.String(256), nullable=False),
    sa.Column("timestamp", sa.Float, nullable=False),
    sa.Column("properties", sa.JSON, nullable=False),
)

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


class StoreUnavailable(Exception):
    """The database cannot be reached or is busy: try again later."""


# Errors that mean "the database is not there right now", as opposed to a bug.
_UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)


def sqlite_url_for(instance_path: str) -> str:
    os.makedirs(instance_path, exist_ok=True)
    return "sqlite:///" + os.path.join(instance_path, "segment.db")


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 2.0})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record):
            # Let SQLAlchemy issue BEGIN itself (see _on_begin), and use WAL so that
            # readers never wait for the writer.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=2000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            # A write transaction takes the write lock up front, so a read-modify-write
            # (merging traits) cannot interleave with another worker's.
            mode = "BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN"
            conn.exec_driver_sql(mode)

        return engine
    return sa.create_engine(
        url,
        pool_pre_ping=True,  # survive a database restart without a failed request
        pool_size=5,
        max_overflow=5,
        pool_timeout=2.0,
        connect_args={"connect_timeout": 2},
    )


class Store:
    def __init__(self, url: str):
        self.url = url
        self.engine = _make_engine(url)
        self.dialect = self.engine.dialect.name

    def create_schema(self) -> None:
        """Create missing tables; safe when several workers start at once."""
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(write=True)
                with conn.begin():
                    if self.dialect == "postgresql":
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(74201901)"))
                    metadata.create_all(conn, checkfirst=True)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(str(exc.orig) if hasattr(exc, "orig") else str(exc)) from exc

    def drop_schema(self) -> None:
        metadata.drop_all(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def write(self) -> Iterator["Transaction"]:
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(write=True)
                with conn.begin():
                    yield Transaction(conn, self.dialect)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(_describe(exc)) from exc

    @contextmanager
    def read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                yield conn
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(_describe(exc)) from exc

    def ping(self) -> bool:
        try:
            with self.read() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except StoreUnavailable:
            return False

    def known_message_ids(self, message_ids: Sequence[str]) -> set[str]:
        """Which of these messageIds were received (and committed) before."""
        known: set[str] = set()
        with self.read() as conn:
            for start in range(0, len(message_ids), 500):
                part = list(message_ids[start:start + 500])
                known.update(row[0] for row in conn.execute(
                    sa.select(messages.c.message_id).where(messages.c.message_id.in_(part))))
        return known

    def counts(self) -> dict[str, int]:
        with self.read() as conn:
            return {
                table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
                for table in (messages, interactions, items, profiles, identity_links)
            }


def _describe(exc: Exception) -> str:
    """The DBAPI's message, first line only: no SQL and no parameters (they hold ids)."""
    original = getattr(exc, "orig", None) or exc
    lines = str(original).strip().splitlines()
    return type(original).__name__ + (": " + lines[0][:200] if lines else "")


class Transaction:
    """The write operations of one delivery, all in one database transaction."""

    def __init__(self, conn: Connection, dialect: str):
        self.conn = conn
        self.dialect = dialect

    def _insert(self, table: sa.Table):
        if self.dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    def claim_messages(self, claims: Sequence[tuple[str, str]]) -> set[str]:
        """Record (message_id, type) pairs; return the ids that were not known before."""
        if not claims:
            return set()
        now = time.time()
        stmt = (
            self._insert(messages)
            .on_conflict_do_nothing(index_elements=["message_id"])
            .returning(messages.c.message_id)
        )
        # Sorted: two deliveries claiming overlapping ids lock them in the same order.
        rows = [{"message_id": mid, "type": kind, "received_at": now}
                for mid, kind in sorted(claims)]
        result = self.conn.execute(stmt, rows)
        return {row[0] for row in result}

    def add_interactions(self, records: Sequence[Interaction]) -> None:
        if not records:
            return
        stmt = self._insert(interactions).on_conflict_do_nothing(index_elements=["event_id"])
        self.conn.execute(stmt, [
            {
                "event_id": r.event_id, "message_id": r.message_id, "user_id": r.user_id,
                "anonymous_id": r.anonymous_id, "item_id": r.item_id,
                "event_type": r.event_type, "timestamp": r.timestamp,
                "properties": r.properties,
            }
            for r in records
        ])

    def upsert_items(self, records: Sequence[ItemDetails]) -> None:
        """Catalog rows: each record applied in time order over the stored row; a newer
        record overwrites the fields it carries, an older one only fills gaps."""
        if not records:
            return
        ids = sorted({r.item_id for r in records})  # a fixed order: no deadlock
        self.conn.execute(
            self._insert(items).on_conflict_do_nothing(index_elements=["item_id"]),
            [{"item_id": item_id, "updated_at": float("-inf") if self.dialect == "sqlite"
              else -1e300} for item_id in ids],
        )
        query = sa.select(items).where(items.c.item_id.in_(ids))
        if self.dialect == "postgresql":
            query = query.with_for_update()
        current = {row.item_id: ({name: getattr(row, name) for name in ITEM_FIELDS},
                                 row.updated_at) for row in self.conn.execute(query)}
        for record in sorted(records, key=lambda r: r.timestamp):
            details, updated_at = current[record.item_id]
            if record.timestamp >= updated_at:
                details.update(record.details)
                updated_at = record.timestamp
            else:
                for name, value in record.details.items():
                    if details.get(name) is None:
                        details[name] = value
            current[record.item_id] = (details, updated_at)
        self.conn.execute(
            items.update().where(items.c.item_id == sa.bindparam("iid")).values(
                updated_at=sa.bindparam("at"),
                **{name: sa.bindparam("f_" + name) for name in ITEM_FIELDS}),
            [{"iid": item_id, "at": at, **{"f_" + n: details.get(n) for n in ITEM_FIELDS}}
             for item_id, (details, at) in sorted(current.items())],
        )

    def merge_traits(self, records: Sequence[UserTraits]) -> None:
        """Merge identify traits into profiles: newer values win, older ones fill gaps."""
        if not records:
            return
        by_profile: dict[str, list[UserTraits]] = {}
        for record in records:
            by_profile.setdefault(record.user_id, []).append(record)
        ids = sorted(by_profile)  # a fixed order: no deadlock between two deliveries
        self.conn.execute(
            self._insert(profiles).on_conflict_do_nothing(index_elements=["profile_id"]),
            [{"profile_id": pid, "traits": {}, "traits_at": 0.0} for pid in ids],
        )
        query = sa.select(profiles).where(profiles.c.profile_id.in_(ids))
        if self.dialect == "postgresql":
            query = query.with_for_update()
        current = {row.profile_id: (dict(row.traits or {}), row.traits_at)
                   for row in self.conn.execute(query)}
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
        self.conn.execute(
            profiles.update()
            .where(profiles.c.profile_id == sa.bindparam("pid"))
            .values(traits=sa.bindparam("traits"), traits_at=sa.bindparam("traits_at")),
            updates,
        )

    def link_identities(self, links: Iterable[IdentityLink]) -> None:
        latest = {link.anonymous_id: link.user_id for link in links}
        if not latest:
            return
        stmt = self._insert(identity_links)
        stmt = stmt.on_conflict_do_update(
            index_elements=["anonymous_id"], set_={"user_id": stmt.excluded.user_id})
        self.conn.execute(stmt, [
            {"anonymous_id": anon, "user_id": user} for anon, user in sorted(latest.items())
        ])

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
