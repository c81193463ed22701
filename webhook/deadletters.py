"""The dead-letter list: records a destination refused for good, kept to be retried.

An applier adds a record here when its destination refuses it (Amazon Personalize's
``InvalidInputException``) or when the mapping cannot fit it within the service's limits,
together with the canonical JSON of the message it came from, so that after a mapping
change ``flask --app webhook dead-letters retry`` can route and send it again. The list is
bounded (``DEAD_LETTERS_MAX``): beyond it the oldest entries are dropped, counted in
``/metrics`` and logged. Entries hold a message (personal data): they are never logged.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from . import metrics
from .storage import Store, Transaction
from .storage.schema import dead_letters

log = logging.getLogger("webhook.deadletters")


@dataclass(frozen=True)
class DeadLetter:
    id: int
    applier: str
    kind: str
    record_id: str
    message_id: str | None
    body: str
    reason: str
    failed_at: float
    attempts: int

    def as_json(self, with_message: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "applier": self.applier,
            "kind": self.kind,
            "recordId": self.record_id,
            "messageId": self.message_id,
            "reason": self.reason,
            "failedAt": self.failed_at,
            "attempts": self.attempts,
        }
        if with_message:
            out["message"] = json.loads(self.body) if self.body else None
        return out


class DeadLetters:
    def __init__(self, store: Store, max_rows: int = 10000):
        self.store = store
        self.max_rows = max_rows

    def add(
        self, tx: Transaction, applier: str, records: Sequence[tuple[str, str, Any, str]]
    ) -> None:
        """In the applier's transaction: (kind, record id, inbox entry or None, reason)."""
        if not records:
            return
        now = time.time()
        tx.conn.execute(
            dead_letters.insert(),
            [
                {
                    "applier": applier,
                    "kind": kind,
                    "record_id": record_id[:512],
                    "message_id": getattr(entry, "message_id", None),
                    "body": getattr(entry, "body", None) or "",
                    "reason": reason[:1000],
                    "failed_at": now,
                    "attempts": 1,
                }
                for kind, record_id, entry, reason in records
            ],
        )
        metrics.DEAD_LETTERS_ADDED.labels(applier=applier).inc(len(records))
        total = tx.conn.execute(sa.select(sa.func.count()).select_from(dead_letters)).scalar_one()
        if total > self.max_rows:
            excess = total - self.max_rows
            oldest = sa.select(dead_letters.c.id).order_by(dead_letters.c.id).limit(excess)
            tx.conn.execute(
                dead_letters.delete().where(dead_letters.c.id.in_(oldest.scalar_subquery()))
            )
            metrics.DEAD_LETTERS_DROPPED.inc(excess)
            log.error(
                "dead letters: the list is full (DEAD_LETTERS_MAX=%d); the %d oldest were dropped",
                self.max_rows,
                excess,
            )

    def count(self) -> int:
        with self.store.read() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(dead_letters)).scalar_one()

    def list(self, limit: int = 50, ids: Sequence[int] | None = None) -> list[DeadLetter]:
        query = sa.select(dead_letters).order_by(dead_letters.c.id)
        if ids is not None:
            query = query.where(dead_letters.c.id.in_(list(ids)))
        else:
            query = query.limit(limit)
        with self.store.read() as conn:
            return [DeadLetter(**row._mapping) for row in conn.execute(query)]

    def resolve(self, ids: Sequence[int]) -> None:
        """These went through: off the list."""
        if ids:
            with self.store.write() as tx:
                tx.conn.execute(dead_letters.delete().where(dead_letters.c.id.in_(list(ids))))

    def refused_again(self, letter: DeadLetter, reason: str) -> None:
        with self.store.write() as tx:
            tx.conn.execute(
                dead_letters.update()
                .where(dead_letters.c.id == letter.id)
                .values(
                    reason=reason[:1000],
                    attempts=dead_letters.c.attempts + 1,
                    failed_at=time.time(),
                )
            )
