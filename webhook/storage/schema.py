"""Every table the service keeps, in one MetaData (migrations: ``storage/migrations``).

The inbox's tables (``INBOX_TABLES``) live, on SQLite, in a file of their own beside the
database (``storage.database.Store``); everything else in the database.
"""

from __future__ import annotations

import sqlalchemy as sa

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

# Deleted people's ids, as keyed hashes, with the time of their deletion (tombstones.py):
# a later message for one of them, older than the deletion, is skipped. Kept with the
# inbox (on SQLite its file), so a delete's tombstone commits with its claim.
tombstones = sa.Table(
    "tombstones",
    metadata,
    sa.Column(
        "seq",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("id_hash", sa.String(64), nullable=False),
    sa.Column("deleted_at", sa.Float, nullable=False),
    sa.UniqueConstraint("id_hash", "deleted_at", name="tombstones_once"),  # a replay adds none
)

# Random keys the service makes for itself, once (the tombstones' HMAC key).
service_keys = sa.Table(
    "service_keys",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# The tables that live with the inbox (on SQLite, in the inbox's own file).
INBOX_TABLES = (inbox, tombstones, service_keys)

# Each applier's position in the inbox and its lease (who applies, until when, what).
inbox_consumers = sa.Table(
    "inbox_consumers",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("position_txid", sa.BigInteger, nullable=False, default=0),
    sa.Column("position_seq", sa.BigInteger, nullable=False, default=0),
    sa.Column("applied", sa.BigInteger, nullable=False, default=0),  # rows, ever
    sa.Column("owner", sa.String(160)),  # host:pid:token of the process applying, if any
    sa.Column("lease_until", sa.Float),
    sa.Column("batch_from_seq", sa.BigInteger),  # the batch in flight, while one is
    sa.Column("batch_to_seq", sa.BigInteger),
    sa.Column("batch_size", sa.Integer),
    sa.Column("batch_started", sa.Float),
    sa.Column("updated_at", sa.Float, nullable=False, default=0.0),
)

# Records an applier's destination refused for good (Personalize: InvalidInputException),
# with the message they came from, so they can be retried after a mapping change.
dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("applier", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # event, user, item
    sa.Column("record_id", sa.String(512), nullable=False),
    sa.Column("message_id", ID),
    sa.Column("body", sa.Text, nullable=False),  # the message's canonical JSON
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("failed_at", sa.Float, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=1),
)

interactions = sa.Table(
    "interactions",
    metadata,
    sa.Column("event_id", ID, primary_key=True),
    sa.Column("message_id", ID, nullable=False),
    sa.Column("user_id", ID),
    sa.Column("anonymous_id", ID),
    sa.Column("item_id", ID, nullable=False),  # no index: reads by item scan anyway
    sa.Column("event_type", sa.String(256), nullable=False),
    sa.Column("timestamp", sa.Float, nullable=False, index=True),  # retention, popularity
    sa.Column("properties", sa.JSON, nullable=False),
    # A person's latest interactions, newest first, by an index range
    # (identity.latest_interactions); lookups by either id use the first column.
    sa.Index("interactions_user_time", "user_id", "timestamp"),
    sa.Index("interactions_anonymous_time", "anonymous_id", "timestamp"),
)

items = sa.Table(
    "items",
    metadata,
    sa.Column("item_id", ID, primary_key=True),
    # The catalog fields (Segment e-commerce spec names; routing.ITEM_FIELDS).
    sa.Column("name", sa.Text),
    sa.Column("price", sa.Float),
    sa.Column("category", sa.Text),
    sa.Column("brand", sa.Text),
    sa.Column("url", sa.Text),
    sa.Column("image_url", sa.Text),
    sa.Column("updated_at", sa.Float, nullable=False),  # time of the newest message applied
)

profiles = sa.Table(
    "profiles",
    metadata,
    sa.Column("profile_id", ID, primary_key=True),  # userId, or anonymousId when anonymous
    sa.Column("traits", sa.JSON, nullable=False),
    sa.Column("traits_at", sa.Float, nullable=False),  # time of the newest identify applied
)

identity_links = sa.Table(
    "identity_links",
    metadata,
    sa.Column("anonymous_id", ID, primary_key=True),
    sa.Column("user_id", ID, nullable=False, index=True),
)


activations = sa.Table(
    "activations",
    metadata,
    sa.Column("user_id", ID, primary_key=True),
    sa.Column("digest", sa.String(64), nullable=False),  # of the list last published
    sa.Column("published_at", sa.Float, nullable=False),
)


# Every answer of GET /recommendations and POST /recommendations/rank, recorded off the
# request path (impressions.py): who saw which items, from which variant and source.
impressions = sa.Table(
    "impressions",
    metadata,
    sa.Column("recommendation_id", sa.String(64), primary_key=True),
    sa.Column("visitor", ID, nullable=False),  # the userId, else the anonymousId asked for
    sa.Column("variant", sa.String(300), nullable=False),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # recommend, rank
    sa.Column("items", sa.JSON, nullable=False),  # the item ids shown, in order
    sa.Column("shown_at", sa.Float, nullable=False, index=True),
)
sa.Index("impressions_visitor", impressions.c.visitor, impressions.c.shown_at)

# What Segment events tell about those answers (appliers/attribution.py): a click on a
# recommended item, an add-to-cart or an order of one. One row per event and kind, so a
# redelivered event counts once.
attributions = sa.Table(
    "attributions",
    metadata,
    sa.Column("event_id", ID, primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),  # click, add, order
    sa.Column("message_id", ID, nullable=False),  # an order of several products: one
    sa.Column("recommendation_id", sa.String(64), nullable=False),
    sa.Column("variant", sa.String(300), nullable=False),
    sa.Column("item_id", ID, nullable=False),
    sa.Column("revenue", sa.Float, nullable=False, default=0.0),
    sa.Column("at", sa.Float, nullable=False, index=True),  # the event's time
)

# Deleted people awaiting Amazon Personalize's next data deletion job (deletions.py): a
# person's ids live here until their job completed.
personalize_deletions = sa.Table(
    "personalize_deletions",
    metadata,
    sa.Column("user_id", ID, primary_key=True),
    sa.Column("requested_at", sa.Float, nullable=False),
    sa.Column("batch_id", sa.String(64), index=True),  # NULL: waiting for the next batch
)

personalize_deletion_batches = sa.Table(
    "personalize_deletion_batches",
    metadata,
    sa.Column("batch_id", sa.String(64), primary_key=True),  # also the job's name
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("users", sa.Integer, nullable=False),
    # new (not submitted yet), running, done, failed (its users were put back)
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("data_location", sa.Text),
    sa.Column("job_arn", sa.Text),
    sa.Column("detail", sa.Text),  # Personalize's status or failure reason, or our error
)

# Hosts using the Profile API, with a heartbeat: the budget's share (budget.py).
service_hosts = sa.Table(
    "service_hosts",
    metadata,
    sa.Column("host_id", sa.String(256), primary_key=True),
    sa.Column("seen_at", sa.Float, nullable=False),
)

# The local engine's models (engine/persistence.py): the latest versions, as blobs.
engine_models = sa.Table(
    "engine_models",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("interactions", sa.Integer, nullable=False),  # rows in the store when trained
    sa.Column("stats", sa.Text, nullable=False),  # JSON: sizes, timings
    sa.Column("blob", sa.LargeBinary, nullable=False),
)

# Named leases (storage/leases.py): who trains the engine, whose turn it is to run the
# data deletion jobs. (The inbox's appliers keep theirs with their positions.)
leases = sa.Table(
    "engine_leases",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(256), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)
