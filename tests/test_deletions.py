"""Deletion requests reach Amazon Personalize: data deletion jobs.

Real parts: boto3's ``s3`` client against moto in server mode on loopback (an S3-protocol
server), boto3's ``personalize`` client against ``tests/fake_personalize_control`` (the
JSON 1.1 control-plane protocol), found through AWS_ENDPOINT_URL_S3 and
AWS_ENDPOINT_URL_PERSONALIZE; deletions arrive as Segment ``delete`` messages on the
webhook; the cycle runs through ``flask --app webhook deletions --run`` or the background
thread.
"""

from __future__ import annotations

import csv
import io
import time
from datetime import UTC

import boto3
import pytest
import requests
import sqlalchemy as sa

from tests.conftest import aws_stand_ins, store_of
from tests.conftest import health as health_of
from tests.deliveries import deliver, product_viewed
from tests.fake_personalize import FakePersonalizeEvents
from tests.fake_personalize_control import FakePersonalizeControl
from tests.waiting import wait_until
from webhook.deletions import personalize_deletions
from webhook.storage.schema import interactions

BUCKET = "shop-deletions"
GROUP = "arn:aws:personalize:us-east-1:123456789012:dataset-group/shop"
ROLE = "arn:aws:iam::123456789012:role/PersonalizeS3Read"
TRACKING_ID = "tracking-shop"


@pytest.fixture
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    # moto keeps its state per process: start every test from an empty S3.
    requests.post(f"{url}/moto-api/reset", timeout=10).raise_for_status()
    yield url
    server.stop()


@pytest.fixture
def s3(s3_server):
    client = boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="example-secret",
    )
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
def aws(monkeypatch, s3_server, s3):
    """The stand-ins, and boto3 pointed at them (set before the app makes its clients)."""
    with (
        FakePersonalizeControl(s3=s3) as control,
        FakePersonalizeEvents(tracking_ids=[TRACKING_ID]) as events,
    ):
        aws_stand_ins(
            monkeypatch, s3=s3_server, personalize=control.url, personalize_events=events.url
        )
        yield control, events


@pytest.fixture
def personalize_app(make_app, aws, database_url):
    def factory(**settings):
        values = dict(
            database_url=database_url,
            personalize_tracking_id=TRACKING_ID,
            aws_region="us-east-1",
            personalize_dataset_group_arn=GROUP,
            personalize_deletion_role_arn=ROLE,
            personalize_deletion_s3_uri=f"s3://{BUCKET}/segment/deletions/",
        )
        values.update(settings)
        return make_app(**values)

    return factory


def delete(user_id: str) -> dict:
    import uuid

    return {
        "type": "delete",
        "userId": user_id,
        "messageId": f"del-{uuid.uuid4().hex}",
        "timestamp": "2026-11-27T12:00:00Z",
    }


def run(app) -> str:
    result = app.test_cli_runner().invoke(args=["deletions", "--run"])
    assert result.exit_code == 0, result.output
    return result.output


def csv_objects(s3) -> dict[str, list[str]]:
    """{key: user ids} of every CSV under the prefix."""
    found = {}
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix="segment/deletions/")
    for entry in listing.get("Contents", []):
        body = s3.get_object(Bucket=BUCKET, Key=entry["Key"])["Body"].read().decode()
        rows = list(csv.reader(io.StringIO(body)))
        assert rows[0] == ["USER_ID"], rows[:2]
        found[entry["Key"]] = [row[0] for row in rows[1:]]
    return found


def waiting(app) -> list[tuple[str, str | None]]:
    with store_of(app).read() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                sa.select(
                    personalize_deletions.c.user_id, personalize_deletions.c.batch_id
                ).order_by(personalize_deletions.c.user_id)
            )
        ]


def test_one_delete_makes_one_csv_in_s3_and_one_job(personalize_app, aws, s3):
    control, _ = aws
    app = personalize_app()
    client = app.test_client()
    deliver(
        client,
        product_viewed("sku-1", user_id="u-gone", anonymous_id=None),
        product_viewed("sku-2", user_id="u-stays", anonymous_id=None),
    )
    deliver(client, delete("u-gone"))

    # The local forgetting stays as it is: at once.
    with store_of(app).read() as conn:
        users = {r[0] for r in conn.execute(sa.select(interactions.c.user_id))}
    assert users == {"u-stays"}
    assert waiting(app) == [("u-gone", None)]
    listed = app.test_cli_runner().invoke(args=["deletions"]).output
    assert "pending: 1 user(s)" in listed

    output = run(app)
    assert "submitted 1" in output
    objects = csv_objects(s3)
    assert list(objects.values()) == [["u-gone"]]
    (job,) = control.jobs()
    (key,) = objects
    assert job["dataSource"]["dataLocation"] == f"s3://{BUCKET}/{key}"
    assert job["datasetGroupArn"] == GROUP and job["roleArn"] == ROLE
    assert control.users_of(job["dataDeletionJobArn"]) == ["u-gone"]
    assert "running: 1 batch(es)" in output

    # Followed with DescribeDataDeletionJob until it completes; then the list forgets.
    run(app)
    output = run(app)
    assert "done 1" in output and "done: 1 batch(es)" in output
    assert waiting(app) == []
    assert [op for op, _ in control.calls].count("CreateDataDeletionJob") == 1
    # The job read it: the CSV, which names the deleted person, is gone from S3.
    assert csv_objects(s3) == {}


def test_a_failed_job_is_retried_and_nobody_is_dropped(personalize_app, aws, s3):
    control, _ = aws
    app = personalize_app()
    client = app.test_client()
    control.fail_next_jobs(1, reason="Access denied to the input file")
    deliver(client, delete("u-1"), delete("u-2"))
    run(app)  # job 1 created
    run(app)  # IN_PROGRESS
    deliver(client, delete("u-3"))  # arrives meanwhile
    output = run(app)  # FAILED: u-1, u-2 back in the list; job 2 with all three
    assert "failed 1" in output and "submitted 1" in output
    first, second = sorted(control.jobs(), key=lambda j: j["creationDateTime"])
    assert first["status"] == "FAILED"
    assert sorted(control.users_of(first["dataDeletionJobArn"])) == ["u-1", "u-2"]
    assert sorted(control.users_of(second["dataDeletionJobArn"])) == ["u-1", "u-2", "u-3"]
    assert "failed (users retried): 1 batch(es)" in output
    assert all(batch for _, batch in waiting(app))  # everyone is in the running job
    run(app)
    run(app)
    assert [j["status"] for j in sorted(control.jobs(), key=lambda j: j["creationDateTime"])] == [
        "FAILED",
        "COMPLETED",
    ]
    assert waiting(app) == []
    assert csv_objects(s3) == {}  # both CSVs removed once their jobs ended


def test_an_upload_that_fails_is_tried_again(personalize_app, aws, s3):
    control, _ = aws
    app = personalize_app(personalize_deletion_s3_uri="s3://not-there-yet/deletions/")
    deliver(app.test_client(), delete("u-9"))
    output = run(app)
    assert "submitted 0" in output and control.jobs() == []
    assert "not submitted: NoSuchBucket" in output  # the listing says why
    s3.create_bucket(Bucket="not-there-yet")
    assert "submitted 1" in run(app)
    (job,) = control.jobs()
    assert control.users_of(job["dataDeletionJobArn"]) == ["u-9"]


def test_the_same_user_deleted_twice_is_sent_once(personalize_app, aws, s3):
    app = personalize_app()
    deliver(app.test_client(), delete("u-1"), delete("u-1"))
    run(app)
    assert list(csv_objects(s3).values()) == [["u-1"]]


def test_the_background_loop_sends_them_every_interval(personalize_app, aws, s3):
    control, _ = aws
    app = personalize_app(personalize_deletion_interval_seconds=0.2)
    sync = app.extensions["segment"].deletions
    deliver(app.test_client(), delete("u-bg"))
    sync.start()  # what the worker does
    try:
        wait_until(
            lambda: any(j["status"] == "COMPLETED" for j in control.jobs()),
            15,
            "a completed data deletion job",
        )
    finally:
        sync.stop()
    (job,) = control.jobs()
    assert job["status"] == "COMPLETED"
    assert control.users_of(job["dataDeletionJobArn"]) == ["u-bg"]


def test_embedded_mode_forgets_locally_and_keeps_no_list(make_app, database_url):
    app = make_app(database_url=database_url)
    deliver(
        app.test_client(), product_viewed("sku-1", user_id="u-1", anonymous_id=None), delete("u-1")
    )
    with store_of(app).read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(interactions)).scalar() == 0
        assert (
            conn.execute(sa.select(sa.func.count()).select_from(personalize_deletions)).scalar()
            == 0
        )
    result = app.test_cli_runner().invoke(args=["deletions"])
    assert result.exit_code != 0 and "not in Personalize mode" in result.output


def test_without_the_deletion_settings_users_wait_and_the_service_warns(make_app, aws):
    app = make_app(personalize_tracking_id=TRACKING_ID, aws_region="us-east-1")
    deliver(app.test_client(), delete("u-5"))
    assert waiting(app) == [("u-5", None)]
    health = health_of(app)
    assert any("PERSONALIZE_DELETION_S3_URI" in w for w in health["warnings"])
    output = app.test_cli_runner().invoke(args=["deletions"]).output
    assert "pending: 1 user(s)" in output and "no job is created" in output


# --- a deletion deletes: every table and file, and no way back -------------------------------


def now_delete(**who) -> dict:
    """A deletion request as Segment sends it now (the person's id(s), no messageId)."""
    from datetime import datetime

    return {"type": "delete", "timestamp": datetime.now(UTC).isoformat(), **who}


def traces(app, needles: tuple[str, ...]) -> list[str]:
    """Where any of ``needles`` appears in any column of any table of the store (and of
    the inbox's own file on SQLite), read with plain SQL: "table.column: value"."""
    store = store_of(app)
    found = []
    for each in store.stores:
        with each.engine.connect() as conn:
            for table in sa.inspect(conn).get_table_names():
                for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')).mappings():
                    for column, value in row.items():
                        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                        if any(needle in text for needle in needles):
                            found.append(f"{table}.{column}: {text[:120]}")
    return found


def raw_file_traces(app, needles: tuple[str, ...]) -> list[str]:
    """SQLite: the needles in the database files' bytes themselves, after every WAL was
    copied back and truncated (deleted rows must not linger in free space)."""
    found = []
    for each in store_of(app).stores:
        with each.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        path = each.engine.url.database
        for suffix in ("", "-wal"):
            try:
                data = open(path + suffix, "rb").read()
            except FileNotFoundError:
                continue
            found += [f"{path}{suffix}: {needle}" for needle in needles if needle.encode() in data]
    return found


JANE = ("jane-7", "jane-anon-7", "jane-old-7", "jane.doe@example.org")


def test_a_deletion_leaves_nothing_of_the_person_anywhere(personalize_app, aws, s3):
    """Jane: a userId, an anonymous id linked to it, a previous userId aliased to it, an
    email in her traits, interactions under each, answers shown to her (impressions) and
    a click on one (an attribution), a write-back, a record Personalize refused (a dead
    letter). After her deletion no table, no inbox body and, on SQLite, no byte of the
    files holds any of it; Bob, beside her, keeps everything. The data deletion job names
    every id of hers, and its CSV is gone from S3 once it completed."""
    from tests.deliveries import identify, order_completed

    control, events = aws
    app = personalize_app(insights_retention_days=90.0, attribution_hold_seconds=0.0)
    client = app.test_client()
    events.reject_event_ids(["jane-refused"])
    refused = product_viewed("sku-9", user_id="jane-7", anonymous_id=None)
    refused["messageId"] = "jane-refused"
    deliver(
        client,
        identify(
            "jane-7", {"email": "jane.doe@example.org", "plan": "pro"}, anonymous_id="jane-anon-7"
        ),
        {
            "type": "alias",
            "previousId": "jane-old-7",
            "userId": "jane-7",
            "messageId": "alias-jane",
            "timestamp": now_delete()["timestamp"],
        },
        product_viewed("sku-1", anonymous_id="jane-anon-7"),
        product_viewed("sku-2", user_id="jane-old-7", anonymous_id=None),
        order_completed(["sku-3"], user_id="jane-7"),
        refused,
        identify("bob", {"email": "bob@example.org"}),
        product_viewed("sku-1", user_id="bob", anonymous_id=None),
    )
    answer = client.get("/recommendations?userId=jane-7&numResults=3").get_json()
    client.get("/recommendations?anonymousId=jane-anon-7&numResults=3")
    click = product_viewed(
        answer["itemList"][0]["itemId"],
        user_id="jane-7",
        anonymous_id=None,
        recommendation_id=answer["recommendationId"],
    )
    click["event"] = "Product Clicked"
    deliver(client, click)
    app.extensions["segment"].activation.wait_idle(10)
    before = traces(app, JANE)
    for place in (
        "interactions",
        "profiles",
        "identity_links",
        "impressions",
        "dead_letters",
        "inbox",
    ):
        assert any(t.startswith(place + ".") for t in before), (place, before)
    with store_of(app).read() as conn:  # her click, linked to her through the answer
        assert (
            conn.execute(
                sa.text("SELECT count(*) FROM attributions WHERE recommendation_id = :r"),
                {"r": answer["recommendationId"]},
            ).scalar()
            == 1
        )

    if store_of(app).dialect == "sqlite":
        assert raw_file_traces(app, JANE)  # the file scan finds her while she is there
    deliver(client, now_delete(userId="jane-7"))

    # The job's list is the one place her ids stay, until the job completed.
    assert sorted(user for user, _ in waiting(app)) == ["jane-7", "jane-anon-7", "jane-old-7"]
    for _ in range(3):
        run(app)
    (job,) = control.jobs()
    assert job["status"] == "COMPLETED"
    assert sorted(control.users_of(job["dataDeletionJobArn"])) == [
        "jane-7",
        "jane-anon-7",
        "jane-old-7",
    ]
    assert csv_objects(s3) == {}
    assert traces(app, JANE) == []
    if store_of(app).dialect == "sqlite":
        assert raw_file_traces(app, JANE) == []
    assert traces(app, ("bob@example.org",))  # the positive control
    with store_of(app).read() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM attributions")).scalar() == 0
    with store_of(app).read() as conn:
        assert {r[0] for r in conn.execute(sa.select(interactions.c.user_id))} == {"bob"}


def test_an_older_message_arriving_late_does_not_bring_the_person_back(make_app):
    """A redelivery, a Replay, an import: a message sent before the deletion is skipped
    ("deleted"); one sent after it is taken (the person may come back)."""
    from datetime import datetime, timedelta

    app = make_app()
    client = app.test_client()
    old = product_viewed("sku-1", user_id="gone-1", anonymous_id="gone-anon")
    deliver(client, old)
    deliver(client, now_delete(userId="gone-1"))
    late = dict(old, messageId="late-copy")  # its claim pruned long ago: a new messageId
    answer = deliver(client, late)
    assert answer["accepted"] == 0
    assert answer["skipped"] == [{"index": 0, "messageId": "late-copy", "reason": "deleted"}]
    by_anonymous = product_viewed("sku-1", anonymous_id="gone-anon")
    by_anonymous["timestamp"] = old["timestamp"]
    assert deliver(client, by_anonymous)["skipped"][0]["reason"] == "deleted"
    newer = product_viewed("sku-2", user_id="gone-1", anonymous_id=None)
    newer["timestamp"] = (datetime.now(UTC) + timedelta(seconds=5)).isoformat()
    assert deliver(client, newer)["accepted"] == 1
    with store_of(app).read() as conn:
        assert [
            tuple(r)
            for r in conn.execute(sa.select(interactions.c.user_id, interactions.c.item_id))
        ] == [("gone-1", "sku-2")]


def test_a_delete_without_message_id_is_applied_once(make_app):
    """Replaying the same deletion request must not wipe what the person did after
    coming back."""
    from datetime import datetime, timedelta

    app = make_app()
    client = app.test_client()
    deliver(client, product_viewed("sku-1", user_id="back-1", anonymous_id=None))
    request = now_delete(userId="back-1")
    assert deliver(client, request)["accepted"] == 1
    newer = product_viewed("sku-2", user_id="back-1", anonymous_id=None)
    newer["timestamp"] = (datetime.now(UTC) + timedelta(seconds=5)).isoformat()
    deliver(client, newer)
    again = deliver(client, request)
    assert (again["accepted"], again["duplicates"]) == (0, 1)
    with store_of(app).read() as conn:
        assert [r[0] for r in conn.execute(sa.select(interactions.c.item_id))] == ["sku-2"]


def test_an_anonymous_only_delete_forgets_that_anonymous_id(make_app):
    from tests.deliveries import identify

    app = make_app()
    client = app.test_client()
    deliver(
        client,
        identify("kept-user", {"plan": "pro"}, anonymous_id="linked-anon"),
        product_viewed("sku-1", anonymous_id="lone-anon"),
        product_viewed("sku-2", anonymous_id="linked-anon"),
        product_viewed("sku-3", user_id="kept-user", anonymous_id=None),
    )
    answer = deliver(client, now_delete(anonymousId="lone-anon"))
    assert answer["accepted"] == 1  # no longer a 400 that Segment drops
    deliver(client, now_delete(anonymousId="linked-anon"))
    with store_of(app).read() as conn:
        rows = {
            tuple(r)
            for r in conn.execute(sa.select(interactions.c.user_id, interactions.c.anonymous_id))
        }
    assert rows == {("kept-user", None)}
    assert traces(app, ("lone-anon", "linked-anon")) == []
    assert traces(app, ("kept-user",))


def test_retention_never_prunes_a_delete_not_applied_yet(make_app):
    from tests.conftest import raw_client

    app = make_app(message_retention_hours=1.0)
    client = raw_client(app)  # nothing applied
    deliver(
        client, now_delete(userId="late-1"), product_viewed("sku-1", anonymous_id="later")
    )  # the newest row is kept anyway
    services = app.extensions["segment"]
    pruned = services.retention.run_once(now=time.time() + 7200)
    assert pruned["inbox"] == 0
    services.drain()
    assert services.retention.run_once(now=time.time() + 7200)["inbox"] == 1


def test_dead_letter_retry_and_queued_write_backs_skip_a_deleted_person(personalize_app, aws):
    """What was in flight when the deletion came (another process's dead letter, a
    write-back waiting in the queue) is never sent for the deleted person."""
    import threading

    from webhook.deadletters import DeadLetters
    from webhook.inbox import Entry

    control, events = aws
    app = personalize_app()
    services = app.extensions["segment"]
    client = app.test_client()
    message = product_viewed("sku-1", user_id="flight-1", anonymous_id=None)
    deliver(client, message)

    # A write-back offered, then held in the queue behind other work, while the deletion
    # is applied.
    gate = threading.Event()
    services.activation.later(gate.wait, 10)
    services.activation.offer("flight-1", ["sku-7"])
    deliver(client, now_delete(userId="flight-1"))
    gate.set()
    assert services.activation.wait_idle(10)
    with store_of(app).read() as conn:
        from webhook.storage.schema import profiles

        assert conn.execute(sa.select(profiles.c.profile_id)).all() == []

    # A dead letter of hers, added by an applier that had the message in flight.
    import json

    with store_of(app).write() as tx:
        DeadLetters(store_of(app)).add(
            tx,
            "personalize",
            [
                (
                    "event",
                    message["messageId"],
                    Entry(0, 0, message["messageId"], "track", 0.0, json.dumps(message)),
                    "refused",
                )
            ],
        )
    sent_before = len(events.events())
    result = app.test_cli_runner().invoke(args=["dead-letters", "retry", "--all"])
    assert result.exit_code == 0, result.output
    assert "deleted" in result.output
    assert len(events.events()) == sent_before
    assert services.dead_letters.count() == 0
