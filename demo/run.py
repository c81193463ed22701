"""``make demo``: a generated shop, loaded and trained through the service's own commands,
then the service itself, running an experiment, with the addresses of a few visitors and
of the experiment's results.

1. ``demo/shop.py`` writes the shop (Segment messages as JSON lines, product pictures);
2. a fresh demo database, ``instance/demo/demo.db``: never the one ``make run`` uses;
3. ``flask --app webhook import`` loads the messages, as it would a Segment archive;
4. ``flask --app webhook train`` trains the local engine;
5. the service, as the Procfile runs it (``gunicorn wsgi:app`` and ``flask --app webhook
   worker``), serves it on ``PORT`` until Ctrl-C, with ``EXPERIMENT=local:50,popular:50``;
6. 14 days of visitors are replayed through it: each asks ``GET /recommendations`` (so the
   service records the answer) and clicks, adds to the cart and orders what they like,
   sent to ``POST /segment`` as Segment would, naming the answer's ``recommendation_id``
   (so the attribution applier attributes them). ``/insights?days=14`` then opens on a
   populated comparison with a verdict.

The service records an answer at the time it gives it. To give the 14 days their own
dates, the demo runs the service on a wall clock it sets back to each day in turn, then to
the real time (``demo/clock/sitecustomize.py``, loaded only by the demo's service); the
events carry the same times. Nothing of the service is changed for this: it lives through
the 14 days, and records what it did on each as it would on any day.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import shop

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "instance" / "demo"
IMAGES = ROOT / "webhook" / "static" / "shop"  # served as /static/shop/
PASSED_THROUGH = (
    "PATH",
    "HOME",
    "LANG",
    "TERM",
    "TMPDIR",
    "TZ",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "WEB_CONCURRENCY",
    "GUNICORN_THREADS",
    "GUNICORN_TIMEOUT",
)
READY_TIMEOUT = 90.0
OPERATOR_TOKEN = secrets.token_hex(16)
EXPERIMENT = "local:50,popular:50"
EXPERIMENT_DAYS = 14
VISITS_PER_DAY = 120
APPLIED_TIMEOUT = 120.0


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def demo_environment(database: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in PASSED_THROUGH or k.startswith("LC_")}
    env.update(
        {
            "DATABASE_URL": f"sqlite:///{database}",
            "PORT": str(port),
            "PYTHONUNBUFFERED": "1",
            # The demo's own operator token: it reads the appliers' lag on /healthz.
            "METRICS_TOKEN": OPERATOR_TOKEN,
        }
    )
    # One worker (4 threads) is plenty for a person clicking around, and the start-up
    # check below then warms exactly the worker that answers: a worker loads the model
    # on its first request, and would answer that one with popular items.
    env.setdefault("WEB_CONCURRENCY", "1")
    return env


class Clock:
    """The demo service's wall clock: an offset from the real time, in a file that every
    process of the service reads (``demo/clock/sitecustomize.py``)."""

    SETTLE_SECONDS = 1.0  # every process has read the file again

    def __init__(self, folder: Path):
        self.file = folder / "clock"
        self.offset = timedelta(0)
        self.file.write_text("0\n")

    def environment(self) -> dict[str, str]:
        return {"PYTHONPATH": str(ROOT / "demo" / "clock"), "DEMO_CLOCK_FILE": str(self.file)}

    def set(self, offset: timedelta) -> None:
        if offset == self.offset:
            return
        self.file.write_text(f"{offset.total_seconds():.0f}\n")
        self.offset = offset
        time.sleep(self.SETTLE_SECONDS)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def flask(env: dict[str, str], *args: str) -> None:
    command = [sys.executable, "-m", "flask", "--app", "webhook", *args]
    say(
        "$ flask --app webhook "
        + " ".join(os.path.relpath(a, ROOT) if os.path.isabs(a) else a for a in args)
    )
    result = subprocess.run(command, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise SystemExit(
            f"demo: `flask --app webhook {args[0]}` failed (exit status {result.returncode})"
        )


def answer(base: str, user_id: str) -> dict | None:
    query = urllib.parse.urlencode({"userId": user_id, "numResults": 4})
    try:
        with urllib.request.urlopen(f"{base}/recommendations?{query}", timeout=5) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def wait_until_ready(server: subprocess.Popen, base: str, user_id: str) -> None:
    """Until the workers answer from the trained model (each loads it on its first
    request): a few answers in a row with ``"source": "local"`` for a visitor of the
    experiment's local variant."""
    deadline = time.monotonic() + READY_TIMEOUT
    in_a_row = 0
    while in_a_row < 6:
        if server.poll() is not None:
            raise SystemExit(f"demo: the service stopped (exit status {server.returncode})")
        if time.monotonic() > deadline:
            raise SystemExit(
                f"demo: the service did not answer from the model within {READY_TIMEOUT:.0f} s"
            )
        body = answer(base, user_id)
        in_a_row = in_a_row + 1 if body and body.get("source") == "local" else 0
        time.sleep(0.2 if in_a_row else 0.5)


def post(base: str, path: str, body: dict) -> None:
    request = urllib.request.Request(
        f"{base}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


def wait_applied(base: str) -> None:
    """Until every applier of the inbox has applied what was sent (GET /healthz)."""
    deadline = time.monotonic() + APPLIED_TIMEOUT
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(
                f"{base}/healthz", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"}
            )
            with urllib.request.urlopen(request, timeout=5) as response:
                inbox = json.load(response).get("inbox")
        except (urllib.error.URLError, OSError, ValueError):
            inbox = None
        if inbox and not any(a["pending"] for a in inbox["appliers"].values()):
            return
        time.sleep(0.1)
    raise SystemExit(f"demo: the service did not apply the events within {APPLIED_TIMEOUT:.0f} s")


def replay(base: str, generated: shop.Shop, clock: Clock) -> dict[str, int]:
    """The experiment's days: each visit asks for recommendations, and what the visitor
    does with them goes to POST /segment. Returns counts for the summary line."""
    plan = shop.experiment_days(generated, EXPERIMENT_DAYS, VISITS_PER_DAY)
    counts = {"visits": 0, "events": 0}
    number = 0
    for day, visits in enumerate(plan):
        clock.set(-timedelta(days=EXPERIMENT_DAYS - 1 - day))
        events: list[dict] = []
        for visit in visits:
            number += 1
            query = urllib.parse.urlencode({**visit.who, "numResults": 4})
            with urllib.request.urlopen(f"{base}/recommendations?{query}", timeout=30) as response:
                body = json.load(response)
            rng = random.Random(f"{shop.EXPERIMENT_SEED}-{number}")
            events += shop.react(rng, generated, visit, body, clock.now(), number)
        for start in range(0, len(events), 100):
            post(base, "/segment", {"batch": events[start : start + 100]})
        wait_applied(base)
        counts["visits"] += len(visits)
        counts["events"] += len(events)
    clock.set(timedelta(0))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the demo shop (make demo).")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    args = parser.parse_args(argv)
    port = args.port
    if not port_is_free(port):
        raise SystemExit(f"demo: port {port} is in use; choose another: make demo PORT={port + 1}")
    started = time.monotonic()

    say("generating the shop (demo/shop.py, fixed seed)")
    shutil.rmtree(DEMO, ignore_errors=True)  # a fresh demo database every time
    generated = shop.write(DEMO, IMAGES)
    say(
        f"{len(generated.products)} products, {generated.visitors} visitors, "
        f"{len(generated.messages)} Segment messages in "
        f"{(DEMO / 'shop.jsonl').relative_to(ROOT)}"
    )

    database = DEMO / "demo.db"
    env = demo_environment(database, port)
    say(f"demo database: {database.relative_to(ROOT)} (your own data is not touched)")
    flask(env, "import", str(DEMO / "shop.jsonl"))
    flask(env, "train")

    clock = Clock(DEMO)
    say(f"starting the service on port {port} with EXPERIMENT={EXPERIMENT} (Ctrl-C stops it)")
    # The Procfile's two processes: the web process and the worker.
    service_env = {**env, "EXPERIMENT": EXPERIMENT, **clock.environment()}
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "wsgi:app"], cwd=ROOT, env=service_env
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "webhook", "worker"], cwd=ROOT, env=service_env
    )

    def stop(signum, frame):  # forward a `kill` to the service; Ctrl-C reaches it directly
        for process in (server, worker):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    try:
        featured = json.loads((DEMO / "featured.json").read_text())
        base = f"http://127.0.0.1:{port}"
        wait_until_ready(server, base, featured[0]["userId"])
        # The imported history goes through the attribution applier first, at the real
        # time: an event it sees is never older than the service's clock.
        wait_applied(base)
        say(
            f"replaying {EXPERIMENT_DAYS} days of the experiment: {VISITS_PER_DAY} visits a "
            "day ask for recommendations, then click, add to the cart and order"
        )
        done = replay(base, generated, clock)
        say(f"{done['visits']} visits, {done['events']} Segment events")
        lines = [f"ready in {time.monotonic() - started:.0f} s. Visitors worth looking at:"]
        for visitor in featured:
            lines.append(f"  {visitor['description']}:")
            lines.append(f"    http://localhost:{port}/?userId={visitor['userId']}")
        lines.append(f"  the experiment ({EXPERIMENT}): what each variant earns, compared:")
        lines.append(f"    http://localhost:{port}/insights?days={EXPERIMENT_DAYS}")
        print("\n" + "\n".join("demo: " + line for line in lines) + "\n", flush=True)
        return server.wait()
    except KeyboardInterrupt:  # Ctrl-C: the service got it too, and is stopping
        return 0
    finally:
        for process in (server, worker):
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


if __name__ == "__main__":
    sys.exit(main())
