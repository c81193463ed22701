"""Impressions: every answer the service gives, recorded off the request path.

``ImpressionRecorder.record`` appends to a bounded buffer and returns; a thread per
worker writes the buffer in one transaction every ``flush_seconds`` (without the fsync of
``SQLITE_SYNCHRONOUS=FULL``: losing the last fraction of a second of impressions in a
power failure costs a few rows of statistics, nothing a shop was promised). The buffer is
bounded in answers and in the item ids they hold (an answer may list 500): what does not
fit (the store down for long) is dropped and counted
(``recommendation_impressions_dropped_total``), never waited for.

The attribution applier (``appliers/attribution.py``) holds back a click that names an
answer not recorded yet for a little longer than ``flush_seconds``, so a click that
follows an answer within a second is still matched.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from . import metrics
from .storage import Store, StoreUnavailable
from .storage.schema import impressions

log = logging.getLogger("webhook.impressions")

FLUSH_SECONDS = 0.2


class ImpressionRecorder:
    def __init__(
        self,
        store: Store,
        max_pending: int = 10_000,
        max_pending_items: int = 100_000,
        flush_seconds: float = FLUSH_SECONDS,
        tombstones=None,
    ):
        self.store = store
        # An answer for a person deleted while it waited in the buffer is not written.
        self.tombstones = tombstones
        self.max_pending = max_pending
        self.max_pending_items = max_pending_items  # ~6 MB of ids at most
        self._items = 0  # item ids held in the buffer
        self.flush_seconds = flush_seconds
        self._rows: list[dict] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def record(
        self,
        *,
        recommendation_id: str,
        visitor: str | None,
        variant: str,
        source: str,
        kind: str,
        items: Sequence[str],
    ) -> bool:
        """Keep an answer for the next write; False if the buffer is full (dropped)."""
        shown = list(items)
        row: dict[str, Any] = {
            "recommendation_id": recommendation_id,
            "visitor": visitor or "",
            "variant": variant,
            "source": source,
            "kind": kind,
            "items": shown,
            "shown_at": time.time(),
        }
        with self._lock:
            if (
                len(self._rows) >= self.max_pending
                or self._items + len(shown) > self.max_pending_items
            ):
                metrics.IMPRESSIONS_DROPPED.inc()
                return False
            self._rows.append(row)
            self._items += len(shown)
            if self._pid != os.getpid() or self._thread is None:
                self._start()
        metrics.IMPRESSIONS.labels(variant=variant).inc()
        return True

    def flush(self) -> int:
        """Write what is buffered now (the thread does it; the CLI and tests may too).
        Returns the rows written. StoreUnavailable: they stay buffered."""
        with self._flush_lock:
            with self._lock:
                rows, self._rows, self._items = self._rows, [], 0
            if not rows:
                return 0
            try:
                if self.tombstones is not None:
                    self.tombstones.refresh()
                    if not self.tombstones.empty:
                        rows = [
                            row
                            for row in rows
                            if not self.tombstones.deleted_since(
                                (row["visitor"],), row["shown_at"], refresh=False
                            )
                        ]
                with self.store.write(durable=False) as tx:
                    tx.conn.execute(
                        tx.insert(impressions).on_conflict_do_nothing(
                            index_elements=["recommendation_id"]
                        ),
                        rows,
                    )
            except BaseException:
                with self._lock:  # back in front, as far as the bounds allow (newest kept)
                    kept: list[dict] = []
                    rows_room = self.max_pending - len(self._rows)
                    items_room = self.max_pending_items - self._items
                    for row in reversed(rows):
                        if len(kept) >= rows_room or len(row["items"]) > items_room:
                            break
                        kept.append(row)
                        items_room -= len(row["items"])
                    kept.reverse()
                    if len(rows) > len(kept):
                        metrics.IMPRESSIONS_DROPPED.inc(len(rows) - len(kept))
                    self._rows[:0] = kept
                    self._items += sum(len(row["items"]) for row in kept)
                raise
            return len(rows)

    def pending(self) -> int:
        return len(self._rows)

    # -- the thread, one per worker ----------------------------------------------------------

    def _start(self) -> None:
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="impressions", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and self._pid == os.getpid():
            thread.join(timeout)
        self._thread = None
        try:
            self.flush()
        except StoreUnavailable:
            log.warning(
                "impressions: store unavailable at shutdown; %d not recorded", len(self._rows)
            )

    def _loop(self) -> None:
        failures = 0
        while not self._stop.wait(self.flush_seconds * (1 + min(failures, 25))):
            try:
                self.flush()
                failures = 0
            except StoreUnavailable as exc:
                failures += 1
                if failures == 1:
                    log.warning("impressions: store unavailable, writing later: %s", exc)
            except Exception:
                failures += 1
                log.exception("impressions: writing failed")
