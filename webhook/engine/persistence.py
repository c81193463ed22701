"""Where the engine keeps what it shares between processes: its models (the training
lease is ``storage.leases``).

They live in the service's database (SQLite or PostgreSQL), so every gunicorn worker and
every host (Heroku dyno) sees the same latest model and only one of them trains at a time.
Also: reading training data and a person's history out of the interactions table.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa

from ..identity import latest_interactions, person_key, subject_of_visitor
from ..storage import Store
from ..storage.schema import engine_models, identity_links, interactions
from .model import UNKNOWN_EVENT_WEIGHT, Interactions, Model

log = logging.getLogger(__name__)

KEEP_VERSIONS = 2  # older models are deleted after a new one is saved


@dataclass(frozen=True)
class ModelInfo:
    version: int
    created_at: float
    interactions: int


def latest_model_info(store: Store) -> ModelInfo | None:
    with store.read() as conn:
        row = conn.execute(
            sa.select(
                engine_models.c.version, engine_models.c.created_at, engine_models.c.interactions
            )
            .order_by(engine_models.c.version.desc())
            .limit(1)
        ).first()
    return ModelInfo(*row) if row else None


def load_model(store: Store, version: int) -> Model | None:
    with store.read() as conn:
        blob = conn.execute(
            sa.select(engine_models.c.blob).where(engine_models.c.version == version)
        ).scalar()
    return Model.from_bytes(bytes(blob)) if blob is not None else None


def save_model(store: Store, model: Model, interactions_count: int) -> int:
    blob = model.to_bytes()
    with store.write() as tx:
        version = tx.conn.execute(
            engine_models.insert()
            .values(
                created_at=time.time(),
                interactions=interactions_count,
                stats=json.dumps(model.stats, default=float),
                blob=blob,
            )
            .returning(engine_models.c.version)
        ).scalar_one()
        tx.conn.execute(
            engine_models.delete().where(engine_models.c.version <= version - KEEP_VERSIONS)
        )
    return int(version)


def count_interactions(store: Store) -> int:
    with store.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(interactions)).scalar_one())


# -- reading interactions ------------------------------------------------------------------

TRAINING_CHUNK_ROWS = 100_000  # rows fetched from the database at a time for training


def load_training_data(
    store: Store, weights: Mapping[str, float], max_interactions: int | None = None
) -> tuple[Interactions, dict[str, int]]:
    """The stored interactions (the most recent ``max_interactions`` of them, if given),
    resolved to a person (an anonymous id linked to a user counts as that user), numbered.
    Returns the data and the person → number map.

    Rows are fetched ``TRAINING_CHUNK_ROWS`` at a time and kept as compact arrays (int32
    person and item numbers, float32 weights, float64 times: 20 bytes an interaction),
    plus one dictionary entry per person, item and event type."""
    people: dict[str, int] = {}
    items: dict[str, int] = {}
    event_numbers: dict[str, int] = {}
    parts: list[tuple[np.ndarray, ...]] = []
    with store.read() as conn:
        links = dict(
            conn.execute(sa.select(identity_links.c.anonymous_id, identity_links.c.user_id)).all()
        )
        query = sa.select(
            interactions.c.user_id,
            interactions.c.anonymous_id,
            interactions.c.item_id,
            interactions.c.event_type,
            interactions.c.timestamp,
        )
        if max_interactions is not None:
            # The time of the max_interactions-th newest row: a walk down the time index.
            oldest = conn.execute(
                sa.select(interactions.c.timestamp)
                .order_by(interactions.c.timestamp.desc())
                .offset(max(0, max_interactions - 1))
                .limit(1)
            ).scalar()
            if oldest is not None:
                query = query.where(interactions.c.timestamp >= oldest)
        result = conn.execution_options(stream_results=True, yield_per=TRAINING_CHUNK_ROWS).execute(
            query
        )
        link_of = links.get
        for rows in result.partitions():
            user_ids, anonymous_ids, item_ids, event_types, timestamps = zip(*rows)
            del rows
            # `u or ...`: a userId is its own person (person_key's rule), without a call.
            persons = [u or person_key(u, a, link_of) for u, a in zip(user_ids, anonymous_ids)]
            parts.append(
                (
                    _numbered(persons, people),
                    _numbered(item_ids, items),
                    _numbered(event_types, event_numbers),
                    np.array(timestamps, dtype=np.float64),
                )
            )
            del persons, user_ids, anonymous_ids, item_ids, event_types, timestamps
    if parts:
        users, item_numbers, events, times = (np.concatenate(c) for c in zip(*parts))
    else:
        users = item_numbers = events = np.empty(0, dtype=np.int32)
        times = np.empty(0, dtype=np.float64)
    del parts
    if max_interactions is not None and len(times) > max_interactions:
        # Rows tied with the oldest one kept: keep the newest max_interactions of them.
        keep = np.sort(np.argsort(-times, kind="stable")[:max_interactions])
        users, item_numbers, events, times = (
            users[keep],
            item_numbers[keep],
            events[keep],
            times[keep],
        )
    by_event = np.array(
        [weights.get(name, UNKNOWN_EVENT_WEIGHT) for name in event_numbers] or [0.0],
        dtype=np.float32,
    )
    known_items = np.empty(len(items), dtype=object)
    known_items[:] = list(items)
    data = Interactions(
        users=users,
        items=item_numbers,
        weights=by_event[events],
        times=times,
        item_ids=known_items,
        n_users=len(people),
    )
    return data, people


def _numbered(values: Sequence[str], numbers: dict[str, int]) -> np.ndarray:
    """The number of each value, numbering new ones in order of first appearance."""
    for value in dict.fromkeys(values):
        if value not in numbers:
            numbers[value] = len(numbers)
    return np.fromiter(map(numbers.__getitem__, values), dtype=np.int32, count=len(values))


def read_history(
    store: Store, identity: str, limit: int
) -> tuple[list[tuple[str, str, float]], set[str]]:
    """The person's latest ``limit`` interactions as (item id, event type, time), oldest
    first, and the items among them: as a user, and as every anonymous id linked to them
    (alias/identify); an anonymous visitor's own only (``identity.subject_of_visitor``).
    The read is bounded (``identity.latest_interactions``): an answer costs the same for a
    visitor with 50 interactions or with 100,000."""
    cols = (
        interactions.c.event_id,
        interactions.c.item_id,
        interactions.c.event_type,
        interactions.c.timestamp,
    )
    with store.read() as conn:
        query = latest_interactions(
            conn, subject_of_visitor(conn, identity), cols, limit, first=identity
        )
        if query is None:
            return [], set()
        rows = {
            event_id: (timestamp, event_id, item_id, event_type)
            for event_id, item_id, event_type, timestamp in conn.execute(query)
        }
    latest = sorted(rows.values())[-max(1, int(limit)) :]
    return (
        [(item_id, event_type, timestamp) for timestamp, _, item_id, event_type in latest],
        {row[2] for row in latest},
    )


def recent_interactions(store: Store, limit: int) -> list[tuple[str, str, float]]:
    with store.read() as conn:
        return [
            tuple(row)
            for row in conn.execute(
                sa.select(
                    interactions.c.item_id, interactions.c.event_type, interactions.c.timestamp
                )
                .order_by(interactions.c.timestamp.desc())
                .limit(limit)
            )
        ]
