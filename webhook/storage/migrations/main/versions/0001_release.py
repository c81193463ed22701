"""The schema of the release before this history began (a snapshot: migrations never
import the live models). A database that release made already has these tables and is
only marked; an empty one gets them. On PostgreSQL the inbox's tables come from the inbox
history."""

import sqlalchemy as sa
from alembic import op

revision = "0001_release"
down_revision = None

metadata = sa.MetaData()

ID = sa.String(256)

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
    sa.Column("user_id", ID, index=True),
    sa.Column("anonymous_id", ID, index=True),
    sa.Column("item_id", ID, nullable=False),  # no index: reads by item scan anyway
    sa.Column("event_type", sa.String(256), nullable=False),
    sa.Column("timestamp", sa.Float, nullable=False, index=True),  # retention, popularity
    sa.Column("properties", sa.JSON, nullable=False),
)

items = sa.Table(
    "items",
    metadata,
    sa.Column("item_id", ID, primary_key=True),
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

personalize_deletions = sa.Table(
    "personalize_deletions",
    metadata,
    sa.Column("user_id", ID, primary_key=True),
    sa.Column("requested_at", sa.Float, nullable=False),
    sa.Column("batch_id", sa.String(64), index=True),
)

personalize_deletion_batches = sa.Table(
    "personalize_deletion_batches",
    metadata,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("users", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("data_location", sa.Text),
    sa.Column("job_arn", sa.Text),
    sa.Column("detail", sa.Text),
)

service_hosts = sa.Table(
    "service_hosts",
    metadata,
    sa.Column("host_id", sa.String(256), primary_key=True),
    sa.Column("seen_at", sa.Float, nullable=False),
)

engine_models = sa.Table(
    "engine_models",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("interactions", sa.Integer, nullable=False),
    sa.Column("stats", sa.Text, nullable=False),
    sa.Column("blob", sa.LargeBinary, nullable=False),
)

engine_leases = sa.Table(
    "engine_leases",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(256), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)


def upgrade() -> None:
    metadata.create_all(op.get_bind(), checkfirst=True)
    bind = op.get_bind()
    for table in metadata.sorted_tables:  # indexes a table made by an older version lacks
        for index in table.indexes:
            index.create(bind, checkfirst=True)
