#!/usr/bin/env python3
"""Where does a signed delivery spend its time?  (helper for the throughput benchmark)

Runs the service in-process (no gunicorn, no sockets) with the benchmark's settings
(SEGMENT_SHARED_SECRET and WEBHOOK_BEARER_TOKEN as there, a fresh SQLite file, its own
prometheus folder) and calls it through WSGI with ``--count`` distinct signed
deliveries. It times, one thread each, with nothing else running in the process:

* the bare app and the anchor (bench/anchor_app.py) with the same deliveries;
* the service's request path alone (its background appliers are not started);
* the local store applier on what those requests left in the inbox (``drain``),
  per message;

then profiles the request path and the applier with cProfile. With ``--gc-modes`` it also
times the local store applier per message three ways, on deliveries of their own: as is,
with the startup heap frozen (``gc.freeze()``, which the worker
process once did), and with the cyclic collector off (the floor). Logs go to a temp file, as
they would to gunicorn's stderr.

    .venv/bin/python bench/profile_service.py [--count 3000] [--batch] [--top 30]
        [--synchronous FULL|NORMAL] [--postgresql] [--no-profile] [--gc-modes]

``--postgresql``: the anchor and the service each on a fresh database of the PostgreSQL
on 127.0.0.1:5432 (dropped at the end) instead of SQLite files.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from webhook_throughput import BATCH_SIZE, BEARER, SECRET, event_json, sign  # noqa: E402


def deliveries(count: int, tag: str, batch: bool) -> list[tuple[bytes, str]]:
    out = []
    for n in range(count):
        if batch:
            events = [event_json(f"{tag}-{n}-{j}", n * BATCH_SIZE + j) for j in range(BATCH_SIZE)]
            out.append((("[" + ",".join(events) + "]").encode(), sign(events[0].encode())))
        else:
            body = event_json(f"{tag}-{n}", n)
            out.append((body.encode(), sign(body.encode())))
    return out


def call(app, items) -> None:
    """Plain WSGI calls with the environ a server gives (Flask's test client costs more
    than the bare app itself and would blur the comparison)."""
    for body, signature in items:
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/segment",
            "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8000",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "CONTENT_LENGTH": str(len(body)),
            "CONTENT_TYPE": "application/json",
            "HTTP_X_SIGNATURE": signature,
            "HTTP_AUTHORIZATION": f"Bearer {BEARER}",
            "HTTP_HOST": "127.0.0.1:8000",
        }
        status = []
        chunks = app(environ, lambda s, h, exc=None, status=status: status.append(s))
        b"".join(chunks)
        if hasattr(chunks, "close"):
            chunks.close()
        assert status[0].startswith("200"), status


def timed(app, items) -> float:
    """CPU time of this thread per delivery, in ms: steadier than wall time on a machine
    doing other work, and what the throughput under gunicorn is made of (waits for an
    fsync are not; FULL's cost shows in the benchmark, not here)."""
    started, wall = time.thread_time(), time.perf_counter()
    call(app, items)
    WALL[app] = (time.perf_counter() - wall) / len(items) * 1e3
    return (time.thread_time() - started) / len(items) * 1e3


def service_environment(tmp: Path, synchronous: str) -> None:
    """The settings the service runs with in these in-process scripts: the throughput
    benchmark's secrets (batches need the bearer token), its own prometheus folder in
    ``tmp``, no background training."""
    (tmp / "metrics").mkdir(exist_ok=True)
    os.environ.update(
        SEGMENT_SHARED_SECRET=SECRET,
        WEBHOOK_BEARER_TOKEN=BEARER,
        SQLITE_SYNCHRONOUS=synchronous,
        PROMETHEUS_MULTIPROC_DIR=str(tmp / "metrics"),
        ENGINE_BACKGROUND_TRAINING="false",
    )


def in_process_service(prefix: str, synchronous: str):
    """The service on a fresh SQLite file in a temp folder, built in this process with no
    background threads (``TESTING``: the caller applies the inbox), its log lines going to
    a file there as they would to gunicorn's stderr. Returns (app, folder)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    service_environment(tmp, synchronous)
    os.environ["DATABASE_URL"] = f"sqlite:///{tmp}/service.db"
    log_file = open(tmp / "stderr.log", "w")
    os.dup2(log_file.fileno(), 2)
    sys.stderr = log_file
    from webhook import create_app

    app = create_app()
    app.config["TESTING"] = True
    return app, tmp


WALL: dict = {}  # app -> wall time per delivery of its last timed run, ms (PostgreSQL's
# round trips are waits, not CPU)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=3000, help="deliveries (default 3000)")
    p.add_argument("--batch", action="store_true", help=f"Actions batches of {BATCH_SIZE}")
    p.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL"])
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--postgresql", action="store_true", help="PostgreSQL on 127.0.0.1:5432")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument(
        "--gc-modes",
        action="store_true",
        help="time the applier as is, with the startup heap frozen, and with no collector",
    )
    args = p.parse_args()
    count = max(1, min(args.count, 100_000))

    tmp = Path(tempfile.mkdtemp(prefix="webhook-profile-"))
    databases: list[str] = []

    def database_url(name: str) -> str:
        if not args.postgresql:
            return f"sqlite:///{tmp}/{name}.db"
        from webhook_throughput import pg_execute

        database = f"profile_{os.getpid()}_{name}"
        pg_execute(f'CREATE DATABASE "{database}"')
        databases.append(database)
        return f"postgresql://postgres@127.0.0.1:5432/{database}"

    service_environment(tmp, args.synchronous)
    log_file = open(tmp / "stderr.log", "w")
    real_stderr, sys.stderr = sys.stderr, log_file
    saved_fd2 = os.dup(2)
    out = io.StringIO()
    try:
        os.dup2(log_file.fileno(), 2)  # logging handlers bound to fd 2 / sys.stderr
        from bare_app import app as bare

        os.environ["DATABASE_URL"] = database_url("anchor")
        anchor = importlib.import_module("anchor_app").app
        os.environ["DATABASE_URL"] = database_url("service")
        from webhook import create_app

        service = create_app()
        service.config["TESTING"] = True  # no background appliers: measured apart
        services = service.extensions["segment"]

        warm = deliveries(200, "warm", args.batch)
        call(bare, warm)
        if not args.batch:  # the anchor takes single messages (the raw body is signed)
            call(anchor, warm)
        call(service, warm)
        services.drain()
        items = deliveries(count, "timed", args.batch)
        bare_ms = timed(bare, items)
        anchor_ms = timed(anchor, items) if not args.batch else float("nan")
        request_ms = timed(service, items)
        started = time.thread_time()
        services.drain()
        messages = count * (BATCH_SIZE if args.batch else 1)
        apply_ms = (time.thread_time() - started) / messages * 1e3

        gc_modes: dict[str, float] = {}
        if args.gc_modes:
            for mode in ("as is", "startup heap frozen", "no cyclic collector"):
                call(service, deliveries(count, f"gc{len(gc_modes)}", args.batch))
                if mode == "startup heap frozen":
                    gc.freeze()
                elif mode == "no cyclic collector":
                    gc.unfreeze()
                    gc.disable()
                started = time.thread_time()
                services.drain()
                gc_modes[mode] = (time.thread_time() - started) / messages * 1e6
                gc.unfreeze()
                gc.enable()

        if not args.no_profile:
            items = deliveries(count, "profiled", args.batch)
            for name, run in (
                ("request path", lambda: call(service, items)),
                ("local store applier", services.drain),
            ):
                prof = cProfile.Profile()
                prof.enable()
                run()
                prof.disable()
                out.write(f"\n===== {name} =====\n")
                st = pstats.Stats(prof, stream=out)
                st.sort_stats("cumulative").print_stats(args.top)
                st.sort_stats("tottime").print_stats(args.top)
    finally:
        if databases:
            from webhook_throughput import pg_execute

            for database in databases:
                pg_execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        sys.stderr = real_stderr
        os.dup2(saved_fd2, 2)
        os.close(saved_fd2)
        log_file.close()
    kind = f"batch x{BATCH_SIZE}" if args.batch else "single"
    print(out.getvalue())
    print(
        f"in-process WSGI calls, {count} {kind} deliveries, one thread, "
        + ("PostgreSQL; " if args.postgresql else f"SQLITE_SYNCHRONOUS={args.synchronous}; ")
        + "CPU time of the calling thread:"
    )
    print(f"  bare app            : {bare_ms:.3f} ms/delivery (wall {WALL[bare]:.3f})")
    print(f"  anchor (per request): {anchor_ms:.3f} ms/delivery (wall {WALL.get(anchor, 0):.3f})")
    print(f"  service request path: {request_ms:.3f} ms/delivery (wall {WALL[service]:.3f})")
    print(
        f"  local store applier : {apply_ms:.3f} ms/message "
        f"({apply_ms * (BATCH_SIZE if args.batch else 1):.3f} ms/delivery)"
    )
    print(
        f"  service beyond bare : request {request_ms - bare_ms:.3f} + apply "
        f"{apply_ms * (BATCH_SIZE if args.batch else 1):.3f} ms; anchor beyond bare "
        f"{anchor_ms - bare_ms:.3f} ms"
    )
    for mode, us in gc_modes.items():
        print(f"  local store applier, {mode:<20}: {us:.1f} µs/message")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
