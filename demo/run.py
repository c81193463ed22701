"""``make demo``: a generated shop, loaded and trained through the service's own commands,
then the service itself, with the addresses of a few visitors worth looking at.

1. ``demo/shop.py`` writes the shop (Segment messages as JSON lines, product pictures);
2. a fresh demo database, ``instance/demo/demo.db``: never the one ``make run`` uses;
3. ``flask --app webhook import`` loads the messages, as it would a Segment archive;
4. ``flask --app webhook train`` trains the local engine;
5. ``gunicorn wsgi:app`` serves it on ``PORT`` until Ctrl-C.

Only the commands' public behaviour is used, with an environment of their own: settings
from the caller's shell (an AWS or Segment account, another DATABASE_URL) never reach the
demo, except LOG_LEVEL, LOG_FORMAT and the gunicorn ones.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import shop

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "instance" / "demo"
IMAGES = ROOT / "webhook" / "static" / "shop"  # served as /static/shop/
PASSED_THROUGH = ("PATH", "HOME", "LANG", "TERM", "TMPDIR", "TZ", "LOG_LEVEL", "LOG_FORMAT",
                  "WEB_CONCURRENCY", "GUNICORN_THREADS", "GUNICORN_TIMEOUT")
READY_TIMEOUT = 90.0


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def demo_environment(database: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k in PASSED_THROUGH or k.startswith("LC_")}
    env.update({"DATABASE_URL": f"sqlite:///{database}", "PORT": str(port),
                "PYTHONUNBUFFERED": "1"})
    # One worker (4 threads) is plenty for a person clicking around, and the start-up
    # check below then warms exactly the worker that answers: a worker loads the model
    # on its first request, and would answer that one with popular items.
    env.setdefault("WEB_CONCURRENCY", "1")
    return env


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
    say("$ flask --app webhook " + " ".join(
        os.path.relpath(a, ROOT) if os.path.isabs(a) else a for a in args))
    result = subprocess.run(command, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise SystemExit(f"demo: `flask --app webhook {args[0]}` failed "
                         f"(exit status {result.returncode})")


def answer(base: str, user_id: str) -> dict | None:
    query = urllib.parse.urlencode({"userId": user_id, "numResults": 4})
    try:
        with urllib.request.urlopen(f"{base}/recommendations?{query}", timeout=5) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def wait_until_ready(server: subprocess.Popen, base: str, user_id: str) -> None:
    """Until the workers answer from the trained model (each loads it on its first
    request): a few answers in a row with ``"source": "local"``."""
    deadline = time.monotonic() + READY_TIMEOUT
    in_a_row = 0
    while in_a_row < 6:
        if server.poll() is not None:
            raise SystemExit(f"demo: the service stopped (exit status {server.returncode})")
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: the service did not answer from the model within "
                             f"{READY_TIMEOUT:.0f} s")
        body = answer(base, user_id)
        in_a_row = in_a_row + 1 if body and body.get("source") == "local" else 0
        time.sleep(0.2 if in_a_row else 0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the demo shop (make demo).")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    args = parser.parse_args(argv)
    port = args.port
    if not port_is_free(port):
        raise SystemExit(f"demo: port {port} is in use; choose another: "
                         f"make demo PORT={port + 1}")
    started = time.monotonic()

    say("generating the shop (demo/shop.py, fixed seed)")
    shutil.rmtree(DEMO, ignore_errors=True)  # a fresh demo database every time
    generated = shop.write(DEMO, IMAGES)
    say(f"{len(generated.products)} products, {generated.visitors} visitors, "
        f"{len(generated.messages)} Segment messages in "
        f"{(DEMO / 'shop.jsonl').relative_to(ROOT)}")

    database = DEMO / "demo.db"
    env = demo_environment(database, port)
    say(f"demo database: {database.relative_to(ROOT)} (your own data is not touched)")
    flask(env, "import", str(DEMO / "shop.jsonl"))
    flask(env, "train")

    say(f"starting the service on port {port} (Ctrl-C stops it)")
    server = subprocess.Popen([sys.executable, "-m", "gunicorn", "wsgi:app"], cwd=ROOT,
                              env=env)

    def stop(signum, frame):  # forward a `kill` to the service; Ctrl-C reaches it directly
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    try:
        featured = json.loads((DEMO / "featured.json").read_text())
        wait_until_ready(server, f"http://127.0.0.1:{port}", featured[0]["userId"])
        lines = [f"ready in {time.monotonic() - started:.0f} s. Visitors worth looking at:"]
        for visitor in featured:
            lines.append(f"  {visitor['description']}:")
            lines.append(f"    http://localhost:{port}/?userId={visitor['userId']}")
        lines.append("  what the recommendations earn (clicks, orders, revenue per variant):")
        lines.append(f"    http://localhost:{port}/insights")
        print("\n" + "\n".join("demo: " + line for line in lines) + "\n", flush=True)
        return server.wait()
    except KeyboardInterrupt:  # Ctrl-C: the service got it too, and is stopping
        return 0
    finally:
        if server.poll() is None:
            server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


if __name__ == "__main__":
    sys.exit(main())
