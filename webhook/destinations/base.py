"""The destination interface: what the webhook does with a delivery's records.

An implementation receives the records of one delivery, in the order the messages came.
It raises ``DestinationError`` when the delivery cannot be completed now (the webhook then
answers 503 and nothing of the delivery is kept, so Segment's redelivery starts afresh).
"""
from __future__ import annotations

from typing import Protocol, Sequence

from ..routing import IdentityLink, Interaction, ItemDetails, UserTraits


class DestinationError(Exception):
    """The destination cannot take the delivery now; Segment should retry it."""

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class Destination(Protocol):
    name: str

    def record_interactions(self, records: Sequence[Interaction]) -> None: ...

    def upsert_users(self, records: Sequence[UserTraits]) -> None: ...

    def upsert_items(self, records: Sequence[ItemDetails]) -> None: ...

    def link_identities(self, records: Sequence[IdentityLink]) -> None: ...

    def delete_user(self, user_id: str) -> None: ...
