"""The Amazon Personalize applier: PutEvents, PutUsers and PutItems through boto3.

A batch of inbox entries becomes calls of at most 10 records (events grouped by session
and user, in arrival order). Each session's calls go one after the other, so Personalize
sees a session's events in order; different sessions go concurrently, in a bounded pool.
Sending is rate-limited per operation (``PERSONALIZE_PUT_EVENTS_PER_SECOND``; PutUsers and
PutItems: ``PERSONALIZE_PUT_RECORDS_PER_SECOND``); since one process at a time holds the
applier's lease, the limit holds for all workers and hosts together.

* Throttling, 5xx, timeouts and unreachable endpoints are retried with full-jitter
  backoff (capped), for as long as it takes: the entries wait in the inbox, the webhook
  keeps answering 200, and the lag shows on /healthz and /metrics. A call that succeeded
  is not sent again when another call of the batch is retried.
* Errors that are neither per record nor transient (unknown tracking id, access denied)
  are retried the same way, slowly, and logged: a configuration to fix, nothing to drop.
* ``InvalidInputException`` refuses a call's records for good. The call is split in
  halves down to single records, so a bad record costs only itself; a refused record
  goes to the dead-letter list with its message (``deadletters.py``), as do records the
  mapping could not fit within the service's limits. ``flask --app webhook dead-letters
  retry`` sends them again, e.g. after a mapping change.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cachetools import LRUCache
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_random_exponential

from .. import metrics
from ..aws import LazyClient
from ..inbox import Entry
from ..personalize_mapping import (
    MAX_RECORDS_PER_CALL,
    MappingConfig,
    Problem,
    event_calls,
    map_items,
    map_users,
)
from ..routing import Routed, Router
from ..storage import Transaction
from . import Applied, Stopping, decode
from .calls import Calls

log = logging.getLogger("webhook.personalize")

THROTTLING_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
    }
)
_MEMBER = {"put_events": "eventList", "put_users": "users", "put_items": "items"}
_KIND = {"put_events": "event", "put_users": "user", "put_items": "item"}
# sentAt as an aware datetime: boto3 converts an epoch number through the local time zone
# first, at a cost on every event.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BACKOFF_CAP = 5.0  # seconds between attempts at most, for transient errors
FATAL_BACKOFF_CAP = 60.0  # for configuration errors


class RateLimiter:
    """A token bucket: ``rate`` calls a second, bursts of up to ``rate`` (at least 1)."""

    def __init__(self, rate: float):
        self.rate = rate
        self.capacity = max(1.0, rate)
        self._tokens = 0.0  # a new holder of the lease starts empty: no burst on takeover
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self, stop: threading.Event | None = None) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
                self._at = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                wait = (1.0 - self._tokens) / self.rate
            if stop is not None:
                if stop.wait(wait):
                    raise _Stopped()
            else:
                time.sleep(wait)


class _Stopped(Stopping):
    """The process is shutting down: the batch is left for later."""


class _Refused(Exception):
    """InvalidInputException: the service refused the call's records for good."""


class _SentCache:
    """Records this process sent recently, by key (the last ``size``). Users and items by
    content, so a catalog that does not change is not re-sent on every product view
    (PutUsers/PutItems allow about 10 calls a second). Events by eventId, so a batch
    applied again in this process (its commit failed: the database was busy) sends only
    what it had not sent."""

    def __init__(self, size: int = 20000):
        self._seen: LRUCache[str, bool] = LRUCache(maxsize=size)
        self._lock = threading.Lock()

    @staticmethod
    def key(kind: str, record: dict) -> str:
        return kind + json.dumps(record, sort_keys=True, ensure_ascii=False)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return self._seen.get(key, False)  # a hit counts as recent use

    def add(self, key: str) -> None:
        with self._lock:
            self._seen[key] = True


@dataclass
class Call:
    operation: str
    kwargs: dict
    keys: list[str]  # _SentCache keys of the records: content (users, items), eventId


@dataclass
class Refusal:
    """A record that will not reach Personalize as it is: for the dead-letter list."""

    kind: str  # event, user, item
    record_id: str
    reason: str


@dataclass
class SendReport:
    calls: int = 0
    retries: int = 0
    sent: dict[str, int] = field(default_factory=lambda: {"event": 0, "user": 0, "item": 0})
    refused: list[Refusal] = field(default_factory=list)


class Sender:
    """Sends calls to personalize-events: rate-limited, retried, refused records split
    out, ``max_concurrency`` calls at a time from threads of this process. Used by the
    applier and by ``dead-letters retry``."""

    def __init__(
        self,
        *,
        region: str = "",
        call_timeout: float = 1.0,
        max_concurrency: int = 8,
        events_per_second: float = 500.0,
        records_per_second: float = 10.0,
        client: Any = None,
    ):
        self.max_concurrency = max_concurrency
        self._calls = Calls(
            LazyClient(
                "personalize-events",
                region=region,
                timeout=call_timeout,
                pool_size=max_concurrency,
                client=client,
            )
        )
        self.limits = {
            "put_events": RateLimiter(events_per_second),
            "put_users": RateLimiter(records_per_second),
            "put_items": RateLimiter(records_per_second),
        }
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._shutdown = False
        self._aborts: set[threading.Event] = set()

    def stop(self) -> None:
        """The process is shutting down: calls in progress give up at their next pause."""
        with self._lock:
            self._shutdown = True
            for abort in self._aborts:
                abort.set()

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        self.max_concurrency, thread_name_prefix="personalize"
                    )
        return self._pool

    def send_chains(
        self,
        chains: Sequence[Sequence[Call]],
        keep_lease: Callable[[], None],
        on_sent: Callable[[Call], None] | None = None,
    ) -> SendReport:
        """Send each chain's calls in order, the chains concurrently; returns when every
        call succeeded or was refused. Raises LostLease or _Stopped."""
        report = SendReport()
        lock = threading.Lock()
        abort = threading.Event()  # set when the batch is given up: every chain stops
        with self._lock:
            if self._shutdown:
                raise _Stopped()
            self._aborts.add(abort)

        def run_chain(chain: Sequence[Call]) -> None:
            try:
                for call in chain:
                    self._send(call, keep_lease, report, lock, on_sent, abort)
            except BaseException:
                abort.set()
                raise

        try:
            futures = [self.pool.submit(run_chain, chain) for chain in chains if chain]
            error: BaseException | None = None
            for future in futures:
                try:
                    future.result()
                except BaseException as exc:  # wait for every chain before raising
                    if error is None or isinstance(error, _Stopped):
                        error = exc
            if error is not None:
                raise error
            return report
        finally:
            with self._lock:
                self._aborts.discard(abort)

    def _send(
        self,
        call: Call,
        keep_lease,
        report: SendReport,
        lock: threading.Lock,
        on_sent,
        abort: threading.Event,
    ) -> None:
        """One call; a refused call of several records is split in halves, down to single
        records, so one bad record costs only itself."""
        member = _MEMBER[call.operation]
        pending = [call]
        while pending:
            part = pending.pop()
            try:
                retries = self._call(part, keep_lease, abort)
            except _Refused as exc:
                records = part.kwargs[member]
                if len(records) == 1:
                    with lock:
                        report.calls += 1
                        report.refused.append(
                            Refusal(_KIND[part.operation], _record_id(part), str(exc)[:500])
                        )
                    continue
                half = len(records) // 2
                for piece in (slice(half, None), slice(0, half)):
                    pending.append(
                        Call(
                            part.operation,
                            {**part.kwargs, member: records[piece]},
                            part.keys[piece],
                        )
                    )
                continue
            with lock:
                report.calls += 1
                report.retries += retries
                report.sent[_KIND[part.operation]] += len(part.kwargs[member])
            if on_sent is not None:
                on_sent(part)

    def _call(self, call: Call, keep_lease, abort: threading.Event) -> int:
        """One API call, retried until it succeeds or is refused; the retries it took.
        Between attempts: exponential backoff with full jitter (AWS Architecture Blog,
        "Exponential Backoff And Jitter"), capped at ``BACKOFF_CAP`` seconds, or
        ``FATAL_BACKOFF_CAP`` after a configuration error; ``abort`` cuts a wait short."""
        logged = [0]  # configuration errors logged: the first, then every 20th attempt

        def attempt() -> None:
            if abort.is_set():
                raise _Stopped()
            keep_lease()
            self.limits[call.operation].acquire(abort)
            result = self._calls.call(call.operation, call.kwargs)
            if result.kind == "ok":
                metrics.count(metrics.PERSONALIZE_CALLS, call.operation, "ok")
                return
            if result.kind == "client_error" and result.code == "InvalidInputException":
                metrics.count(metrics.PERSONALIZE_CALLS, call.operation, "invalid")
                raise _Refused(f"InvalidInputException: {result.message}")
            failure = _failure(result)
            metrics.count(metrics.PERSONALIZE_CALLS, call.operation, failure.outcome)
            if failure.fatal and (logged[0] < 1 or retrying.statistics["attempt_number"] % 20 == 1):
                logged[0] += 1
                log.error(
                    "personalize %s (%s): check the tracking id, dataset ARNs and "
                    "credentials; retrying",
                    "refused the call" if result.kind == "client_error" else "call failed",
                    result.code or result.status,
                    extra={"operation": call.operation},
                )
            raise failure

        def pause(seconds: float) -> None:
            if abort.wait(seconds):
                raise _Stopped()

        def wait(state: RetryCallState) -> float:
            failure = state.outcome.exception() if state.outcome else None
            cap = FATAL_BACKOFF_CAP if getattr(failure, "fatal", False) else BACKOFF_CAP
            return wait_random_exponential(multiplier=0.05, max=cap, exp_base=2)(state)

        def before_sleep(state: RetryCallState) -> None:
            if state.attempt_number == 5:
                failure = state.outcome.exception() if state.outcome else None
                log.warning(
                    "personalize: retrying (%s)",
                    getattr(failure, "outcome", "?"),
                    extra={"operation": call.operation},
                )

        retrying = Retrying(
            retry=retry_if_exception_type(_Failed),
            wait=wait,
            sleep=pause,
            before_sleep=before_sleep,
            reraise=True,
        )
        retrying(attempt)
        retries = retrying.statistics["attempt_number"] - 1
        if retries >= 3:
            log.info(
                "personalize: a call went through after %d attempts",
                retries + 1,
                extra={"operation": call.operation},
            )
        return retries


class _Failed(Exception):
    """An attempt that failed and is tried again: why (the metric's outcome), and whether
    it was a configuration error (the longer backoff)."""

    def __init__(self, outcome: str, fatal: bool = False):
        super().__init__(outcome)
        self.outcome = outcome
        self.fatal = fatal


def _failure(result) -> _Failed:
    if result.kind == "client_error":
        if result.code in THROTTLING_CODES or result.status == 429:
            return _Failed("throttled")
        if result.status >= 500:
            return _Failed("error")
        return _Failed("fatal", fatal=True)
    if result.kind == "transient":
        return _Failed("timeout")
    return _Failed("fatal", fatal=True)


def _record_id(call: Call) -> str:
    if call.operation == "put_events":
        return str(call.kwargs["eventList"][0].get("eventId", "?"))
    if call.operation == "put_users":
        return str(call.kwargs["users"][0]["userId"])
    return str(call.kwargs["items"][0]["itemId"])


def plan_calls(
    routed: Routed,
    mapping: MappingConfig,
    users_dataset_arn: str,
    items_dataset_arn: str,
    sent: _SentCache | None,
    problems: list[Problem],
    sent_events: _SentCache | None = None,
) -> list[list[Call]]:
    """The calls for a batch's records, as chains: one chain per sessionId of events, in
    order; users and items in chains of their own. Records in ``sent`` (users, items) and
    ``sent_events`` are left out."""
    chains: list[list[Call]] = []
    by_session: dict[str, list[Call]] = {}
    interactions = routed.interactions
    if sent_events is not None:
        # A session's calls go one after the other, so what was sent of it is a prefix:
        # leaving it out keeps the rest in order.
        interactions = [r for r in interactions if r.event_id not in sent_events]
    for call in event_calls(interactions, mapping, problems):
        events = [
            {**event, "sentAt": _EPOCH + timedelta(seconds=event["sentAt"])}
            for event in call.events
        ]
        kwargs: dict[str, Any] = {
            "trackingId": mapping.tracking_id,
            "sessionId": call.session_id,
            "eventList": events,
        }
        if call.user_id:
            kwargs["userId"] = call.user_id
        by_session.setdefault(call.session_id, []).append(
            Call("put_events", kwargs, [e["eventId"] for e in call.events])
        )
    chains.extend(by_session.values())
    for operation, member, arn, records in (
        (
            "put_users",
            "users",
            users_dataset_arn,
            map_users(routed.users, mapping, problems) if users_dataset_arn else [],
        ),
        (
            "put_items",
            "items",
            items_dataset_arn,
            map_items(routed.items, mapping, problems) if items_dataset_arn else [],
        ),
    ):
        fresh = [(r, _SentCache.key(member, r)) for r in records]
        if sent is not None:
            fresh = [(r, k) for r, k in fresh if k not in sent]
        for start in range(0, len(fresh), MAX_RECORDS_PER_CALL):
            part = fresh[start : start + MAX_RECORDS_PER_CALL]
            chains.append(
                [
                    Call(
                        operation,
                        {"datasetArn": arn, member: [r for r, _ in part]},
                        [k for _, k in part],
                    )
                ]
            )
    return chains


class PersonalizeApplier:
    name = "personalize"
    batch_size = 1000
    lease_seconds = 30.0
    settle_seconds = 0.1

    def __init__(
        self,
        router: Router,
        mapping: MappingConfig,
        sender: Sender,
        *,
        users_dataset_arn: str = "",
        items_dataset_arn: str = "",
        dead_letters=None,
        tombstones=None,
    ):
        self.router = router
        self.mapping = mapping
        self.sender = sender
        self.users_dataset_arn = users_dataset_arn
        self.items_dataset_arn = items_dataset_arn
        self.dead_letters = dead_letters
        # Messages about a person deleted after they were sent are not sent (the local
        # store applier puts the deleted ids on the data deletion job's list).
        self.tombstones = tombstones
        self._sent = _SentCache()
        # A batch whose commit failed is applied again right after: room for two batches
        # of orders of ten products.
        self._sent_events = _SentCache(size=20 * self.batch_size)

    def apply(self, entries: Sequence[Entry], keep_lease: Callable[[], None]) -> Applied:
        routed = Routed()
        origin: dict[tuple[str, str], Entry] = {}  # (kind, record id) -> the message's entry
        if self.tombstones is not None:
            self.tombstones.refresh(force=True)
        for entry in entries:
            message = decode(entry, self.tombstones)
            if message is None:
                continue
            one = self.router.route(message)
            routed.interactions.extend(one.interactions)
            routed.users.extend(one.users)
            routed.items.extend(one.items)
            for event in one.interactions:
                origin[("event", event.event_id)] = entry
            for user in one.users:
                origin[("user", user.user_id)] = entry
            for item in one.items:
                origin[("item", item.item_id)] = entry

        problems: list[Problem] = []
        chains = plan_calls(
            routed,
            self.mapping,
            self.users_dataset_arn,
            self.items_dataset_arn,
            self._sent,
            problems,
            self._sent_events,
        )
        report = self.sender.send_chains(chains, keep_lease, on_sent=self._remember)

        refusals = [Refusal(p.kind, p.id, p.reason) for p in problems if p.action == "dropped"]
        refusals += report.refused
        for problem in problems:
            metrics.count(metrics.PERSONALIZE_RECORDS, problem.kind, problem.action)
        for kind, count in report.sent.items():
            if count:
                metrics.count(metrics.PERSONALIZE_RECORDS, kind, "sent", by=count)
        for refusal in report.refused:
            metrics.count(metrics.PERSONALIZE_RECORDS, refusal.kind, "dropped")
        trimmed = sorted({p.reason for p in problems if p.action == "trimmed"})
        if refusals or trimmed:
            # Our own reasons only (they name fields and limits, never values); the
            # service's refusal messages may quote record contents, so they are not logged.
            log.warning(
                "personalize: %d record(s) to the dead-letter list, %d trimmed",
                len(refusals),
                sum(1 for p in problems if p.action == "trimmed"),
                extra={"trimmed": trimmed[:20]},
            )

        def write(tx: Transaction) -> None:
            if refusals and self.dead_letters is not None:
                self.dead_letters.add(
                    tx,
                    self.name,
                    [
                        (r.kind, r.record_id, origin.get((r.kind, r.record_id)), r.reason)
                        for r in refusals
                    ],
                )

        return Applied(write=write)

    def _remember(self, call: Call) -> None:
        cache = self._sent_events if call.operation == "put_events" else self._sent
        for key in call.keys:
            cache.add(key)

    # -- dead letters ----------------------------------------------------------------------

    def retry(self, letters, timeout: float = 60.0) -> dict[int, str]:
        """Route each dead letter's message again, with the mapping configured now, and
        send its record. Returns, by id: "sent", "refused: <reason>", "gone" (the message
        no longer yields that record: nothing to send) or "no message"."""
        deadline = time.monotonic() + timeout

        def keep_going() -> None:
            if time.monotonic() > deadline:
                raise TimeoutError("Amazon Personalize did not take the records in time")

        outcomes: dict[int, str] = {}
        if self.tombstones is not None:
            self.tombstones.refresh(force=True)
        for letter in letters:
            entry = Entry(0, 0, letter.message_id, "", 0.0, letter.body or None)
            if decode(entry) is not None and decode(entry, self.tombstones) is None:
                outcomes[letter.id] = "deleted"  # its sender was deleted since: never sent
                continue
            message = decode(entry)
            if message is None:
                outcomes[letter.id] = "no message"
                continue
            every = self.router.route(message)
            routed = Routed(
                interactions=[
                    r
                    for r in every.interactions
                    if letter.kind == "event" and r.event_id == letter.record_id
                ],
                users=[
                    r
                    for r in every.users
                    if letter.kind == "user" and r.user_id == letter.record_id
                ],
                items=[
                    r
                    for r in every.items
                    if letter.kind == "item" and r.item_id == letter.record_id
                ],
            )
            problems: list[Problem] = []
            chains = plan_calls(
                routed, self.mapping, self.users_dataset_arn, self.items_dataset_arn, None, problems
            )
            dropped = [p for p in problems if p.action == "dropped"]
            if dropped:
                outcomes[letter.id] = "refused: " + dropped[0].reason
                continue
            if not chains:
                outcomes[letter.id] = "gone"
                continue
            report = self.sender.send_chains(chains, keep_going)
            outcomes[letter.id] = (
                "refused: " + report.refused[0].reason if report.refused else "sent"
            )
        return outcomes
