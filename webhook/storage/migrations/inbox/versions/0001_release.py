"""The inbox as the release before this history began kept it (a snapshot), and what
even older versions kept elsewhere, carried over once:

* claims in ``segment_messages`` (before the inbox) become inbox rows with nothing to
  apply (body NULL), so redeliveries of those messages are still duplicates;
* on SQLite, an inbox kept in the database file (before the inbox had a file of its own)
  is copied into this file, seq (and so every applier's position) kept; the database
  file's copy is dropped once this committed (``storage/migrate.py``).
"""

import sqlalchemy as sa
from alembic import context, op

revision = "0001_release"
down_revision = None

metadata = sa.MetaData()
ID = sa.String(256)

# Every accepted message, in arrival order: the claim of its messageId (a redelivery finds
# it and is a duplicate) and its canonical JSON, which the appliers consume (inbox.py).
# ``txid`` orders rows on PostgreSQL, where concurrent transactions commit out of ``seq``
# order (see inbox.py); SQLite has one writer at a time and leaves it 0.
inbox = sa.Table(
    "inbox",
    metadata,
    sa.Column(
        "seq",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("txid", sa.BigInteger, nullable=False, default=0),
    sa.Column("message_id", ID, unique=True),  # NULL: a delete sent without one
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("body", sa.Text),  # NULL: a claim carried over from before the inbox existed
    # No AUTOINCREMENT (it costs a write to sqlite_sequence a statement): SQLite gives
    # max(seq) + 1, and pruning never deletes the newest row (inbox.py), so a seq is never
    # given twice and never falls behind an applier's position.
)
sa.Index("inbox_order", inbox.c.txid, inbox.c.seq).ddl_if(dialect="postgresql")


CARRY_OVER_CLAIMS = (
    "INSERT INTO {inbox} (txid, message_id, type, received_at, body) "
    "SELECT 0, message_id, type, received_at, NULL FROM {claims} "
    "WHERE message_id NOT IN (SELECT message_id FROM {inbox} WHERE message_id IS NOT NULL)"
)


def upgrade() -> None:
    bind = op.get_bind()
    metadata.create_all(bind, checkfirst=True)
    for index in inbox.indexes:
        index.create(bind, checkfirst=True)
    if context.config.attributes.get("main_file_attached"):
        # SQLite: the database file (attached as main_file) may hold what older versions
        # kept there; its copies are dropped once this has committed (migrate.py).
        present = {
            row[0]
            for row in bind.exec_driver_sql(
                "SELECT name FROM main_file.sqlite_master WHERE type = 'table'"
            )
        }
        if "inbox" in present:
            bind.exec_driver_sql(
                "INSERT OR IGNORE INTO main.inbox (seq, txid, message_id, type, received_at, "
                "body) SELECT seq, txid, message_id, type, received_at, body "
                "FROM main_file.inbox"
            )
        if "segment_messages" in present:
            bind.exec_driver_sql(
                CARRY_OVER_CLAIMS.format(inbox="main.inbox", claims="main_file.segment_messages")
            )
    elif sa.inspect(bind).has_table("segment_messages"):
        bind.execute(sa.text(CARRY_OVER_CLAIMS.format(inbox="inbox", claims="segment_messages")))
        bind.execute(sa.text("DROP TABLE segment_messages"))
