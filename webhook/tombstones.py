"""Tombstones: what keeps a deleted person from coming back through an older message.

A Segment deletion request (``delete``) makes the local store applier forget everything
held about the person (``appliers/local.py``). A message written before the deletion may
still arrive later: a redelivery after its messageId claim was pruned, a Replay, an
import of an archive, a dead letter retried, a write-back that was queued. For each id of
the person (the userId, the anonymous ids linked to it, previous userIds reached by
alias) a tombstone records a keyed hash of the id (HMAC-SHA256, the key a random one kept
in the database: the table alone does not tell whose ids they were) and the deletion's
time. A later message for such an id whose own time is before the deletion is skipped
with the reason ``deleted``; a newer one is taken: the person may come back.

Each process keeps the tombstones in memory (about 100 bytes each), read again from the
database at most every ``REFRESH_SECONDS`` (only the rows added since): a process learns
of a deletion made by another within that time, and the appliers check again, authoritatively,
before they apply. With no tombstone at all, checking a message costs nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Iterable, Sequence

import sqlalchemy as sa

from .storage import Store
from .storage.schema import service_keys, tombstones

REFRESH_SECONDS = 1.0
KEY_NAME = "tombstones"
# The rows added since the last one read: built once (building it is most of a look, which
# every applier's batch takes).
_SINCE = (
    sa.select(tombstones.c.seq, tombstones.c.id_hash, tombstones.c.deleted_at)
    .where(tombstones.c.seq > sa.bindparam("seq"))
    .order_by(tombstones.c.seq)
)


class Tombstones:
    """The tombstones of one database (held by its inbox's store)."""

    def __init__(self, store: Store, refresh_seconds: float = REFRESH_SECONDS):
        self.store = store.inbox_store
        self.refresh_seconds = refresh_seconds
        self._key: bytes | None = None
        self._deleted: dict[str, float] = {}  # digest -> the latest deletion's time
        self._seq = 0  # the last row read
        self._checked = 0.0
        self._lock = threading.Lock()

    # -- hashing ------------------------------------------------------------------------

    def _load_key(self) -> bytes:
        if self._key is None:
            with self.store.write() as tx:
                tx.conn.execute(
                    tx.insert(service_keys)
                    .on_conflict_do_nothing(index_elements=["name"])
                    .values(name=KEY_NAME, value=secrets.token_hex(32))
                )
                value = tx.conn.execute(
                    sa.select(service_keys.c.value).where(service_keys.c.name == KEY_NAME)
                ).scalar_one()
            self._key = bytes.fromhex(value)
        return self._key

    def digest(self, identifier: str) -> str:
        return hmac.new(
            self._load_key(), identifier.encode("utf-8", "surrogatepass"), hashlib.sha256
        ).hexdigest()

    # -- reading ------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> None:
        """Read the tombstones added since the last look (at most every
        ``refresh_seconds``, unless ``force``). StoreUnavailable propagates."""
        now = time.monotonic()
        if not force and now - self._checked < self.refresh_seconds:
            return
        with self._lock:
            if not force and now - self._checked < self.refresh_seconds:
                return
            with self.store.read() as conn:
                rows = conn.execute(_SINCE, {"seq": self._seq}).all()
            for seq, digest, deleted_at in rows:
                if deleted_at > self._deleted.get(digest, float("-inf")):
                    self._deleted[digest] = deleted_at
                self._seq = seq
            self._checked = now

    def deleted_since(
        self, identifiers: Iterable[str | None], when: float, refresh: bool = True
    ) -> bool:
        """Whether one of these ids was deleted after ``when`` (epoch seconds): a message
        of that time, about them, must not bring them back."""
        if refresh:
            self.refresh()
        if not self._deleted:
            return False
        for identifier in identifiers:
            if identifier:
                deleted_at = self._deleted.get(self.digest(identifier))
                if deleted_at is not None and when < deleted_at:
                    return True
        return False

    @property
    def empty(self) -> bool:
        return not self._deleted

    # -- writing ------------------------------------------------------------------------

    def rows(self, identifiers: Iterable[str], deleted_at: float) -> list[dict]:
        """The rows that record these ids as deleted at ``deleted_at``."""
        return [
            {"id_hash": self.digest(identifier), "deleted_at": deleted_at}
            for identifier in sorted(set(filter(None, identifiers)))
        ]

    def record(self, identifiers: Sequence[str], deleted_at: float) -> None:
        """Record these ids as deleted (one transaction of the inbox's store); known to
        this process at once."""
        rows = self.rows(identifiers, deleted_at)
        if not rows:
            return
        with self.store.write() as tx:
            tx.conn.execute(
                tx.insert(tombstones).on_conflict_do_nothing(
                    index_elements=["id_hash", "deleted_at"]
                ),
                rows,
            )
        for row in rows:
            if row["deleted_at"] > self._deleted.get(row["id_hash"], float("-inf")):
                self._deleted[row["id_hash"]] = row["deleted_at"]
