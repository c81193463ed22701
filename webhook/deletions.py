"""Deletion requests reach Amazon Personalize: data deletion jobs for deleted users.

A Segment deletion request (``{"type": "delete", "userId": …}``) is applied to the local
store at once (``forget.py``). In Personalize mode, Personalize must forget the person
too, and it has no real-time call for that: a *data deletion job* reads a CSV of user ids
(one ``USER_ID`` column) from S3. So:

* ``record_deletions(tx, ids)`` adds the person's ids (the userId, and the anonymous ids
  linked to it: Personalize keys an anonymous visitor's events by the sessionId, the
  anonymousId) to ``personalize_deletions`` inside the local store applier's transaction
  that forgot them, so a deletion acknowledged to Segment is never lost;
* every ``PERSONALIZE_DELETION_INTERVAL_SECONDS`` (default an hour), one process of the
  fleet (a lease in the database) runs ``DeletionSync.run_once``:

  1. follows the running jobs with ``DescribeDataDeletionJob``: a completed job's users are
     done (their rows go, the batch row stays for the record); a failed job's users go back
     to the pending list, so the next batch retries them: nobody is dropped; a finished
     job's CSV is removed from S3 (it names deleted people);
  2. puts the pending users into a new batch, uploads ``<batch>.csv`` under
     ``PERSONALIZE_DELETION_S3_URI`` and calls ``CreateDataDeletionJob`` (dataset group,
     role); a batch whose upload or job creation failed is tried again on the next run.

``flask --app webhook deletions`` lists the pending users, and the running, failed and done
batches (``--run`` runs a cycle now). Tables stay bounded: a user's row lives until their
job completes, and only the latest ``KEEP_BATCHES`` batches are kept.
"""

from __future__ import annotations

import csv
import io
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from urllib.parse import urlsplit

import click
import sqlalchemy as sa
from botocore.exceptions import BotoCoreError, ClientError
from flask.cli import with_appcontext

from . import metrics
from .aws import LazyClient
from .background import BackgroundThread
from .storage import Store, insert
from .storage.leases import Lease, holder_name
from .storage.schema import personalize_deletion_batches, personalize_deletions

log = logging.getLogger("webhook.deletions")

KEEP_BATCHES = 1000
LEASE_NAME = "personalize-deletions"
# Statuses of DescribeDataDeletionJob (PENDING > IN_PROGRESS > COMPLETED or FAILED; the SDK
# models also name ACTIVE and CREATE FAILED for the same ends).
DONE_STATUSES = {"COMPLETED", "ACTIVE"}
FAILED_STATUSES = {"FAILED", "CREATE FAILED"}


def record_deletions(tx, user_ids: Iterable[str]) -> int:
    """Remember deleted users for Personalize's next data deletion job, in the caller's
    write transaction (a ``storage.Transaction``). A user already waiting or in a
    running job is not added twice. Returns how many were added."""
    ids = sorted({user_id for user_id in user_ids if user_id})
    if not ids:
        return 0
    now = time.time()
    result = tx.conn.execute(
        insert(tx.dialect, personalize_deletions).on_conflict_do_nothing(
            index_elements=["user_id"]
        ),
        [{"user_id": user_id, "requested_at": now, "batch_id": None} for user_id in ids],
    )
    added = max(0, result.rowcount or 0)
    metrics.PERSONALIZE_DELETIONS.labels(outcome="recorded").inc(added)
    return added


def _bucket_and_prefix(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    prefix = parts.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return parts.netloc, prefix


class DeletionSync(BackgroundThread):
    """Batches of deleted users → S3 → CreateDataDeletionJob, followed to the end; in the
    worker, a thread that takes the fleet's turn every interval (``due``)."""

    name = "personalize-deletions"

    def __init__(self, store: Store, settings, *, s3=None, personalize=None):
        super().__init__()
        self.store = store
        self.settings = settings
        self.dataset_group_arn = settings.personalize_dataset_group_arn
        self.role_arn = settings.personalize_deletion_role_arn
        self.s3_uri = settings.personalize_deletion_s3_uri
        self.every = settings.personalize_deletion_interval_seconds
        self.interval = min(self.every, 30.0)  # how often to look whether it is this host's turn
        self._s3 = LazyClient("s3", region=settings.aws_region, timeout=10.0, client=s3)
        self._personalize = LazyClient(
            "personalize", region=settings.aws_region, timeout=10.0, client=personalize
        )
        self.holder = holder_name()
        self._run_lock = threading.Lock()

    @property
    def configured(self) -> bool:
        return bool(self.dataset_group_arn and self.role_arn and self.s3_uri)

    # -- one cycle -----------------------------------------------------------------------

    def run_once(self) -> dict:
        """Follow running jobs, retry failed submissions, submit the pending users.
        Returns counts of what happened (for the command and the log)."""
        with self._run_lock:
            report = {"done": 0, "failed": 0, "submitted": 0, "running": 0}
            self._follow(report)
            self._new_batch()
            for batch_id in self._batches("new"):
                if self._submit(batch_id):
                    report["submitted"] += 1
            self._prune()
            return report

    def _batches(self, status: str) -> list[str]:
        with self.store.read() as conn:
            return [
                row[0]
                for row in conn.execute(
                    sa.select(personalize_deletion_batches.c.batch_id)
                    .where(personalize_deletion_batches.c.status == status)
                    .order_by(personalize_deletion_batches.c.created_at)
                )
            ]

    def _follow(self, report: dict) -> None:
        with self.store.read() as conn:
            running = conn.execute(
                sa.select(
                    personalize_deletion_batches.c.batch_id, personalize_deletion_batches.c.job_arn
                ).where(personalize_deletion_batches.c.status == "running")
            ).all()
        for batch_id, job_arn in running:
            try:
                job = self._personalize.get().describe_data_deletion_job(
                    dataDeletionJobArn=job_arn
                )["dataDeletionJob"]
                status, reason = job.get("status", ""), job.get("failureReason", "")
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "error")
                if code != "ResourceNotFoundException":
                    log.warning("DescribeDataDeletionJob refused: %s", code)
                    report["running"] += 1
                    continue
                status, reason = "FAILED", "the job is gone (ResourceNotFoundException)"
            except BotoCoreError as exc:
                log.warning("DescribeDataDeletionJob failed: %s", type(exc).__name__)
                report["running"] += 1
                continue
            if status in DONE_STATUSES:
                self._finish(batch_id, "done", status)
                report["done"] += 1
            elif status in FAILED_STATUSES:
                self._finish(batch_id, "failed", reason or status)
                report["failed"] += 1
            else:
                self._update(batch_id, detail=status)
                report["running"] += 1

    def _finish(self, batch_id: str, outcome: str, detail: str) -> None:
        self._remove_csv(batch_id)  # read by the job: no longer needed, and it names people
        now = time.time()
        with self.store.write() as tx:
            users = personalize_deletions.c
            if outcome == "done":
                # Done: Personalize has forgotten them; so may this list.
                count = tx.conn.execute(
                    personalize_deletions.delete().where(users.batch_id == batch_id)
                ).rowcount
            else:
                # Failed: back to the pending list, for the next batch.
                count = tx.conn.execute(
                    personalize_deletions.update()
                    .where(users.batch_id == batch_id)
                    .values(batch_id=None)
                ).rowcount
            tx.conn.execute(
                personalize_deletion_batches.update()
                .where(personalize_deletion_batches.c.batch_id == batch_id)
                .values(status=outcome, detail=detail[:1000], updated_at=now)
            )
        metrics.PERSONALIZE_DELETIONS.labels(
            outcome="done" if outcome == "done" else "retried"
        ).inc(max(0, count or 0))
        log.info(
            "data deletion job %s",
            outcome,
            extra={"batch": batch_id, "users": count, "detail": detail[:200]},
        )

    def _remove_csv(self, batch_id: str) -> None:
        """A finished job's CSV names deleted people: it goes from S3 (best effort: a
        failure is logged; the object is not tried again)."""
        with self.store.read() as conn:
            location = conn.execute(
                sa.select(personalize_deletion_batches.c.data_location).where(
                    personalize_deletion_batches.c.batch_id == batch_id
                )
            ).scalar()
        if not location or not location.startswith("s3://"):
            return
        bucket, _, key = location[len("s3://") :].partition("/")
        try:
            self._s3.get().delete_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            log.warning(
                "the CSV of a completed data deletion job could not be removed: %s",
                type(exc).__name__,
                extra={"batch": batch_id},
            )

    def _update(self, batch_id: str, **values) -> None:
        with self.store.write() as tx:
            tx.conn.execute(
                personalize_deletion_batches.update()
                .where(personalize_deletion_batches.c.batch_id == batch_id)
                .values(updated_at=time.time(), **values)
            )

    def _new_batch(self) -> str | None:
        """The pending users as a new batch (in one transaction), or None if none wait."""
        now = time.time()
        stamp = datetime.fromtimestamp(now, tz=UTC).strftime("%Y%m%dT%H%M%SZ")
        batch_id = f"segment-deletions-{stamp}-{uuid.uuid4().hex[:8]}"
        with self.store.write() as tx:
            count = tx.conn.execute(
                personalize_deletions.update()
                .where(personalize_deletions.c.batch_id.is_(None))
                .values(batch_id=batch_id)
            ).rowcount
            if not count:
                return None
            tx.conn.execute(
                personalize_deletion_batches.insert().values(
                    batch_id=batch_id,
                    created_at=now,
                    updated_at=now,
                    users=count,
                    status="new",
                    attempts=0,
                )
            )
        return batch_id

    def _submit(self, batch_id: str) -> bool:
        """Upload the batch's CSV and create its job; False (and tried again on the next
        run) if either fails."""
        with self.store.read() as conn:
            ids = [
                row[0]
                for row in conn.execute(
                    sa.select(personalize_deletions.c.user_id)
                    .where(personalize_deletions.c.batch_id == batch_id)
                    .order_by(personalize_deletions.c.user_id)
                )
            ]
            attempts = conn.execute(
                sa.select(personalize_deletion_batches.c.attempts).where(
                    personalize_deletion_batches.c.batch_id == batch_id
                )
            ).scalar_one()
        if not ids:  # every user of it was deleted meanwhile: nothing to send
            self._update(batch_id, status="done", users=0, detail="no users left")
            return False
        body = io.StringIO()
        writer = csv.writer(body, lineterminator="\n")
        writer.writerow(["USER_ID"])
        writer.writerows([user_id] for user_id in ids)
        bucket, prefix = _bucket_and_prefix(self.s3_uri)
        key = f"{prefix}{batch_id}.csv"
        location = f"s3://{bucket}/{key}"
        # A retried job needs a new name (names are unique per account).
        job_name = batch_id if attempts == 0 else f"{batch_id[:56]}-r{attempts}"
        try:
            self._s3.get().put_object(
                Bucket=bucket, Key=key, Body=body.getvalue().encode(), ContentType="text/csv"
            )
            answer = self._personalize.get().create_data_deletion_job(
                jobName=job_name,
                datasetGroupArn=self.dataset_group_arn,
                dataSource={"dataLocation": location},
                roleArn=self.role_arn,
            )
        except (ClientError, BotoCoreError) as exc:
            code = (
                exc.response.get("Error", {}).get("Code", "error")
                if isinstance(exc, ClientError)
                else type(exc).__name__
            )
            log.warning(
                "data deletion job not created (tried again next time): %s",
                code,
                extra={"batch": batch_id, "users": len(ids)},
            )
            self._update(
                batch_id,
                attempts=attempts + 1,
                detail=f"not submitted: {code}",
                data_location=location,
            )
            return False
        self._update(
            batch_id,
            status="running",
            attempts=attempts + 1,
            users=len(ids),
            data_location=location,
            job_arn=answer["dataDeletionJobArn"],
            detail="submitted",
        )
        metrics.PERSONALIZE_DELETIONS.labels(outcome="submitted").inc(len(ids))
        log.info("data deletion job created", extra={"batch": batch_id, "users": len(ids)})
        return True

    def _prune(self) -> None:
        with self.store.write() as tx:
            table = personalize_deletion_batches
            keep = (
                sa.select(table.c.batch_id)
                .order_by(table.c.created_at.desc())
                .limit(KEEP_BATCHES)
                .scalar_subquery()
            )
            tx.conn.execute(
                table.delete().where(
                    table.c.status.in_(["done", "failed"]), table.c.batch_id.not_in(keep)
                )
            )

    # -- listing ---------------------------------------------------------------------------

    def status(self) -> dict:
        with self.store.read() as conn:
            pending = conn.execute(
                sa.select(sa.func.count())
                .select_from(personalize_deletions)
                .where(personalize_deletions.c.batch_id.is_(None))
            ).scalar_one()
            batches = [
                dict(row._mapping)
                for row in conn.execute(
                    sa.select(personalize_deletion_batches).order_by(
                        personalize_deletion_batches.c.created_at.desc()
                    )
                )
            ]
        return {"pending_users": int(pending), "batches": batches}

    # -- the schedule ------------------------------------------------------------------------

    def due(self) -> bool:
        """Take the fleet's turn: True at most once per interval across every process and
        host on this database (a lease left to expire, under a name new each time)."""
        return Lease(self.store, LEASE_NAME).acquire(f"{self.holder}:{time.time()}", self.every)

    def step(self) -> None:
        if self.configured and self.due():
            log.info("personalize deletions", extra=self.run_once())


# -- the command and the app ---------------------------------------------------------------


@click.command("deletions")
@click.option(
    "--run",
    "run_now",
    is_flag=True,
    help="Run a cycle now: follow running jobs, submit the pending users.",
)
@with_appcontext
def deletions_command(run_now: bool) -> None:
    """List users deleted through Segment that Amazon Personalize must forget: pending
    users, and running, failed and done data deletion jobs."""
    from flask import current_app

    services = current_app.extensions["segment"]
    sync: DeletionSync | None = services.deletions
    if sync is None:
        raise click.ClickException(
            "not in Personalize mode (PERSONALIZE_TRACKING_ID is not "
            "set): deletions are applied to the local store only"
        )
    services.ensure_schema()
    if run_now:
        if not sync.configured:
            raise click.ClickException(
                "set PERSONALIZE_DATASET_GROUP_ARN, "
                "PERSONALIZE_DELETION_ROLE_ARN and "
                "PERSONALIZE_DELETION_S3_URI first"
            )
        report = sync.run_once()
        click.echo("run: " + ", ".join(f"{k} {v}" for k, v in report.items()))
    status = sync.status()
    click.echo(f"pending: {status['pending_users']} user(s) waiting for the next job")
    if not sync.configured:
        click.echo("(no job is created until the deletion settings are set)")
    for title, wanted in (
        ("running", ("new", "running")),
        ("failed (users retried)", ("failed",)),
        ("done", ("done",)),
    ):
        batches = [b for b in status["batches"] if b["status"] in wanted]
        click.echo(f"{title}: {len(batches)} batch(es)")
        for b in batches:
            when = datetime.fromtimestamp(b["created_at"], tz=UTC).isoformat(timespec="seconds")
            click.echo(
                f"  {b['batch_id']}  {when}  {b['users']} user(s)  {b['status']}"
                f"  {b['detail'] or ''}  {b['job_arn'] or ''}".rstrip()
            )


def init_app(app) -> None:
    app.cli.add_command(deletions_command)
