"""Activation: recommendations written back onto the profile as a trait.

``Activation.offer(user_id, item_ids)`` returns at once; a background thread decides
(only when the list changed, at most once per user per interval — decided in the database,
so it holds across workers) and publishes through a ``Publisher``. The queue in between is
bounded (``ACTIVATION_QUEUE_MAX``): what does not fit is dropped and counted
(``activations_total{outcome="dropped"}``), so a request never waits for it and a flood
cannot grow the worker's memory. Who may be activated at all is decided in one place, the
recommendation pipeline (``RecommendationService._write_back``).

- ``SegmentPublisher``: an ``identify`` through Segment's HTTP Tracking API, with Segment's
  own client (segment-analytics-python). It queues, batches, gzips and retries off the
  request path by itself; with ``requests`` all of that would be ours to write and test.
  Segment takes at most 32 KB an event, so a long list (up to 500 ids of up to 256
  characters) is cut to the best items that fit.
- ``LocalPublisher``: into the local profile store, when no write key is configured.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import sqlalchemy as sa

from . import metrics
from .routing import UserTraits
from .storage import Store, StoreUnavailable
from .storage.schema import activations

if TYPE_CHECKING:
    from .appliers.local import Statements

log = logging.getLogger("webhook.activation")


class Publisher(Protocol):
    name: str

    def publish(self, user_id: str, traits: dict) -> None: ...


class LocalPublisher:
    name = "local"

    def __init__(self, store: Store):
        self.store = store
        self._statements: Statements | None = None

    def publish(self, user_id: str, traits: dict) -> None:
        # The trait, merged into the profile as an identify's are (newer values win).
        from .appliers.local import Prepared, Statements

        if self._statements is None:
            self._statements = Statements(self.store)
        update = Prepared(self._statements, users=[UserTraits(user_id, traits, time.time())])
        with self.store.write() as tx:
            update.write(tx)


# Segment's HTTP Tracking API takes at most 32 KB an event ("HTTP API Source", "Max
# request size": 400 above it); analytics-python refuses a bigger one before sending, with
# an exception that quotes the whole message. The client adds about 300 bytes to the
# userId and traits (messageId, timestamp, context.library, type): 1 KB is left for them.
MAX_EVENT_BYTES = 32 * 1024
ENVELOPE_BYTES = 1024


class TooLarge(Exception):
    """An identify Segment would not take, even with its lists cut."""


def fit_traits(user_id: str, traits: dict, budget: int = MAX_EVENT_BYTES - ENVELOPE_BYTES) -> dict:
    """``traits``, with the longest list cut from its end (the least recommended items)
    until the userId and traits fit ``budget`` bytes, measured as analytics-python
    measures a message."""

    def size(values: dict) -> int:
        return len(json.dumps({"userId": user_id, "traits": values}).encode())

    if size(traits) <= budget:
        return traits
    lists = [name for name, value in traits.items() if isinstance(value, list)]
    if not lists:
        raise TooLarge("identify over Segment's 32 KB, and no list to cut")
    name = max(lists, key=lambda n: len(json.dumps(traits[n])))
    items = traits[name]
    fits, fails = 0, len(items)  # the most items that fit: binary search
    while fails - fits > 1:
        middle = (fits + fails) // 2
        if size({**traits, name: items[:middle]}) <= budget:
            fits = middle
        else:
            fails = middle
    cut = {**traits, name: items[:fits]}
    if size(cut) > budget:
        raise TooLarge("identify over Segment's 32 KB without its list")
    return cut


class SegmentPublisher:
    name = "segment"

    def __init__(self, write_key: str, host: str):
        self._write_key = write_key
        self._host = host
        self._client = None
        self._lock = threading.Lock()

    @property
    def client(self):
        # Made on first use: its upload thread must belong to this (forked) worker.
        if self._client is None:
            with self._lock:
                if self._client is None:
                    from segment.analytics import Client

                    logging.getLogger("segment").setLevel(logging.WARNING)
                    self._client = Client(
                        write_key=self._write_key,
                        host=self._host,
                        on_error=self._failed,
                        max_retries=5,
                        timeout=5,
                        upload_interval=0.5,
                        gzip=True,
                    )
        return self._client

    @staticmethod
    def _failed(error, batch) -> None:
        metrics.ACTIVATIONS.labels(outcome="failed").inc(len(batch))
        log.warning(
            "segment tracking api refused %d identify call(s): %s", len(batch), type(error).__name__
        )

    def publish(self, user_id: str, traits: dict) -> None:
        fitted = fit_traits(user_id, traits)
        if fitted is not traits:
            log.info(
                "write-back cut to fit Segment's 32 KB an event: %d of %d items",
                *(sum(len(v) for v in t.values() if isinstance(v, list)) for t in (fitted, traits)),
            )
        client = self.client
        try:
            client.identify(user_id=user_id, traits=fitted)
        except RuntimeError:  # the client's size check, its message quoting the traits
            raise TooLarge("identify over Segment's 32 KB") from None

    def flush(self) -> None:
        if self._client is not None:
            self._client.flush()


class Activation:
    IDLE_SECONDS = 60.0  # the thread ends after this long without work; the next offer
    #                      starts another

    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        trait: str,
        interval: float,
        queue_max: int = 1000,
        tombstones=None,
    ):
        self.store = store
        # A write-back queued for a person deleted since is never sent.
        self.tombstones = tombstones
        self.publisher = publisher
        self.trait = trait
        self.interval = interval
        self.queue_max = queue_max
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def offer(self, user_id: str, item_ids: Sequence[str]) -> bool:
        """Publish later, off the request path. False when the queue is full (dropped,
        counted); never blocks."""
        return self._put((self._run, (user_id, list(item_ids), time.time())))

    def later(self, work: Callable, *args) -> bool:
        """Run ``work(*args)`` on the activation thread (a recomputation after a purchase);
        the same bound as ``offer``."""
        return self._put((work, args))

    def _put(self, job) -> bool:
        with self._lock:
            if self._queue is None or self._pid != os.getpid():
                # Made on first use in each (forked) process: a queue and its thread.
                self._queue = queue.Queue(maxsize=self.queue_max)
                self._thread, self._pid = None, os.getpid()
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                metrics.ACTIVATIONS.labels(outcome="dropped").inc()
                return False
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, args=(self._queue,), name="activation", daemon=True
                )
                self._thread.start()
        return True

    def pending(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def wait_idle(self, timeout: float) -> bool:
        """Wait until everything queued so far is done (tests, shutdown)."""
        jobs = self._queue
        if jobs is None or self._pid != os.getpid():
            return True
        deadline = time.monotonic() + timeout
        with jobs.all_tasks_done:
            while jobs.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                jobs.all_tasks_done.wait(remaining)
        return True

    def _work(self, jobs: queue.Queue) -> None:
        while True:
            try:
                work, args = jobs.get(timeout=self.IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if jobs.empty():  # nothing came meanwhile: end; the next offer restarts
                        if self._queue is jobs:
                            self._thread = None
                        return
                continue
            try:
                work(*args)
            except Exception:  # the thread must never die
                log.exception("activation job failed")
            finally:
                jobs.task_done()

    def _run(self, user_id: str, item_ids: list[str], offered_at: float) -> str:
        try:
            if self.tombstones is not None and self.tombstones.deleted_since(
                (user_id,), offered_at
            ):
                outcome = "deleted"
            else:
                outcome = self.publish_if_due(user_id, item_ids)
        except StoreUnavailable:
            outcome = "store_unavailable"
        except Exception:  # a background thread must never die silently
            log.exception("activation failed")
            outcome = "error"
        metrics.ACTIVATIONS.labels(outcome=outcome).inc()
        return outcome

    def publish_if_due(self, user_id: str, item_ids: list[str]) -> str:
        digest = hashlib.sha1(json.dumps(item_ids).encode("utf-8")).hexdigest()
        now = time.time()
        with self.store.write() as tx:
            row = tx.conn.execute(
                sa.select(activations.c.digest, activations.c.published_at).where(
                    activations.c.user_id == user_id
                )
            ).first()
            if row is not None:
                if row.digest == digest:
                    return "unchanged"
                if now - row.published_at < self.interval:
                    return "too_soon"
                # Optimistic: if another worker published meanwhile, it wins.
                done = tx.conn.execute(
                    activations.update()
                    .where(
                        activations.c.user_id == user_id,
                        activations.c.published_at == row.published_at,
                    )
                    .values(digest=digest, published_at=now)
                )
            else:
                done = tx.conn.execute(
                    tx.insert(activations)
                    .values(user_id=user_id, digest=digest, published_at=now)
                    .on_conflict_do_nothing(index_elements=["user_id"])
                )
            if done.rowcount == 0:
                return "concurrent"
        self.publisher.publish(user_id, {self.trait: item_ids})
        return "published"
