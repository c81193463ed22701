"""Who a visitor is: the one place that turns an anonymousId into a userId.

Segment links an ``anonymousId`` to a ``userId`` with ``alias`` (or any message carrying
both); the store keeps those links (``identity_links``). Every reader that needs "this
person's history" or "this person's traits" resolves the visitor here, so that the trait
checks, the purchases excluded at once, the local engine's history and its training data
all agree on who is who.

Two questions, answered here only:

* **Who is this person?** (``resolve``; the service's own bookkeeping: the experiment
  variant a person keeps, the attribution of their clicks and orders, training data.) A
  userId is the person; an anonymousId belongs to the user it is linked to, else it stands
  for an anonymous person of its own (``owner``).
* **Whose data may a request read?** (``subject``, ``subject_of_visitor``; every reader
  behind ``GET /recommendations`` and ``POST /recommendations/rank``.) A userId reads the
  user's data with every anonymousId linked to them; an anonymousId given alongside that is
  not linked to them is not theirs and is left out. An anonymousId alone reads that
  anonymous id's own data, never the user it may be linked to: a logged-out browser, or a
  link forged with the public write key, never discloses a user's history or traits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from .storage.schema import identity_links, interactions

ANONYMOUS_PREFIX = "\x00anon:"  # keeps anonymous people apart from user ids in one key space


@dataclass(frozen=True)
class Person:
    user_id: str | None  # the userId, given or linked; None: anonymous
    anonymous_ids: tuple[str, ...]  # every anonymousId known to be this person

    @property
    def ids(self) -> tuple[str, ...]:
        """Every id the person's records may be stored under (profiles are keyed by the
        userId, or by the anonymousId for an anonymous person)."""
        return ((self.user_id,) if self.user_id else ()) + tuple(
            a for a in self.anonymous_ids if a != self.user_id
        )


def owner(
    user_id: str | None, anonymous_id: str | None, link_of: Callable[[str], str | None]
) -> str | None:
    """The userId a message or a visitor belongs to: its own userId, else the user its
    anonymousId is linked to (``link_of``), else None (an anonymous person)."""
    if user_id:
        return user_id
    if anonymous_id:
        return link_of(anonymous_id) or None
    return None


def person_key(
    user_id: str | None, anonymous_id: str | None, link_of: Callable[[str], str | None]
) -> str:
    """One string per person (for training data): the owner's userId, else the
    anonymousId, marked so it never equals a userId."""
    return owner(user_id, anonymous_id, link_of) or ANONYMOUS_PREFIX + (anonymous_id or "")


def resolve(conn, *, user_id: str | None = None, anonymous_id: str | None = None) -> Person:
    """The person behind a visitor known by userId and/or anonymousId, with every
    anonymousId linked to them."""

    def link_of(anonymous: str) -> str | None:
        return conn.execute(
            sa.select(identity_links.c.user_id).where(identity_links.c.anonymous_id == anonymous)
        ).scalar()

    user = owner(user_id, anonymous_id, link_of)
    anonymous = {anonymous_id} if anonymous_id else set()
    if user:
        anonymous.update(
            row[0]
            for row in conn.execute(
                sa.select(identity_links.c.anonymous_id).where(identity_links.c.user_id == user)
            )
        )
    return Person(user, tuple(sorted(anonymous)))


def _linked_to(conn, user_id: str) -> list[str]:
    return [
        row[0]
        for row in conn.execute(
            sa.select(identity_links.c.anonymous_id).where(identity_links.c.user_id == user_id)
        )
    ]


def is_linked(conn, anonymous_id: str, user_id: str) -> bool:
    """Whether the store links ``anonymous_id`` to ``user_id``."""
    return (
        conn.execute(
            sa.select(identity_links.c.user_id).where(identity_links.c.anonymous_id == anonymous_id)
        ).scalar()
        == user_id
    )


def subject(conn, *, user_id: str | None = None, anonymous_id: str | None = None) -> Person:
    """Whose data a request for this visitor may read (module docstring)."""
    if user_id:
        return Person(user_id, tuple(sorted(_linked_to(conn, user_id))))
    return Person(None, (anonymous_id,) if anonymous_id else ())


def subject_of_visitor(conn, visitor: str) -> Person:
    """``subject`` for the one id a recommender is given (the userId, or the anonymousId
    of an anonymous visitor), taken as either kind: the id's own records, and those of
    the anonymous ids linked to it as a user. An anonymous id's link to a user is never
    followed."""
    return Person(visitor, tuple(sorted({visitor, *_linked_to(conn, visitor)})))


ANONYMOUS_IDS_READ = 32  # linked anonymousIds whose own rows one bounded read covers


def latest_interactions(conn, person: Person, columns, limit: int, first: str | None = None):
    """A query for the person's latest ``limit`` interactions (``columns`` of them) under
    each of their ids: the userId, and at most ``ANONYMOUS_IDS_READ`` linked anonymousIds
    (``first`` before the others). Each id is one range of an index on (id, time)
    (``interactions_user_time``, ``interactions_anonymous_time``) read newest first and
    cut at ``limit``, so the work is bounded by ``limit`` per id however long the history
    is. A row stored under both the userId and an anonymousId comes once for each. None
    when the person has no id.

    On PostgreSQL, plans in ``conn``'s transaction avoid sorting from here on
    (``enable_sort``, and ``jit`` off: a sort that remains is costed so high that it would
    be compiled): when the planner's statistics underestimate a visitor's rows (right
    after an import, or a bot grown since the last ANALYZE), it would otherwise fetch
    their whole history and sort it. SQLite's planner reads the index in order by itself."""
    anonymous = sorted(person.anonymous_ids, key=lambda a: a != first)[:ANONYMOUS_IDS_READ]
    ranges: list[tuple[sa.Column, str | None]] = [
        (interactions.c.anonymous_id, a) for a in anonymous
    ]
    if person.user_id:
        ranges.insert(0, (interactions.c.user_id, person.user_id))
    if not ranges:
        return None
    if conn.dialect.name == "postgresql":  # and no JIT for the inflated cost of a sort
        conn.execute(
            sa.text("SELECT set_config('enable_sort', 'off', true), set_config('jit', 'off', true)")
        )
    # The number of parts is rounded up to a power of two (at most the largest count), the
    # extra parts matching nothing (NULL equals no id). SQLAlchemy compiles each shape of
    # statement once and keeps it, per process: a shape for every count of ids, filled
    # as visitors gathered ids, made a web process's memory grow for minutes
    # (bench/README.md, the soak).
    size = min(1 << (len(ranges) - 1).bit_length(), ANONYMOUS_IDS_READ + 1)
    ranges += [(interactions.c.anonymous_id, None)] * (size - len(ranges))
    parts = [
        sa.select(*columns)
        .where(column == sa.bindparam(None, value, type_=column.type))
        .order_by(interactions.c.timestamp.desc())
        .limit(max(1, int(limit)))
        .subquery()
        .select()
        for column, value in ranges
    ]
    return sa.union_all(*parts) if len(parts) > 1 else parts[0]
