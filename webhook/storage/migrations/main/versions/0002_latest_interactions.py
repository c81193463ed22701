"""A visitor's latest interactions read by an index range: (user_id, timestamp) and
(anonymous_id, timestamp) replace the single-column indexes on user_id and anonymous_id
(every lookup by either id is served by the new ones' first column; an insert keeps
maintaining two indexes, not four). The engine's history and the purchases an answer
excludes read them (identity.latest_interactions).

On PostgreSQL, building them locks the interactions table against writes for as long as
it takes; deliveries wait in the inbox meanwhile."""

from alembic import op

revision = "0002_latest_interactions"
down_revision = "0001_release"


def upgrade() -> None:
    op.create_index(
        "interactions_user_time", "interactions", ["user_id", "timestamp"], if_not_exists=True
    )
    op.create_index(
        "interactions_anonymous_time",
        "interactions",
        ["anonymous_id", "timestamp"],
        if_not_exists=True,
    )
    op.drop_index("ix_interactions_user_id", table_name="interactions", if_exists=True)
    op.drop_index("ix_interactions_anonymous_id", table_name="interactions", if_exists=True)
