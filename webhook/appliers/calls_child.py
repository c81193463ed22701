"""The child process that makes the Personalize applier's calls (see ``calls.py``).

Run as a script (``python calls_child.py FD OPTIONS``), so that it imports boto3 and
nothing of the service: it starts in a fraction of a second. ``calls.py`` imports
``Outcome`` and ``invoke`` from here, so both ways of calling classify alike.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

TRANSIENT_ERRORS = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError,
                    ConnectionClosedError)


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
        return Outcome("client_error", str(error.get("Code", "")), int(status or 0),
                       str(error.get("Message", "")))
    except TRANSIENT_ERRORS as exc:
        return Outcome("transient", type(exc).__name__)
    except BotoCoreError as exc:
        return Outcome("error", type(exc).__name__)


def main(fd: int, options: dict) -> None:
    # The parent ends the child by closing its end; signals to the process group (Ctrl-C,
    # a service manager's TERM) reach the parent, which stops first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if options["nice"]:
        try:
            os.nice(int(options["nice"]))
        except OSError:
            pass
    import boto3
    from botocore.config import Config

    conn = Connection(fd)
    client = boto3.session.Session().client(
        options["service"], region_name=options["client"]["region_name"],
        config=Config(**options["client"]["config"]))
    send_lock = threading.Lock()

    def run(call_id: int, operation: str, kwargs: dict) -> None:
        try:
            outcome = invoke(client, operation, kwargs)
        except Exception as exc:  # anything else: the parent retries it, slowly
            outcome = Outcome("error", type(exc).__name__)
        try:
            with send_lock:
                conn.send((call_id, tuple(outcome)))
        except (OSError, ValueError):
            pass  # the parent is gone

    with ThreadPoolExecutor(int(options["concurrency"])) as pool:
        while conn.poll(float(options["idle_seconds"])):
            try:
                request = conn.recv()
            except (EOFError, OSError):
                break
            pool.submit(run, *request)


if __name__ == "__main__":
    main(int(sys.argv[1]), json.loads(sys.argv[2]))
