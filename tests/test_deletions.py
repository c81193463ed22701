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

import boto3
import pytest
import requests
import sqlalchemy as sa

from tests.conftest import aws_stand_ins, store_of
from tests.conftest import health as health_of
from tests.fake_personalize import FakePersonalizeEvents
from tests.fake_personalize_control import FakePersonalizeControl
from tests.fake_segment_apis import deliver, product_viewed
from webhook.deletions import personalize_deletions
from webhook.store import interactions


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
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                          aws_access_key_id="AKIDEXAMPLE",
                          aws_secret_access_key="example-secret")
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
def aws(monkeypatch, s3_server, s3):
    """The stand-ins, and boto3 pointed at them (set before the app makes its clients)."""
    with FakePersonalizeControl(s3=s3) as control, FakePersonalizeEvents() as events:
        aws_stand_ins(monkeypatch, s3=s3_server, personalize=control.url,
                      personalize_events=events.url)
        yield control, events


@pytest.fixture
def personalize_app(make_app, aws, database_url):
    def factory(**settings):
        values = dict(database_url=database_url, personalize_tracking_id=TRACKING_ID,
                      aws_region="us-east-1", personalize_dataset_group_arn=GROUP,
                      personalize_deletion_role_arn=ROLE,
                      personalize_deletion_s3_uri=f"s3://{BUCKET}/segment/deletions/")
        values.update(settings)
        return make_app(**values)
    return factory


def delete(user_id: str) -> dict:
    import uuid
    return {"type": "delete", "userId": user_id, "messageId": f"del-{uuid.uuid4().hex}",
            "timestamp": "2026-11-27T12:00:00Z"}


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
        return [tuple(r) for r in conn.execute(
            sa.select(personalize_deletions.c.user_id, personalize_deletions.c.batch_id)
            .order_by(personalize_deletions.c.user_id))]


def test_one_delete_makes_one_csv_in_s3_and_one_job(personalize_app, aws, s3):
    control, _ = aws
    app = personalize_app()
    client = app.test_client()
    deliver(client, product_viewed("sku-1", user_id="u-gone", anonymous_id=None),
            product_viewed("sku-2", user_id="u-stays", anonymous_id=None))
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
    assert len(csv_objects(s3)) == 1


def test_a_failed_job_is_retried_and_nobody_is_dropped(personalize_app, aws, s3):
    control, _ = aws
    app = personalize_app()
    client = app.test_client()
    control.fail_next_jobs(1, reason="Access denied to the input file")
    deliver(client, delete("u-1"), delete("u-2"))
    run(app)                       # job 1 created
    run(app)                       # IN_PROGRESS
    deliver(client, delete("u-3"))  # arrives meanwhile
    output = run(app)              # FAILED: u-1, u-2 back in the list; job 2 with all three
    assert "failed 1" in output and "submitted 1" in output
    first, second = sorted(control.jobs(), key=lambda j: j["creationDateTime"])
    assert first["status"] == "FAILED"
    assert sorted(control.users_of(first["dataDeletionJobArn"])) == ["u-1", "u-2"]
    assert sorted(control.users_of(second["dataDeletionJobArn"])) == ["u-1", "u-2", "u-3"]
    assert "failed (users retried): 1 batch(es)" in output
    assert all(batch for _, batch in waiting(app))  # everyone is in the running job
    run(app)
    run(app)
    assert [j["status"] for j in sorted(control.jobs(), key=lambda j: j["creationDateTime"])
            ] == ["FAILED", "COMPLETED"]
    assert waiting(app) == []
    assert len(csv_objects(s3)) == 2


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
    sync.start_background()  # what each worker does on its first request under a server
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any(
                j["status"] == "COMPLETED" for j in control.jobs()):
            time.sleep(0.05)
    finally:
        sync.stop_background()
    assert [j["status"] for j in control.jobs()] == ["COMPLETED"]
    assert list(csv_objects(s3).values()) == [["u-bg"]]


def test_embedded_mode_forgets_locally_and_keeps_no_list(make_app, database_url):
    app = make_app(database_url=database_url)
    deliver(app.test_client(), product_viewed("sku-1", user_id="u-1", anonymous_id=None),
            delete("u-1"))
    with store_of(app).read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(interactions)).scalar() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(personalize_deletions)
                            ).scalar() == 0
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
