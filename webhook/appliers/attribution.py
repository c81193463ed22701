"""The attribution applier: what Segment events say about the recommendations shown.

One more consumer of the inbox (its own position, so it never slows ingestion or the
other appliers). For each product event (an interaction, ``routing.py``):

* **click**: the event carries ``properties.recommendation_id`` of a recorded answer
  (``impressions``) and its product is one of that answer's items;
* **add** (``Product Added``) and **order** (``PURCHASE_EVENTS``): the product was shown
  to the same person (every id linked by ``alias``/``identify``: ``identity.resolve``) in an
  answer at most ``ATTRIBUTION_WINDOW_HOURS`` before the event; the last such answer
  wins. An event naming a recorded answer that holds the product is attributed to that
  answer. An order's revenue is price × quantity of the product (quantity 1 if absent).

A row per (event id, kind): a redelivered event, or one applied again after a crash,
counts once. An event that is a click and an add-to-cart at once (added from the
recommendation itself) counts as both.

Answers are recorded by each worker a fraction of a second after they are given
(``impressions.py``). An attributable event that finds no answer, and arrived less than
``hold_seconds`` ago, is held back (the batch stops before it) until another worker's
record has had time to land; this worker's own records are written first.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from .. import metrics
from ..identity import resolve
from ..inbox import Entry
from ..routing import Interaction, Router
from ..storage import Store, StoreUnavailable, Transaction
from ..storage.schema import attributions, impressions
from . import Applied, decode

ADD_TO_CART_EVENTS = ("Product Added", "Added Product")
CLOCK_SLACK_SECONDS = 60.0  # an event's own time may run this far behind our clock


@dataclass(frozen=True)
class _Shown:
    recommendation_id: str
    visitor: str
    variant: str
    items: tuple[str, ...]
    shown_at: float


@dataclass(frozen=True)
class Attribution:
    event_id: str
    message_id: str
    kind: str  # click, add, order
    recommendation_id: str
    variant: str
    item_id: str
    revenue: float
    at: float


class AttributionApplier:
    name = "attribution"
    batch_size = 500
    lease_seconds = 30.0
    settle_seconds = 1.0

    def __init__(
        self,
        store: Store,
        router: Router,
        purchase_events: Iterable[str],
        window_hours: float = 24.0,
        hold_seconds: float = 1.0,
        before_apply: Callable[[], object] | None = None,
        tombstones=None,
    ):
        self.store = store
        self.tombstones = tombstones  # a deleted person's old events attribute nothing
        self.router = router
        self.purchase_events = frozenset(purchase_events)
        self.add_events = frozenset(ADD_TO_CART_EVENTS)
        # As they appear in canonical JSON (ASCII escapes; no quotes: a name with spaces
        # around it is still that event).
        self._names = tuple(
            json.dumps(name)[1:-1] for name in sorted(self.purchase_events | self.add_events)
        )
        self.window = window_hours * 3600.0
        self.hold_seconds = hold_seconds
        self.before_apply = before_apply  # this worker's impressions, written first

    def apply(self, entries: Sequence[Entry], keep_lease=None) -> Applied:
        if self.before_apply is not None:
            try:
                self.before_apply()
            except StoreUnavailable:
                pass  # the records wait in their buffer; the hold covers the gap
        now = time.time()
        found: list[Attribution] = []
        consumed = len(entries)
        if self.tombstones is not None:
            self.tombstones.refresh(force=True)
        with self.store.read() as conn:
            answers = _Answers(conn)
            for index, entry in enumerate(entries):
                if not self._may_attribute(entry):
                    continue
                message = decode(entry, self.tombstones)
                if message is None:
                    continue
                interactions = self.router.route(message).interactions
                attributed, unmatched = self._attribute(interactions, answers)
                if unmatched and now - entry.received_at < self.hold_seconds:
                    consumed = index  # its answer may not be recorded yet: later
                    break
                found.extend(attributed)
        if consumed == 0:
            return Applied(consumed=0)
        added: list[Attribution] = []

        def write(tx: Transaction) -> None:
            statement = (
                tx.insert(attributions)
                .on_conflict_do_nothing(index_elements=["event_id", "kind"])
                .returning(attributions.c.event_id)
            )
            for a in found:
                row = {
                    "event_id": a.event_id,
                    "message_id": a.message_id,
                    "kind": a.kind,
                    "recommendation_id": a.recommendation_id,
                    "variant": a.variant,
                    "item_id": a.item_id,
                    "revenue": a.revenue,
                    "at": a.at,
                }
                if tx.conn.execute(statement.values(**row)).first() is not None:
                    added.append(a)

        def after() -> None:
            for a in added:
                metrics.count(metrics.ATTRIBUTIONS, a.variant, a.kind)
                if a.revenue:
                    metrics.count(metrics.ATTRIBUTED_REVENUE, a.variant, by=a.revenue)

        return Applied(
            write=write if found else None,
            after=after,
            consumed=None if consumed == len(entries) else consumed,
        )

    def _may_attribute(self, entry: Entry) -> bool:
        """A look at the raw JSON before parsing it: most messages (views without a
        recommendation_id, identify calls) cannot be attributed, and parsing each again
        would cost this applier as much as the local store's. Canonical JSON holds the
        event name as written, so a substring test cannot miss one (a false match only
        costs the parse)."""
        body = entry.body
        if entry.type != "track" or body is None:
            return False
        return "recommendation_id" in body or any(name in body for name in self._names)

    def _attribute(
        self, interactions: Sequence[Interaction], answers: _Answers
    ) -> tuple[list[Attribution], bool]:
        """The attributions of one message's interactions, and whether one of them could
        have been attributed had its answer been recorded (it is then held back)."""
        found: list[Attribution] = []
        unmatched = False
        for interaction in interactions:
            named = _text(interaction.properties.get("recommendation_id"))
            shown = answers.by_id(named) if named else None
            if named and shown is None:
                unmatched = True  # not recorded (yet, or ever)
            if shown is not None and interaction.item_id not in shown.items:
                shown = None  # an answer that did not hold this product
            if shown is not None:
                found.append(self._record(interaction, "click", shown))
            kind = (
                "order"
                if interaction.event_type in self.purchase_events
                else "add"
                if interaction.event_type in self.add_events
                else None
            )
            if kind is None:
                continue
            if shown is None:
                shown = answers.last_showing(interaction, self.window)
            if shown is None:
                unmatched = True
                continue
            found.append(self._record(interaction, kind, shown))
        return found, unmatched

    @staticmethod
    def _record(interaction: Interaction, kind: str, shown: _Shown) -> Attribution:
        revenue = 0.0
        if kind == "order":
            price = _number(interaction.properties.get("price"))
            quantity = _number(interaction.properties.get("quantity"))
            if price is not None and price > 0:
                revenue = round(price * (quantity if quantity and quantity > 0 else 1.0), 6)
        return Attribution(
            interaction.event_id,
            interaction.message_id,
            kind,
            shown.recommendation_id,
            shown.variant,
            interaction.item_id,
            revenue,
            interaction.timestamp,
        )


class _Answers:
    """Recorded answers, read once per batch."""

    def __init__(self, conn):
        self.conn = conn
        self._by_id: dict[str, _Shown | None] = {}

    def by_id(self, recommendation_id: str) -> _Shown | None:
        if recommendation_id not in self._by_id:
            row = self.conn.execute(
                sa.select(impressions).where(impressions.c.recommendation_id == recommendation_id)
            ).first()
            self._by_id[recommendation_id] = _shown(row) if row is not None else None
        return self._by_id[recommendation_id]

    def last_showing(self, interaction: Interaction, window: float) -> _Shown | None:
        """The person's last answer that held the product, within the window before the
        event."""
        person = resolve(
            self.conn, user_id=interaction.user_id, anonymous_id=interaction.anonymous_id
        )
        ids = list(person.ids)
        if not ids:
            return None
        rows = self.conn.execute(
            sa.select(impressions)
            .where(
                impressions.c.visitor.in_(ids),
                impressions.c.shown_at >= interaction.timestamp - window,
                impressions.c.shown_at <= interaction.timestamp + CLOCK_SLACK_SECONDS,
            )
            .order_by(impressions.c.shown_at.desc(), impressions.c.recommendation_id.desc())
            .limit(200)
        )
        for row in rows:
            shown = _shown(row)
            if interaction.item_id in shown.items:
                return shown
        return None


def _shown(row) -> _Shown:
    items = row._mapping["items"]
    items = items if isinstance(items, list) else []
    return _Shown(
        row.recommendation_id, row.visitor, row.variant, tuple(str(i) for i in items), row.shown_at
    )


def _text(value) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()[:64]
    return None


def _number(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
