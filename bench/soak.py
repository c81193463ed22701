"""Soak benchmark: mixed webhook deliveries and recommendation reads at a steady rate.

Runs the service as the Procfile does, on loopback: real gunicorn ``wsgi:app`` (2 web
workers, gthread, as deployed) and the worker process ``flask --app webhook worker`` beside
it (it applies the inbox, trains the local engine, activates), with the credentials a
deployment sets (``SEGMENT_SHARED_SECRET``: every delivery signed; ``WEBHOOK_BEARER_TOKEN``:
every delivery carries it, as Actions batches must; ``METRICS_TOKEN`` for /metrics). It
sends, open-loop at fixed rates, Segment deliveries (Classic single messages and Actions
batches of 5: product views, add-to-cart, orders, identifies) to POST /segment and reads
GET /recommendations for known visitors and items. Bounded in time (``--duration``) and in
count (rate × duration, and ``--max-requests``). Not part of CI.

Reports: errors (any non-2xx or failed request: must be zero), p50/p99/max latency per
endpoint, requests late to start (the client could not keep the rate), the resident memory
(VmRSS) of each web worker and of the worker process after a warm-up and at the end (growth
must stay under 10 % for each), and whether any of them was replaced (a failure). A probe
measures real time under this load: every ``--probe-every`` seconds a new user buys the
item first in their recommendations, and the time from the purchase's 200 to the first
answer without it is recorded (the inbox applied, the purchase excluded); its p99 must stay
within 1 s. The warm-up (60 s) lasts until the
service is in its steady shape: at these rates the local engine trains its first model
after ~30 s (1,000 interactions) in the worker process, and each web worker loads it within
ENGINE_MODEL_REFRESH_SECONDS; a process measured before that would count the model itself
as growth. Exit status 1 when a criterion fails.

    .venv/bin/python bench/soak.py                       # 10 minutes, SQLite
    .venv/bin/python bench/soak.py --duration 60         # a quick look
    .venv/bin/python bench/soak.py --database-url postgresql+psycopg://...  # PostgreSQL
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from tests.gunicorn_server import gunicorn, worker_pids  # noqa: E402

SECRET = "soak-shared-secret"
BEARER = "soak-bearer-token-0123456789"
METRICS_TOKEN = "soak-metrics-token-0123456789"

USERS = [f"soak-user-{i}" for i in range(300)]
ANONS = [f"soak-anon-{i}" for i in range(1000)]
ITEMS = [f"sku-{i}" for i in range(500)]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def signed_post(http: requests.Session, url: str, body: list | dict, timeout: float):
    """POST a delivery as Segment sends it: the bearer token, and X-Signature of the raw
    body (one message) or of JSON.stringify of the first message (an Actions batch; the
    messages here are plain JSON, which compact json.dumps writes as JavaScript does)."""
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    signed = (
        json.dumps(body[0], separators=(",", ":"), ensure_ascii=False).encode()
        if isinstance(body, list)
        else raw
    )
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {BEARER}",
        "X-Signature": hmac.new(SECRET.encode(), signed, hashlib.sha1).hexdigest(),
    }
    return http.post(url, data=raw, headers=headers, timeout=timeout)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Traffic:
    def __init__(self, seed: int):
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counter = 0

    def _message(self) -> dict:
        with self.lock:
            self.counter += 1
            n = self.counter
            r = self.random.random()
            user = self.random.choice(USERS)
            anon = self.random.choice(ANONS)
            item = self.random.choice(ITEMS[:100] if r < 0.5 else ITEMS)
        base = {
            "messageId": f"soak-{os.getpid()}-{n}",
            "anonymousId": anon,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        }
        if r < 0.70:
            return {
                **base,
                "type": "track",
                "event": "Product Viewed",
                "properties": {"product_id": item, "name": f"Item {item}", "price": 9.5},
            }
        if r < 0.85:
            return {
                **base,
                "type": "track",
                "event": "Product Added",
                "userId": user,
                "properties": {"product_id": item, "quantity": 1},
            }
        if r < 0.95:
            return {
                **base,
                "type": "track",
                "event": "Order Completed",
                "userId": user,
                "properties": {
                    "order_id": f"o-{n}",
                    "products": [{"product_id": item}, {"product_id": ITEMS[(n * 7) % 100]}],
                },
            }
        return {
            **base,
            "type": "identify",
            "userId": user,
            "traits": {"plan": "pro", "city": "Zürich"},
        }

    def delivery(self) -> list | dict:
        with self.lock:
            batch = self.random.random() < 0.3
        return [self._message() for _ in range(5)] if batch else self._message()

    def read_query(self) -> dict:
        with self.lock:
            r = self.random.random()
            if r < 0.5:
                return {"userId": self.random.choice(USERS), "numResults": 10}
            if r < 0.85:
                return {"anonymousId": self.random.choice(ANONS), "numResults": 10}
            return {"itemId": self.random.choice(ITEMS[:100]), "numResults": 10}


def probe_visibility(
    base: str, every: float, stop: threading.Event, visible: list, failures: list
) -> None:
    """A new user buys the item first in their recommendations; how long until an answer
    leaves it out (the purchase applied from the inbox and excluded)?"""
    http = requests.Session()
    n = 0
    while not stop.wait(every):
        n += 1
        user = f"probe-{os.getpid()}-{n}"
        query = {"userId": user, "numResults": 20}
        try:
            before = http.get(base + "/recommendations", params=query, timeout=10).json()
            if not before.get("itemList"):
                continue
            item = before["itemList"][0]["itemId"]
            order = {
                "type": "track",
                "event": "Order Completed",
                "userId": user,
                "messageId": f"{user}-order",
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                "properties": {
                    "order_id": f"{user}-o",
                    "products": [{"product_id": item, "price": 9.5, "quantity": 1}],
                },
            }
            answer = signed_post(http, base + "/segment", order, timeout=10)
            if answer.status_code != 200:
                failures.append(f"order {answer.status_code}")
                continue
            accepted = time.perf_counter()
            while True:
                now = http.get(base + "/recommendations", params=query, timeout=10).json()
                if item not in {i["itemId"] for i in now.get("itemList", [])}:
                    visible.append(time.perf_counter() - accepted)
                    break
                if time.perf_counter() - accepted > 10:
                    failures.append(f"{item} still recommended 10 s after its purchase")
                    break
                time.sleep(0.01)
        except (requests.RequestException, ValueError) as exc:
            failures.append(type(exc).__name__)


def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    database_url = args.database_url or f"sqlite:///{workdir}/soak.db"
    env = {
        "DATABASE_URL": database_url,
        "_LOG_DIR": str(workdir),
        "LOG_LEVEL": args.log_level,
        "SEGMENT_SHARED_SECRET": SECRET,
        "WEBHOOK_BEARER_TOKEN": BEARER,
        "METRICS_TOKEN": METRICS_TOKEN,
    }
    if args.no_training:
        env["ENGINE_BACKGROUND_TRAINING"] = "false"
    traffic = Traffic(args.seed)
    results: dict[str, list] = {"webhook": [], "recommendations": []}
    errors: list[str] = []
    late = {"count": 0}
    lock = threading.Lock()
    session_local = threading.local()

    def session() -> requests.Session:
        if not hasattr(session_local, "s"):
            session_local.s = requests.Session()
        return session_local.s

    def do(kind: str, base: str) -> None:
        started = time.perf_counter()
        try:
            if kind == "webhook":
                response = signed_post(session(), base + "/segment", traffic.delivery(), 10)
            else:
                response = session().get(
                    base + "/recommendations", params=traffic.read_query(), timeout=10
                )
            ok = 200 <= response.status_code < 300
            detail = f"{kind} {response.status_code} {response.text[:120]}"
        except requests.RequestException as exc:
            ok, detail = False, f"{kind} {type(exc).__name__}"
        elapsed = time.perf_counter() - started
        with lock:
            results[kind].append(elapsed)
            if not ok:
                errors.append(detail)

    with gunicorn(env, workers=args.workers) as (base, process):
        seed = [traffic._message() for _ in range(400)]
        assert signed_post(session(), base + "/segment", seed, 30).status_code == 200
        pids = sorted(worker_pids(process.pid))
        boot_rss = {pid: rss_kib(pid) for pid in pids}

        def schedule(seconds: float, record: bool) -> int:
            interval = {"webhook": 1.0 / args.webhook_rate, "recommendations": 1.0 / args.read_rate}
            nxt = {k: time.perf_counter() for k in interval}
            end = time.perf_counter() + seconds
            sent = 0
            with ThreadPoolExecutor(args.client_threads) as pool:
                while time.perf_counter() < end and sent < args.max_requests:
                    kind = min(nxt, key=nxt.get)
                    wait = nxt[kind] - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                    elif wait < -0.25 and record:
                        late["count"] += 1
                    pool.submit(do, kind, base)
                    nxt[kind] += interval[kind]
                    sent += 1
            return sent

        schedule(args.warmup, record=True)
        with lock:
            for values in results.values():
                values.clear()
            errors_warmup = list(errors)
            errors.clear()
        start_rss = {pid: rss_kib(pid) for pid in pids}
        # The worker process (the Procfile's worker): its memory counts as theirs does.
        worker_process = process.worker.pid
        worker_start = {worker_process: rss_kib(worker_process)}
        started = time.time()
        samples: list = []
        stop_sampling = threading.Event()

        def sample_rss():
            # Memory over time: growth that levels off (caches, the model of a growing data
            # set) reads differently from growth that keeps going (a leak).
            while not stop_sampling.wait(args.sample_every):
                samples.append(
                    {
                        "t": round(time.time() - started),
                        **{
                            str(p): rss_kib(p)
                            for p in [*pids, worker_process]
                            if os.path.exists(f"/proc/{p}")
                        },
                    }
                )

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        visible: list[float] = []
        probe_failures: list[str] = []
        prober = threading.Thread(
            target=probe_visibility,
            daemon=True,
            args=(base, args.probe_every, stop_sampling, visible, probe_failures),
        )
        prober.start()
        sent = schedule(args.duration, record=True)
        stop_sampling.set()
        prober.join(30)
        wall = time.time() - started
        end_pids = sorted(worker_pids(process.pid))
        end_rss = {pid: rss_kib(pid) for pid in end_pids if pid in start_rss}
        # Replaced: it exited (a supervisor like Heroku's would start a new one).
        worker_replaced = process.worker.poll() is not None
        worker_end = {} if worker_replaced else {worker_process: rss_kib(worker_process)}
        metrics = requests.get(
            base + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10
        )
        metrics.raise_for_status()
        counts = metrics.text.count("\n")
        log_size = process.log_path.stat().st_size
        unhandled = process.log_path.read_text(errors="replace").count("unhandled error")

    growth = {
        str(pid): round(100.0 * (end_rss[pid] - start_rss[pid]) / start_rss[pid], 2)
        for pid in end_rss
    }
    worker_growth = {
        str(pid): round(100.0 * (worker_end[pid] - worker_start[pid]) / worker_start[pid], 2)
        for pid in worker_end
    }
    report = {
        "duration_s": round(wall, 1),
        "workers": args.workers,
        "database": "postgresql" if database_url.startswith("postgresql") else "sqlite",
        "rates_per_s": {"webhook": args.webhook_rate, "recommendations": args.read_rate},
        "requests": {k: len(v) for k, v in results.items()},
        "scheduled": sent,
        "late_starts": late["count"],
        "errors": len(errors),
        "error_samples": errors[:5],
        "errors_during_warmup": len(errors_warmup),
        "unhandled_errors_logged": unhandled,
        "latency_ms": {
            k: {
                "p50": round(1000 * percentile(v, 0.50), 2),
                "p99": round(1000 * percentile(v, 0.99), 2),
                "max": round(1000 * max(v), 2) if v else None,
            }
            for k, v in results.items()
        },
        "worker_rss_kib": {"boot": boot_rss, "after_warmup": start_rss, "end": end_rss},
        "worker_rss_growth_pct": growth,
        "worker_process_rss_kib": {"after_warmup": worker_start, "end": worker_end},
        "worker_process_rss_growth_pct": worker_growth,
        "worker_process_replaced": worker_replaced,
        "purchase_visible_ms": {
            "probes": len(visible),
            "p50": round(1000 * percentile(visible, 0.50), 1),
            "p99": round(1000 * percentile(visible, 0.99), 1),
            "max": round(1000 * max(visible), 1) if visible else None,
            "failures": probe_failures[:5],
        },
        "worker_rss_samples_kib": samples,
        "engine_background_training": not args.no_training,
        "workers_replaced": sorted(set(pids) ^ set(end_pids)),
        "log_bytes": log_size,
        "metrics_lines": counts,
    }
    report["pass"] = bool(
        report["errors"] == 0
        and not report["workers_replaced"]
        and growth
        and max(growth.values()) < 10.0
        and not worker_replaced
        and worker_growth
        and all(g < 10.0 for g in worker_growth.values())
        and report["requests"]["webhook"] > 0
        and visible
        and not probe_failures
        and percentile(visible, 0.99) <= 1.0
    )
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds measured")
    parser.add_argument(
        "--warmup",
        type=float,
        default=60.0,
        help="seconds before measuring (default 60: first model loaded)",
    )
    parser.add_argument("--webhook-rate", type=float, default=25.0, help="deliveries/s")
    parser.add_argument("--read-rate", type=float, default=25.0, help="reads/s")
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--client-threads", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--sample-every", type=float, default=30.0, help="seconds between memory samples"
    )
    parser.add_argument(
        "--no-training",
        action="store_true",
        help="ENGINE_BACKGROUND_TRAINING=false: the request path alone",
    )
    parser.add_argument(
        "--probe-every", type=float, default=2.0, help="seconds between purchase-visibility probes"
    )
    parser.add_argument("--out", default="", help="also write the JSON report here")
    args = parser.parse_args()
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
