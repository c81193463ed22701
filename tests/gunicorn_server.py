"""Run the service under a real gunicorn for end-to-end tests: the one launcher.

``gunicorn(env)`` starts ``gunicorn wsgi:app`` from the project folder (so
gunicorn.conf.py applies) and yields (base_url, process); ``worker_pids`` and
``wait_for_workers`` find its workers; ``wait_for_log`` waits for a line in its output.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import requests

from tests.operator import OPERATOR_TOKEN, TIMELESS_ENV
from tests.waiting import child_pids, wait_until

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_worker(env: dict, log_file) -> subprocess.Popen:
    """``flask --app webhook worker`` (the Procfile's worker) with ``env``."""
    return subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "webhook", "worker"],
        cwd=ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def gunicorn(
    env: dict, workers: int = 2, timeout: float = 90.0, worker: bool = True, scheme: str = "http"
):
    """The service as the Procfile runs it: `gunicorn wsgi:app` with ``env`` over the
    environment, and (``worker``) `flask --app webhook worker` beside it; yield
    (base_url, process) once GET /healthz answers; stop both afterwards. ``process`` is
    gunicorn's master; ``process.worker`` the worker process (None without one), which a
    test may stop and start again with ``process.restart_worker()``, and
    ``process.add_worker()`` starts one more. Their output is
    collected in ``process.log_path`` (in ``env["_LOG_DIR"]`` if given). Any request
    error while starting means "not yet", until ``timeout`` seconds."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_")}
    full_env.update(
        {
            "WEB_CONCURRENCY": str(workers),
            "GUNICORN_BIND": f"127.0.0.1:{port}",
            "METRICS_TOKEN": OPERATOR_TOKEN,
            **TIMELESS_ENV,
        }
    )
    full_env.update(env)
    log_path = Path(env.get("_LOG_DIR", tempfile.gettempdir())) / f"gunicorn-{port}.log"
    # Both processes append to one file (O_APPEND: their lines never overwrite each other).
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "wsgi:app"],
            cwd=ROOT,
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        process.log_path = log_path  # type: ignore[attr-defined]
        process.worker = start_worker(full_env, log_file) if worker else None  # type: ignore[attr-defined]

        def restart_worker() -> subprocess.Popen:
            if process.worker is not None:  # type: ignore[attr-defined]
                stop(process.worker)  # type: ignore[attr-defined]
            process.worker = start_worker(full_env, log_file)  # type: ignore[attr-defined]
            return process.worker  # type: ignore[attr-defined]

        process.restart_worker = restart_worker  # type: ignore[attr-defined]
        extra_workers: list[subprocess.Popen] = []

        def add_worker() -> subprocess.Popen:
            """One more worker process on the same database (stopped with the rest)."""
            extra_workers.append(start_worker(full_env, log_file))
            return extra_workers[-1]

        process.add_worker = add_worker  # type: ignore[attr-defined]
        base = f"{scheme}://127.0.0.1:{port}"  # https: gunicorn's own TLS (a test's cert)
        try:

            def answers() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"gunicorn exited with {process.returncode}:\n"
                        + log_path.read_text(errors="replace")
                    )
                answer = requests.get(base + "/healthz", timeout=2, verify=False)
                return answer.status_code in (200, 503)

            wait_until(
                answers,
                timeout,
                "gunicorn answering /healthz",
                interval=0.1,
                ignoring=(requests.RequestException,),
                detail=lambda: log_path.read_text(errors="replace")[-3000:],
            )
            yield base, process
        finally:
            stop(process)
            for extra in extra_workers:
                stop(extra)
            if process.worker is not None:  # type: ignore[attr-defined]
                stop(process.worker)  # type: ignore[attr-defined]


def worker_pids(master_pid: int) -> set[int]:
    """The gunicorn master's live workers."""
    return child_pids(master_pid)


def wait_for_workers(master_pid: int, count: int, timeout: float = 30.0) -> set[int]:
    return wait_until(
        lambda: (lambda pids: pids if len(pids) >= count else None)(worker_pids(master_pid)),
        timeout,
        f"gunicorn running {count} workers",
        interval=0.1,
        detail=lambda: f"workers now: {worker_pids(master_pid)}",
    )


def wait_for_log(process, text: str, timeout: float = 30.0) -> str:
    """Poll the server's output until it contains ``text``; the output so far."""

    def logged() -> str | None:
        log = process.log_path.read_text(errors="replace")
        return log if text in log else None

    return wait_until(
        logged,
        timeout,
        f"{text!r} logged",
        interval=0.1,
        detail=lambda: process.log_path.read_text(errors="replace")[-3000:],
    )
