"""The Profile API budget: Segment allows about 100 requests/s per space, shared with
everything else the customer runs, and answers 429 above that.

* ``HostBudget``: at most ``share`` calls reach the API in any one second, counted across
  every gunicorn worker of this host, plus a pause every worker honours (after a 429 with
  ``Retry-After``). The state is a small file beside the other temporary files, guarded by
  ``flock`` (threads of one process queue on a thread lock first: the flock belongs to the
  process). It holds one slot per call: when it was admitted and when it completed. A call
  reaches Segment somewhere between the two, so a call counts from its admission until one
  second after its completion (while in flight, it counts as "now"), and a new call is
  admitted only while fewer than ``share`` count. Whatever the delays between admission,
  arrival and answer (a busy host, a slow network), no one-second window at Segment then
  holds more than ``share`` arrivals: of any calls arriving within one second, the last
  admitted saw all the others counted. The price is one second per call beyond its
  duration (at 20 ms a call, 98 % of the budget, sustained). A call still in flight after
  ``stale_after`` seconds (its process was killed) counts as completed then, so a killed
  worker holds its slots for a bounded time.
* ``HostShare``: this host's share of ``PROFILE_API_MAX_RPS``. Each host records a
  heartbeat row in the store (``service_hosts``) while it uses the Profile API; the share is
  the budget divided by the hosts seen in the last minute. Rows older than that are removed,
  so the table stays as small as the fleet.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import struct
import tempfile
import threading
import time

import sqlalchemy as sa

from .storage import Store, StoreUnavailable
from .storage.schema import service_hosts

log = logging.getLogger("webhook.budget")

_HEADER = struct.Struct("<8sqd")  # magic, admissions so far, paused until (monotonic)
_MAGIC = b"PAPIBUD2"
_SLOT = struct.Struct("<qdd")  # admission number (0: free), admitted at, completed at (0)


class HostBudget:
    """Admissions shared by the processes of one host (see the module's docstring)."""

    def __init__(self, path: str, capacity: int, window: float = 1.0, stale_after: float = 30.0):
        self.path = path
        self.capacity = max(1, int(capacity))
        self.window = window
        self.stale_after = stale_after
        self._size = _HEADER.size + self.capacity * _SLOT.size
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            self._fd, self._pid = fd, os.getpid()
        return self._fd

    def _locked(self, action):
        with self._thread_lock:
            fd = self._file()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                raw = os.pread(fd, _HEADER.size, 0)
                if (
                    len(raw) < _HEADER.size
                    or _HEADER.unpack(raw)[0] != _MAGIC
                    or os.fstat(fd).st_size != self._size
                ):
                    os.ftruncate(fd, 0)  # new, or made with another layout: start afresh
                    os.ftruncate(fd, self._size)
                    header = (0, 0.0)
                else:
                    header = _HEADER.unpack(raw)[1:]
                return action(fd, *header)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _counts_until(self, admitted_at: float, completed_at: float, now: float) -> float:
        """Until when a call counts: a second after its completion; in flight, from now."""
        if completed_at:
            return completed_at + self.window
        return min(now, admitted_at + self.stale_after) + self.window

    def acquire(self, share: int) -> tuple[str, int]:
        """``("ok", ticket)``: go ahead, and hand the ticket to ``complete`` when the call
        has its answer (or failed). ``("paused", 0)`` after a 429, ``("over_budget", 0)``."""
        share = max(1, min(int(share), self.capacity))

        def action(fd: int, admitted: int, paused_until: float) -> tuple[str, int]:
            now = time.monotonic()
            if now < paused_until:
                return "paused", 0
            raw = os.pread(fd, self.capacity * _SLOT.size, _HEADER.size)
            counting, free = 0, None
            for index, (number, admitted_at, completed_at) in enumerate(_SLOT.iter_unpack(raw)):
                if number and self._counts_until(admitted_at, completed_at, now) > now:
                    counting += 1
                elif free is None:
                    free = index
            if counting >= share or free is None:
                return "over_budget", 0
            ticket = admitted + 1
            os.pwrite(fd, _SLOT.pack(ticket, now, 0.0), _HEADER.size + free * _SLOT.size)
            os.pwrite(fd, _HEADER.pack(_MAGIC, ticket, paused_until), 0)
            return "ok", ticket * self.capacity + free

        return self._locked(action)

    def complete(self, ticket: int) -> None:
        """The call admitted with ``ticket`` has its answer: it counts one more second."""
        number, index = divmod(ticket, self.capacity)
        offset = _HEADER.size + index * _SLOT.size

        def action(fd: int, admitted: int, paused_until: float) -> None:
            slot_number, admitted_at, completed_at = _SLOT.unpack(os.pread(fd, _SLOT.size, offset))
            if slot_number == number and not completed_at:  # not reused meanwhile
                os.pwrite(fd, _SLOT.pack(number, admitted_at, time.monotonic()), offset)

        if number:
            self._locked(action)

    def pause(self, seconds: float) -> None:
        """No call from this host for ``seconds`` (extends, never shortens, a pause)."""

        def action(fd: int, admitted: int, paused_until: float) -> None:
            until = max(paused_until, time.monotonic() + seconds)
            os.pwrite(fd, _HEADER.pack(_MAGIC, admitted, until), 0)

        self._locked(action)

    def paused_for(self) -> float:
        """Seconds left of the current pause (0: none)."""
        return self._locked(lambda fd, admitted, until: max(0.0, until - time.monotonic()))


def budget_path(*parts: str) -> str:
    """A file every worker of this host finds for the same service (database) and space."""
    digest = hashlib.sha1("\x00".join(parts).encode("utf-8")).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"segment-profile-api-{digest}.budget")


class HostShare:
    """This host's share of a budget shared by every host on one database."""

    HEARTBEAT_SECONDS = 10.0
    EXPIRE_SECONDS = 60.0

    def __init__(self, store: Store, total: int, host_id: str | None = None):
        self.store = store
        self.total = max(1, int(total))
        self.host_id = host_id or socket.gethostname()
        self.hosts = 1
        self._beaten_at = 0.0
        self._beating = threading.Lock()

    def share(self) -> int:
        """The calls per second this host may make; starts a heartbeat when one is due
        (in the background: never on the caller's time)."""
        if time.monotonic() - self._beaten_at >= self.HEARTBEAT_SECONDS and self._beating.acquire(
            blocking=False
        ):
            threading.Thread(
                target=self._beat_and_release, name="profile-api-heartbeat", daemon=True
            ).start()
        return max(1, self.total // max(1, self.hosts))

    def _beat_and_release(self) -> None:
        try:
            self.beat()
        except StoreUnavailable as exc:
            log.warning("profile api heartbeat: store unavailable: %s", exc)
        except Exception:  # a background thread must never die silently
            log.exception("profile api heartbeat failed")
        finally:
            self._beating.release()

    def beat(self) -> int:
        """Record this host as alive, forget hosts silent for EXPIRE_SECONDS, count the
        live ones. Returns the count."""
        now = time.time()
        self._beaten_at = time.monotonic()
        with self.store.write() as tx:
            statement = tx.insert(service_hosts).values(host_id=self.host_id, seen_at=now)
            tx.conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["host_id"], set_={"seen_at": statement.excluded.seen_at}
                )
            )
            tx.conn.execute(
                service_hosts.delete().where(service_hosts.c.seen_at < now - self.EXPIRE_SECONDS)
            )
            hosts = tx.conn.execute(
                sa.select(sa.func.count()).select_from(service_hosts)
            ).scalar_one()
        self.hosts = max(1, int(hosts))
        return self.hosts
