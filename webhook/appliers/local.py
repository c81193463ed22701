"""The local store applier: what every message means for the embedded default's store.

Interactions feed the local recommendation engine and the purchase exclusions; identify
traits form the local profile store; product properties fill the item catalog; alias and
identify link anonymous history to the user; a deletion request forgets the user. A batch
is written in the transaction that also moves the applier's position, so each entry
takes effect exactly once; within it, a deletion is a barrier (what came before it is
written before, what came after, after).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

from ..inbox import Entry
from ..routing import Routed, Router
from ..store import Transaction
from . import Applied, decode


class LocalStoreApplier:
    name = "local"
    batch_size = 1000
    lease_seconds = 30.0
    settle_seconds = 0.05

    def __init__(self, router: Router, purchase_events: Iterable[str],
                 on_purchases: Callable[[list[str]], None] | None = None):
        self.router = router
        self.purchase_events = frozenset(purchase_events)
        self.on_purchases = on_purchases

    def apply(self, entries: Sequence[Entry], keep_lease=None) -> Applied:
        steps: list[Routed] = []
        purchasers: list[str] = []
        for entry in entries:
            message = decode(entry)
            if message is None:
                continue
            routed = self.router.route(message)
            steps.append(routed)
            if message.user_id and any(i.event_type in self.purchase_events
                                       for i in routed.interactions):
                purchasers.append(message.user_id)

        def write(tx: Transaction) -> None:
            pending = Routed()
            for routed in steps:
                if routed.delete_user_id:
                    _flush(pending, tx)
                    pending = Routed()
                    tx.delete_user(routed.delete_user_id)
                pending.links.extend(routed.links)
                pending.users.extend(routed.users)
                pending.items.extend(routed.items)
                pending.interactions.extend(routed.interactions)
            _flush(pending, tx)

        after = None
        if purchasers and self.on_purchases is not None:
            def after() -> None:
                self.on_purchases(list(dict.fromkeys(purchasers)))
        return Applied(write=write, after=after)


def _flush(pending: Routed, tx: Transaction) -> None:
    if pending.links:
        tx.link_identities(pending.links)
    if pending.users:
        tx.merge_traits(pending.users)
    if pending.items:
        tx.upsert_items(pending.items)
    if pending.interactions:
        tx.add_interactions(pending.interactions)
