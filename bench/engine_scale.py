"""Scale bench of the local recommendation engine (not a test): what a shop runs.

A synthetic shop: Zipf item popularity over 50,000 items, 100,000 users with Zipf
activity, a sequential tendency (the next item is often close to the previous one), a mix
of event types, times spread over the last 90 days. Its interactions go in through
``Ingestor.ingest`` (the webhook's code) and are applied to the store as they go
(``Parts.drain``, as ``flask --app webhook import`` does), in growing prefixes of the
one shop: 1M, 5M, 10M by default. At each size:

* ``flask --app webhook train`` runs in a child process: its wall time, the load / fit
  split, and its peak RSS (VmHWM, read by the child as it exits);
* the model must hold what was given: every interaction (or ENGINE_TRAIN_MAX_INTERACTIONS
  of them) and every item; otherwise the bench stops with an error, before any figure;
* the model's size (the blob the workers load);
* ``gunicorn wsgi:app`` with 2 workers serves ``GET /recommendations``; one client thread
  asks, alternately, for one of the 300 most active users and for one of 300 typical users
  (drawn at random among all users), ``--rounds`` times each: p50 and p99 of each group.

The settings come from the environment, as for the service (e.g. ENGINE_HISTORY_MAX,
ENGINE_TRAIN_MAX_INTERACTIONS); the bench sets DATABASE_URL, turns background training off,
logs warnings only and, unless INSIGHTS_RETENTION_DAYS is set, records no insights.

    .venv/bin/python bench/engine_scale.py                            # ~45 min; SQLite
    .venv/bin/python bench/engine_scale.py --sizes 100000 --rounds 1  # a quick look
    .venv/bin/python bench/engine_scale.py --database-url postgresql+psycopg://...  # empty
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EVENTS = (
    ("Product Viewed", 0.70),
    ("Product Clicked", 0.15),
    ("Product Added", 0.10),
    ("Order Completed", 0.05),
)
DAYS = 90


class BenchFailure(SystemExit):
    """The bench cannot report figures: what it measured is not what it was given."""


def synthetic(n: int, n_items: int, n_users: int, seed: int = 7, now: float | None = None):
    """(users, items, events, times), in time order over the last ``DAYS`` days, with
    power-law item popularity and user activity."""
    rng = np.random.default_rng(seed)
    item_p = np.arange(1, n_items + 1, dtype=np.float64) ** -1.0
    item_p /= item_p.sum()
    user_p = np.arange(1, n_users + 1, dtype=np.float64) ** -0.6
    user_p /= user_p.sum()
    users = rng.choice(n_users, size=n, p=user_p)
    items = rng.choice(n_items, size=n, p=item_p)
    # Sequential tendency: half of the time, a user's next item is near their previous one.
    order = np.argsort(users, kind="stable")
    su, si = users[order], items[order]
    follow = rng.random(n) < 0.5
    follow[0] = False
    same = np.empty(n, dtype=bool)
    same[0] = False
    same[1:] = su[1:] == su[:-1]
    step = rng.integers(1, 4, size=n)
    for idx in np.flatnonzero(follow & same):
        si[idx] = (si[idx - 1] + step[idx]) % n_items
    items[order] = si
    events = rng.choice(len(EVENTS), size=n, p=[p for _, p in EVENTS])
    start = (time.time() if now is None else now) - DAYS * 86400
    times = start + np.sort(rng.random(n)) * DAYS * 86400
    return users, items, events, times


def messages(users, items, events, times, start: int, stop: int):
    for n in range(start, stop):
        yield {
            "type": "track",
            "messageId": f"bench-{n}",
            "userId": f"user-{users[n]}",
            "event": EVENTS[events[n]][0],
            "timestamp": datetime.fromtimestamp(float(times[n]), tz=UTC).isoformat(),
            "properties": {"product_id": f"item-{items[n]}"},
        }


def ingest(services, users, items, events, times, start: int, stop: int) -> int:
    """Ingest and apply rows [start, stop); returns the interactions stored."""
    from webhook.engine.importer import ImportReport, import_messages

    # The local store's applier keeps up as the messages go in (as in the import
    # command); any other applier catches up at the end, before anything is measured.
    report = import_messages(
        services.ingestor,
        messages(users, items, events, times, start, stop),
        ImportReport(),
        lambda _: services.drain(["local"]),
        chunk=2000,
    )
    if not services.drain(timeout=3600):
        raise BenchFailure("the appliers did not catch up with the inbox in an hour")
    return report.interactions


# `flask --app webhook train`, reporting at exit the peak RSS of its own address space
# (VmHWM). Not ru_maxrss: Linux carries the forking parent's RSS into the child's across
# exec, so that would report this bench's own size whenever it is the larger.
TRAIN = """
import atexit, sys
from flask.cli import main

def peak():
    status = open("/proc/self/status").read()
    print("VmHWM_kB", status.split("VmHWM:")[1].split()[0], flush=True)

atexit.register(peak)
sys.argv = ["flask", "--app", "webhook", "train"]
main()
"""


def train(env: dict[str, str]) -> dict:
    """``flask --app webhook train`` in a child: its wall time and peak RSS."""
    started = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-c", TRAIN], cwd=ROOT, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    peak = [line.split()[1] for line in child.stdout.splitlines() if line.startswith("VmHWM_kB ")]
    if child.returncode != 0 or not peak:
        raise BenchFailure(
            f"flask train failed ({child.returncode}):\n{child.stdout}{child.stderr}"
        )
    return {"seconds": seconds, "peak_rss_mib": int(peak[0]) / 1024}


def latest_model(store) -> tuple[dict, int]:
    """The newest model's stats and the size of its blob in bytes."""
    import sqlalchemy as sa

    from webhook.storage.schema import engine_models as models_table

    with store.read() as conn:
        row = conn.execute(
            sa.select(models_table.c.stats, sa.func.length(models_table.c.blob))
            .order_by(models_table.c.version.desc())
            .limit(1)
        ).first()
    if row is None:
        raise BenchFailure("no model was saved")
    return json.loads(row[0]), int(row[1])


def check_model(stats: dict, interactions: int, items: int, train_max: int) -> None:
    """Stop the bench unless the model holds the interactions and items it was given
    (``interactions`` ingested, over ``items`` distinct items)."""
    wanted = min(interactions, train_max)
    if not stats.get("interactions") or not stats.get("items"):
        raise BenchFailure(
            f"the model is empty ({stats.get('interactions', 0)} interactions, "
            f"{stats.get('items', 0)} items) after {interactions} interactions over {items} "
            f"items were ingested: nothing reached the store, or training read nothing"
        )
    if stats["interactions"] != wanted:
        raise BenchFailure(
            f"the model was trained on {stats['interactions']} interactions, not the {wanted} given"
        )
    if wanted == interactions and stats["items"] != items:
        raise BenchFailure(f"the model holds {stats['items']} items, not the {items} given")


def latency(base: str, paths: list[str]) -> list[float]:
    import requests

    session = requests.Session()
    timings = []
    for path in paths:
        started = time.perf_counter()
        response = session.get(base + path, timeout=30)
        timings.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200:
            raise BenchFailure(f"GET {path}: {response.status_code} {response.text[:200]}")
    return timings


@contextlib.contextmanager
def gunicorn(env: dict[str, str], log_dir: str, workers: int = 2, timeout: float = 60.0):
    """`gunicorn wsgi:app` from the project folder; yields its base URL."""
    import requests

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    full_env = dict(env, WEB_CONCURRENCY=str(workers), GUNICORN_BIND=f"127.0.0.1:{port}")
    with open(os.path.join(log_dir, f"gunicorn-{port}.log"), "w+b") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "wsgi:app"],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise BenchFailure(f"gunicorn exited; see {log.name}")
                try:
                    if requests.get(base + "/healthz", timeout=10).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise BenchFailure("gunicorn did not answer in time")
                time.sleep(0.2)
            yield base
        finally:
            process.terminate()
            process.wait(timeout=30)


def wait_for_model(base: str, path: str, timeout: float = 120.0) -> None:
    """Until both workers answer from the model (20 local answers in a row)."""
    import requests

    deadline = time.monotonic() + timeout
    local = 0
    while local < 20:
        if time.monotonic() > deadline:
            raise BenchFailure("the workers did not load the model in time")
        source = requests.get(base + path, timeout=30).json().get("source")
        local = local + 1 if source == "local" else 0
        time.sleep(0.05)


def percentiles(timings: list[float]) -> str:
    return f"p50 {np.percentile(timings, 50):.1f} ms, p99 {np.percentile(timings, 99):.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,5000000,10000000")
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument(
        "--visitors", type=int, default=300, help="most active and typical users asked for, each"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="times each of those users is asked for"
    )
    parser.add_argument(
        "--database-url",
        default="",
        help="an empty database (default: SQLite in a temporary folder)",
    )
    parser.add_argument(
        "--workdir",
        help="where the temporary folder goes (its SQLite "
        "database, gunicorn's logs); removed after a run that succeeded",
    )
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))

    from webhook import create_app
    from webhook.engine.persistence import count_interactions
    from webhook.settings import Settings

    tmp = tempfile.mkdtemp(prefix="engine-bench-", dir=args.workdir)
    url = args.database_url or f"sqlite:///{tmp}/bench.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_")}
    env.update(DATABASE_URL=url, ENGINE_BACKGROUND_TRAINING="false", LOG_LEVEL="WARNING")
    # No insights unless asked for: attributing millions of synthetic clicks and orders
    # that no recorded answer showed is the attribution applier's work, not the engine's.
    env.setdefault("INSIGHTS_RETENTION_DAYS", "0")
    os.environ.update(env)  # the in-process app reads the same settings as its children
    settings = Settings.from_env(env)
    app = create_app()
    services = app.extensions["segment"]
    if count_interactions(services.store):
        raise BenchFailure(f"the database already holds interactions: {url}")
    print(
        f"engine scale bench: {', '.join(f'{s:,}' for s in sizes)} interactions, "
        f"{args.items:,} items, up to {args.users:,} users; {services.store.dialect}; "
        f"ENGINE_HISTORY_MAX={settings.engine_history_max}, "
        f"ENGINE_TRAIN_MAX_INTERACTIONS={settings.engine_train_max_interactions}; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    users, items, events, times = synthetic(sizes[-1], args.items, args.users)
    rng = np.random.default_rng(11)
    done = 0
    for size in sizes:
        started = time.perf_counter()
        stored = ingest(services, users, items, events, times, done, size)
        ingest_seconds = time.perf_counter() - started
        done = size
        given_items = len(np.unique(items[:size]))
        trained = train(env)
        stats, blob_bytes = latest_model(services.store)
        check_model(stats, size, given_items, settings.engine_train_max_interactions)
        print(
            f"{size:>11,} interactions ({stored:,} stored in {ingest_seconds:.0f} s, "
            f"{stored / ingest_seconds:,.0f}/s), {stats['users']:,} users, "
            f"{stats['items']:,} items: train {trained['seconds']:.1f} s (load "
            f"{stats['load_seconds']:.1f}, fit {stats['fit_seconds']:.1f}), peak RSS "
            f"{trained['peak_rss_mib']:,.0f} MiB; "
            f"model {blob_bytes / 1e6:.1f} MB (similar {stats['similar_nnz']:,} + "
            f"following {stats['following_nnz']:,} entries)",
            flush=True,
        )

        activity = np.bincount(users[:size], minlength=args.users)
        present = np.flatnonzero(activity)
        active = np.argsort(-activity, kind="stable")[: args.visitors]
        typical = rng.choice(present, size=min(args.visitors, len(present)), replace=False)
        paths = []
        for _ in range(args.rounds):
            for a, t in zip(rng.permutation(active), rng.permutation(typical)):
                paths += [
                    f"/recommendations?userId=user-{a}&numResults=25",
                    f"/recommendations?userId=user-{t}&numResults=25",
                ]
        with gunicorn(env, tmp) as base:
            wait_for_model(base, paths[0])
            latency(base, paths[:100])  # warm-up
            timings = latency(base, paths)
        print(
            f"{'':>11} GET /recommendations, gunicorn 2 workers, 1 client, "
            f"{len(paths):,} requests: most active {len(active)} "
            f"({activity[active].min():,}-{activity[active].max():,} interactions): "
            f"{percentiles(timings[0::2])}; typical {len(typical)} (median "
            f"{int(np.median(activity[typical])):,} interactions): "
            f"{percentiles(timings[1::2])}",
            flush=True,
        )
    services.store.dispose()
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
