"""Upgrading from the release: a database the release made, with deliveries it applied and
one it acknowledged but had not applied yet, is brought up to date when this version
starts (storage/migrate.py, the Alembic histories): nothing is lost, the pending delivery
is applied, and the schema is exactly the one this version declares.

The release is the last commit before the Alembic histories (``RELEASE``); its code is
taken from git and run in a child process of its own, as an operator's old dyno would.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from tests.conftest import applied
from webhook.storage import migrate
from webhook.storage.schema import INBOX_TABLES, interactions, metadata, profiles

ROOT = Path(__file__).resolve().parents[1]
RELEASE = "39c7c50e578eda464c88a24bd726412d0ff8077e"

# Run by the release's code: three deliveries applied, a fourth acknowledged and left in
# the inbox (the process ends before its appliers run).
RELEASE_SCRIPT = r"""
import json, sys, time
from datetime import datetime, timezone
from webhook import create_app

url = sys.argv[1]
now = datetime.now(timezone.utc).isoformat()

def message(n, kind, **fields):
    return {"type": kind, "messageId": f"release-{n}", "timestamp": now, **fields}

app = create_app({"database_url": url, "engine_background_training": False})
client = app.test_client()
services = app.extensions["segment"]
applied = [
    message(1, "identify", userId="u-old", anonymousId="a-old",
            traits={"plan": "gold", "recommendations_opt_out": False}),
    message(2, "track", userId="u-old", event="Product Viewed",
            properties={"product_id": "sku-1", "name": "Mug", "price": 9.5}),
    message(3, "track", userId="u-old", event="Order Completed",
            properties={"products": [{"product_id": "sku-2", "name": "Cup"}]}),
]
for body in applied:
    assert client.post("/segment", json=body).status_code == 200
assert services.drain(timeout=30)
pending = message(4, "track", anonymousId="a-old", event="Product Viewed",
                  properties={"product_id": "sku-3", "name": "Plate"})
assert client.post("/segment", json=pending).status_code == 200
services.store.dispose()
print("release done")
"""


@pytest.fixture(scope="module")
def release_code(tmp_path_factory) -> Path:
    """The release's ``webhook`` package, from git (CI's clone has the history)."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", RELEASE, "webhook"], cwd=ROOT, capture_output=True
    )
    assert archive.returncode == 0, (
        f"git cannot give the release {RELEASE[:7]} (a shallow clone?): "
        f"{archive.stderr.decode(errors='replace')}"
    )
    folder = tmp_path_factory.mktemp("release")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def run_release(release_code: Path, url: str, instance: Path) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATABASE_", "SEGMENT_", "PERSONALIZE_", "PROMETHEUS_"))
    }
    env.update(PYTHONPATH=str(release_code), HOME=str(instance))
    done = subprocess.run(
        [sys.executable, "-c", RELEASE_SCRIPT, url],
        cwd=instance,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "release done" in done.stdout, done.stdout + done.stderr


def schema_differences(parts) -> list:
    """What Alembic's autogenerate would change to make the database match this version's
    tables (each store: on SQLite the inbox's tables are in a file of their own)."""
    store = parts.store
    inbox_names = {table.name for table in INBOX_TABLES}
    every = {table.name for table in metadata.sorted_tables}
    groups = (
        [(store.inbox_store, inbox_names), (store, every - inbox_names)]
        if store.inbox_store is not store
        else [(store, every)]
    )
    differences = []
    for target, names in groups:
        with target.engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "compare_type": True,
                    "include_name": lambda name, kind, _: (
                        not (kind == "table" and name in migrate.HISTORIES.values())
                    ),
                    "include_object": _included(names, conn.dialect.name),
                },
            )
            differences += compare_metadata(context, metadata)
    return differences


def _included(names: set[str], dialect: str):
    """This store's tables, and not what this version creates on the other database only
    (an index's ``ddl_if``)."""

    def include(obj, name, kind, reflected, compare_to) -> bool:
        table = name if kind == "table" else getattr(getattr(obj, "table", None), "name", None)
        if table is not None and table not in names:
            return False
        condition = getattr(obj, "_ddl_if", None)
        return condition is None or condition.dialect in (None, dialect)

    return include


def test_a_release_database_is_upgraded_with_nothing_lost(
    release_code, database_url, tmp_path, make_app
):
    run_release(release_code, database_url, tmp_path)

    app = make_app(database_url=database_url, max_message_age_hours=0, interaction_retention_days=0)
    parts = app.extensions["segment"]
    assert migrate.current(parts.store) == migrate.heads()
    differences = schema_differences(parts)
    assert differences == [], "\n".join(map(str, differences))

    applied(app)  # the delivery the release acknowledged but never applied
    with parts.store.read() as conn:
        stored = conn.execute(sa.select(interactions.c.item_id)).scalars().all()
        traits = conn.execute(
            sa.select(profiles.c.traits).where(profiles.c.profile_id == "u-old")
        ).scalar()
    assert sorted(stored) == ["sku-1", "sku-2", "sku-3"]
    assert (traits if isinstance(traits, dict) else json.loads(traits))["plan"] == "gold"

    # And the service works on it: the old purchase is excluded, the pending view counts
    # for the user it was linked to.
    client = app.test_client()
    answer = client.get("/recommendations?userId=u-old").get_json()
    assert "sku-2" not in [entry["itemId"] for entry in answer["itemList"]]
    assert answer["itemList"], answer

    # Starting again changes nothing (the heads are already there).
    again = make_app(database_url=database_url)
    assert migrate.current(again.extensions["segment"].store) == migrate.heads()


def test_a_new_database_has_exactly_the_declared_schema(make_app, database_url):
    parts = make_app(database_url=database_url).extensions["segment"]
    assert migrate.current(parts.store) == migrate.heads()
    differences = schema_differences(parts)
    assert differences == [], "\n".join(map(str, differences))
