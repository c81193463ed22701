"""Appliers: what consumes the inbox, each at its own pace (see ``webhook/inbox.py``).

An applier gets a batch of inbox entries in arrival order and returns an ``Applied``: the
writes to make in the transaction that also moves its position (so the local store's
effects and the position commit together, exactly once), and what to do after that
commit. ``Runner`` does the rest for every applier alike: read the batch, take the lease,
apply, commit, let go; one thread per applier in each worker, woken when this worker
accepted something and otherwise polling for what other workers and hosts accepted.

* ``local.LocalStoreApplier``: interactions, catalog, traits, identity links, deletions.
* ``personalize.PersonalizeApplier``: PutEvents, PutUsers, PutItems.
* ``attribution.AttributionApplier``: clicks, add-to-carts and orders of recommended items.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .. import metrics
from ..background import BackgroundThread
from ..inbox import BUSY as CLAIMED_ELSEWHERE
from ..inbox import Entry, Inbox, LostLease
from ..segment import Message, MessageError, decode_json, parse_message
from ..storage import StoreUnavailable, Transaction
from ..storage.leases import holder_name

log = logging.getLogger("webhook.appliers")


@dataclass
class Applied:
    write: Callable[[Transaction], None] | None = None  # in the advancing transaction
    after: Callable[[], None] | None = None  # once that transaction committed
    # How many of the batch's entries were applied (the position moves past them); None:
    # all. Fewer: the rest is not ready yet and comes again in the next batch.
    consumed: int | None = None


class Applier(Protocol):
    name: str
    batch_size: int  # entries a batch, at most
    lease_seconds: float  # how long a batch may go without renewing its lease
    # After a batch that was not full, the wait before the next one: what arrives
    # meanwhile is applied together (fewer transactions under load; a delivery arriving
    # while nothing is pending is applied at once).
    settle_seconds: float

    def apply(self, entries: Sequence[Entry], keep_lease: Callable[[], None]) -> Applied:
        """Do the batch's work. A long one calls ``keep_lease()`` now and then (it raises
        LostLease when another process took over: stop, nothing may be committed)."""
        ...


def decode(entry: Entry, tombstones=None) -> Message | None:
    """The message of an inbox entry, validated again; None when there is nothing to
    apply: its body was dropped (a deletion request forgot its sender, or a claim carried
    over from before the inbox), it no longer validates, or, with ``tombstones``
    (``tombstones.Tombstones``, refreshed by the caller), it is about a person deleted
    after it was sent."""
    if entry.body is None:
        return None
    try:
        message = parse_message(decode_json(entry.body.encode()))
    except (ValueError, RecursionError, MessageError) as exc:
        log.error("inbox: an entry no longer validates and is left out: %s", type(exc).__name__)
        metrics.INBOX_UNREADABLE.inc()
        return None
    if (
        tombstones is not None
        and message.type != "delete"
        and not tombstones.empty
        and tombstones.deleted_since(
            (message.user_id, message.anonymous_id, message.previous_id),
            message.timestamp.timestamp(),
            refresh=False,
        )
    ):
        return None
    return message


@dataclass
class _Renewer:
    inbox: Inbox
    name: str
    owner: str
    ttl: float
    renewed_at: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self) -> None:
        if time.monotonic() - self.renewed_at < self.ttl / 3:
            return
        with self.lock:
            if time.monotonic() - self.renewed_at < self.ttl / 3:
                return
            self.inbox.renew_lease(self.name, self.owner, self.ttl)
            self.renewed_at = time.monotonic()


class Stopping(Exception):
    """Raised by an applier whose process is shutting down: the batch is left unapplied
    (its rows are applied again after the restart, at-least-once)."""


POLL_SECONDS = 0.1  # an idle applier's look for new rows (one cheap query)
BUSY = -1  # run_once: another process holds the lease
NOT_READY = -2  # run_once: the next entry is not ready to apply yet (Applied.consumed 0)


class Runner(BackgroundThread):
    """Runs one applier: ``run_once`` (one batch), ``drain`` (until caught up) and, in the
    worker, a thread (``start``/``stop``/``wake``) that applies what arrives: it looks for
    new rows every ``poll_seconds`` (one cheap query), and is woken at once by deliveries
    accepted in its own process (``WORKER_IN_WEB``)."""

    def __init__(self, inbox: Inbox, applier: Applier, poll_seconds: float = POLL_SECONDS):
        super().__init__()
        self.inbox = inbox
        self.applier = applier
        self.name = applier.name
        self.poll_seconds = poll_seconds
        self._run_lock = threading.Lock()  # one batch at a time in this process
        self._token = uuid.uuid4().hex[:8]
        self._backoff = 0.0
        self._failures = 0

    def run_once(self) -> int:
        """Apply the next batch, if any: the number of entries applied, 0 when there was
        nothing to do, BUSY when another process holds the lease, NOT_READY when the
        applier held its next entry back."""
        with self._run_lock:
            return self._run_once()

    def _run_once(self) -> int:
        owner = f"{holder_name()}:{self._token}"
        ttl = self.applier.lease_seconds
        claimed = self.inbox.claim(self.name, owner, self.applier.batch_size, ttl)
        if claimed is None:
            return 0
        if claimed == CLAIMED_ELSEWHERE:
            return BUSY
        _, entries = claimed
        started = time.perf_counter()
        try:
            applied = self.applier.apply(entries, _Renewer(self.inbox, self.name, owner, ttl))
            if applied.consumed is not None and applied.consumed < len(entries):
                if applied.consumed <= 0:  # nothing ready yet: let go, look again later
                    self.inbox.release_lease(self.name, owner)
                    return NOT_READY
                entries = entries[: applied.consumed]
            # Not durable (no fsync of its own at SQLITE_SYNCHRONOUS=FULL): what an applier
            # writes is derived from inbox rows that were durable before their 2xx. A
            # power loss can only take this commit with everything after it in the WAL,
            # so the position and the effects roll back together and the batch is
            # applied again, with the same idempotent effects.
            with self.inbox.store.write(durable=False) as tx:
                self.inbox.advance(tx, self.name, owner, entries[-1].position, len(entries))
                if applied.write is not None:
                    applied.write(tx)
        except BaseException:
            self.inbox.release_lease(self.name, owner)
            raise
        metrics.INBOX_APPLIED.labels(applier=self.name).inc(len(entries))
        metrics.INBOX_APPLY_SECONDS.labels(applier=self.name).observe(time.perf_counter() - started)
        if applied.after is not None:
            try:
                applied.after()
            except Exception:  # the batch is committed; what follows is best effort
                log.exception("inbox: after-commit step failed", extra={"applier": self.name})
        return len(entries)

    def drain(self, timeout: float = 60.0) -> bool:
        """Apply until nothing is left (or ``timeout`` seconds passed); True if caught up.
        Waits for another process that holds the lease to finish, and on PostgreSQL for
        rows that an older transaction still running keeps out of reach (inbox.py)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.run_once()
            if done == 0 and not self.inbox.lag([self.name])[self.name].pending:
                return True
            if done in (0, BUSY, NOT_READY):
                time.sleep(0.01)  # another process applies, or rows are not ready yet
        return False

    # -- the background thread -------------------------------------------------------------

    def step(self) -> float:
        """One batch; how long to wait before the next (0: at once)."""
        try:
            done = self.run_once()
            self._backoff, self._failures = 0.0, 0
        except Stopping:
            log.info(
                "inbox: shutting down mid-batch; the batch will be applied again",
                extra={"applier": self.name},
            )
            self._stop.set()
            return 0.0
        except LostLease:
            log.warning(
                "inbox: the lease was taken over mid-batch; the batch will be applied again",
                extra={"applier": self.name},
            )
            return self.poll_seconds
        except StoreUnavailable as exc:
            self._failures += 1
            if self._failures == 1 or self._failures % 60 == 0:
                log.warning(
                    "inbox: store unavailable, applying later: %s",
                    exc,
                    extra={"applier": self.name},
                )
            self._backoff = min(5.0, max(0.25, self._backoff * 2))
            return self._backoff
        except Exception:
            self._failures += 1
            log.exception("inbox: applying a batch failed", extra={"applier": self.name})
            self._backoff = min(30.0, max(1.0, self._backoff * 2))
            return self._backoff
        if done == self.applier.batch_size:
            return 0.0  # more is waiting: read again at once
        if done > 0 or done == NOT_READY:
            # Applied a batch: what arrives meanwhile is applied together. Held back (an
            # attribution waiting for another process's record): each look takes and gives
            # back the lease, so not at once either.
            return self.applier.settle_seconds
        return self.poll_seconds  # nothing to do, or another process applies
