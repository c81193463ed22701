"""Leases: at most one process of the fleet does a job at a time.

``Lease(store, name)`` is a row of ``leases`` (holder, until when): ``acquire`` takes it
if it is free, expired or already the caller's (atomic on both databases: SQLite
serialises writers with BEGIN IMMEDIATE; PostgreSQL re-checks the UPDATE's condition on
the row a concurrent winner just committed), ``release`` gives it back. Who trains the
local engine, whose turn it is to run the data deletion jobs.

``holder_name`` names this process (host, pid and a token against pid reuse) and
``holder_is_gone`` tells whether a holder that ran on this host has died, so its lease
can be taken over at once; the inbox's appliers use both for the leases they keep with
their positions.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import psutil
import sqlalchemy as sa

from .database import Store, insert
from .schema import leases

_TOKEN: tuple[int, str] = (0, "")


def holder_name() -> str:
    """This process: ``host:pid:token`` (a forked process is a holder of its own)."""
    global _TOKEN
    if _TOKEN[0] != os.getpid():
        _TOKEN = (os.getpid(), uuid.uuid4().hex[:8])
    return f"{socket.gethostname()}:{_TOKEN[0]}:{_TOKEN[1]}"


def holder_is_gone(holder: str) -> bool:
    """True when ``holder`` ran on this host and its process no longer exists (or is a
    zombie, or is another process with its pid); False when alive or elsewhere."""
    host, pid_text, token = (holder.split(":") + ["", ""])[:3]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():  # this process, or an earlier one with the same pid
        return not holder.startswith(holder_name())
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


class Lease:
    def __init__(self, store: Store, name: str):
        self.store = store
        self.name = name

    def acquire(self, holder: str, ttl: float) -> bool:
        """Take (or extend) the lease for ``ttl`` seconds; False when another has it."""
        now = time.time()
        with self.store.write() as tx:
            tx.conn.execute(
                insert(self.store.dialect, leases)
                .on_conflict_do_nothing(index_elements=["name"])
                .values(name=self.name, holder="", expires_at=0.0)
            )
            result = tx.conn.execute(
                leases.update()
                .where(leases.c.name == self.name)
                .where(sa.or_(leases.c.expires_at < now, leases.c.holder == holder))
                .values(holder=holder, expires_at=now + ttl)
            )
            return result.rowcount == 1

    def release(self, holder: str) -> None:
        with self.store.write() as tx:
            tx.conn.execute(
                leases.update()
                .where(leases.c.name == self.name, leases.c.holder == holder)
                .values(holder="", expires_at=0.0)
            )

    def holder(self) -> str | None:
        """Who holds it now, if anyone."""
        with self.store.read() as conn:
            row = conn.execute(
                sa.select(leases.c.holder, leases.c.expires_at).where(leases.c.name == self.name)
            ).first()
        return row[0] if row and row[1] > time.time() and row[0] else None
