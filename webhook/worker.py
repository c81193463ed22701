"""The worker process: ``flask --app webhook worker`` (the Procfile's ``worker``).

Everything that is not answering HTTP runs here, each in a thread of its own
(``background.BackgroundThread``): the inbox's appliers (the local store, attribution,
Amazon Personalize), retention, SQLite's WAL checkpoints, the data deletion jobs, the
engine's training (in a child process), and the write-backs that follow a purchase. It
finds new inbox rows by looking every 0.1 s (one cheap query an applier); several workers
on one database stay correct through the leases (one process applies an applier's rows at
a time, across hosts too).

It runs at ``WORKER_NICE`` (10): on a host it shares with the web process, answering
Segment comes first, and what is not applied yet waits in the inbox (its lag is in
``/metrics``). SIGTERM or SIGINT (Heroku's shutdown, Ctrl-C) stop it: the batches in flight
are finished or given back first.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import psutil

from .storage import StoreUnavailable
from .wiring import Parts

log = logging.getLogger("webhook.worker")

RETRY_SECONDS = 2.0  # while the database cannot be reached at start


def lower_priority(nice: int) -> None:
    """Run at this nice value. On a kernel with autogroup scheduling
    (``/proc/sys/kernel/sched_autogroup_enabled``, on by default in many distributions,
    for processes outside a CPU cgroup) the CPU is first shared between sessions, and a
    nice value ranks a process only against the others of its session. A worker in the web
    process's session (both started from one shell) is ranked against it by its nice value
    alone. A worker in a session of its own (honcho and Foreman start each process in one)
    would yield only to itself, so that session's autogroup gets the same nice value.

    The worker never leaves the session or process group it was started in: a process
    manager stops a process by signalling its group (honcho: SIGTERM, then SIGKILL), and
    a terminal's Ctrl-C reaches the foreground group."""
    if nice <= 0:
        return
    try:
        os.nice(nice)
    except OSError:
        return
    if _session_is_ours():
        _set_autogroup_nice(nice)


def _session_is_ours() -> bool:
    """Whether every process of this session is this one, an ancestor of it (a shell that
    started it) or a descendant: then the session's autogroup holds no one else's work."""
    try:
        me = psutil.Process()
        session = os.getsid(0)
        ours = {me.pid, *(p.pid for p in me.parents()), *(p.pid for p in me.children(True))}
        for pid in psutil.pids():
            if pid in ours:
                continue
            try:
                if os.getsid(pid) == session:
                    return False
            except OSError:
                continue  # gone meanwhile
        return True
    except (OSError, psutil.Error):
        return False


def _set_autogroup_nice(nice: int) -> None:
    autogroup = "/proc/self/autogroup"
    try:
        with open(autogroup) as handle:
            grouped = bool(handle.read().strip())
    except OSError:
        return
    if not grouped:
        return  # not in an autogroup (a cgroup of its own): the nice value already counts
    for _ in range(20):  # the kernel takes such a write at most every 100 ms, machine-wide
        try:
            with open(autogroup, "w") as handle:
                handle.write(str(nice))
            return
        except BlockingIOError:
            time.sleep(0.1)
        except OSError:
            return


def run(parts: Parts, stop: threading.Event | None = None) -> None:
    """Run the worker until ``stop`` is set or the process is told to stop."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    lower_priority(parts.settings.worker_nice)
    while not stop.is_set():
        try:
            parts.start_worker()
            break
        except StoreUnavailable as exc:
            log.warning("worker: the store is unavailable, trying again: %s", exc)
            stop.wait(RETRY_SECONDS)
    if stop.is_set():
        return
    log.info("worker: running", extra={"threads": [t.name for t in parts.worker_threads()]})
    stop.wait()
    log.info("worker: stopping")
    parts.stop()
    parts.activation.wait_idle(10)
    log.info("worker: stopped")
