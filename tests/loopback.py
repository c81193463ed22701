"""What every stand-in server has in common: a threaded HTTP server on loopback that a
test starts and stops (tests/fake_*.py, ``segment_wire.CaptureServer``).

    class Echo(LoopbackServer):
        def _serve(self, handler):     # every method; a BaseHTTPRequestHandler
            ...

    with Echo() as server:
        requests.get(server.url + "/anything")
"""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


class LoopbackServer:
    """``start()`` / ``stop()`` (or ``with``), ``url``, ``port``, ``stopped``.

    Subclasses answer every request in ``_serve(handler)`` and may set, as class
    attributes: ``protocol_version`` (HTTP/1.0 by default: one request a connection, so a
    stopped server never goes on answering on a pooled keep-alive connection),
    ``handler_timeout`` (an idle keep-alive connection ends after it), ``disable_nagle``,
    ``request_queue_size``, ``poll_interval`` (how long ``stop()`` may wait).
    ``_stopping`` is set while stopping, to wake handlers waiting in an injected delay.
    Started again after a stop, it listens on the same port if it was given one."""

    protocol_version = "HTTP/1.0"
    handler_timeout: float | None = None
    disable_nagle = False
    request_queue_size = 5
    poll_interval = 0.05

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host, self._port = host, port
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        raise NotImplementedError

    def start(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = owner.protocol_version
            timeout = owner.handler_timeout
            # Headers and body may go out in separate writes: without TCP_NODELAY,
            # Nagle's algorithm and the client's delayed ACK add ~40 ms to an answer on a
            # kept-alive connection.
            disable_nagle_algorithm = owner.disable_nagle

            def _any(self):
                owner._serve(self)

            def log_message(self, format, *args):  # keep the test output quiet
                pass

        for method in METHODS:
            setattr(Handler, "do_" + method, Handler._any)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = owner.request_queue_size

            def handle_error(self, request, client_address):
                # A client that hung up before its answer (a test's timeout did that on
                # purpose) is expected; anything else is printed as socketserver does.
                if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    return
                super().handle_error(request, client_address)

        self._stopping.clear()
        self._httpd = Server((self._host, self._port), Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": self.poll_interval},
            name=type(self).__name__,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = self._thread = None

    @property
    def stopped(self) -> bool:
        return self._httpd is None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. ``http://127.0.0.1:54321``."""
        if self._httpd is None:
            raise RuntimeError("server not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"
