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
import time
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


def lower_priority(nice: int | str) -> None:
    """Run below the workers: ``"idle"`` or a nice value from 1 to 19.

    ``"idle"``: Linux's SCHED_IDLE policy (every thread started afterwards inherits it).
    The process gets the CPU only when nothing else on it wants it, and a worker thread
    that wakes up (a request, the end of an fsync) takes the CPU from it at once, where a
    low nice value still lets it finish its time slice first. Where the policy is missing,
    nice 19.

    A nice value: on a kernel with autogroup scheduling
    (``/proc/sys/kernel/sched_autogroup_enabled``, on by default in many distributions;
    it applies to processes outside a CPU cgroup), the CPU is first shared between
    sessions, and a nice value ranks a process only against the others of its session.
    In the service's session, this process's CPU would come out of the share of the
    workers it is meant to yield to. So it starts a session of its own and gives that
    session the same nice value. Where autogroup does not apply (a container's cgroup, a
    kernel without it), the process's nice value is what counts, within the cgroup."""
    if nice == "idle":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        except (AttributeError, OSError):
            nice = 19
    nice = int(nice)
    try:
        os.nice(nice)
    except OSError:
        return
    autogroup = "/proc/self/autogroup"
    try:
        with open(autogroup) as f:
            grouped = bool(f.read().strip())
    except OSError:
        return
    if not grouped:
        # The file is there but empty: this process is not in an autogroup (a CPU
        # cgroup of its own, or autogroup off), so its nice value already counts.
        return
    try:
        os.setsid()
    except OSError:
        return
    # Raising an autogroup's nice needs no privilege, but the kernel takes such a write
    # at most every 100 ms machine-wide (EAGAIN meanwhile).
    for _ in range(20):
        try:
            with open(autogroup, "w") as f:
                f.write(str(nice))
            return
        except BlockingIOError:
            time.sleep(0.1)
        except OSError:
            return


def main(fd: int, options: dict) -> None:
    # The parent ends the child by closing its end; signals to the process group (Ctrl-C,
    # a service manager's TERM) reach the parent, which stops first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if options["nice"]:
        lower_priority(options["nice"])
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
