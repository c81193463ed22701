"""Tombstones (a deleted person's ids, as keyed hashes, with the deletion's time) and the
service's own random keys (the tombstones' HMAC key): tombstones.py."""

import sqlalchemy as sa
from alembic import op

revision = "0002_tombstones"
down_revision = "0001_release"


def upgrade() -> None:
    op.create_table(
        "tombstones",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("id_hash", sa.String(64), nullable=False),
        sa.Column("deleted_at", sa.Float, nullable=False),
        sa.UniqueConstraint("id_hash", "deleted_at", name="tombstones_once"),
    )
    op.create_table(
        "service_keys",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
