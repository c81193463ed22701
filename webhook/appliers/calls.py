"""Making the calls to Amazon Personalize: in this process, or in a child process that runs
at a lower CPU priority.

The Personalize applier's calls cost CPU: boto3 validates, serializes and signs every call
and parses its answer, a few milliseconds of Python each. Made in a gunicorn worker, that
work holds the worker's GIL, so it is taken from the requests the worker answers, and an
OS priority cannot help: a thread the OS puts aside keeps the GIL. A child process has its
own GIL, and its nice value lowers its share of the CPU only when the machine is busy:
answering Segment comes first, and the calls that cannot be made meanwhile wait in the
inbox, as they would during an outage. On an idle machine the child sends at full speed.
By default the child runs under Linux's SCHED_IDLE policy: a worker that wakes up takes
the CPU from it at once (``calls_child.lower_priority``).

Both ways answer a call with an ``Outcome`` (``calls_child.py``), which the applier
classifies (retry, refuse, give up).

The child gets its requests over a socket pair shared with the process that started it:
``(call id, operation, parameters)`` in, ``(call id, outcome)`` out, pickled by
``multiprocessing.connection``, never over a network. It makes up to ``concurrency``
calls at a time with the same client options, and exits when its parent closes its end
or dies, or after ``IDLE_SECONDS`` without a call (the worker that holds the applier's
lease may change). A call in flight when the child exits is answered ``transient`` and
retried, like a timeout: it may have reached Personalize, whose events carry their
eventId.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path

from ..aws import LazyClient, client_options
from .calls_child import OK, Outcome, invoke

__all__ = ["OK", "Outcome", "InProcessCalls", "ChildProcessCalls"]

log = logging.getLogger("webhook.personalize")

IDLE_SECONDS = 120.0
_CHILD = Path(__file__).with_name("calls_child.py")
_GONE = Outcome("transient", "SenderProcessExited")


class InProcessCalls:
    """Calls made by the calling thread (tests with a stubbed client)."""

    def __init__(self, client: LazyClient):
        self._client = client

    def call(self, operation: str, kwargs: dict) -> Outcome:
        return invoke(self._client.get(), operation, kwargs)

    def close(self) -> None:
        pass


class _Waiting:
    __slots__ = ("done", "outcome")

    def __init__(self):
        self.done = threading.Event()
        self.outcome = _GONE


class _Channel:
    """One child process and the calls waiting on it."""

    def __init__(self, options: dict):
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, str(_CHILD), str(theirs.fileno()), json.dumps(options)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.open = True
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._waiting: dict[int, _Waiting] = {}
        threading.Thread(target=self._read, name="personalize-replies", daemon=True).start()

    def send(self, call_id: int, operation: str, kwargs: dict, waiting: _Waiting) -> None:
        with self._lock:
            if not self.open:
                waiting.done.set()
                return
            self._waiting[call_id] = waiting
        try:
            with self._send_lock:
                self.conn.send((call_id, operation, kwargs))
        except (OSError, EOFError, ValueError):
            self.close()

    def forget(self, call_id: int) -> None:
        with self._lock:
            self._waiting.pop(call_id, None)

    def close(self) -> None:
        """No more calls: the child finishes those in flight and exits; every call still
        waiting is answered ``transient``."""
        with self._lock:
            self.open = False
            waiting, self._waiting = self._waiting, {}
        for w in waiting.values():
            w.done.set()
        # A shutdown, not a close: it wakes the reader blocked on the socket (which then
        # closes it) and gives the child its end of file.
        try:
            with socket.fromfd(self.conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass

    def _read(self) -> None:
        try:
            while True:
                call_id, outcome = self.conn.recv()
                with self._lock:
                    waiting = self._waiting.pop(call_id, None)
                if waiting is not None:
                    waiting.outcome = Outcome(*outcome)
                    waiting.done.set()
        except (EOFError, OSError, ValueError, TypeError):
            pass
        self.close()
        self.conn.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ChildProcessCalls:
    """Calls made by a child process at priority ``nice`` ("idle" or a nice value), started
    at the first call (again after it exited). Thread-safe; each process that uses it has
    its own child."""

    def __init__(self, *, region: str, timeout: float, concurrency: int,
                 nice: int | str):
        self._options = {"service": "personalize-events",
                         "client": client_options(region, timeout, concurrency),
                         "concurrency": concurrency, "nice": nice,
                         "idle_seconds": IDLE_SECONDS}
        # Longer than a call can take in the child (connect + read timeouts), with room
        # for a child that a busy machine runs seldom.
        self._reply_timeout = max(60.0, 20 * timeout)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pid = 0
        self._channel: _Channel | None = None

    def call(self, operation: str, kwargs: dict) -> Outcome:
        waiting = _Waiting()
        call_id = next(self._ids)
        channel = self._current()
        channel.send(call_id, operation, kwargs, waiting)
        if not waiting.done.wait(self._reply_timeout):
            channel.forget(call_id)
            log.warning("personalize: the sending process did not answer in %d s",
                        int(self._reply_timeout))
            return Outcome("transient", "SenderProcessTimeout")
        return waiting.outcome

    def close(self) -> None:
        with self._lock:
            channel, self._channel = self._channel, None
        if channel is not None and self._pid == os.getpid():
            channel.close()

    def _current(self) -> _Channel:
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's child is not ours
                self._channel, self._pid = None, os.getpid()
            if self._channel is None or not self._channel.open:
                self._channel = _Channel(self._options)
            return self._channel
