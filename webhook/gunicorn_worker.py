"""gunicorn's gthread worker, except that closing a connection never blocks the worker.

gunicorn 27 closes a connection whose answer said ``Connection: close`` the way RFC 9112
section 9.6 asks: it half-closes the socket, then reads and discards whatever the client
still sends until the client hangs up, so that unread bytes do not make the kernel reset the
connection and truncate the answer. It does that reading in the worker's main thread,
blocking, for up to 2 s. Meanwhile the worker accepts and dispatches nothing: one client that
keeps its sockets open after such answers stalls every other client of that worker by ~2 s
(``tests/test_gunicorn.py`` has the attack).

This worker half-closes the same way, then drains on the worker's own poller, with the same
bounds (2 s, 64 KiB a connection), for at most ``worker_connections`` connections at a time;
past that bound a connection is closed at once. gunicorn.conf.py makes it the default class.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections import deque
from typing import Any

from gunicorn.workers.gthread import ThreadWorker as _GThreadWorker

LINGER_SECONDS = 2.0
LINGER_BYTES = 65536


class _Lingering:
    __slots__ = ("sock", "deadline", "drained", "open")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.drained = 0
        self.open = True


class ThreadWorker(_GThreadWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lingering: deque[_Lingering] = deque()  # by deadline: one fixed linger time
        self._lingering_open = 0

    def finish_request(self, conn: Any, fs: Any) -> None:
        # gunicorn closes a finished connection with conn.close(graceful=True), here in
        # the main thread; give this connection a close that does not block.
        sock = conn.sock

        def close(graceful: bool = False) -> None:
            if graceful:
                self._linger(sock)
            else:
                _close(sock)

        conn.close = close
        super().finish_request(conn, fs)

    def _linger(self, sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            _close(sock)
            return
        if self._lingering_open >= self.worker_connections:
            _close(sock)
            return
        sock.setblocking(False)
        entry = _Lingering(sock, time.monotonic() + LINGER_SECONDS)
        self.poller.register(sock, selectors.EVENT_READ, lambda _sock: self._drain(entry))
        self._lingering.append(entry)
        self._lingering_open += 1

    def _drain(self, entry: _Lingering) -> None:
        try:
            data = entry.sock.recv(LINGER_BYTES - entry.drained)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        entry.drained += len(data)
        if not data or entry.drained >= LINGER_BYTES:
            self._end(entry)

    def _end(self, entry: _Lingering) -> None:
        if not entry.open:
            return
        entry.open = False
        self._lingering_open -= 1
        try:
            self.poller.unregister(entry.sock)
        except (KeyError, ValueError, OSError):
            pass
        _close(entry.sock)

    def murder_keepalived(self, force: bool = False) -> None:
        # Called by gunicorn's main loop at least once a second, and with force=True
        # when the worker stops: the place for the lingering connections' deadlines too.
        super().murder_keepalived(force)
        now = time.monotonic()
        while self._lingering and (
            force or not self._lingering[0].open or self._lingering[0].deadline <= now
        ):
            self._end(self._lingering.popleft())


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
