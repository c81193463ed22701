"""Bringing a database up to date: Alembic revisions, run by the service itself.

Two histories, each with its own version table, because on SQLite the inbox lives in a
file of its own: ``migrations/main`` (every other table; ``alembic_version``) and
``migrations/inbox`` (the inbox's tables; ``alembic_version_inbox``). On PostgreSQL both
run in the one database. The first revision of each is the schema of the release before
this history began (a database it made is simply marked as there, then upgraded); it also
carries over what even older versions kept elsewhere.

``upgrade(store)`` runs both to their heads, in one transaction each, under a lock that
makes processes starting together wait for each other (PostgreSQL: an advisory lock;
SQLite: BEGIN IMMEDIATE). A new revision: ``alembic -c`` is not needed; write a file in
``versions/`` with ``revision``/``down_revision`` and an ``upgrade()`` (see the others).
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

HERE = Path(__file__).resolve().parent / "migrations"
HISTORIES = {"main": "alembic_version", "inbox": "alembic_version_inbox"}
_LOCK = 74201901  # pg_advisory_xact_lock key


def config(history: str, connection=None, **attributes) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE / history))
    cfg.attributes.update(connection=connection, version_table=HISTORIES[history], **attributes)
    return cfg


def run_environment() -> None:
    """What each history's ``env.py`` does when Alembic runs it: the revisions, on the
    connection and version table ``config`` handed over."""
    from alembic import context

    from .schema import metadata

    attributes = context.config.attributes
    context.configure(
        connection=attributes["connection"],
        target_metadata=metadata,
        version_table=attributes["version_table"],
        render_as_batch=True,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def heads() -> dict[str, str | None]:
    return {
        history: ScriptDirectory.from_config(config(history)).get_current_head()
        for history in HISTORIES
    }


def current(store) -> dict[str, str | None]:
    """Each history's revision in this database."""
    out = {}
    for history, table in HISTORIES.items():
        target = store.inbox_store if history == "inbox" else store
        with target.engine.connect() as conn:
            out[history] = MigrationContext.configure(
                conn, opts={"version_table": table}
            ).get_current_revision()
    return out


def upgrade(store) -> None:
    """Both histories to their heads (see the module docstring)."""
    separate = store.inbox_store is not store
    for history in ("inbox", "main"):
        target = store.inbox_store if history == "inbox" else store
        with target.engine.connect() as conn:
            attached = history == "inbox" and separate
            if attached:  # the database file, for what older versions kept there
                conn.connection.driver_connection.execute(
                    "ATTACH DATABASE ? AS main_file", (store.engine.url.database,)
                )
            try:
                conn = conn.execution_options(write=True)
                with conn.begin():
                    if target.dialect == "postgresql":
                        conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({_LOCK})"))
                    command.upgrade(config(history, conn, main_file_attached=attached), "head")
            finally:
                if attached:
                    conn.connection.driver_connection.execute("DETACH DATABASE main_file")
    if separate:
        _drop_carried_over(store)


def _drop_carried_over(store) -> None:
    """SQLite: an inbox (or claims) that an older version kept in the database file was
    copied into the inbox's file by the inbox history's first revision, committed; the
    copy in the database file goes now (again at the next start if this is cut short)."""
    with store.engine.connect() as conn:
        legacy = set(sa.inspect(conn).get_table_names()) & {"inbox", "segment_messages"}
    if legacy:
        with store.engine.connect() as conn:
            conn = conn.execution_options(write=True)
            with conn.begin():
                for name in sorted(legacy):
                    conn.exec_driver_sql(f"DROP TABLE {name}")
