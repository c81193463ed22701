#!/usr/bin/env python3
"""Retention soak: a million deliveries, and the database's size levels off.

The service runs as the Procfile runs it, gunicorn ``wsgi:app`` (2 workers, as deployed)
and the worker process ``flask --app webhook worker`` (it applies the inbox and prunes), on
SQLite with short retention windows, so that what a week of traffic does to a production
database happens in minutes: inbox rows (and their messageId claims) are kept
``--message-retention`` seconds, interactions ``--interaction-retention`` seconds (each
message is dated the moment wrk sends it, so it is stored on arrival and due for pruning
that long after), and the worker process prunes every ``RETENTION_INTERVAL_SECONDS=5``.
Deliveries carry the bearer token only (``WEBHOOK_BEARER_TOKEN``, a whole-body credential),
so wrk may write the time into each body as it sends it. ``wrk`` sends ``--deliveries``
distinct single messages (500 products, 5,000 anonymous visitors: the catalog and the
identity links stay bounded, as in a shop) while the size of the database and inbox
files with their WALs, and the row counts, are sampled every ``--sample-every`` seconds.

Pass: every answer was 200, and the size over the last third of the run grew by less than
10 % (it levels off: pruning keeps up, freed pages are reused).

    .venv/bin/python bench/retention_soak.py [--deliveries 1000000] [--synchronous FULL]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import webhook_throughput  # noqa: E402
from webhook_throughput import (  # noqa: E402
    BEARER,
    LUA_SCRIPT,
    METRICS_TOKEN,
    free_port,
    write_pool,
)

NOW = "SENTATSENTATSENTAT"  # replaced by the time of sending (no Lua pattern characters)


def size_mib(db: Path) -> float:
    """The database and the inbox's own file beside it, each with its WAL."""
    files = (db, Path(f"{db}-wal"), Path(f"{db}-inbox"), Path(f"{db}-inbox-wal"))
    return sum(p.stat().st_size for p in files if p.exists()) / 2**20


def counts(db: Path) -> dict[str, int]:
    out = {}
    try:
        for path, tables in (
            (f"{db}-inbox", ("inbox",)),
            (str(db), ("interactions", "items", "identity_links")),
        ):
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            try:
                out.update(
                    {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}
                )
            finally:
                con.close()
    except sqlite3.Error:
        return {}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deliveries", type=int, default=1_000_000)
    p.add_argument(
        "--message-retention",
        type=float,
        default=60.0,
        help="seconds inbox rows are kept (MESSAGE_RETENTION_HOURS in seconds)",
    )
    p.add_argument(
        "--interaction-retention",
        type=float,
        default=120.0,
        help="seconds interactions are kept (INTERACTION_RETENTION_DAYS in seconds)",
    )
    p.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL"])
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--sample-every", type=float, default=15.0)
    p.add_argument("--keep-tmp", action="store_true")
    a = p.parse_args()
    if not shutil.which("wrk"):
        print("wrk is needed (apt-get install wrk)", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="retention-soak-"))
    db = tmp / "soak.db"
    started = time.monotonic()
    # A placeholder, which the Lua script replaces by the time of
    # sending (the bodies are not signed: the bearer token covers them whole).
    webhook_throughput.TIMESTAMP = NOW
    write_pool(tmp / "pool", f"rs{os.getpid()}", "single", a.deliveries, 1)
    print(
        f"[soak] pool of {a.deliveries} deliveries written in {time.monotonic() - started:.0f} s",
        flush=True,
    )
    (tmp / "segment.lua").write_text(
        LUA_SCRIPT.replace(
            "    bodies[idx])",
            f'    (bodies[idx]:gsub("{NOW}", os.date("!%Y-%m-%dT%H:%M:%S.000Z"), 1)))',
        )
    )
    (tmp / "metrics").mkdir()
    port = free_port()
    env = dict(
        os.environ,
        WEBHOOK_BEARER_TOKEN=BEARER,
        METRICS_TOKEN=METRICS_TOKEN,
        DATABASE_URL=f"sqlite:///{db}",
        SQLITE_SYNCHRONOUS=a.synchronous,
        ENGINE_BACKGROUND_TRAINING="false",
        MESSAGE_RETENTION_HOURS=str(a.message_retention / 3600),
        INTERACTION_RETENTION_DAYS=str(a.interaction_retention / 86400),
        RETENTION_INTERVAL_SECONDS="5",
        PROMETHEUS_MULTIPROC_DIR=str(tmp / "metrics"),
    )
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "gunicorn.conf.py",
            "--workers",
            "2",
            "--no-control-socket",
            "--bind",
            f"127.0.0.1:{port}",
            "wsgi:app",
        ],
        cwd=REPO,
        env=env,
        stdout=open(tmp / "gunicorn.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "webhook", "worker"],
        cwd=REPO,
        env=env,
        stdout=open(tmp / "worker.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    samples: list[dict] = []
    stop = threading.Event()
    try:
        time.sleep(3)

        def sample() -> None:
            t0 = time.monotonic()
            while not stop.wait(a.sample_every):
                samples.append(
                    {"t": round(time.monotonic() - t0), "mib": round(size_mib(db), 2), **counts(db)}
                )
                print(f"[soak] {json.dumps(samples[-1])}", flush=True)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # wrk with a long duration, stopped (SIGINT: it still reports) once the service
        # has answered every delivery of the pool.
        proc = subprocess.Popen(
            [
                "wrk",
                "-t",
                "1",
                "-c",
                str(a.connections),
                "-d",
                "7200s",
                "--timeout",
                "10s",
                "-s",
                str(tmp / "segment.lua"),
                f"http://127.0.0.1:{port}/segment",
                "--",
                str(tmp / "pool"),
                "0",
                BEARER,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        while proc.poll() is None:
            time.sleep(1)
            if _delivered(port) >= a.deliveries:
                proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
        stop.set()
        sampler.join(5)
        stats = next(
            (json.loads(line[11:]) for line in out.splitlines() if line.startswith("BENCH_JSON ")),
            {},
        )
    finally:
        stop.set()
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
    third = samples[len(samples) * 2 // 3 :] if len(samples) >= 3 else samples
    growth = (
        (max(s["mib"] for s in third) - third[0]["mib"]) / third[0]["mib"] * 100
        if third and third[0]["mib"]
        else float("nan")
    )
    # A run that stored nothing measured nothing: the service answers 200 for messages it
    # skips (too old, older than INTERACTION_RETENTION_DAYS on arrival).
    stored = any(s.get("inbox", 0) or s.get("interactions", 0) for s in samples)
    if not stored:
        print("the service stored none of the deliveries: nothing was measured")
    ok = bool(stats) and stats.get("non200", 1) == 0 and growth < 10.0 and stored
    print(
        json.dumps(
            {
                "deliveries_answered_200": stats.get("ok"),
                "non200": stats.get("non200"),
                "socket_errors": {
                    k: stats.get(k) for k in ("err_connect", "err_read", "err_write", "err_timeout")
                },
                "size_mib_first": samples[0]["mib"] if samples else None,
                "size_mib_last": samples[-1]["mib"] if samples else None,
                "growth_over_last_third_pct": round(growth, 2),
                "samples": samples,
            },
            indent=1,
        )
    )
    print("PASS" if ok else "FAIL")
    if a.keep_tmp:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


def _delivered(port: int) -> int:
    """Deliveries answered so far, from the service's own counter."""
    import urllib.request

    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics",
            headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return 0
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith('segment_deliveries_total{status="200"}')
        )
    )


if __name__ == "__main__":
    sys.exit(main())
