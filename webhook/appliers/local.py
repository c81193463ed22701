"""The local store applier: what every message means for the embedded default's store.

Interactions feed the local recommendation engine and the purchase exclusions; identify
traits form the local profile store; product properties fill the item catalog; alias and
identify link anonymous history to the user; a deletion request forgets the person
(``forget.py``: every table, the inbox's bodies, tombstones). A batch is written in the
transaction that also moves the applier's position, so each entry takes effect exactly
once; within it, a deletion is a barrier (what came before it is written before, what came
after, after). A message about a person deleted after it was sent is left out.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

from .. import forget
from ..inbox import Entry
from ..routing import Deletion, Routed, Router
from ..store import Prepared, Store, Transaction
from . import Applied, decode


class _Forget:
    """A deletion step of a batch: whom, and what of theirs outside the store's tables."""

    def __init__(self, deletion: Deletion, seq: int, links_before: list):
        self.deletion = deletion
        self.seq = seq  # the request's own inbox row
        self.links_before = links_before  # the batch's links written before it
        self.ids: list[str] = []
        self.dead_letters: list[int] = []


class LocalStoreApplier:
    name = "local"
    batch_size = 1000
    lease_seconds = 30.0
    settle_seconds = 0.2

    def __init__(self, router: Router, purchase_events: Iterable[str], store: Store,
                 on_purchases: Callable[[list[str]], None] | None = None, *,
                 tombstones=None, record_for_personalize: bool = False):
        self.router = router
        self.store = store
        self.statements = store.statements  # the store's compiled write statements
        self.purchase_events = frozenset(purchase_events)
        self.on_purchases = on_purchases
        self.tombstones = tombstones  # tombstones.Tombstones
        # Personalize mode: a deleted person's ids go on the next data deletion job's list.
        self.record_for_personalize = record_for_personalize

    def apply(self, entries: Sequence[Entry], keep_lease=None) -> Applied:
        # Everything but the statements is done here, before the write transaction (and
        # its lock): decoding, routing, and the statements' parameters (store.Prepared).
        if self.tombstones is not None:
            self.tombstones.refresh(force=True)
        statements = self.statements
        steps: list[Prepared | _Forget] = []
        pending = Routed()
        links_so_far = []  # this batch's links, written before any deletion step
        purchasers: list[str] = []
        for entry in entries:
            message = decode(entry, self.tombstones)
            if message is None:
                continue
            routed = self.router.route(message)
            if routed.deletion is not None:  # a barrier: what came before is written before
                steps.append(_prepare(statements, pending))
                steps.append(_Forget(routed.deletion, entry.seq, list(links_so_far)))
                pending = Routed()
                continue
            pending.links.extend(routed.links)
            links_so_far.extend(routed.links)
            pending.users.extend(routed.users)
            pending.items.extend(routed.items)
            pending.interactions.extend(routed.interactions)
            if message.user_id and any(i.event_type in self.purchase_events
                                       for i in routed.interactions):
                purchasers.append(message.user_id)
        steps.append(_prepare(statements, pending))
        forgets = [step for step in steps if isinstance(step, _Forget)]
        if forgets:
            self._forget_outside_the_store(forgets)

        def write(tx: Transaction) -> None:
            for step in steps:
                if isinstance(step, _Forget):
                    forget.purge(tx, step.ids, step.dead_letters,
                                 record_for_personalize=self.record_for_personalize)
                elif step:
                    tx.write_prepared(step)

        def after() -> None:
            for step in forgets:  # the requests themselves, now that they are applied
                forget.redact_request(self.store, step.seq)
            if purchasers and self.on_purchases is not None:
                self.on_purchases(list(dict.fromkeys(purchasers)))

        return Applied(write=write, after=after if forgets or purchasers else None)

    def _forget_outside_the_store(self, forgets: list[_Forget]) -> None:
        """Whom each deletion names, their tombstones and their inbox bodies; idempotent,
        before the batch's transaction (a crash applies the batch again)."""
        with self.store.read() as conn:
            for step in forgets:
                step.ids = forget.person_ids(conn, step.deletion, step.links_before)
                step.dead_letters = forget.dead_letters_of(conn, step.ids)
        for step in forgets:
            if self.tombstones is not None:
                self.tombstones.record(step.ids, step.deletion.deleted_at)
            forget.redact_inbox(self.store, step.ids, step.deletion.deleted_at,
                                keep=[step.seq])


def _prepare(statements, routed: Routed) -> Prepared:
    return Prepared(statements, links=routed.links, users=routed.users, items=routed.items,
                    interactions=routed.interactions)
