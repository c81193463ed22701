"""The embedded default destination: the delivery's own store transaction.

Interactions feed the local recommendation engine; identify traits form the local profile
store; product properties fill the item catalog; alias/identify link anonymous history to
the user; a deletion request forgets the user.
"""
from __future__ import annotations

from typing import Sequence

from ..routing import IdentityLink, Interaction, ItemDetails, UserTraits
from ..store import Transaction


class LocalDestination:
    name = "local"

    def __init__(self, tx: Transaction):
        self.tx = tx

    def record_interactions(self, records: Sequence[Interaction]) -> None:
        self.tx.add_interactions(records)

    def upsert_users(self, records: Sequence[UserTraits]) -> None:
        self.tx.merge_traits(records)

    def upsert_items(self, records: Sequence[ItemDetails]) -> None:
        self.tx.upsert_items(records)

    def link_identities(self, records: Sequence[IdentityLink]) -> None:
        self.tx.link_identities(records)

    def delete_user(self, user_id: str) -> None:
        self.tx.delete_user(user_id)
