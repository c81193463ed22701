"""Activation: recommendations written back onto the profile as a trait.

``Activation.submit(user_id, item_ids)`` returns at once; a background thread decides
(only when the list changed, at most once per user per interval — decided in the database,
so it holds across workers) and publishes through a ``Publisher``:

- ``SegmentPublisher``: an ``identify`` through Segment's HTTP Tracking API, with Segment's
  own client (segment-analytics-python). It queues, batches, gzips and retries off the
  request path by itself; with ``requests`` all of that would be ours to write and test.
- ``LocalPublisher``: into the local profile store, when no write key is configured.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, Sequence

import sqlalchemy as sa

from . import metrics
from .routing import UserTraits
from .store import Store, StoreUnavailable, activations

log = logging.getLogger("webhook.activation")


class Publisher(Protocol):
    name: str

    def publish(self, user_id: str, traits: dict) -> None: ...


class LocalPublisher:
    name = "local"

    def __init__(self, store: Store):
        self.store = store

    def publish(self, user_id: str, traits: dict) -> None:
        with self.store.write() as tx:
            tx.merge_traits([UserTraits(user_id, traits, time.time())])


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
                        write_key=self._write_key, host=self._host, on_error=self._failed,
                        max_retries=5, timeout=5, upload_interval=0.5, gzip=True)
        return self._client

    @staticmethod
    def _failed(error, batch) -> None:
        metrics.ACTIVATIONS.labels(outcome="failed").inc(len(batch))
        log.warning("segment tracking api refused %d identify call(s): %s",
                    len(batch), type(error).__name__)

    def publish(self, user_id: str, traits: dict) -> None:
        self.client.identify(user_id=user_id, traits=traits)

    def flush(self) -> None:
        if self._client is not None:
            self._client.flush()


class Activation:
    def __init__(self, store: Store, publisher: Publisher, trait: str, interval: float):
        self.store = store
        self.publisher = publisher
        self.trait = trait
        self.interval = interval
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @property
    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="activation")
        return self._executor

    def submit(self, user_id: str, item_ids: Sequence[str]):
        """Publish later, off the request path; returns the future (tests wait on it)."""
        return self.executor.submit(self._run, user_id, list(item_ids))

    def _run(self, user_id: str, item_ids: list[str]) -> str:
        try:
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
            row = tx.conn.execute(sa.select(activations.c.digest, activations.c.published_at)
                                  .where(activations.c.user_id == user_id)).first()
            if row is not None:
                if row.digest == digest:
                    return "unchanged"
                if now - row.published_at < self.interval:
                    return "too_soon"
                # Optimistic: if another worker published meanwhile, it wins.
                done = tx.conn.execute(
                    activations.update()
                    .where(activations.c.user_id == user_id,
                           activations.c.published_at == row.published_at)
                    .values(digest=digest, published_at=now))
            else:
                done = tx.conn.execute(
                    tx._insert(activations)
                    .values(user_id=user_id, digest=digest, published_at=now)
                    .on_conflict_do_nothing(index_elements=["user_id"]))
            if done.rowcount == 0:
                return "concurrent"
        self.publisher.publish(user_id, {self.trait: item_ids})
        return "published"
