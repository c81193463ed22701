#!/usr/bin/env python3
"""Instructions a single-message delivery costs, counted by valgrind: the same on a noisy
machine, where timings move by 10-20 % between runs.

It runs the service in-process (as ``profile_service.py`` does: WSGI calls, no sockets,
SQLITE_SYNCHRONOUS=NORMAL, a fresh database) under valgrind's cachegrind, for two numbers
of distinct signed deliveries, each followed by the appliers' drain, and divides the
difference of the two counts by the difference of the deliveries: what one delivery costs
in user space, its request and its applying, without the start-up. The anchor
(``bench/anchor_app.py``, request only: it applies nothing) is counted the same way. The
kernel's work (sockets, fsync, locks) and gunicorn's are not in these counts: they are
the same for both, and the throughput benchmark is what measures them.

    .venv/bin/python bench/instructions.py [--small 100] [--large 1100]
        [--root OTHER_CHECKOUT ...]   # the service of other checkouts too, side by side

Needs valgrind (``apt-get install valgrind``). Each count takes about a minute; two run
at a time.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _child(which: str, count: int, root: str) -> None:
    """Run ``count`` deliveries (after 100 not counted apart: warm-up) and drain."""
    tmp = tempfile.mkdtemp(prefix="instructions-")
    os.makedirs(f"{tmp}/metrics")
    os.environ.update(
        SEGMENT_SHARED_SECRET="bench-secret",
        SQLITE_SYNCHRONOUS="NORMAL",
        PROMETHEUS_MULTIPROC_DIR=f"{tmp}/metrics",
        ENGINE_BACKGROUND_TRAINING="false",
        DATABASE_URL=f"sqlite:///{tmp}/{which}.db",
    )
    sys.path.insert(0, str(REPO / "bench"))
    from profile_service import call, deliveries

    sys.path.insert(0, root)  # the checkout measured, ahead of this one
    try:
        items = deliveries(count + 100, "instructions", False)
        if which == "anchor":
            from anchor_app import app

            call(app, items)
            return
        import webhook

        assert webhook.__file__.startswith(root), webhook.__file__
        app = webhook.create_app()
        app.config["TESTING"] = True  # no background threads: the drain applies
        services = app.extensions["segment"]
        call(app, items[:100])
        services.drain()
        call(app, items[100:])
        services.drain()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _count(which: str, count: int, root: str) -> int:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    result = subprocess.run(
        [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--child",
            which,
            str(count),
            root,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
    )
    found = re.search(r"I\s+refs:\s+([\d,]+)", result.stderr)
    if result.returncode != 0 or not found:
        raise RuntimeError(f"valgrind run failed ({which}, {count}):\n{result.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", type=int, default=100)
    p.add_argument("--large", type=int, default=1100)
    p.add_argument(
        "--root",
        action="append",
        default=[],
        help="another checkout whose service to count as well",
    )
    args = p.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    targets = (
        [("anchor", str(REPO))]
        + [("service", str(REPO))]
        + [("service", str(Path(root).resolve())) for root in args.root]
    )
    jobs = [(which, n, root) for which, root in targets for n in (args.small, args.large)]
    with ThreadPoolExecutor(2) as pool:
        counts = dict(zip(jobs, pool.map(lambda job: _count(*job), jobs)))
    per = {}
    for which, root in targets:
        per[(which, root)] = (
            counts[(which, args.large, root)] - counts[(which, args.small, root)]
        ) / (args.large - args.small)
    anchor = per[("anchor", str(REPO))]
    print(
        f"user-space instructions a single-message delivery (valgrind; "
        f"{args.large} - {args.small} deliveries, SQLITE_SYNCHRONOUS=NORMAL):"
    )
    for (which, root), value in per.items():
        label = "anchor (request)" if which == "anchor" else f"service (request + apply) {root}"
        print(f"  {value / 1000:8.0f}k  x{value / anchor:4.2f} the anchor  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
