"""Forgetting a person: every table and file the service keeps, for a deletion request.

The local store applier (``appliers/local.py``) applies a ``delete`` in one pass:

1. **Who** (``person_ids``): the userId, every anonymous id linked to it and every previous
   userId reached by alias (``identity_links``, and the links its own batch is about to
   write); for an anonymous-only request, that anonymous id alone.
2. **Tombstones** for each id (``tombstones.py``), so no later-arriving older message
   brings them back.
3. **The inbox** (``redact_inbox``): the bodies of their messages received so far are
   dropped; the claims stay, so a redelivery is still a duplicate.
4. **The store**, in the applier's transaction (``purge``): interactions (as a user or
   anonymous), profiles, identity links, activations, impressions and the attributions
   made through them, dead letters holding their messages; and, in Personalize mode, the
   ids go on the list of Personalize's next data deletion job (``deletions.py``).

Steps 2 and 3 are idempotent and run before the applier's transaction: a crash in
between applies the batch again. The deletion request's own body is dropped last, after
that transaction committed (``redact_request``).

Found by the id's JSON form (``"userId":"…"``, ``"anonymousId":"…"``, ``"previousId":"…"``)
and confirmed on the decoded message, with its time: only what was sent before the
deletion goes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import sqlalchemy as sa

from .routing import Deletion, IdentityLink
from .segment import MessageError, encode_json, message_time
from .storage import Store, Transaction
from .storage.schema import (
    activations,
    attributions,
    dead_letters,
    identity_links,
    impressions,
    inbox,
    interactions,
    profiles,
)

ID_FIELDS = ("userId", "anonymousId", "previousId")


def person_ids(conn, deletion: Deletion, pending: Sequence[IdentityLink] = ()) -> list[str]:
    """Every id the deleted person is known by (see the module docstring)."""
    if not deletion.user_id:
        return [deletion.anonymous_id] if deletion.anonymous_id else []
    user = deletion.user_id
    ids = {user}
    ids.update(
        row[0]
        for row in conn.execute(
            sa.select(identity_links.c.anonymous_id).where(identity_links.c.user_id == user)
        )
    )
    ids.update(link.anonymous_id for link in pending if link.user_id == user)
    if deletion.anonymous_id:
        ids.add(deletion.anonymous_id)
    return sorted(ids)


def _patterns(ids: Iterable[str]) -> list[str]:
    """LIKE patterns that find a message naming one of ``ids`` in an id field (``\\`` is
    the escape character)."""
    out = []
    for identifier in ids:
        text = encode_json(identifier)
        text = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        out += [f'%"{field}":{text}%' for field in ID_FIELDS]
    return out


def _matching(conn, table: sa.Table, key, ids: Sequence[str]) -> list[tuple]:
    """(key, body) of the rows whose body may name one of ``ids`` (to be confirmed)."""
    if not ids:
        return []
    like = [table.c.body.like(pattern, escape="\\") for pattern in _patterns(ids)]
    return conn.execute(
        sa.select(key, table.c.body).where(table.c.body.is_not(None), sa.or_(*like))
    ).all()


def _names(body: str, ids: set[str], before: float | None) -> bool:
    """Whether the message ``body`` is about one of ``ids`` (and, with ``before``, was
    sent at or before that time)."""
    try:
        raw = json.loads(body)
    except ValueError:
        return False
    if not isinstance(raw, dict) or not any(
        isinstance(raw.get(field), (str, int)) and str(raw.get(field)) in ids for field in ID_FIELDS
    ):
        return False
    if before is None:
        return True
    try:
        return message_time(raw).timestamp() <= before
    except MessageError:
        return True  # a deletion request may carry no time: it is theirs all the same


def redact_inbox(
    store: Store, ids: Sequence[str], deleted_at: float, keep: Iterable[int] = ()
) -> int:
    """Drop the bodies of the inbox rows about ``ids`` sent at or before ``deleted_at``,
    except the rows ``keep`` (seq); their claims stay. Returns the rows redacted."""
    kept = set(keep)
    wanted = set(ids)
    inbox_store = store.inbox_store
    with inbox_store.read() as conn:
        found = [
            seq
            for seq, body in _matching(conn, inbox, inbox.c.seq, ids)
            if seq not in kept and _names(body, wanted, deleted_at)
        ]
    if found:
        with inbox_store.write() as tx:
            for start in range(0, len(found), 500):
                tx.conn.execute(
                    inbox.update()
                    .where(inbox.c.seq.in_(found[start : start + 500]))
                    .values(body=None)
                )
    return len(found)


def redact_request(store: Store, seq: int) -> None:
    """Drop the body of the deletion request itself (after it was applied)."""
    with store.inbox_store.write() as tx:
        tx.conn.execute(inbox.update().where(inbox.c.seq == seq).values(body=None))


def dead_letters_of(conn, ids: Sequence[str]) -> list[int]:
    """The dead letters holding a message about ``ids``, or a record of theirs."""
    wanted = set(ids)
    found = {
        row_id
        for row_id, body in _matching(conn, dead_letters, dead_letters.c.id, ids)
        if _names(body, wanted, None)
    }
    found.update(
        row[0]
        for row in conn.execute(
            sa.select(dead_letters.c.id).where(dead_letters.c.record_id.in_(list(ids)))
        )
    )
    return sorted(found)


def purge(
    tx: Transaction,
    ids: Sequence[str],
    dead: Sequence[int] = (),
    record_for_personalize: bool = False,
) -> None:
    """In the applier's transaction: everything the store holds about ``ids``."""
    ids = list(ids)
    if not ids:
        return
    conn = tx.conn
    conn.execute(
        interactions.delete().where(
            sa.or_(interactions.c.user_id.in_(ids), interactions.c.anonymous_id.in_(ids))
        )
    )
    conn.execute(profiles.delete().where(profiles.c.profile_id.in_(ids)))
    conn.execute(
        identity_links.delete().where(
            sa.or_(identity_links.c.user_id.in_(ids), identity_links.c.anonymous_id.in_(ids))
        )
    )
    conn.execute(activations.delete().where(activations.c.user_id.in_(ids)))
    shown = sa.select(impressions.c.recommendation_id).where(impressions.c.visitor.in_(ids))
    conn.execute(attributions.delete().where(attributions.c.recommendation_id.in_(shown)))
    conn.execute(impressions.delete().where(impressions.c.visitor.in_(ids)))
    if dead:
        conn.execute(dead_letters.delete().where(dead_letters.c.id.in_(list(dead))))
    if record_for_personalize:
        from .deletions import record_deletions

        record_deletions(tx, ids)
