"""Run the service under a real gunicorn for end-to-end tests."""
from __future__ import annotations

import contextlib
import os
import tempfile
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def gunicorn(env: dict[str, str], workers: int = 2, timeout: float = 30.0):
    """Start `gunicorn wsgi:app` from the project folder (so gunicorn.conf.py applies);
    yield (base_url, process); stop it afterwards. stderr is collected in process.log."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_")}
    full_env.update({"WEB_CONCURRENCY": str(workers), "GUNICORN_BIND": f"127.0.0.1:{port}"})
    full_env.update(env)
    log_path = Path(env.get("_LOG_DIR", tempfile.gettempdir())) / f"gunicorn-{port}.log"
    log_file = open(log_path, "w+b")
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "wsgi:app"],
        cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
    )
    process.log_path = log_path  # type: ignore[attr-defined]
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError("gunicorn exited:\n" + log_path.read_text(errors="replace"))
            try:
                if requests.get(base + "/healthz", timeout=1).status_code in (200, 503):
                    break
            except requests.RequestException:  # not listening yet, or still importing
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("gunicorn did not answer in time")
            time.sleep(0.1)
        yield base, process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log_file.close()
