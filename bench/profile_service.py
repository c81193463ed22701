#!/usr/bin/env python3
"""Where does a signed single-message delivery spend its time?  (helper for the benchmark)

Runs ``wsgi:app`` in-process (no gunicorn, no sockets) with the benchmark's settings
(SEGMENT_SHARED_SECRET=bench-secret, fresh SQLite file, its own prometheus dir), sends
``--count`` distinct signed messages through Flask's test client under cProfile, and
prints the per-request wall time and the functions that take it; the bare app is timed
the same way for comparison.  Logs go to a temp file (as they would to gunicorn's stderr).

    .venv/bin/python bench/profile_service.py [--count 2000] [--batch] [--top 30]
"""
from __future__ import annotations

import argparse
import cProfile
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

from webhook_throughput import BATCH_SIZE, SECRET, event_json, sign  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=2000, help="requests (default 2000, max 100000)")
    p.add_argument("--batch", action="store_true", help=f"Actions batches of {BATCH_SIZE}")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    count = max(1, min(args.count, 100_000))

    tmp = Path(tempfile.mkdtemp(prefix="webhook-profile-"))
    (tmp / "metrics").mkdir()
    os.environ.update(SEGMENT_SHARED_SECRET=SECRET, DATABASE_URL=f"sqlite:///{tmp}/bench.db",
                      PROMETHEUS_MULTIPROC_DIR=str(tmp / "metrics"))
    log_file = open(tmp / "stderr.log", "w")
    real_stderr, sys.stderr = sys.stderr, log_file
    saved_fd2 = os.dup(2)
    try:
        os.dup2(log_file.fileno(), 2)  # logging handlers bound to fd 2 / sys.stderr
        import wsgi
        from bare_app import app as bare

        reqs = []
        for n in range(count + 200):
            if args.batch:
                evs = [event_json(f"prof-{n}-{j}", n * BATCH_SIZE + j) for j in range(BATCH_SIZE)]
                body, sig = "[" + ",".join(evs) + "]", sign(evs[0].encode())
            else:
                body = event_json(f"prof-{n}", n)
                sig = sign(body.encode())
            reqs.append((body.encode(), {"Content-Type": "application/json", "X-Signature": sig}))

        def run(app, items):
            # Plain WSGI calls with the environ a server gives (Flask's test client
            # costs more than the bare app itself and would blur the comparison).
            for body, headers in items:
                environ = {
                    "REQUEST_METHOD": "POST", "PATH_INFO": "/segment", "QUERY_STRING": "",
                    "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000",
                    "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
                    "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
                    "wsgi.errors": sys.stderr, "wsgi.multithread": True,
                    "wsgi.multiprocess": True, "wsgi.run_once": False,
                    "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": headers["Content-Type"],
                    "HTTP_X_SIGNATURE": headers["X-Signature"], "HTTP_HOST": "127.0.0.1:8000",
                }
                status = []
                chunks = app(environ, lambda s, h, exc=None: status.append(s))
                b"".join(chunks)
                if hasattr(chunks, "close"):
                    chunks.close()
                assert status[0].startswith("200"), status

        run(wsgi.app, reqs[count:])  # warm-up (schema, imports, caches)
        run(bare, reqs[:200])
        t0 = time.perf_counter()
        run(bare, reqs[:count])
        bare_ms = (time.perf_counter() - t0) / count * 1e3
        t0 = time.perf_counter()
        run(wsgi.app, reqs[:count])
        svc_ms = (time.perf_counter() - t0) / count * 1e3
        prof = cProfile.Profile()
        # Distinct messageIds again (renamed, re-signed) for the profiled pass.
        items = []
        for body in (b.replace(b"prof-", b"prof2-") for b, _ in reqs[:count]):
            if args.batch:
                first = body[1:body.index(b"},{") + 1]
                items.append((body, {"Content-Type": "application/json", "X-Signature": sign(first)}))
            else:
                items.append((body, {"Content-Type": "application/json", "X-Signature": sign(body)}))
        prof.enable()
        run(wsgi.app, items)
        prof.disable()
    finally:
        sys.stderr = real_stderr
        os.dup2(saved_fd2, 2)
        os.close(saved_fd2)
        log_file.close()
    out = io.StringIO()
    st = pstats.Stats(prof, stream=out).sort_stats("cumulative")
    st.print_stats(args.top)
    st.sort_stats("tottime").print_stats(args.top)
    kind = f"batch x{BATCH_SIZE}" if args.batch else "single"
    print(f"in-process WSGI calls, {count} {kind} requests, one thread:")
    print(f"  bare app : {bare_ms:.3f} ms/request")
    print(f"  service  : {svc_ms:.3f} ms/request  ({svc_ms / bare_ms:.1f}x bare)")
    print(out.getvalue())
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
