"""Ingestion: a delivery's messages validated and written durably into the inbox.

The one ingestion path: ``POST /segment``, the Segment-compatible ``/v1/*`` endpoints and
``flask --app webhook import`` all call ``Ingestor.ingest``. It checks each message
against the Spec, then writes the valid ones in one short transaction: each message's
messageId claim and canonical JSON, one inbox row each (``Transaction.add_to_inbox``). A
messageId already in the inbox makes the message a duplicate, known from that insert
itself. Once the transaction has committed, the caller may acknowledge the delivery; what
the messages mean is applied afterwards, in bulk, by the appliers (``appliers/``), which
are woken here.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .routing import Router
from .segment import Message, MessageError, encode_json, parse_message
from .store import Store


@dataclass(slots=True)
class Summary:
    """What became of each message of a delivery; the webhook's JSON answer."""
    received: int = 0
    accepted: int = 0
    duplicates: int = 0
    interactions: int = 0
    skipped: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    notes: list[dict] = field(default_factory=list)
    outcomes: dict = field(default_factory=dict)  # (type, outcome) -> count

    def count(self, kind: str, outcome: str) -> None:
        key = (kind, outcome)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1

    def as_json(self) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "received": self.received,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "skipped": self.skipped,
            "rejected": self.rejected,
            "interactions": self.interactions,
        }
        if self.notes:
            answer["notes"] = self.notes
        return answer


class NoMessages(Exception):
    """Nothing in the delivery is a valid Segment message."""

    def __init__(self, summary: Summary):
        super().__init__("no valid Segment message in the delivery")
        self.summary = summary


def _entry(index: int, raw: Any, reason: str) -> dict:
    entry: dict[str, Any] = {"index": index, "reason": reason}
    message_id = raw.get("messageId") if isinstance(raw, dict) else None
    if isinstance(message_id, str) and len(message_id) <= 256:
        entry["messageId"] = message_id
    return entry


def _type_label(raw: Any) -> str:
    kind = raw.get("type") if isinstance(raw, dict) else None
    if isinstance(kind, str) and kind.strip().lower() in {
            "track", "identify", "page", "screen", "group", "alias", "delete"}:
        return kind.strip().lower()
    return "invalid"  # a bounded label set: never echo what the caller sent


def canonical_json(raw: dict) -> str:
    """The form a message is kept in: compact, keys in the order received, non-ASCII and
    lone surrogates escaped (so any database takes it as text)."""
    return encode_json(raw)


class Ingestor:
    def __init__(self, store: Store, router: Router,
                 max_message_age_seconds: float | None = None):
        self.store = store
        self.router = router
        self.max_message_age_seconds = max_message_age_seconds
        self.listeners: list[Callable[[], None]] = []  # told when new rows are committed
        self._group = _GroupCommit(self._write)

    def ingest(self, raw_messages: Sequence[Any], *, live: bool = True) -> Summary:
        """Validate a delivery and write it into the inbox. Raises ``NoMessages`` (nothing
        valid; nothing written) or ``StoreUnavailable`` (nothing written; retry). A live
        delivery (not an import) may have old messages skipped: MAX_MESSAGE_AGE_HOURS."""
        summary = Summary(received=len(raw_messages))
        rows: list[tuple[int, Message, str]] = []
        oldest = (time.time() - self.max_message_age_seconds
                  if live and self.max_message_age_seconds else None)
        for index, raw in enumerate(raw_messages):
            try:
                message = parse_message(raw)
            except MessageError as exc:
                summary.rejected.append(_entry(index, raw, str(exc)))
                summary.count(_type_label(raw), "rejected")
                continue
            if oldest is not None and message.type != "delete" \
                    and message.timestamp.timestamp() < oldest:
                summary.skipped.append({"index": index, "messageId": message.message_id,
                                        "reason": "too_old"})
                summary.count(message.type, "skipped")
                continue
            rows.append((index, message, canonical_json(raw)))
        if not rows:
            if summary.rejected:
                raise NoMessages(summary)
            return summary  # every message skipped as too old: nothing to keep

        job = _Job(rows)
        self._group.submit(job)
        fresh = job.fresh
        for index, message, _ in rows:
            message_id = message.message_id
            if message_id is not None:
                if message_id not in fresh:
                    summary.duplicates += 1
                    summary.count(message.type, "duplicate")
                    continue
                fresh.discard(message_id)  # a second copy in this delivery: a duplicate
            skipped, notes, interactions = self.router.outcome(message)
            for note in notes:
                summary.notes.append({"index": index, "messageId": message_id, "reason": note})
            if skipped:
                summary.skipped.append({"index": index, "messageId": message_id,
                                        "reason": skipped})
                summary.count(message.type, "skipped")
            else:
                summary.accepted += 1
                summary.count(message.type, "accepted")
            summary.interactions += interactions
        if job.added:
            for listener in self.listeners:
                listener()
        return summary

    def _write(self, jobs: Sequence["_Job"]) -> None:
        """Write the rows of a group of deliveries in one transaction (``_GroupCommit``):
        a messageId in two of them (or twice in one) is new for its first copy only."""
        rows: list[tuple[str | None, str, str]] = []
        seen: set[str] = set()
        for job in jobs:
            for _, message, body in job.rows:
                message_id = message.message_id
                if message_id is not None:
                    if message_id in seen:
                        continue
                    seen.add(message_id)
                rows.append((message_id, message.type, body))
        fresh = self.store.add_to_inbox(rows)
        for job in jobs:
            job.added = False
            mine: set[str] = set()
            for _, message, _ in job.rows:
                message_id = message.message_id
                if message_id is None:
                    job.added = True
                elif message_id in fresh:
                    fresh.discard(message_id)
                    mine.add(message_id)
                    job.added = True
            job.fresh = mine


@dataclass(slots=True)
class _Job:
    rows: list[tuple[int, Message, str]]
    fresh: set[str] = field(default_factory=set)
    added: bool = False
    done: bool = False
    error: BaseException | None = None


class _GroupCommit:
    """Deliveries that arrive while a transaction is running share the next one.

    The first request thread to find no transaction in progress becomes the leader: it
    takes every job waiting and writes them together, one statement and one commit for
    all; the others wait for it and answer from their own results. An uncontended delivery
    commits alone, at once. With ``SQLITE_SYNCHRONOUS=FULL`` a commit is an fsync, so under
    load this is what keeps single-message deliveries cheap. An error fails every job of
    the group (nothing written)."""

    def __init__(self, apply):
        self._apply = apply
        self._cond = threading.Condition(threading.Lock())  # not re-entered: a plain lock
        self._waiting: list[_Job] = []
        self._leading = False

    def submit(self, job: _Job) -> None:
        with self._cond:
            self._waiting.append(job)
            while not job.done and self._leading:
                self._cond.wait()
            if job.done:
                if job.error is not None:
                    raise job.error
                return
            self._leading = True
            group, self._waiting = self._waiting, []
        try:
            self._apply(group)
        except BaseException as exc:
            for member in group:
                member.error = exc
        finally:
            with self._cond:
                for member in group:
                    member.done = True
                self._leading = False
                self._cond.notify_all()
        if job.error is not None:
            raise job.error
