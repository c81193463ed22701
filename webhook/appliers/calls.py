"""Making one call to Amazon Personalize (personalize-events) with boto3, and what came of
it (``Outcome``), which the Personalize applier classifies: retry, refuse, give up.

The calls are made by the worker's sending threads (``personalize.Sender``): the worker is
a process of its own, so boto3's CPU (validating, signing, parsing: a few milliseconds a
call) never holds a web process's GIL, and the worker runs below the web processes' CPU
priority (``WORKER_NICE``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from ..aws import LazyClient

TRANSIENT_ERRORS = (
    EndpointConnectionError,
    ConnectTimeoutError,
    ReadTimeoutError,
    ConnectionClosedError,
)


class Outcome(NamedTuple):
    kind: str  # ok | client_error (an answer with an error) | transient | error
    code: str = ""  # the error code (client_error) or the exception's name
    status: int = 0  # HTTP status (client_error)
    message: str = ""  # the service's message (client_error): may quote record contents


OK = Outcome("ok")


def invoke(client: Any, operation: str, kwargs: dict) -> Outcome:
    """Make one call with a boto3 client; what came of it."""
    try:
        getattr(client, operation)(**kwargs)
        return OK
    except ClientError as exc:
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return Outcome(
            "client_error",
            str(error.get("Code", "")),
            int(status or 0),
            str(error.get("Message", "")),
        )
    except TRANSIENT_ERRORS as exc:
        return Outcome("transient", type(exc).__name__)
    except BotoCoreError as exc:
        return Outcome("error", type(exc).__name__)


class Calls:
    """Calls made by the calling thread, on one (lazily made) client."""

    def __init__(self, client: LazyClient):
        self._client = client

    def call(self, operation: str, kwargs: dict) -> Outcome:
        return invoke(self._client.get(), operation, kwargs)
