"""The one helper for work that runs in a daemon thread of its own: the appliers, retention,
WAL checkpoints, data deletion jobs, training, model reloads, impressions' writes.

A subclass gives ``step()`` (one round of its work) and ``interval`` (seconds between
rounds). ``start()`` starts the thread once per process (again in a process that forked
after it started), ``wake()`` runs the next round now, ``stop()`` ends it after the round
in flight. A round that fails is logged and the thread goes on: a store that is down
(``StoreUnavailable``) is a warning, anything else an error with its traceback.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("webhook.background")


class StoreDown(Exception):
    """Raised to mean "the store is unavailable": set by storage (``StoreUnavailable``
    derives from it) so this module need not import storage."""


class BackgroundThread:
    name = "background"
    interval = 1.0  # seconds between rounds

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._start_lock = threading.Lock()

    # -- the thread ------------------------------------------------------------------------

    def start(self) -> None:
        """Start this process's thread (once; again in a forked child)."""
        with self._start_lock:
            if self.running:
                return
            self._pid = os.getpid()
            self._stop = threading.Event()
            self._wake = threading.Event()
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._pid == os.getpid() and self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """Run the next round now. A set flag needs no lock: under load it is set already."""
        wake = self._wake
        if not wake.is_set():
            wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if (
            thread is not None
            and self._pid == os.getpid()
            and thread is not threading.current_thread()
        ):
            thread.join(timeout)
        self._thread = None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` or until stopped; True when stopped."""
        return self._stop.wait(seconds)

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._wake.clear()
            try:
                wait = self.step()
                failures = 0
            except StoreDown as exc:
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning("%s: the store is unavailable, later: %s", self.name, exc)
                wait = None
            except Exception:  # the thread must never die
                failures += 1
                log.exception("%s: a round failed", self.name)
                wait = None
            if self._stop.is_set():
                break
            if wait is None:
                wait = self.interval
            if wait > 0:
                self._wake.wait(wait)

    # -- the work --------------------------------------------------------------------------

    def step(self) -> float | None:
        """One round; the seconds until the next (None: ``interval``)."""
        raise NotImplementedError
