"""A local impersonation of Amazon Personalize's control plane (``personalize``), for tests:
the data deletion job operations, over the service's documented wire protocol.

Protocol (botocore model ``personalize/2018-05-22``: ``"protocol": "json"``, JSON 1.1,
target prefix ``AmazonPersonalize``): every call is ``POST /`` with
``Content-Type: application/x-amz-json-1.1`` and ``X-Amz-Target:
AmazonPersonalize.<Operation>``, a JSON body, SigV4-signed for the signing name
``personalize``. Errors: HTTP 400 with ``{"__type": "<Code>", "message": …}`` (botocore's
JSON parser reads ``__type``). Timestamps in answers are epoch seconds (numbers).

Operations: ``CreateDataDeletionJob`` (jobName ``^[a-zA-Z0-9][a-zA-Z0-9\\-_]*`` 1..63 and
unique, datasetGroupArn, dataSource.dataLocation ``(s3|http|https)://.+``, roleArn
``arn:…:iam::<12 digits>:role/…``), ``DescribeDataDeletionJob``, ``ListDataDeletionJobs``.

Like the real service, a job reads its CSV from S3 (here: ``s3``, a boto3 client for the
S3-protocol server the test runs, e.g. moto in server mode): a file that is missing or does
not have a single ``USER_ID`` column makes the job FAILED. A job moves one step each time it
is described: PENDING → IN_PROGRESS → COMPLETED (or FAILED, with ``failureReason``).
``fail_next_jobs(n)`` makes the next ``n`` jobs end FAILED.
"""

from __future__ import annotations

import csv
import io
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from tests.fake_personalize import ARN_PATTERN, _ApiError, _check_str
from tests.loopback import LoopbackServer

TARGET_PREFIX = "AmazonPersonalize."
NAME_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9\-_]*"
ROLE_PATTERN = r"arn:([a-z\d-]+):iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+"
S3_PATTERN = r"(s3|http|https)://.+"


class FakePersonalizeControl(LoopbackServer):
    def __init__(self, *, s3=None, region: str = "us-east-1", account: str = "123456789012"):
        super().__init__()
        self.s3 = s3
        self.region, self.account = region, account
        self._cond = threading.Condition()
        self._jobs: dict[str, dict[str, Any]] = {}  # arn -> job
        self._files: dict[str, list[str]] = {}  # arn -> user ids read from S3
        self._fail_next = 0
        self._fail_reason = ""
        self.calls: list[tuple[str, dict]] = []  # (operation, body) of accepted calls

    # -- control and inspection ----------------------------------------------------------

    def fail_next_jobs(self, n: int = 1, reason: str = "Internal failure, try again") -> None:
        with self._cond:
            self._fail_next, self._fail_reason = n, reason

    def jobs(self) -> list[dict[str, Any]]:
        with self._cond:
            return [dict(job) for job in self._jobs.values()]

    def users_of(self, arn: str) -> list[str]:
        """The user ids the job read from its CSV file."""
        with self._cond:
            return list(self._files.get(arn, []))

    # -- the wire ------------------------------------------------------------------------

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        target = handler.headers.get("X-Amz-Target", "")
        try:
            auth = handler.headers.get("Authorization", "")
            match = re.match(r"AWS4-HMAC-SHA256 Credential=[^/]+/\d{8}/[^/]+/([^/]+)/", auth)
            if not match or match.group(1) != "personalize":
                raise _ApiError(
                    403,
                    "MissingAuthenticationTokenException",
                    "a SigV4 signature for 'personalize' is required",
                )
            if urlsplit(handler.path).path != "/" or not target.startswith(TARGET_PREFIX):
                raise _ApiError(400, "UnknownOperationException", f"unknown target {target}")
            if "x-amz-json-1.1" not in (handler.headers.get("Content-Type") or ""):
                raise _ApiError(400, "SerializationException", "expected x-amz-json-1.1")
            operation = target[len(TARGET_PREFIX) :]
            method = getattr(self, f"_handle_{operation}", None)
            if method is None:
                raise _ApiError(400, "UnknownOperationException", f"unknown operation {operation}")
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                raise _ApiError(400, "SerializationException", "not JSON") from None
            result = method(body)
            with self._cond:
                self.calls.append((operation, body))
            status, payload = 200, json.dumps(result).encode()
        except _ApiError as err:
            status = err.status
            payload = json.dumps({"__type": err.code, "message": err.message}).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/x-amz-json-1.1")
        handler.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    # -- operations ----------------------------------------------------------------------

    def _handle_CreateDataDeletionJob(self, body: dict) -> dict:
        name = _check_str(
            body, "jobName", required=True, min_len=1, max_len=63, pattern=NAME_PATTERN
        )
        group = _check_str(body, "datasetGroupArn", required=True, max_len=256, pattern=ARN_PATTERN)
        _check_str(body, "roleArn", required=True, max_len=256, pattern=ROLE_PATTERN)
        source = body.get("dataSource")
        if not isinstance(source, dict):
            raise _ApiError(400, "InvalidInputException", "dataSource is required")
        location = _check_str(
            source, "dataLocation", "dataSource.", required=True, max_len=256, pattern=S3_PATTERN
        )
        arn = f"arn:aws:personalize:{self.region}:{self.account}:data-deletion-job/{name}"
        users, problem = self._read(location)
        now = time.time()
        with self._cond:
            if arn in self._jobs:
                raise _ApiError(
                    400,
                    "ResourceAlreadyExistsException",
                    f"A data deletion job named {name} already exists",
                )
            fail = self._fail_next > 0
            if fail:
                self._fail_next -= 1
            self._jobs[arn] = {
                "jobName": name,
                "dataDeletionJobArn": arn,
                "datasetGroupArn": group,
                "dataSource": {"dataLocation": location},
                "roleArn": body["roleArn"],
                "status": "PENDING",
                "creationDateTime": now,
                "lastUpdatedDateTime": now,
                "_fail": problem or (self._fail_reason if fail else ""),
            }
            self._files[arn] = users
        return {"dataDeletionJobArn": arn}

    def _read(self, location: str) -> tuple[list[str], str]:
        """The user ids of the CSV at ``location``, or a failure reason."""
        if self.s3 is None:
            return [], ""
        parts = urlsplit(location)
        try:
            data = self.s3.get_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))
            text = data["Body"].read().decode("utf-8")
        except Exception as exc:  # noqa: BLE001 - any S3 failure fails the job
            return [], f"Could not read the input file: {type(exc).__name__}"
        rows = list(csv.reader(io.StringIO(text)))
        if not rows or [c.strip() for c in rows[0]] != ["USER_ID"]:
            return [], "The input file must have a single USER_ID column"
        return [row[0] for row in rows[1:] if row], ""

    def _handle_DescribeDataDeletionJob(self, body: dict) -> dict:
        arn = _check_str(
            body, "dataDeletionJobArn", required=True, max_len=256, pattern=ARN_PATTERN
        )
        with self._cond:
            job = self._jobs.get(arn)
            if job is None:
                raise _ApiError(400, "ResourceNotFoundException", f"Could not find resource: {arn}")
            if job["status"] == "PENDING":
                job["status"] = "IN_PROGRESS"
            elif job["status"] == "IN_PROGRESS":
                if job["_fail"]:
                    job["status"], job["failureReason"] = "FAILED", job["_fail"]
                else:
                    job["status"], job["numDeleted"] = "COMPLETED", len(self._files[arn])
            job["lastUpdatedDateTime"] = time.time()
            return {"dataDeletionJob": {k: v for k, v in job.items() if not k.startswith("_")}}

    def _handle_ListDataDeletionJobs(self, body: dict) -> dict:
        with self._cond:
            return {
                "dataDeletionJobs": [
                    {
                        k: job[k]
                        for k in (
                            "jobName",
                            "dataDeletionJobArn",
                            "datasetGroupArn",
                            "status",
                            "creationDateTime",
                            "lastUpdatedDateTime",
                        )
                    }
                    for job in self._jobs.values()
                ]
            }
