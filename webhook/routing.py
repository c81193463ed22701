"""Routing: what each Segment message means for a recommender.

``route`` turns one validated ``Message`` into records — interactions, user traits, item
details, identity links, a user deletion — without touching storage or the network.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .segment import MAX_ID_LENGTH, Message, clean_text

# The catalog fields this service keeps for each product (Segment e-commerce spec names).
ITEM_FIELDS = ("name", "price", "category", "brand", "url", "image_url")


class Interaction(NamedTuple):
    """One (user, item, event) — Personalize's interaction; PutEvents' event.

    The records are NamedTuples: an applier builds several a message, thousands a batch,
    and a tuple is the cheapest record Python builds."""

    event_id: str  # stable across redeliveries: derived from messageId
    message_id: str
    user_id: str | None
    anonymous_id: str | None
    item_id: str
    event_type: str  # the Segment event name
    timestamp: float  # epoch seconds of the message's time
    properties: dict  # the product's properties over the event's (without `products`)

    @property
    def session_id(self) -> str:
        return self.anonymous_id or self.user_id or ""


class UserTraits(NamedTuple):
    """An identify's traits for one profile (Personalize's user; PutUsers)."""

    user_id: str
    traits: dict
    timestamp: float


class ItemDetails(NamedTuple):
    """What a message says about a product (Personalize's item; PutItems)."""

    item_id: str
    details: dict  # only ITEM_FIELDS that were present
    properties: dict  # every product property, for mappings to an items schema
    timestamp: float


class Deletion(NamedTuple):
    """A Segment deletion request: forget this person (userId, with the ids linked to it;
    or an anonymousId alone), as of ``deleted_at``."""

    user_id: str | None
    anonymous_id: str | None
    deleted_at: float


class IdentityLink(NamedTuple):
    """anonymous_id belongs to user_id (from alias, identify or any message with both)."""

    anonymous_id: str
    user_id: str


@dataclass(slots=True)
class Routed:
    interactions: list[Interaction] = field(default_factory=list)
    users: list[UserTraits] = field(default_factory=list)
    items: list[ItemDetails] = field(default_factory=list)
    links: list[IdentityLink] = field(default_factory=list)
    deletion: Deletion | None = None
    skipped: str | None = None  # why a message meant to be an interaction gave none
    notes: list[str] = field(default_factory=list)  # products dropped from a fan-out


def stable_event_id(message_id: str, index: int | None) -> str:
    """``messageId`` for one product, ``messageId#i`` for the i-th of a products array.

    Redeliveries of a message carry the same messageId and the same products in the same
    order, so they map to the same ids. Longer than Personalize's 256 characters: hashed.
    """
    candidate = message_id if index is None else f"{message_id}#{index}"
    if len(candidate) <= MAX_ID_LENGTH:
        return candidate
    return "sha1:" + hashlib.sha1(candidate.encode("utf-8")).hexdigest()


def _item_id(properties: dict, id_properties: Iterable[str]) -> str | None:
    for name in id_properties:
        value = properties.get(name)
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            value = str(value)
        if isinstance(value, str) and value.strip():
            value = value.strip()
            return value if len(value) <= MAX_ID_LENGTH and clean_text(value) else None
    return None


def _item_details(item_id: str, product: dict, timestamp: float) -> ItemDetails | None:
    """The ITEM_FIELDS a product carries, as the catalog keeps them: text that a database
    can hold (a number given for a text field as its text), a price as a finite float.
    Text is the common case and is checked first (every delivered product passes here)."""
    details: dict[str, Any] = {}
    get = product.get
    for name in ITEM_FIELDS:
        value = get(name)
        if value is None:
            continue
        if type(value) is str:
            if not value or not clean_text(value):
                continue
            if name == "price":
                value = _finite_price(value)
                if value is None:
                    continue
        elif name == "price":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            value = _finite_price(value)
            if value is None:
                continue
        elif isinstance(value, (int, float)):  # a bool too, as its text
            value = str(value)
        else:
            continue
        details[name] = value
    if not details:
        return None
    return ItemDetails(item_id, details, product, timestamp)


_INFINITIES = (float("inf"), float("-inf"))


def _finite_price(value: int | float | str) -> float | None:
    try:
        price = float(value)
    except (ValueError, OverflowError):
        return None
    if price != price or price in _INFINITIES:
        return None
    return price


class Router:
    def __init__(self, interaction_events: Iterable[str], item_id_properties: Iterable[str]):
        self.interaction_events = frozenset(interaction_events)
        self.item_id_properties = tuple(item_id_properties)

    def route(self, message: Message) -> Routed:
        routed = Routed()
        when = message.timestamp.timestamp()
        if message.user_id and message.anonymous_id and message.type != "delete":
            routed.links.append(IdentityLink(message.anonymous_id, message.user_id))

        if message.type == "track":
            self._route_track(message, when, routed)
        elif message.type == "identify":
            profile_id = message.user_id or message.anonymous_id
            if message.traits and profile_id:
                routed.users.append(UserTraits(profile_id, dict(message.traits), when))
        elif message.type == "alias":
            assert message.previous_id and message.user_id
            if message.previous_id != message.user_id:
                routed.links.append(IdentityLink(message.previous_id, message.user_id))
        elif message.type == "delete":
            routed.deletion = Deletion(message.user_id, message.anonymous_id, when)
        # page, screen and group: accepted and counted, nothing to record.
        return routed

    def outcome(self, message: Message) -> tuple[str | None, list[str], int]:
        """What ``route`` would report for a message, without building its records:
        (why it is skipped, notes, number of interactions). The webhook's answer needs
        only this; the appliers route for real."""
        if message.type != "track":
            return None, [], 0
        notes: list[str] = []
        made = sum(1 for _, _, item_id in self._products(message, notes) if item_id)
        if message.event not in self.interaction_events:
            return None, notes, 0
        if not made:
            return self._skip_reason(message), notes, 0
        return None, notes, made

    def _products(self, message: Message, notes: list[str]):
        """(index or None, product properties, item id or None) for each product a track
        message is about: the entries of ``properties.products``, or the properties."""
        properties = message.properties or {}
        products = properties.get("products")
        if not isinstance(products, list):
            yield None, properties, _item_id(properties, self.item_id_properties)
            return
        for index, product in enumerate(products):
            if not isinstance(product, dict):
                notes.append(f"products[{index}] is not an object")
                continue
            item_id = _item_id(product, self.item_id_properties)
            if item_id is None:
                notes.append(f"products[{index}] has no {self._id_names()}")
                continue
            yield index, product, item_id

    def _skip_reason(self, message: Message) -> str:
        if isinstance((message.properties or {}).get("products"), list):
            return f"no product in products has {self._id_names()}"
        return f"properties has no {self._id_names()}"

    def _route_track(self, message: Message, when: float, routed: Routed) -> None:
        properties = message.properties or {}
        is_interaction = message.event in self.interaction_events
        assert message.message_id is not None
        shared = None
        for index, product, item_id in self._products(message, routed.notes):
            if item_id is None:
                continue
            if index is None:
                merged = product
            else:
                if shared is None:
                    shared = {k: v for k, v in properties.items() if k != "products"}
                merged = {**shared, **product}
            details = _item_details(item_id, product, when)
            if details:
                routed.items.append(details)
            if is_interaction:
                routed.interactions.append(
                    self._interaction(
                        message, stable_event_id(message.message_id, index), item_id, when, merged
                    )
                )
        if is_interaction and not routed.interactions:
            routed.skipped = self._skip_reason(message)

    def _id_names(self) -> str:
        return " or ".join(self.item_id_properties)

    @staticmethod
    def _interaction(
        message: Message, event_id: str, item_id: str, when: float, properties: dict
    ) -> Interaction:
        assert message.message_id is not None and message.event is not None
        # Positional, in the record's field order (keywords cost twice as much here).
        return Interaction(
            event_id,
            message.message_id,
            message.user_id,
            message.anonymous_id,
            item_id,
            message.event,
            when,
            properties,
        )
