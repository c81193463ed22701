"""Retention: the inbox and the interactions pruned in the background, in small batches.

* Inbox rows (and the messageId claims they hold) are kept ``MESSAGE_RETENTION_HOURS``
  (default 168 h, well beyond Segment's four-hour retry window), then deleted. A message
  redelivered after its claim is gone is taken for new: ``MAX_MESSAGE_AGE_HOURS`` can
  skip live messages older than the window instead (README).
* Interactions older than ``INTERACTION_RETENTION_DAYS`` (by their own time; default 730)
  are deleted.
* Impressions and attributions (the insights) older than ``INSIGHTS_RETENTION_DAYS``
  (default 90) are deleted.

The worker runs the loop; batches are small (one short transaction each) so pruning never
holds the write lock for long, and two workers pruning at once only share the work.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable

import sqlalchemy as sa

from . import metrics
from .background import BackgroundThread
from .inbox import Inbox
from .storage.schema import attributions, impressions, interactions

log = logging.getLogger("webhook.retention")

BATCH = 1000  # rows a transaction
MAX_BATCHES = 50  # batches a run, per table: a large backlog is worked off over several runs


class Retention(BackgroundThread):
    name = "retention"

    def __init__(
        self,
        inbox: Inbox,
        consumers: Iterable[str],
        message_retention_hours: float,
        interaction_retention_days: float,
        interval_seconds: float = 60.0,
        insights_retention_days: float = 0.0,
    ):
        super().__init__()
        self.inbox = inbox
        self.store = inbox.store
        self.consumers = list(consumers)
        self.message_seconds = message_retention_hours * 3600.0
        self.interaction_seconds = interaction_retention_days * 86400.0
        self.insights_seconds = insights_retention_days * 86400.0
        self.interval = interval_seconds
        self._spread = False

    def run_once(self, now: float | None = None) -> dict[str, int]:
        """Prune what is due now; returns the rows deleted by table."""
        now = time.time() if now is None else now
        deleted = {"inbox": 0, "interactions": 0, "impressions": 0, "attributions": 0}
        for _ in range(MAX_BATCHES):
            n = self.inbox.prune(now - self.message_seconds, self.consumers, BATCH)
            deleted["inbox"] += n
            if n < BATCH:
                break
        due = []  # (table, its time column, the cutoff)
        if self.interaction_seconds:
            due.append((interactions, interactions.c.timestamp, now - self.interaction_seconds))
        if self.insights_seconds:
            due += [
                (impressions, impressions.c.shown_at, now - self.insights_seconds),
                (attributions, attributions.c.at, now - self.insights_seconds),
            ]
        for table, column, cutoff in due:
            for _ in range(MAX_BATCHES):
                n = self._prune_before(table, column, cutoff)
                deleted[table.name] += n
                if n < BATCH:
                    break
        for name, n in deleted.items():
            if n:
                metrics.INBOX_PRUNED.labels(table=name).inc(n)
        if any(deleted.values()):
            log.info("retention: rows pruned", extra={"pruned": deleted})
        return deleted

    def _prune_before(self, table, column, cutoff: float) -> int:
        """Delete at most BATCH rows of ``table`` whose time (an indexed column) is before
        ``cutoff``, chosen by primary key (a row value when the key has two columns)."""
        keys = list(table.primary_key.columns)
        key = keys[0] if len(keys) == 1 else sa.tuple_(*keys)
        with self.store.write() as tx:
            doomed = sa.select(*keys).where(column < cutoff).limit(BATCH)
            return tx.conn.execute(table.delete().where(key.in_(doomed))).rowcount

    def step(self) -> None:
        if not self._spread:  # processes started together spread their runs out
            self._spread = True
            if self.sleep(random.uniform(0, self.interval)):
                return
        self.run_once()
