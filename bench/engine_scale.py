"""Scale bench of the local recommendation engine (not a test).

Synthetic shop with power-law popularity (Zipf over 50,000 items), 100,000 users with
skewed activity, a sequential tendency (the next item is often close to the previous one)
and a mix of event types. The interactions go in through ``Ingestor.ingest`` (the webhook's
code) in growing prefixes: 100k, 250k, 500k, 1M. At each size, training runs in a fresh
subprocess (as background training does), which reports its wall time and peak RSS
(``ru_maxrss``). At the largest size, ``gunicorn wsgi:app`` (2 workers) serves
``GET /recommendations`` and the client measures p50/p99 latency.

    .venv/bin/python bench/engine_scale.py                       # SQLite in a temp folder
    .venv/bin/python bench/engine_scale.py --database-url postgresql+psycopg://...
    .venv/bin/python bench/engine_scale.py --sizes 100000 --requests 500   # quick
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EVENTS = (("Product Viewed", 0.70), ("Product Clicked", 0.15), ("Product Added", 0.10),
          ("Order Completed", 0.05))


def synthetic(n: int, n_items: int, n_users: int, seed: int = 7):
    """(users, items, events, times) with power-law item popularity and user activity."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, n_items + 1, dtype=np.float64)
    item_p = ranks ** -1.0
    item_p /= item_p.sum()
    user_p = np.arange(1, n_users + 1, dtype=np.float64) ** -0.6
    user_p /= user_p.sum()
    users = rng.choice(n_users, size=n, p=user_p)
    users[:n_users] = rng.permutation(n_users)  # every user at least once
    items = rng.choice(n_items, size=n, p=item_p)
    # Sequential tendency: half of the time, a user's next item is near their previous one.
    order = np.argsort(users, kind="stable")
    su, si = users[order], items[order]
    follow = (rng.random(n) < 0.5)
    follow[0] = False
    same = np.empty(n, dtype=bool)
    same[0] = False
    same[1:] = su[1:] == su[:-1]
    step = rng.integers(1, 4, size=n)
    for idx in np.flatnonzero(follow & same):
        si[idx] = (si[idx - 1] + step[idx]) % n_items
    items[order] = si
    events = rng.choice(len(EVENTS), size=n, p=[p for _, p in EVENTS])
    times = 1_700_000_000 + np.sort(rng.random(n)) * 90 * 86400  # 90 days, in order
    return users, items, events, times


def messages(users, items, events, times, start: int, stop: int):
    for n in range(start, stop):
        yield {"type": "track", "messageId": f"bench-{n}",
               "userId": f"user-{users[n]}", "event": EVENTS[events[n]][0],
               "timestamp": datetime.fromtimestamp(float(times[n]), tz=timezone.utc)
               .isoformat(),
               "properties": {"product_id": f"item-{items[n]}"}}


def train_child(database_url: str) -> None:
    """Runs in its own process: train once, print wall time and peak RSS as JSON."""
    from webhook.settings import Settings
    from webhook.engine.service import train_once
    from webhook.storage import Store
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    store = Store(database_url)
    started = time.perf_counter()
    version, stats = train_once(store, Settings(database_url=database_url))
    seconds = time.perf_counter() - started
    print(json.dumps({"version": version, "seconds": round(seconds, 2),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                            / 1024, 1),
                      "rss_after_imports_mib": round(rss_before / 1024, 1), **stats}))


def latency(base: str, paths: list[str], threads: int) -> list[float]:
    import requests
    timings: list[float] = []
    lock = threading.Lock()
    chunks = [paths[i::threads] for i in range(threads)]

    def run(chunk):
        session = requests.Session()
        local = []
        for path in chunk:
            started = time.perf_counter()
            response = session.get(base + path, timeout=10)
            local.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, (response.status_code, response.text[:200])
        with lock:
            timings.extend(local)
    workers = [threading.Thread(target=run, args=(c,)) for c in chunks]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return timings


@contextlib.contextmanager
def gunicorn(env: dict[str, str], workers: int = 2, timeout: float = 60.0):
    """`gunicorn wsgi:app` from the project folder; yields its base URL."""
    import requests
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_")}
    full_env.update(env, WEB_CONCURRENCY=str(workers), GUNICORN_BIND=f"127.0.0.1:{port}")
    log = open(os.path.join(env.get("_LOG_DIR", tempfile.gettempdir()), f"gunicorn-{port}.log"), "w+b")
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "wsgi:app"], cwd=ROOT,
                               env=full_env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"gunicorn exited; see {log.name}")
            try:
                if requests.get(base + "/healthz", timeout=10).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("gunicorn did not answer in time")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,250000,500000,1000000")
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--train-child", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_child:
        train_child(args.train_child)
        return

    from webhook import create_app
    from webhook.engine.importer import ImportReport, import_messages

    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = tempfile.mkdtemp(prefix="engine-bench-")
    for size in sizes:
        # Each size is its own shop: 10 interactions a user on average (100,000 users at
        # 1M), the same 50,000-item catalogue.
        n_users = min(args.users, max(1, size // 10))
        url = args.database_url or f"sqlite:///{tmp}/bench-{size}.db"
        users, items, events, times = synthetic(size, args.items, n_users)
        app = create_app({"database_url": url, "engine_background_training": False,
                          "log_level": "WARNING"})
        ingestor = app.extensions["segment"].ingestor
        started = time.perf_counter()
        report = import_messages(ingestor, messages(users, items, events, times, 0, size),
                                 ImportReport(), chunk=2000)
        ingest_seconds = time.perf_counter() - started
        app.extensions["segment"].store.dispose()
        child = subprocess.run([sys.executable, __file__, "--train-child", url],
                               capture_output=True, text=True, cwd=ROOT)
        if child.returncode != 0:
            sys.exit(child.stderr)
        result = json.loads(child.stdout.strip().splitlines()[-1])
        result["ingest_per_second"] = round(report.interactions / ingest_seconds)
        print(f"{size:>9} interactions ({n_users} users): train {result['seconds']:6.1f} s "
              f"(load {result['load_seconds']} s, fit {result['fit_seconds']} s, save "
              f"{result.get('save_seconds', '?')} s), peak RSS {result['peak_rss_mib']} MiB "
              f"(after imports {result['rss_after_imports_mib']} MiB); "
              f"{result['items']} items, similar {result['similar_nnz']} + following "
              f"{result['following_nnz']} entries; ingest {result['ingest_per_second']}/s",
              flush=True)
        if args.database_url and size != sizes[-1]:
            sys.exit("--database-url takes one size (the database is not emptied)")

    # Latency through HTTP under gunicorn, at the largest size.
    rng = np.random.default_rng(11)
    picked = rng.integers(0, max(sizes), size=args.requests)
    paths = []
    for n, i in enumerate(picked):
        if n % 10 == 9:
            paths.append(f"/recommendations?itemId=item-{items[i]}&numResults=25")
        elif n % 10 == 8:
            paths.append(f"/recommendations?anonymousId=nobody-{n}&numResults=25")
        else:
            paths.append(f"/recommendations?userId=user-{users[i]}&numResults=25")
    env = {"DATABASE_URL": url, "ENGINE_BACKGROUND_TRAINING": "false", "LOG_LEVEL": "WARNING",
           "_LOG_DIR": tmp}
    with gunicorn(env, workers=2, timeout=60) as base:
        import requests
        deadline = time.monotonic() + 60
        loaded = 0
        while time.monotonic() < deadline and loaded < 20:  # both workers have the model
            answer = requests.get(base + paths[0], timeout=10).json()
            loaded = loaded + 1 if answer.get("source") != "popular" else 0
            time.sleep(0.05)
        latency(base, paths[:200], 1)  # warm-up
        for threads in (1, 4):
            timings = np.array(latency(base, paths, threads))
            print(f"GET /recommendations at {max(sizes)} interactions, {threads} client "
                  f"thread(s), {len(timings)} requests: p50 {np.percentile(timings, 50):.1f} ms, "
                  f"p99 {np.percentile(timings, 99):.1f} ms, max {timings.max():.1f} ms",
                  flush=True)


if __name__ == "__main__":
    main()
