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

from collections.abc import Callable, Iterable, Sequence

import sqlalchemy as sa

from .. import forget
from ..inbox import Entry
from ..routing import (
    ITEM_FIELDS,
    Deletion,
    IdentityLink,
    Interaction,
    ItemDetails,
    Routed,
    Router,
    UserTraits,
)
from ..segment import encode_json
from ..storage import Bulk, Store, Transaction, insert
from ..storage.schema import identity_links, interactions, items, profiles
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

    def __init__(
        self,
        router: Router,
        purchase_events: Iterable[str],
        store: Store,
        on_purchases: Callable[[list[str]], None] | None = None,
        *,
        tombstones=None,
        record_for_personalize: bool = False,
    ):
        self.router = router
        self.store = store
        self.statements = Statements(store)
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
        # This batch's links, written before any deletion step.
        links_so_far: list[IdentityLink] = []
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
            if message.user_id and any(
                i.event_type in self.purchase_events for i in routed.interactions
            ):
                purchasers.append(message.user_id)
        steps.append(_prepare(statements, pending))
        forgets = [step for step in steps if isinstance(step, _Forget)]
        if forgets:
            self._forget_outside_the_store(forgets)

        def write(tx: Transaction) -> None:
            for step in steps:
                if isinstance(step, _Forget):
                    forget.purge(
                        tx,
                        step.ids,
                        step.dead_letters,
                        record_for_personalize=self.record_for_personalize,
                    )
                elif step:
                    step.write(tx)

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
            forget.redact_inbox(self.store, step.ids, step.deletion.deleted_at, keep=[step.seq])


def _prepare(statements: Statements, routed: Routed) -> Prepared:
    return Prepared(
        statements,
        links=routed.links,
        users=routed.users,
        items=routed.items,
        interactions=routed.interactions,
    )


# -- the local store's writes ------------------------------------------------------------


class Statements:
    """The local store's write statements for one store, compiled once (building them per
    batch cost more than running them)."""

    def __init__(self, store: Store):
        dialect = store.dialect

        def link_upsert(link):
            return link.on_conflict_do_update(
                index_elements=["anonymous_id"],
                set_={"user_id": link.excluded.user_id},
                where=identity_links.c.user_id != link.excluded.user_id,
            )

        def item_upsert(item):
            newer = item.excluded.updated_at >= items.c.updated_at
            # A newer record overwrites the fields it carries; an older one only fills gaps.
            merge = {
                name: sa.case(
                    (newer, sa.func.coalesce(item.excluded[name], items.c[name])),
                    else_=sa.func.coalesce(items.c[name], item.excluded[name]),
                )
                for name in ITEM_FIELDS
            }
            merge["updated_at"] = sa.case(
                (newer, item.excluded.updated_at), else_=items.c.updated_at
            )
            return item.on_conflict_do_update(index_elements=["item_id"], set_=merge)

        self.interaction = Bulk(
            store,
            interactions,
            _INTERACTION_COLUMNS,
            lambda add: add.on_conflict_do_nothing(index_elements=["event_id"]),
        )
        self.link = Bulk(store, identity_links, _LINK_COLUMNS, link_upsert)
        self.item = Bulk(store, items, _ITEM_COLUMNS, item_upsert)
        self.ensure_profile = insert(dialect, profiles).on_conflict_do_nothing(
            index_elements=["profile_id"]
        )
        self.select_profiles = sa.select(profiles).where(
            profiles.c.profile_id.in_(sa.bindparam("ids", expanding=True))
        )
        if dialect == "postgresql":
            self.select_profiles = self.select_profiles.with_for_update()
        self.update_profile = (
            profiles.update()
            .where(profiles.c.profile_id == sa.bindparam("pid"))
            .values(traits=sa.bindparam("traits"), traits_at=sa.bindparam("traits_at"))
        )


class Prepared:
    """The local store's writes for a batch of routed records, with their DBAPI parameters
    built in advance: building them (row tuples, JSON, the item rounds) is most of the
    Python work of a write, and doing it before the transaction keeps it out of the write
    lock, which every process waits for."""

    def __init__(
        self,
        statements: Statements,
        *,
        links: Sequence[IdentityLink] = (),
        users: Sequence[UserTraits] = (),
        items: Sequence[ItemDetails] = (),
        interactions: Sequence[Interaction] = (),
    ):
        self.sql = statements
        self.users = list(users)  # merged in the transaction (read-modify-write)
        latest = {link.anonymous_id: link.user_id for link in links}
        self.links = statements.link.params(sorted(latest.items()))
        self.item_rounds = [
            statements.item.params(
                [
                    (record.item_id, *map(record.details.get, ITEM_FIELDS), record.timestamp)
                    for record in round_records
                ]
            )
            for round_records in _item_rounds(items)
        ]
        # An interaction record is its row, in the same order, with its properties as JSON.
        self.interactions = statements.interaction.params(
            [r[:7] + (encode_json(r[7]),) for r in interactions]
        )

    def __bool__(self) -> bool:
        return bool(
            self.users
            or self.links is not None
            or self.item_rounds
            or self.interactions is not None
        )

    def write(self, tx: Transaction) -> None:
        """Identity links, traits, catalog rows, interactions, in this order (a record
        written later may rely on an earlier kind). Catalog rows: each record applied in
        time order over the stored row, in SQL; a newer record overwrites the fields it
        carries, an older one only fills gaps. Interactions: once per event id."""
        tx.bulk(self.sql.link, self.links)
        if self.users:
            self._merge_traits(tx)
        for round_params in self.item_rounds:
            tx.bulk(self.sql.item, round_params)
        tx.bulk(self.sql.interaction, self.interactions)

    def _merge_traits(self, tx: Transaction) -> None:
        """Merge identify traits into profiles: newer values win, older ones fill gaps."""
        by_profile: dict[str, list[UserTraits]] = {}
        for record in self.users:
            by_profile.setdefault(record.user_id, []).append(record)
        ids = sorted(by_profile)  # a fixed order: no deadlock between two writers
        sql = self.sql
        tx.conn.execute(
            sql.ensure_profile, [{"profile_id": pid, "traits": {}, "traits_at": 0.0} for pid in ids]
        )
        current = {
            row.profile_id: (dict(row.traits or {}), row.traits_at)
            for row in tx.conn.execute(sql.select_profiles, {"ids": ids})
        }
        updates = []
        for pid in ids:
            traits, traits_at = current.get(pid, ({}, 0.0))
            for record in sorted(by_profile[pid], key=lambda r: r.timestamp):
                if record.timestamp >= traits_at:
                    traits.update(record.traits)
                    traits_at = record.timestamp
                else:
                    for key, value in record.traits.items():
                        traits.setdefault(key, value)
            updates.append({"pid": pid, "traits": traits, "traits_at": traits_at})
        tx.conn.execute(sql.update_profile, updates)


_LINK_COLUMNS = ["anonymous_id", "user_id"]
_ITEM_COLUMNS = ["item_id", *ITEM_FIELDS, "updated_at"]
_INTERACTION_COLUMNS = list(Interaction._fields)


def _item_rounds(records: Sequence[ItemDetails]) -> list[list[ItemDetails]]:
    """The records for the item upsert, in rounds that touch each item at most once
    (PostgreSQL refuses an upsert that touches a row twice), each item's records in time
    order. Consecutive records of an item with the same details collapse into the later
    one: applying both or only the later gives the same row, whatever is stored."""
    per_item: dict[str, list[ItemDetails]] = {}
    for record in sorted(records, key=lambda r: r.timestamp):
        chain = per_item.setdefault(record.item_id, [])
        if chain and chain[-1].details == record.details:
            chain[-1] = record
        else:
            chain.append(record)
    rounds: list[list[ItemDetails]] = []
    for item_id in sorted(per_item):
        for depth, record in enumerate(per_item[item_id]):
            if depth == len(rounds):
                rounds.append([])
            rounds[depth].append(record)
    return rounds
