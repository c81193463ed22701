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
from ..store import Prepared, Transaction
from . import Applied, decode


class LocalStoreApplier:
    name = "local"
    batch_size = 1000
    lease_seconds = 30.0
    settle_seconds = 0.2

    def __init__(self, router: Router, purchase_events: Iterable[str], statements,
                 on_purchases: Callable[[list[str]], None] | None = None):
        self.router = router
        self.statements = statements  # the store's compiled write statements
        self.purchase_events = frozenset(purchase_events)
        self.on_purchases = on_purchases

    def apply(self, entries: Sequence[Entry], keep_lease=None) -> Applied:
        # Everything but the statements is done here, before the write transaction (and
        # its lock): decoding, routing, and the statements' parameters (store.Prepared).
        statements = self.statements
        steps: list[Prepared | str] = []  # prepared writes, and user ids to delete
        pending = Routed()
        purchasers: list[str] = []
        for entry in entries:
            message = decode(entry)
            if message is None:
                continue
            routed = self.router.route(message)
            if routed.delete_user_id:  # a barrier: what came before is written before it
                steps.append(_prepare(statements, pending))
                steps.append(routed.delete_user_id)
                pending = Routed()
            pending.links.extend(routed.links)
            pending.users.extend(routed.users)
            pending.items.extend(routed.items)
            pending.interactions.extend(routed.interactions)
            if message.user_id and any(i.event_type in self.purchase_events
                                       for i in routed.interactions):
                purchasers.append(message.user_id)
        steps.append(_prepare(statements, pending))

        def write(tx: Transaction) -> None:
            for step in steps:
                if isinstance(step, str):
                    tx.delete_user(step)
                elif step:
                    tx.write_prepared(step)

        after = None
        if purchasers and self.on_purchases is not None:
            def after() -> None:
                self.on_purchases(list(dict.fromkeys(purchasers)))
        return Applied(write=write, after=after)


def _prepare(statements, routed: Routed) -> Prepared:
    return Prepared(statements, links=routed.links, users=routed.users, items=routed.items,
                    interactions=routed.interactions)
