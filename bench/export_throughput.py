"""Benchmark: ``flask --app webhook export`` on a synthetic Segment archive.

    .venv/bin/python bench/export_throughput.py [--events 1000000] [--keep DIR]

Writes a gzip JSON-lines archive shaped like Segment's S3 archives (Product Viewed,
Product Added, Order Completed with 1-3 products, identify, page; about 2% redeliveries),
then runs the export in a fresh process — twice, to check the output is the same byte for
byte — and reports messages/s, interactions/s and that process's peak RSS. The archive is
generated in this process, so the figures are the export's alone.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
from webhook.settings import Settings
from webhook.export import export_archives
settings = Settings.from_mapping(dict(
    event_value_property="price", event_properties=(("discount", "discount"),),
    user_traits_map=(("plan", "plan"), ("city", "city")),
    item_properties_map=(("category", "category"), ("price", "price"))))
started = time.perf_counter()
report = export_archives(sys.argv[2:], sys.argv[1], settings)
elapsed = time.perf_counter() - started
print(json.dumps({"seconds": elapsed, "report": report.as_json(),
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def generate(path: Path, events: int, seed: int = 8) -> int:
    """Write ``events`` messages; returns how many were written (redeliveries included)."""
    rng = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    n_users, n_items = max(10, events // 20), max(10, events // 100)
    written = 0
    recent: list[str] = []
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as out:
        for n in range(events):
            if recent and rng.random() < 0.02:
                out.write(rng.choice(recent) + "\n")  # a redelivery: same messageId
                written += 1
                continue
            user = f"user-{rng.randrange(n_users)}"
            when = (start + timedelta(seconds=n * 3)).isoformat().replace("+00:00", "Z")
            base = {
                "messageId": f"m-{n}",
                "anonymousId": f"anon-{user}",
                "userId": user,
                "timestamp": when,
                "receivedAt": when,
                "sentAt": when,
                "context": {
                    "library": {"name": "analytics-python", "version": "2.4.0"},
                    "ip": "203.0.113.9",
                },
                "integrations": {},
            }
            roll = rng.random()
            item = f"sku-{int(rng.paretovariate(1.2)) % n_items}"
            product = {
                "product_id": item,
                "name": f"Product {item}",
                "price": round(rng.uniform(5, 500), 2),
                "category": rng.choice(["Furniture", "Lamps", "Tables", "Rugs"]),
            }
            if roll < 0.70:
                message = {
                    **base,
                    "type": "track",
                    "event": "Product Viewed",
                    "properties": {**product, "discount": rng.choice([0, 0.1])},
                }
            elif roll < 0.82:
                message = {
                    **base,
                    "type": "track",
                    "event": "Product Added",
                    "properties": {**product, "quantity": 1},
                }
            elif roll < 0.87:
                products = [
                    {**product, "product_id": f"sku-{rng.randrange(n_items)}"}
                    for _ in range(rng.randint(1, 3))
                ]
                message = {
                    **base,
                    "type": "track",
                    "event": "Order Completed",
                    "properties": {"order_id": f"o-{n}", "revenue": 99.0, "products": products},
                }
            elif roll < 0.95:
                message = {**base, "type": "page", "name": "Home", "properties": {}}
            else:
                message = {
                    **base,
                    "type": "identify",
                    "traits": {
                        "plan": rng.choice(["free", "pro"]),
                        "city": rng.choice(["Zürich", "Lyon", "Porto"]),
                        "email": f"{user}@example.com",
                    },
                }
            line = json.dumps(message, ensure_ascii=False)
            out.write(line + "\n")
            written += 1
            recent.append(line)
            if len(recent) > 1000:
                recent = recent[-500:]
    return written


def run_export(archive: Path, out: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(out), str(archive)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    answer["children_max_rss_kib"] = max(
        before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    )
    return answer


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("interactions.csv", "users.csv", "items.csv"):
        h.update((folder / name).read_bytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--keep", help="a folder to keep the archive and output in")
    args = parser.parse_args()
    folder = Path(args.keep or tempfile.mkdtemp(prefix="export-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "archive.jsonl.gz"
    started = time.perf_counter()
    written = generate(archive, args.events)
    print(
        f"archive: {written} messages, {archive.stat().st_size / 1e6:.1f} MB gzip, "
        f"made in {time.perf_counter() - started:.1f} s"
    )
    runs = []
    for attempt in (1, 2):
        out = folder / f"out{attempt}"
        result = run_export(archive, out)
        runs.append((result, digest(out)))
        report = result["report"]
        print(
            f"run {attempt}: {result['seconds']:.1f} s, "
            f"{report['messages'] / result['seconds']:,.0f} messages/s, "
            f"{report['interactions'] / result['seconds']:,.0f} interactions/s, "
            f"peak RSS {result['peak_rss_kib'] / 1024:.0f} MiB; "
            f"{report['interactions']} interactions, {report['users']} users, "
            f"{report['items']} items, {report['duplicates']} duplicates"
        )
    same = runs[0][1] == runs[1][1]
    print(f"same output on re-run: {same} (sha256 {runs[0][1][:16]}…)")
    print(json.dumps(runs[0][0]["report"]))
    if not args.keep:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
