"""Segment records → Amazon Personalize records, checked against the service's limits.

Pure functions: no boto3, no network. PutEvents reports no per-event errors, so whatever
does not fit is trimmed or dropped *here*, and each trim or drop is returned with its reason.

Limits (botocore's personalize-events model): ids ≤ 256 characters; an event's
``properties`` ≤ 1024 characters; ``recommendationId`` ≤ 40; ``impression`` 1–25 ids of ≤ 256;
a user's ``properties`` ≤ 24000, an item's ≤ 32000; 1–10 records a call.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .routing import Interaction, ItemDetails, UserTraits

MAX_ID = 256
MAX_EVENT_PROPERTIES = 1024
MAX_USER_PROPERTIES = 24000
MAX_ITEM_PROPERTIES = 32000
MAX_RECOMMENDATION_ID = 40
MAX_IMPRESSION = 25
MAX_RECORDS_PER_CALL = 10


@dataclass(frozen=True)
class MappingConfig:
    tracking_id: str
    event_type_map: Mapping[str, str] = field(default_factory=dict)
    event_value_property: str = ""
    event_properties: Sequence[tuple[str, str]] = ()  # (Segment property, schema field)
    user_traits_map: Sequence[tuple[str, str]] = ()
    item_properties_map: Sequence[tuple[str, str]] = ()

    @classmethod
    def from_settings(cls, settings) -> MappingConfig:
        """The mapping the settings describe (real-time forwarding and export alike)."""
        return cls(
            tracking_id=settings.personalize_tracking_id,
            event_type_map=dict(settings.event_type_map),
            event_value_property=settings.event_value_property,
            event_properties=settings.event_properties,
            user_traits_map=settings.user_traits_map,
            item_properties_map=settings.item_properties_map,
        )


@dataclass
class Problem:
    """A record dropped, or a field trimmed, before sending; reported, never silent."""

    kind: str  # "event", "user", "item"
    id: str
    action: str  # "dropped" or "trimmed"
    reason: str

    def as_json(self) -> dict:
        return {"kind": self.kind, "id": self.id, "action": self.action, "reason": self.reason}


@dataclass(frozen=True)
class EventCall:
    """One PutEvents call: events of one session and user, at most 10."""

    session_id: str
    user_id: str | None
    events: tuple[dict, ...]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _scalar(value: Any) -> Any:
    """A metadata value: lists joined with '|' (Personalize's categorical form)."""
    if isinstance(value, list):
        parts = [
            str(v) for v in value if isinstance(v, (str, int, float)) and not isinstance(v, bool)
        ]
        return "|".join(parts) if parts else None
    if isinstance(value, (str, int, float, bool)):
        return value
    return None


def _properties_json(
    source: Mapping[str, Any], mapping: Iterable[tuple[str, str]], limit: int
) -> tuple[str | None, list[str]]:
    """Mapped fields as a compact JSON string within ``limit`` characters; fields that do
    not fit are left out, last ones first. Returns (json or None, names left out)."""
    fields: dict[str, Any] = {}
    for source_name, schema_name in mapping:
        if source_name in source:
            value = _scalar(source[source_name])
            if value is not None and value != "":
                fields[schema_name] = value
    left_out: list[str] = []
    while fields:
        text = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
        if len(text) <= limit:
            return text, left_out
        left_out.append(fields.popitem()[0])
    return None, left_out


def map_event(
    record: Interaction, config: MappingConfig, problems: list[Problem]
) -> tuple[str, str | None, dict] | None:
    """(sessionId, userId, event) for PutEvents, or None when it cannot be sent."""

    def drop(reason: str) -> None:
        problems.append(Problem("event", record.event_id, "dropped", reason))

    def trim(reason: str) -> None:
        problems.append(Problem("event", record.event_id, "trimmed", reason))

    session_id = record.session_id
    user_id = record.user_id
    event_type = config.event_type_map.get(record.event_type, record.event_type)
    for name, value in (
        ("sessionId", session_id),
        ("userId", user_id or ""),
        ("eventType", event_type),
        ("itemId", record.item_id),
        ("eventId", record.event_id),
    ):
        if len(value) > MAX_ID:
            drop(f"{name} is longer than {MAX_ID} characters")
            return None
    if not session_id:
        drop("no anonymousId or userId for sessionId")
        return None

    event: dict[str, Any] = {
        "eventId": record.event_id,
        "eventType": event_type,
        "itemId": record.item_id,
        "sentAt": record.timestamp,
    }
    props = record.properties
    if config.event_value_property:
        raw = props.get(config.event_value_property)
        if raw is not None:
            number = _number(raw)
            if number is None:
                trim(f"eventValue: {config.event_value_property} is not a number")
            else:
                event["eventValue"] = number
    if config.event_properties:
        text, left_out = _properties_json(props, config.event_properties, MAX_EVENT_PROPERTIES)
        if left_out:
            trim(
                f"properties over {MAX_EVENT_PROPERTIES} characters: left out "
                + ", ".join(left_out)
            )
        if text:
            event["properties"] = text
    recommendation_id = props.get("recommendation_id")
    if recommendation_id not in (None, ""):
        if isinstance(recommendation_id, str) and len(recommendation_id) <= MAX_RECOMMENDATION_ID:
            event["recommendationId"] = recommendation_id
        else:
            trim(
                f"recommendationId left out: not a string of at most "
                f"{MAX_RECOMMENDATION_ID} characters"
            )
    impression = props.get("impression")
    if impression not in (None, "", []):
        if isinstance(impression, str):
            impression = impression.split("|")  # Personalize's own notation
        if isinstance(impression, list):
            ids = [
                str(i)
                for i in impression
                if isinstance(i, (str, int))
                and not isinstance(i, bool)
                and 0 < len(str(i)) <= MAX_ID
            ]
            if len(ids) != len(impression):
                trim("impression: ids that are not strings of 1-256 characters left out")
            if len(ids) > MAX_IMPRESSION:
                trim(f"impression trimmed to its first {MAX_IMPRESSION} of {len(ids)} ids")
                ids = ids[:MAX_IMPRESSION]
            if ids:
                event["impression"] = ids
        else:
            trim("impression left out: not a list of item ids")
    return session_id, user_id, event


def event_calls(
    records: Sequence[Interaction], config: MappingConfig, problems: list[Problem]
) -> list[EventCall]:
    """Each session's events in arrival order, cut into calls of at most 10, and where
    the userId changes (one call has one userId): sent one after the other, a session's
    calls keep its order."""
    sessions: dict[str, list[tuple[str | None, dict]]] = {}
    for record in records:
        mapped = map_event(record, config, problems)
        if mapped is None:
            continue
        session_id, user_id, event = mapped
        sessions.setdefault(session_id, []).append((user_id, event))
    calls = []
    for session_id, events in sessions.items():
        run: list[dict] = []
        run_user = events[0][0]
        for user_id, event in events:
            if run and (user_id != run_user or len(run) == MAX_RECORDS_PER_CALL):
                calls.append(EventCall(session_id, run_user, tuple(run)))
                run = []
            run_user = user_id
            run.append(event)
        calls.append(EventCall(session_id, run_user, tuple(run)))
    return calls


def map_users(
    records: Sequence[UserTraits], config: MappingConfig, problems: list[Problem]
) -> list[dict]:
    """One PutUsers record per profile (its traits merged in time order)."""
    merged: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: r.timestamp):
        merged.setdefault(record.user_id, {}).update(record.traits)
    users = []
    for user_id, traits in merged.items():
        if len(user_id) > MAX_ID:
            problems.append(
                Problem(
                    "user", user_id[:64], "dropped", f"userId is longer than {MAX_ID} characters"
                )
            )
            continue
        text, left_out = _properties_json(traits, config.user_traits_map, MAX_USER_PROPERTIES)
        if left_out:
            problems.append(
                Problem(
                    "user",
                    user_id,
                    "trimmed",
                    "properties too long: left out " + ", ".join(left_out),
                )
            )
        if text is None:
            continue  # no mapped trait: nothing to tell Personalize
        users.append({"userId": user_id, "properties": text})
    return users


def map_items(
    records: Sequence[ItemDetails], config: MappingConfig, problems: list[Problem]
) -> list[dict]:
    merged: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: r.timestamp):
        merged.setdefault(record.item_id, {}).update(record.properties)
    items = []
    for item_id, properties in merged.items():
        text, left_out = _properties_json(
            properties, config.item_properties_map, MAX_ITEM_PROPERTIES
        )
        if left_out:
            problems.append(
                Problem(
                    "item",
                    item_id,
                    "trimmed",
                    "properties too long: left out " + ", ".join(left_out),
                )
            )
        item: dict[str, Any] = {"itemId": item_id}
        if text:
            item["properties"] = text
        items.append(item)
    return items
