"""Amazon Personalize as a destination: PutEvents, PutUsers, PutItems through boto3.

``PersonalizeForwarder.forward(routed, deadline)`` sends one delivery's records before the
delivery is committed locally. Calls run concurrently in a bounded pool; throttling, 5xx
and timeouts are retried with full-jitter backoff while the deadline allows. If it does
not, ``DestinationError`` makes the webhook answer 503 and Segment redelivers; events keep
their ids (derived from messageId), so Personalize does not count a redelivered one twice.
``InvalidInputException`` is permanent for the records of that call: reported, not retried.
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from .. import metrics
from ..aws import LazyClient
from ..routing import Routed
from .base import DestinationError
from .personalize_mapping import (
    MappingConfig,
    Problem,
    chunks,
    event_calls,
    map_items,
    map_users,
)

log = logging.getLogger("webhook.personalize")

THROTTLING_CODES = frozenset({
    "ThrottlingException", "Throttling", "TooManyRequestsException",
    "ProvisionedThroughputExceededException", "RequestLimitExceeded",
})
STRUGGLING_BUDGET = 0.75  # seconds a delivery may take while Personalize is struggling
STRUGGLING_WINDOW = 10.0  # how long "struggling" lasts after a delivery ran out of time
TRANSIENT_ERRORS = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError,
                    ConnectionClosedError)


_MEMBER = {"put_events": "eventList", "put_users": "users", "put_items": "items"}


@dataclass
class _Outcome:
    calls: int = 0
    retries: int = 0
    sent: list = field(default_factory=list)
    sent_keys: list = field(default_factory=list)
    refused: list = field(default_factory=list)  # (single-record call, reason)


class _Permanent(Exception):
    """The service refused the call's records for good (InvalidInputException)."""


class _OutOfTime(Exception):
    """The deadline passed before the call could succeed."""


class _Fatal(Exception):
    """Not a per-record problem and not transient (e.g. unknown tracking id, no access)."""


@dataclass
class ForwardReport:
    events: int = 0
    users: int = 0
    items: int = 0
    calls: int = 0
    retries: int = 0
    problems: list[Problem] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "events": self.events, "users": self.users, "items": self.items,
            "calls": self.calls, "retries": self.retries,
            "dropped": [p.as_json() for p in self.problems if p.action == "dropped"],
            "trimmed": [p.as_json() for p in self.problems if p.action == "trimmed"],
        }


class _SentCache:
    """Users and items sent recently, so a catalog that does not change is not re-sent on
    every product view (PutUsers/PutItems allow about 10 calls a second)."""

    def __init__(self, size: int = 20000):
        self.size = size
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(kind: str, record: dict) -> str:
        return kind + json.dumps(record, sort_keys=True, ensure_ascii=False)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            if key in self._seen:
                self._seen.move_to_end(key)
                return True
            return False

    def add(self, key: str) -> None:
        with self._lock:
            self._seen[key] = None
            self._seen.move_to_end(key)
            while len(self._seen) > self.size:
                self._seen.popitem(last=False)


class PersonalizeForwarder:
    name = "personalize"

    def __init__(self, mapping: MappingConfig, *, users_dataset_arn: str = "",
                 items_dataset_arn: str = "", region: str = "", call_timeout: float = 1.0,
                 max_concurrency: int = 8, client: Any = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.mapping = mapping
        self.users_dataset_arn = users_dataset_arn
        self.items_dataset_arn = items_dataset_arn
        self.max_concurrency = max_concurrency
        self._client = LazyClient("personalize-events", region=region, timeout=call_timeout,
                                  pool_size=max_concurrency, client=client)
        self._sleep = sleep
        # After a delivery ran out of time, the next ones get a short budget until one
        # goes through: under a long throttle they answer 503 in well under a second
        # instead of holding every server thread for the whole deadline.
        self._struggling_until = 0.0
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._sent = _SentCache()

    @property
    def client(self):
        return self._client.get()

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.max_concurrency,
                                                    thread_name_prefix="personalize")
        return self._pool

    def forward(self, routed: Routed, deadline: float) -> ForwardReport:
        """Send a delivery's records; raise ``DestinationError`` if they cannot all be
        sent (or permanently refused) before ``deadline`` (a time.monotonic() value)."""
        report = ForwardReport()
        jobs: list[tuple[str, dict, int, list[str]]] = []  # (operation, kwargs, n, keys)
        for call in event_calls(routed.interactions, self.mapping, report.problems):
            kwargs: dict[str, Any] = {"trackingId": self.mapping.tracking_id,
                                      "sessionId": call.session_id,
                                      "eventList": list(call.events)}
            if call.user_id:
                kwargs["userId"] = call.user_id
            jobs.append(("put_events", kwargs, len(call.events), [""] * len(call.events)))
        if self.users_dataset_arn and routed.users:
            self._record_jobs(jobs, "put_users", "users",
                              map_users(routed.users, self.mapping, report.problems))
        if self.items_dataset_arn and routed.items:
            self._record_jobs(jobs, "put_items", "items",
                              map_items(routed.items, self.mapping, report.problems))
        if routed.delete_user_id:
            report.problems.append(Problem(
                "user", "-", "dropped",
                "a deletion is not sent to Personalize in real time: run a data deletion job"))
        for problem in report.problems:
            metrics.PERSONALIZE_RECORDS.labels(kind=problem.kind, outcome=problem.action).inc()
        if not jobs:
            return report
        if time.monotonic() < self._struggling_until:
            deadline = min(deadline, time.monotonic() + STRUGGLING_BUDGET)

        futures = {self.pool.submit(self._send, op, kwargs, keys, deadline): op
                   for op, kwargs, n, keys in jobs}
        done, not_done = wait(futures, timeout=max(0.0, deadline - time.monotonic()) + 0.5)
        out_of_time = bool(not_done)
        fatal: str | None = None
        for future in done:
            op = futures[future]
            try:
                outcome = future.result()
            except _OutOfTime:
                out_of_time = True
                continue
            except _Fatal as exc:
                fatal = str(exc)
                continue
            report.calls += outcome.calls
            report.retries += outcome.retries
            for refused, reason in outcome.refused:
                self._refused(op, refused, reason, report)
            kind = {"put_events": "event", "put_users": "user", "put_items": "item"}[op]
            count = len(outcome.sent)
            metrics.PERSONALIZE_RECORDS.labels(kind=kind, outcome="sent").inc(count)
            if op == "put_events":
                report.events += count
            elif op == "put_users":
                report.users += count
            else:
                report.items += count
            for key in outcome.sent_keys:
                if key:
                    self._sent.add(key)
        if fatal:
            log.error("personalize refused the delivery: %s", fatal)
            raise DestinationError(f"Amazon Personalize refused the delivery: {fatal}")
        if out_of_time:
            self._struggling_until = time.monotonic() + STRUGGLING_WINDOW
            log.warning("personalize: deadline passed with calls unfinished",
                        extra={"calls": len(jobs)})
            raise DestinationError(
                "Amazon Personalize did not take the delivery in time (throttling or errors); "
                "retry later", retry_after=5)
        self._struggling_until = 0.0
        if report.problems:
            log.warning("personalize: records dropped or trimmed", extra={
                "problems": [{"kind": p.kind, "action": p.action, "reason": p.reason}
                             for p in report.problems]})
        return report

    def _record_jobs(self, jobs: list, operation: str, member: str, records: list[dict]) -> None:
        arn = self.users_dataset_arn if member == "users" else self.items_dataset_arn
        fresh = [(r, _SentCache.key(member, r)) for r in records]
        fresh = [(r, k) for r, k in fresh if k not in self._sent]
        for start in range(0, len(fresh), 10):
            part = fresh[start:start + 10]
            jobs.append((operation, {"datasetArn": arn, member: [r for r, _ in part]},
                         len(part), [k for _, k in part]))

    def _refused(self, operation: str, kwargs: dict, reason: str, report: ForwardReport) -> None:
        if operation == "put_events":
            ids = [e.get("eventId", "?") for e in kwargs["eventList"]]
            kind = "event"
        elif operation == "put_users":
            ids, kind = [u["userId"] for u in kwargs["users"]], "user"
        else:
            ids, kind = [i["itemId"] for i in kwargs["items"]], "item"
        for record_id in ids:
            report.problems.append(Problem(kind, record_id, "dropped",
                                           f"InvalidInputException: {reason[:200]}"))
        metrics.PERSONALIZE_RECORDS.labels(kind=kind, outcome="dropped").inc(len(ids))
        log.warning("personalize refused %d %s record(s): InvalidInputException", len(ids), kind)

    def _send(self, operation: str, kwargs: dict, keys: list[str],
              deadline: float) -> "_Outcome":
        """Send one call's records. When the service refuses a call of several records
        (InvalidInputException names none), the halves are sent apart, down to single
        records, so one bad record costs only itself."""
        member = _MEMBER[operation]
        outcome = _Outcome()
        pending = [(kwargs, keys)]
        while pending:
            call, call_keys = pending.pop()
            outcome.calls += 1
            try:
                outcome.retries += self._call(operation, call, deadline)
            except _Permanent as exc:
                records = call[member]
                if len(records) == 1:
                    outcome.refused.append((call, str(exc)))
                    continue
                half = len(records) // 2
                for part in (slice(half, None), slice(0, half)):
                    pending.append(({**call, member: records[part]}, call_keys[part]))
                continue
            outcome.sent.extend(call[member])
            outcome.sent_keys.extend(call_keys)
        return outcome

    def _call(self, operation: str, kwargs: dict, deadline: float) -> int:
        """One API call with retries; returns the number of retries it took."""
        method = getattr(self.client, operation)
        attempt = 0
        while True:
            if time.monotonic() >= deadline:
                raise _OutOfTime()
            try:
                method(**kwargs)
                metrics.PERSONALIZE_CALLS.labels(operation=operation, outcome="ok").inc()
                return attempt
            except ClientError as exc:
                error = exc.response.get("Error", {})
                code = error.get("Code", "")
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if code == "InvalidInputException":
                    metrics.PERSONALIZE_CALLS.labels(operation=operation,
                                                     outcome="invalid").inc()
                    raise _Permanent(error.get("Message", code)) from None
                if code in THROTTLING_CODES or status == 429:
                    outcome = "throttled"
                elif status >= 500:
                    outcome = "error"
                else:
                    metrics.PERSONALIZE_CALLS.labels(operation=operation, outcome="fatal").inc()
                    raise _Fatal(f"{code or status}") from None
            except TRANSIENT_ERRORS:
                outcome = "timeout"
            except BotoCoreError as exc:
                metrics.PERSONALIZE_CALLS.labels(operation=operation, outcome="fatal").inc()
                raise _Fatal(type(exc).__name__) from None
            metrics.PERSONALIZE_CALLS.labels(operation=operation, outcome=outcome).inc()
            attempt += 1
            # Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter").
            pause = random.uniform(0, min(1.0, 0.05 * 2 ** attempt))
            if time.monotonic() + pause >= deadline:
                raise _OutOfTime()
            self._sleep(pause)
