"""Ingestion: a delivery's messages validated and written durably into the inbox.

The one ingestion path: ``POST /segment``, the Segment-compatible ``/v1/*`` endpoints and
``flask --app webhook import`` all call ``Ingestor.ingest``. It checks each message
against the Spec, then writes the valid ones in one short transaction: each message's
messageId claim and canonical JSON, one inbox row each (``Transaction.add_to_inbox``). A
messageId already in the inbox makes the message a duplicate, known from that insert
itself. Once the transaction has committed, the caller may acknowledge the delivery; what
the messages mean is applied afterwards, in bulk, by the appliers (``appliers/``) of the
worker process.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .consent import denied_categories
from .inbox import Inbox
from .routing import Router
from .segment import Message, MessageError, encode_json, parse_message


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
        "track",
        "identify",
        "page",
        "screen",
        "group",
        "alias",
        "delete",
    }:
        return kind.strip().lower()
    return "invalid"  # a bounded label set: never echo what the caller sent


def canonical_json(raw: dict) -> str:
    """The form a message is kept in: compact, keys in the order received, non-ASCII and
    lone surrogates escaped (so any database takes it as text)."""
    return encode_json(raw)


class Ingestor:
    """Validates deliveries and writes them into the inbox.

    A valid message is skipped, with its reason in the answer, instead of stored when it
    would only be thrown away or must not be used:

    * ``too_old``: a live message older than ``max_message_age_seconds`` (by default the
      inbox's retention: a replay is either a duplicate or too old; imports are not
      bound by it);
    * ``no_consent``: its ``context.consent.categoryPreferences`` denies one of
      ``consent_categories`` (``consent.py``);
    * ``older_than_retention``: an interaction older than ``interaction_retention_seconds``
      (it would be pruned within a minute);
    * ``deleted``: it is about a person deleted after the message's time
      (``tombstones.py``).

    A deletion request is never skipped. Its tombstones are written with its claim; one
    without a messageId is claimed by its content, so a replay of it is a duplicate.
    """

    def __init__(
        self,
        inbox: Inbox,
        router: Router,
        max_message_age_seconds: float | None = None,
        *,
        interaction_retention_seconds: float | None = None,
        consent_categories: Sequence[str] = (),
        tombstones=None,
    ):
        self.inbox = inbox
        self.router = router
        self.max_message_age_seconds = max_message_age_seconds
        self.interaction_retention_seconds = interaction_retention_seconds
        self.consent_categories = tuple(consent_categories)
        self.tombstones = tombstones  # tombstones.Tombstones, or None: no check
        self.listeners: list[Callable[[], None]] = []  # told when new rows are committed
        # SQLite at FULL takes one writer at a time and an fsync a commit: deliveries that
        # arrive together share one transaction. At NORMAL a commit is a write to the WAL,
        # and PostgreSQL flushes concurrent commits together itself: a delivery writes at
        # once, on its own thread's connection.
        self._submit = _GroupCommit(self._write).submit if inbox.rows.commit_syncs else self._alone

    def ingest(self, raw_messages: Sequence[Any], *, live: bool = True) -> Summary:
        """Validate a delivery and write it into the inbox. Raises ``NoMessages`` (nothing
        valid; nothing written) or ``StoreUnavailable`` (nothing written; retry). A live
        delivery (not an import) may have old messages skipped: MAX_MESSAGE_AGE_HOURS."""
        summary = Summary(received=len(raw_messages))
        rows: list[tuple[int, Message, str]] = []
        now = time.time()
        oldest = (
            now - self.max_message_age_seconds if live and self.max_message_age_seconds else None
        )
        retained = (
            now - self.interaction_retention_seconds if self.interaction_retention_seconds else None
        )
        if self.tombstones is not None:
            self.tombstones.refresh()
        graves: list[dict] = []
        for index, raw in enumerate(raw_messages):
            try:
                message = parse_message(raw)
            except MessageError as exc:
                summary.rejected.append(_entry(index, raw, str(exc)))
                summary.count(_type_label(raw), "rejected")
                continue
            if message.type == "delete":
                body = canonical_json(raw)
                if message.message_id is None:
                    message.message_id = delete_claim(body)
                if self.tombstones is not None:
                    graves += self.tombstones.rows(
                        (message.user_id, message.anonymous_id), message.timestamp.timestamp()
                    )
                rows.append((index, message, body))
                continue
            reason = self._skip_reason(message, raw, oldest, retained)
            if reason is not None:
                summary.skipped.append(
                    {"index": index, "messageId": message.message_id, "reason": reason}
                )
                summary.count(message.type, "skipped")
                continue
            rows.append((index, message, canonical_json(raw)))
        if not rows:
            if summary.rejected:
                raise NoMessages(summary)
            return summary  # every message skipped: nothing to keep

        job = _Job(rows, graves)
        self._submit(job)
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
                summary.skipped.append({"index": index, "messageId": message_id, "reason": skipped})
                summary.count(message.type, "skipped")
            else:
                summary.accepted += 1
                summary.count(message.type, "accepted")
            summary.interactions += interactions
        if job.added:
            for listener in self.listeners:
                listener()
        return summary

    def _skip_reason(
        self, message: Message, raw: dict, oldest: float | None, retained: float | None
    ) -> str | None:
        when = message.timestamp.timestamp()
        if oldest is not None and when < oldest:
            return "too_old"
        if self.consent_categories and denied_categories(raw, self.consent_categories):
            return "no_consent"
        if (
            retained is not None
            and when < retained
            and message.type == "track"
            and message.event in self.router.interaction_events
        ):
            return "older_than_retention"
        if (
            self.tombstones is not None
            and not self.tombstones.empty
            and self.tombstones.deleted_since(
                (message.user_id, message.anonymous_id, message.previous_id), when, refresh=False
            )
        ):
            return "deleted"
        return None

    def _write(self, jobs: Sequence[_Job]) -> None:
        """Write the rows of a group of deliveries in one transaction (``_GroupCommit``):
        a messageId in two of them (or twice in one) is new for its first copy only."""
        rows: list[tuple[str | None, str, str]] = []
        graves: list[dict] = []
        seen: set[str] = set()
        for job in jobs:
            graves += job.graves
            for _, message, body in job.rows:
                message_id = message.message_id
                if message_id is not None:
                    if message_id in seen:
                        continue
                    seen.add(message_id)
                rows.append((message_id, message.type, body))
        fresh = self.inbox.add(rows, graves)
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

    def _alone(self, job: _Job) -> None:
        self._write([job])


def delete_claim(body: str) -> str:
    """The claim of a deletion request sent without a messageId: its content (the same
    request sent again is the same claim, a duplicate)."""
    return "delete:" + hashlib.sha256(body.encode("utf-8")).hexdigest()


@dataclass(slots=True)
class _Job:
    rows: list[tuple[int, Message, str]]
    graves: list[dict] = field(default_factory=list)  # tombstones of its deletes
    fresh: set[str] = field(default_factory=set)
    added: bool = False
    done: bool = False
    error: BaseException | None = None


class _GroupCommit:
    """Deliveries that arrive while a transaction is running share the next one (SQLite).

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
