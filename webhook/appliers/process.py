"""The appliers' own process: one a host, below the workers' CPU priority.

Applied in a worker, the inbox's batches share that worker's GIL with the requests it
answers: decoding, routing and writing a batch hold it for milliseconds at a time, and an
OS priority cannot help a thread that holds the GIL. In a process of their own, the
appliers have their own GIL, and their process runs at ``APPLIER_NICE`` (by default nice
10): on a busy machine answering Segment comes first and what is not applied yet waits
in the inbox (its lag is in ``/metrics`` and ``/healthz``); on an idle one they apply at
full speed. The inbox's leases stay what makes each row applied by one process at a time,
across hosts too.

* **Who starts it.** Every worker runs an ``AppliersProcess`` thread. The one that takes
  the host's lock (an ``flock`` on a file named after the database) starts the process,
  hands it the settings over a socket pair, and starts it again if it exits (after a
  pause that grows while it keeps failing). The others wait for the lock: when the
  worker holding it exits, another takes it over within a second. A worker that cannot
  open the lock file at all applies in threads of its own, as with ``APPLIER_NICE=off``.
* **How it ends.** It applies until its end of the socket pair reports that the worker
  closed it or died (or its parent changed): the batches in flight are finished and
  their leases given back first. A worker killed with SIGKILL mid-way leaves nothing
  behind: the process notices the closed socket and stops the same way.
* **Purchases.** The local store applier reports who bought something; the process
  passes the user ids to its worker, whose activation queue recomputes and publishes
  their recommendations, as before.
* **Attribution.** It cannot flush the workers' buffers of recorded answers; the workers
  write them every 0.2 s, and the attribution applier holds a click back
  ``ATTRIBUTION_HOLD_SECONDS`` (1 s) for an answer not written yet, as it did for the
  other workers' answers.

``main(FD)`` is the process's side; only an ``AppliersProcess`` starts it.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

from .. import pids
from ..store import BackgroundThread

log = logging.getLogger("webhook.appliers")

WAKE_EVERY_SECONDS = 0.01  # a worker wakes the process at most this often (see wake)
STOP_SECONDS = 15.0  # a process stopping finishes its batches; then it is killed
CHILD_POLL_SECONDS = 0.1  # each applier's look for new rows while idle (one cheap query)
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)
# Not ``-m``: the package imports this module before runpy would run it as __main__.
_CHILD_MAIN = ("import sys; from webhook.appliers.process import main; "
               "sys.exit(main(int(sys.argv[1])))")


def lock_path(database_url: str) -> str:
    """The host's lock for the appliers' process of this database: beside a SQLite file,
    else in the temporary directory, named after the URL (its password left out)."""
    import sqlalchemy as sa
    url = sa.engine.make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database:
        return url.database + ".appliers.lock"
    key = url.render_as_string(hide_password=True).encode()
    return os.path.join(tempfile.gettempdir(),
                        f"segment-appliers-{hashlib.sha256(key).hexdigest()[:16]}.lock")


def wake_address(lock: str) -> bytes:
    """The host's wake-up socket of the process using ``lock``: a datagram socket in
    Linux's abstract namespace (no file to clean up, no path length limit)."""
    digest = hashlib.sha256(os.path.abspath(lock).encode()).hexdigest()[:16]
    return b"\0segment-appliers-" + digest.encode()


class AppliersProcess(BackgroundThread):
    """A worker's side: takes the host's lock when it can, then runs the process."""

    thread_name = "appliers-process"

    def __init__(self, settings, instance_path: str, database_url: str, *,
                 on_purchases: Callable[[list[str]], None] | None = None,
                 fallback: Callable[[], None] | None = None):
        super().__init__()
        self.settings = settings
        self.fallback = fallback  # applies in this worker instead, when there is no lock
        self.instance_path = instance_path
        self.lock_path = lock_path(database_url)
        self.on_purchases = on_purchases
        self.proc: subprocess.Popen | None = None  # the process, while this worker runs it
        self._wake_address = wake_address(self.lock_path)
        self._wake_socket: socket.socket | None = None
        self._wake_pid = 0
        self._woken_at = 0.0

    def wake(self) -> None:
        """A delivery was committed: tell the process, whichever worker runs it, so an
        idle applier reads it at once instead of at its next look (0.1 s). At most one
        datagram every WAKE_EVERY_SECONDS: under load the appliers are busy or settling
        and do not wait for wake-ups, and when one is skipped, the next look finds the
        rows anyway. Best effort, never blocking: no process (or a full buffer) is no
        error."""
        now = time.monotonic()
        if now - self._woken_at < WAKE_EVERY_SECONDS:
            return
        self._woken_at = now
        sock = self._wake_socket
        if sock is None or self._wake_pid != pids.current():
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            except (OSError, AttributeError):
                return
            self._wake_socket, self._wake_pid = sock, pids.current()
        try:
            sock.sendto(b"w", socket.MSG_DONTWAIT, self._wake_address)
        except OSError:
            pass

    def stop(self, timeout: float = STOP_SECONDS + 5.0) -> None:
        super().stop(timeout)  # the process finishes its batches first

    # -- the worker's thread ---------------------------------------------------------------

    def _loop(self) -> None:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.error("appliers: cannot open the lock file (%s); applying in this worker",
                      exc.strerror)
            if self.fallback is not None:
                self.fallback()
            return
        try:
            while not self._stop.is_set():
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another worker of this host runs the process
                    self._stop.wait(1.0)
                    continue
                try:
                    self._supervise()
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _supervise(self) -> None:
        """Run the process until this worker stops, starting it again when it exits."""
        failures = 0
        while not self._stop.is_set():
            began = time.monotonic()
            code = self._run_one()
            if self._stop.is_set():
                return
            failures = failures + 1 if time.monotonic() - began < 60 else 1
            pause = min(30.0, 0.5 * 2 ** (failures - 1))
            log.warning("appliers: their process exited (%s); starting it again in %.1f s",
                        code, pause)
            self._stop.wait(pause)

    def _run_one(self):
        ours, theirs = socket.socketpair()
        try:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                [_PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
            proc = self.proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD_MAIN, str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env)
        except OSError as exc:
            ours.close()
            theirs.close()
            return f"could not start: {exc.strerror}"
        theirs.close()
        conn = Connection(ours.detach())
        try:
            conn.send(("start", self.settings, self.instance_path, self._wake_address))
            while not self._stop.is_set():
                if proc.poll() is not None:
                    break
                try:
                    if not conn.poll(0.2):
                        continue
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    break
                if kind == "purchases" and self.on_purchases is not None:
                    try:
                        self.on_purchases(payload)
                    except Exception:
                        log.exception("appliers: after-purchase step failed")
        except (OSError, ValueError):
            pass  # the process is gone: waited for below
        except Exception:  # a bug here must not end the thread: logged, the process restarted
            log.exception("appliers: talking to their process failed")
        finally:
            conn.close()  # the process's signal to finish its batches and exit
            try:
                code = proc.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            _mark_dead(proc.pid)
            self.proc = None
        return f"exit code {code}"


def _mark_dead(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        try:
            from prometheus_client import multiprocess
            multiprocess.mark_process_dead(pid)
        except Exception:  # its files stay; counters keep counting, which is right
            log.debug("marking the appliers' process dead in metrics failed", exc_info=True)


# -- the process's side ------------------------------------------------------------------------

def main(fd: int) -> int:
    # The worker ends this process by closing its end of the socket; signals meant for
    # the server (Ctrl-C, a TERM to the process group) reach the worker, which stops first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()
    conn = Connection(fd)
    try:
        kind, settings, instance_path, address = conn.recv()
    except (EOFError, OSError):
        return 0
    from .calls_child import lower_priority
    lower_priority(settings.applier_nice)

    from ..logs import configure_logging
    from ..services import secret_values
    configure_logging(settings.log_level, secret_values(settings), settings.log_format)

    from ..deadletters import DeadLetters
    from ..inbox import Inbox
    from ..routing import Router
    from ..services import build_appliers
    from ..store import Store, sqlite_url_for
    from ..tombstones import Tombstones
    from . import Runner

    send_lock = threading.Lock()

    def report_purchases(user_ids: list[str]) -> None:
        with send_lock:
            conn.send(("purchases", user_ids))

    store = Store(settings.database_url or sqlite_url_for(instance_path),
                  synchronous=settings.sqlite_synchronous)
    router = Router(settings.interaction_events, settings.item_id_properties)
    inbox = Inbox(store)
    appliers = build_appliers(settings, store, router,
                              DeadLetters(store, settings.dead_letters_max),
                              Tombstones(store),
                              on_purchases=report_purchases, before_attribution=None)
    runners = [Runner(inbox, applier, poll_seconds=CHILD_POLL_SECONDS)
               for applier in appliers]
    for runner in runners:
        runner.start()
    _listen_for_wakes(address, runners)
    log.info("appliers: running", extra={"appliers": [r.name for r in runners]})
    try:
        while os.getppid() == parent:
            try:
                if conn.poll(1.0):
                    conn.recv()  # nothing is sent after the settings: any message ends it
                    break
            except (EOFError, OSError):
                break
    finally:
        for runner in runners:
            sender = getattr(runner.applier, "sender", None)
            if sender is not None:
                sender.stop()
        for runner in runners:
            runner.stop(STOP_SECONDS - 2)
        store.dispose()
    return 0


def _listen_for_wakes(address: bytes, runners) -> None:
    """Wake the appliers whenever a worker says something was committed (``wake``)."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind(address)
    except OSError as exc:  # no abstract namespace (not Linux), or a process still
        # exiting holds the name: the appliers look every CHILD_POLL_SECONDS instead
        log.info("appliers: no wake-up socket (%s); polling", exc.strerror)
        return

    def listen() -> None:
        while True:
            try:
                sock.recv(16)
                while True:  # every datagram waiting is the same news
                    sock.recv(16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            except OSError:
                return
            for runner in runners:
                runner.wake()

    threading.Thread(target=listen, name="appliers-wake", daemon=True).start()
