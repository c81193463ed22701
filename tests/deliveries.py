"""Deliveries as Segment makes them, and the ledger the failure tests check against.

"Segment-style redelivery": every delivery that did not get a 2xx (a 5xx, a timeout, a
dropped connection) is sent again, unchanged, until it does (bounded in rounds and time).
The check that follows is always the same: every messageId that ever got a 2xx is stored,
exactly once, with everything it means (its interactions), and no answer was a 500.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import requests
import sqlalchemy as sa

from tests.operator import OPERATOR
from tests.waiting import wait_until
from webhook.storage import inbox_url_for


def sign(body: bytes, secret: str | bytes) -> str:
    """The X-Signature Segment sends: hex HMAC-SHA1 of the exact body bytes with the shared
    secret. The tests' one Python signer; an attack test signs with the wrong secret or
    over other bytes through it too. (tests/segment_wire.py's Node.js signer is the
    independent one, and tests/test_segment_wire_selfcheck.py holds the two together.)"""
    key = secret if isinstance(secret, bytes) else secret.encode("utf-8")
    return hmac.new(key, body, hashlib.sha1).hexdigest()


def make_message(n: int, prefix: str) -> dict:
    """A product event; every fifth an Order Completed of two products (two interactions)."""
    at = {
        "message_id": f"{prefix}-{n}",
        "anonymous_id": f"anon-{n % 17}",
        "timestamp": "2026-11-27T10:00:00.000Z",
    }
    if n % 5 == 4:
        return track(
            "Order Completed",
            None,
            user_id=f"user-{n % 11}",
            properties={
                "order_id": f"o-{n}",
                "products": [
                    {"product_id": f"p-{n % 23}", "price": 5},
                    {"product_id": f"p-{(n + 1) % 23}"},
                ],
            },
            **at,
        )
    return track(product_id=f"p-{n % 23}", properties={"price": 9.5}, **at)


def expected_event_ids(message: dict) -> list[str]:
    products = message["properties"].get("products")
    if products:
        return [f"{message['messageId']}#{i}" for i in range(len(products))]
    return [message["messageId"]]


@dataclass
class Ledger:
    """Every attempt's outcome, per messageId."""

    ok: set = field(default_factory=set)
    statuses: Counter = field(default_factory=Counter)
    attempts: Counter = field(default_factory=Counter)
    latencies: list = field(default_factory=list)
    bad_503: list = field(default_factory=list)  # 503s without Retry-After
    lock: threading.Lock = field(default_factory=threading.Lock)

    def assert_only_ok_or_retried(self) -> None:
        """No answer was a 500, and every 503 carried Retry-After."""
        assert self.statuses[500] == 0, self.statuses
        assert not self.bad_503, self.bad_503[:3]

    def send(self, base: str, message: dict | list, timeout: float = 10.0) -> bool:
        """POST one delivery: a message (Classic) or a list of them (an Actions batch)."""
        ids = [m["messageId"] for m in (message if isinstance(message, list) else [message])]
        body = json.dumps(message).encode()
        started = time.monotonic()
        try:
            response = requests.post(
                base + "/segment",
                data=body,
                timeout=timeout,
                headers={"Content-Type": "application/json", "Connection": "close"},
            )
            status = response.status_code
        except requests.RequestException as exc:
            status, response = type(exc).__name__, None
        elapsed = time.monotonic() - started
        with self.lock:
            for mid in ids:
                self.attempts[mid] += 1
            self.statuses[status] += 1
            self.latencies.append(elapsed)
            if status == 503 and not response.headers.get("Retry-After", "").isdigit():
                self.bad_503.append(response.text[:200])
            if isinstance(status, int) and 200 <= status < 300:
                self.ok.update(ids)
                return True
        return False


def stream(
    base: str, ledger: Ledger, messages: list[dict], threads: int = 4, stop_after: float = 120.0
) -> list[dict]:
    """Send each message once, from several threads; return those that got no 2xx."""
    failed: list[dict] = []
    lock = threading.Lock()
    deadline = time.monotonic() + stop_after

    def work(part: list[dict]) -> None:
        for message in part:
            if time.monotonic() > deadline:
                with lock:
                    failed.append(message)
                continue
            if not ledger.send(base, message):
                with lock:
                    failed.append(message)

    parts = [messages[i::threads] for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, parts))
    return failed


def redeliver(
    base: str,
    ledger: Ledger,
    pending: list[dict],
    rounds: int = 30,
    pause: float = 0.5,
    budget: float = 60.0,
) -> list[dict]:
    """Segment-style: resend what got no 2xx until it does; return what never did."""
    deadline = time.monotonic() + budget
    for _ in range(rounds):
        if not pending or time.monotonic() > deadline:
            break
        pending = stream(base, ledger, pending, threads=4, stop_after=deadline - time.monotonic())
        if pending:
            time.sleep(pause)
    return pending


def assert_stored(url: str, messages: list[dict], acknowledged: set) -> None:
    """Every acknowledged message is in the inbox, with all its interactions in the store;
    nothing of a message that was never acknowledged is. (How often each arrived is
    counted where it can differ: at the stand-ins, not on unique columns.)"""
    engine, inbox_engine = sa.create_engine(url), sa.create_engine(inbox_url_for(url))
    try:
        with inbox_engine.connect() as conn:
            stored = {row[0] for row in conn.execute(sa.text("SELECT message_id FROM inbox"))}
        with engine.connect() as conn:
            events = {row[0] for row in conn.execute(sa.text("SELECT event_id FROM interactions"))}
    finally:
        engine.dispose()
        inbox_engine.dispose()
    by_id = {m["messageId"]: m for m in messages}
    missing = sorted(acknowledged - stored)
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:5]}"
    lost = [
        event_id
        for mid in acknowledged
        for event_id in expected_event_ids(by_id[mid])
        if event_id not in events
    ]
    assert not lost, f"{len(lost)} interactions of acknowledged messages lost: {lost[:5]}"
    # Nothing half-stored: an interaction exists only for a stored message.
    stray = [e for e in events if e.split("#")[0] not in stored]
    assert not stray, stray[:5]


def no_unhandled_errors(log_text: str, tracebacks: bool = True) -> None:
    """No request ended in a 500 (``unhandled error``), and, with ``tracebacks``, nothing
    else logged a traceback either."""
    lines = [
        line
        for line in log_text.splitlines()
        if "unhandled error" in line or (tracebacks and "Traceback" in line)
    ]
    assert not lines, "\n".join(line[:3000] for line in lines[:3])


def send_signed(base: str, secret: str, messages: list[dict]) -> dict:
    """POST messages as the Webhooks destination does (one Classic message, or a batch),
    signed with ``secret``; asserts every one was accepted and returns the summary."""
    payload = messages[0] if len(messages) == 1 else {"batch": messages}
    body = json.dumps(payload, separators=(",", ":")).encode()
    response = requests.post(
        base + "/segment",
        data=body,
        timeout=10,
        headers={"Content-Type": "application/json", "X-Signature": sign(body, secret)},
    )
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == len(messages), response.text
    return response.json()


def wait_applied(base: str, timeout: float = 120.0) -> dict:
    """Poll GET /healthz until no applier has an inbox row left to apply; its inbox part."""

    def applied() -> dict | None:
        inbox = requests.get(base + "/healthz", headers=OPERATOR, timeout=5).json().get("inbox")
        if inbox and not any(a["pending"] for a in inbox["appliers"].values()):
            return inbox
        return None

    return wait_until(
        applied,
        timeout,
        "the inbox applied",
        interval=0.02,
        ignoring=(requests.RequestException, ValueError),
    )


def inbox_order(url: str) -> list[str]:
    """The messageIds in the inbox, in the order the appliers take them."""
    engine = sa.create_engine(inbox_url_for(url))
    try:
        with engine.connect() as conn:
            return [
                row[0]
                for row in conn.execute(sa.text("SELECT message_id FROM inbox ORDER BY txid, seq"))
            ]
    finally:
        engine.dispose()


def assert_in_order_per_session(events: list[dict], order: list[str]) -> None:
    """Each session's events reached Personalize (first copies) in inbox order."""
    rank = {mid: i for i, mid in enumerate(order)}
    seen: set = set()
    last: dict = {}
    for event in events:
        event_id = event["eventId"]
        if event_id in seen:
            continue
        seen.add(event_id)
        position = (rank[event_id.split("#")[0]], event_id)
        session = event["sessionId"]
        assert session not in last or last[session] < position, (
            f"session {session}: {event_id} after {last[session][1]}"
        )
        last[session] = position


# --------------------------------------------------------------------------------------
# Segment messages as the Webhooks destination delivers them (for POST /segment).
# --------------------------------------------------------------------------------------


def message(
    kind: str,
    *,
    user_id: str | None = None,
    anonymous_id: str | None = None,
    message_id: str | None = None,
    timestamp: str | None = None,
    **fields,
) -> dict:
    """A message of ``kind`` as Segment delivers it: ``message_id`` (default a fresh one),
    ``timestamp`` (default now), the ids given, and ``fields`` as they are (Segment's
    own camelCase names: ``event``, ``properties``, ``traits``, ``context``...). The tests'
    one message builder: every other one fills these in."""
    built = {
        "type": kind,
        "messageId": message_id or f"m-{uuid.uuid4().hex}",
        "timestamp": timestamp or datetime.now(UTC).isoformat(),
    }
    if user_id:
        built["userId"] = user_id
    if anonymous_id:
        built["anonymousId"] = anonymous_id
    built.update(fields)
    return built


def track(
    event: str = "Product Viewed",
    product_id: str | None = "p-1",
    *,
    properties: dict | None = None,
    **given,
) -> dict:
    """A track message of ``event`` about ``product_id`` (None: no product_id), with
    ``properties`` beside it; the rest as ``message`` takes it."""
    product = {} if product_id is None else {"product_id": product_id}
    return message("track", event=event, properties={**product, **(properties or {})}, **given)


def product_viewed(
    product_id: str,
    *,
    user_id: str | None = None,
    anonymous_id: str | None = "anon-catalog",
    **details,
) -> dict:
    """A Product Viewed sent now (by ``anon-catalog`` unless said otherwise)."""
    return track(
        product_id=product_id, user_id=user_id, anonymous_id=anonymous_id, properties=details
    )


def order_completed(
    product_ids: list[str], *, user_id: str | None = None, anonymous_id: str | None = None
) -> dict:
    """An Order Completed sent now, one of each product."""
    return track(
        "Order Completed",
        None,
        user_id=user_id,
        anonymous_id=anonymous_id,
        properties={
            "order_id": "o-" + "-".join(product_ids),
            "products": [{"product_id": p, "quantity": 1} for p in product_ids],
        },
    )


def identify(user_id: str, traits: dict, anonymous_id: str | None = None) -> dict:
    return message("identify", user_id=user_id, anonymous_id=anonymous_id, traits=traits)


def deliver(client, *messages: dict) -> dict:
    """POST the messages to the service's webhook (an open one) as a Webhooks (Actions)
    batch; assert it was stored; return the summary."""
    response = client.post(
        "/segment",
        data=json.dumps(list(messages)),
        headers={"Content-Type": "application/json", "User-Agent": "Segment (Actions)"},
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


class Seeder:
    """Seeds a running service through its POST /segment, signed with ``secret``, as the
    Webhooks destination delivers: every message gets a fresh messageId and ``timestamp``
    (None: now) unless it has its own. ``settle``: after each send, wait until the
    appliers applied it, so that a test starts from the state it seeded."""

    def __init__(self, base: str, secret: str, *, timestamp: str | None = None, settle=False):
        self.base, self.secret, self.timestamp, self.settle = base, secret, timestamp, settle

    def send(self, *messages: dict) -> dict:
        """One delivery of ``messages`` (a batch when several); the summary."""
        filled = [
            {
                "messageId": f"m-{uuid.uuid4().hex}",
                "timestamp": self.timestamp or datetime.now(UTC).isoformat(),
                **m,
            }
            for m in messages
        ]
        summary = send_signed(self.base, self.secret, filled)
        if self.settle:
            wait_applied(self.base, 10)
        return summary

    def view(self, anonymous_id: str, item_id: str, **properties) -> dict:
        return self.send(
            track(
                product_id=item_id,
                anonymous_id=anonymous_id,
                properties=properties,
                timestamp=self.timestamp,
            )
        )

    def order(self, user_id: str, item_ids: list[str], **properties) -> dict:
        products = [{"product_id": item} for item in item_ids]
        order = {"order_id": f"o-{uuid.uuid4().hex[:8]}", "products": products, **properties}
        return self.send(
            track(
                "Order Completed", None, user_id=user_id, properties=order, timestamp=self.timestamp
            )
        )

    def identify(self, user_id: str, traits: dict) -> dict:
        return self.send(
            message("identify", user_id=user_id, traits=traits, timestamp=self.timestamp)
        )
