#!/usr/bin/env python3
"""What each stage of POST /segment adds to a single delivery's CPU, in-process.

A helper for the throughput benchmark, beside ``profile_service.py`` (whose cProfile
figures are inflated by the profiler itself). The service is built as there (the
benchmark's secrets, a fresh SQLite file, no background threads) and called through WSGI
with distinct signed single deliveries, one thread. The view is swapped for copies that
stop after each stage of the real one (``webhook/views/segment.py``) and answer a fixed
body: the app's hooks alone, then reading the body, verifying the credentials, parsing,
ingesting (the inbox insert included), and the JSON answer; the last row is the real view
(its metrics and log decisions too). Rounds are interleaved; medians of the thread's CPU
time a delivery, and what each stage adds to the one before.

    .venv/bin/python bench/request_stages.py [--count 3000] [--rounds 7]
        [--synchronous NORMAL|FULL]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from profile_service import call, deliveries, in_process_service  # noqa: E402

STAGES = ("hooks", "read", "verify", "parse", "ingest", "answer")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--synchronous", default="NORMAL", choices=["FULL", "NORMAL"])
    args = p.parse_args()
    app, tmp = in_process_service("request-stages-", args.synchronous)

    from flask import current_app, request

    from webhook.segment import decode_body, parse_body
    from webhook.settings import reveal
    from webhook.signature import verify_delivery
    from webhook.views.edge import read_body
    from webhook.views.errors import json_response
    from webhook.views.segment import receive

    parts = app.extensions["segment"]
    with app.app_context():
        fixed = app.response_class(b'{"ok":true}\n', content_type="application/json")

    def cut_after(stage: str):
        """The real view's steps, up to and including ``stage``."""

        def view():
            if stage == "hooks":
                return fixed
            services = current_app.extensions["segment"]
            settings = services.settings
            raw = read_body(settings.max_body_bytes)
            if stage == "read":
                return fixed
            data = verify_delivery(
                request.headers,
                raw,
                secrets=reveal(settings.segment_shared_secrets),
                bearer_tokens=reveal(settings.webhook_bearer_tokens),
                decode=decode_body,
            )
            if stage == "verify":
                return fixed
            body = parse_body(raw, data)
            if stage == "parse":
                return fixed
            summary = services.ingestor.ingest(body.raw_messages)
            if stage == "ingest":
                return fixed
            return json_response(summary.as_json())

        return view

    views = {stage: cut_after(stage) for stage in STAGES}
    views["the real view"] = receive
    call(app, deliveries(300, "warm", False))
    parts.drain()
    times: dict[str, list[float]] = {name: [] for name in views}
    for rnd in range(args.rounds):
        for name, view in views.items():
            app.view_functions["segment.receive"] = view
            items = deliveries(args.count, f"r{rnd}-{name}", False)
            started = time.thread_time()
            call(app, items)
            times[name].append((time.thread_time() - started) / args.count * 1e6)
            parts.drain()  # the worker's work, outside the measured calls
    print(
        f"in-process WSGI calls, {args.count} single deliveries x {args.rounds} rounds, "
        f"SQLITE_SYNCHRONOUS={args.synchronous}; thread CPU a delivery, µs (median):",
        file=sys.__stdout__,
    )
    before = None
    for name, values in times.items():
        value = statistics.median(values)
        added = "" if before is None else f"(+{value - before:5.1f})"
        print(f"  up to {name:<14} {value:7.1f} {added}", file=sys.__stdout__)
        before = value
    return 0


if __name__ == "__main__":
    sys.exit(main())
