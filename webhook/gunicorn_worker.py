"""gunicorn's gthread worker, with two changes that keep one slow or stubborn client from
stalling everyone else. gunicorn.conf.py makes it the default class.

**A request is read whole before a thread takes it.** gthread hands a connection to one of
its few threads (``GUNICORN_THREADS``) as soon as the first bytes arrive; the thread then
blocks until the client has sent the rest. A client that sends a byte a second holds that
thread as long as it likes, and a dozen such connections took every thread of a
2 x 4-thread server (``tests/test_gunicorn.py`` has the attack). Here the worker's main
thread reads each request without blocking, on its poller, until the head and the body
have arrived, then hands the bytes to gunicorn's own parser, which parses them as before.
A client gets ``READ_SECONDS`` to send its request, after which its connection is closed.
The bytes held across all connections are bounded by ``BUFFERED_BYTES`` (past it, the
connection that would add more is closed). A body over ``BODY_BUFFER_BYTES`` is still
read by the thread: the app refuses one over ``MAX_BODY_BYTES`` unread, so this matters
only where that setting is raised above it. When the head is not plain (a chunked body,
``Expect: 100-continue``), h11 tells when the request is complete, and answers the
expectation.

**Closing a connection never blocks.** gunicorn 27 closes a connection whose answer said
``Connection: close`` the way RFC 9112 section 9.6 asks: it half-closes the socket, then
reads and discards whatever the client still sends until the client hangs up, so that
unread bytes do not make the kernel reset the connection and truncate the answer. It does
that in the worker's main thread, blocking, for up to 2 s, during which the worker accepts
and dispatches nothing: one client that kept its sockets open after such answers stalled
every other client of that worker by ~2 s. This worker half-closes the same way, then
drains on its poller, with the same bounds (2 s, 64 KiB a connection), for at most
``worker_connections`` connections at a time; past that a connection is closed at once.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import h11
from gunicorn.workers.gthread import ThreadWorker as _GThreadWorker

LINGER_SECONDS = 2.0
LINGER_BYTES = 65536
READ_SECONDS = 10.0  # to send a whole request, from its connection or its first byte
BODY_BUFFER_BYTES = 8 * 1024 * 1024  # MAX_BODY_BYTES' default; the app refuses more unread
BUFFERED_BYTES = 32 * 1024 * 1024  # across a worker's connections
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Reading:
    """A request being received: its bytes so far, and until when it may take."""

    __slots__ = ("conn", "data", "deadline", "parser", "fed", "open")

    def __init__(self, conn: Any, data: bytes, deadline: float) -> None:
        self.conn = conn
        self.data = bytearray(data)
        self.deadline = deadline
        self.parser: h11.Connection | None = None  # only for heads that need it
        self.fed = 0  # bytes of ``data`` given to ``parser``
        self.open = True


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
        self._reading: deque[_Reading] = deque()  # by deadline, as above
        self._buffered = 0  # bytes held by the requests being read
        cfg = self.cfg
        # Reading ahead needs a request's plain bytes: with TLS in gunicorn itself
        # (--certfile) the socket is wrapped later, in the thread, and HTTP/2 reads its
        # preface from the socket. There gthread's own way stays.
        self._read_whole = not cfg.is_ssl and "h2" not in cfg.http_protocols
        # The longest head gunicorn's parser accepts: past it, it refuses the request
        # from what it was given, without reading from the socket.
        self._head_bytes = (
            cfg.limit_request_line
            + cfg.limit_request_fields * (cfg.limit_request_field_size + 2)
            + 4
        )

    # -- reading a request whole before a thread takes it --------------------------------

    def enqueue_req(self, conn: Any) -> None:
        # gunicorn calls this for a new connection, for a kept-alive one that became
        # readable, and for one whose client sent its next request along with the last
        # (those bytes are in the parser's buffer already).
        if not self._read_whole:
            super().enqueue_req(conn)
            return
        conn.sock.setblocking(False)
        ahead = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        reading = _Reading(conn, ahead, time.monotonic() + READ_SECONDS)
        self._buffered += len(ahead)
        if self._receive(reading):
            return
        self.poller.register(conn.sock, selectors.EVENT_READ, lambda _s: self._readable(reading))
        self._reading.append(reading)

    def _readable(self, reading: _Reading) -> None:
        if self._receive(reading):
            self._stop_reading(reading)

    def _receive(self, reading: _Reading) -> bool:
        """Take what the socket holds; hand the request over once it is whole. Whether
        the reading is over (handed over, or the connection closed)."""
        if not reading.data or not self._complete(reading):
            try:
                chunk = reading.conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                chunk = b""
            if not chunk or self._buffered + len(chunk) > BUFFERED_BYTES:
                self._drop(reading)  # the client hung up, or too much is held already
                return True
            reading.data += chunk
            self._buffered += len(chunk)
            if not self._complete(reading):
                return False
        data = bytes(reading.data)
        self._buffered -= len(data)
        reading.data = bytearray()
        reading.conn.request_bytes = data
        super().enqueue_req(reading.conn)
        return True

    def _complete(self, reading: _Reading) -> bool:
        """Whether ``reading.data`` holds a whole request (or so much that gunicorn's
        parser, reading the rest itself, should have it)."""
        data = reading.data
        if reading.parser is None:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                return len(data) > self._head_bytes
            head = bytes(data[:end]).lower()
            if b"\r\ntransfer-encoding:" not in head and b"\r\nexpect:" not in head:
                length = _content_length(head)
                if length is None:
                    return True  # a malformed length: gunicorn answers 400
                return length > BODY_BUFFER_BYTES or len(data) >= end + 4 + length
            reading.parser = h11.Connection(h11.SERVER, max_incomplete_event_size=self._head_bytes)
        return self._complete_by_h11(reading)

    def _complete_by_h11(self, reading: _Reading) -> bool:
        parser = reading.parser
        assert parser is not None
        parser.receive_data(bytes(reading.data[reading.fed :]))
        reading.fed = len(reading.data)
        if reading.fed > self._head_bytes + BODY_BUFFER_BYTES:
            return True
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError:
                return True  # gunicorn's parser gives the answer
            if event is h11.NEED_DATA:
                if parser.they_are_waiting_for_100_continue:
                    # Without it the client sends no body; gunicorn sends its own once
                    # it has parsed the head (a client reads any number of 1xx answers).
                    try:
                        reading.conn.sock.send(_CONTINUE)
                    except OSError:
                        return True
                    parser.send(h11.InformationalResponse(status_code=100, headers=[]))
                return False
            if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return True

    def _stop_reading(self, reading: _Reading) -> None:
        reading.open = False
        try:
            self.poller.unregister(reading.conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _drop(self, reading: _Reading) -> None:
        self._buffered -= len(reading.data)
        reading.data = bytearray()
        self._stop_reading(reading)
        self.nr_conns -= 1
        _close(reading.conn.sock)

    def handle(self, conn: Any) -> Any:
        # In a thread: the request read by the main thread goes to gunicorn's parser.
        data = conn.__dict__.pop("request_bytes", None)
        if data is not None:
            conn.data_ready = True
            conn.sock.setblocking(True)
            conn.init()  # makes the parser on a connection's first request
            conn.parser.unreader.unread(data)
        return super().handle(conn)

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
        _expire(self._lingering, now, force, self._end)
        _expire(self._reading, now, force, self._drop)  # too slow: READ_SECONDS


def _expire(entries: deque[Any], now: float, force: bool, end: Callable[[Any], None]) -> None:
    """Pop the entries past their deadline (all, with ``force``) off a deque kept in
    deadline order, calling ``end`` on those still open; finished ones just go."""
    while entries and (force or not entries[0].open or entries[0].deadline <= now):
        entry = entries.popleft()
        if entry.open:
            end(entry)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _content_length(head: bytes) -> int | None:
    """The Content-Length of a lower-cased head (0 without one; None if malformed)."""
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    end = head.find(b"\r\n", at + 2)
    value = head[at + 17 : end if end >= 0 else len(head)].strip()
    return int(value) if value.isdigit() else None
