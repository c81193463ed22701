"""The path every newcomer takes, as they take it: ``make run`` from a copy of the project,
with an environment that holds no ``DATABASE_URL`` and no secret, events over HTTP, and
answers from the local engine without any manual command.

Every other test sets ``DATABASE_URL``; this one must not, or it would miss what the
README's first command does (background training once failed there for ever).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from datetime import UTC
from pathlib import Path

import pytest
import requests

from tests.gunicorn_server import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def project_copy(destination: Path) -> Path:
    """The project's files as a clone would have them (tracked and new, not ignored), with
    their modification times, and the project's virtual environment linked in: ``make``
    then finds it up to date and installs nothing."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = ROOT / name
        if not source.is_file():
            continue  # deleted in the working tree
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    venv = ROOT / ".venv"
    assert venv.is_dir(), "the tests run from the project's .venv (make test)"
    (destination / ".venv").symlink_to(venv)
    return destination


def newcomer_environment(home: Path, **extra: str) -> dict[str, str]:
    """What a fresh shell has: no DATABASE_URL, no secret, no AWS or Segment account."""
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def start(command: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    handle = open(log, "wb")
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C, as a person stops it
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_until(predicate, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except requests.RequestException as exc:
            last = exc
        time.sleep(0.25)
    raise AssertionError(
        f"{what} within {timeout:.0f} s (last: {last!r}):\n"
        + log.read_text(errors="replace")[-4000:]
    )


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on ``port`` (IPv4, from /proc)."""
    found = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # LISTEN
                found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def views(prefix: str, visitors: int, products: int) -> list[dict]:
    """Visitors who each view a few products of one of two groups, now (the defaults skip
    messages older than a week)."""
    from datetime import datetime

    now = datetime.now(UTC).isoformat()
    messages = []
    for v in range(visitors):
        group = v % 2
        for k in range(4):
            item = f"sku-{group}-{(v + k) % products}"
            messages.append(
                {
                    "type": "track",
                    "event": "Product Viewed",
                    "messageId": f"{prefix}-{v}-{k}",
                    "anonymousId": f"visitor-{v}",
                    "timestamp": now,
                    "properties": {"product_id": item, "name": f"Item {item}", "price": 10},
                }
            )
    return messages


def test_make_run_serves_and_trains_by_itself_with_no_configuration(tmp_path):
    project = project_copy(tmp_path / "project")
    port = free_port()
    log = tmp_path / "make-run.log"
    env = newcomer_environment(tmp_path, PORT=str(port))
    process = start(["make", "run"], project, env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        health = wait_until(
            lambda: requests.get(base + "/healthz", timeout=2),
            120,
            "make run answers /healthz",
            log,
        )
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}  # the details need METRICS_TOKEN
        # Without HOST=0.0.0.0 nothing outside this machine can reach it.
        assert listening_addresses(port) == {"127.0.0.1"}

        # The README's curl, then a shop's worth of views: one delivery each, unsigned
        # (no secret is configured), as Segment would send them.
        for message in views("newcomer", visitors=40, products=6):
            answer = requests.post(base + "/segment", json=message, timeout=10)
            assert answer.status_code == 200, answer.text
            assert answer.json()["accepted"] == 1

        def local_answer():
            body = requests.get(
                base + "/recommendations",
                params={"anonymousId": "visitor-0", "numResults": 2},
                timeout=5,
            ).json()
            return body if body.get("source") == "local" else None

        body = wait_until(local_answer, 90, "answers come from the local engine", log)
        assert body["itemList"], body
        # Visitor 0 viewed group 0's products: the engine recommends the rest of group 0.
        assert all(item["itemId"].startswith("sku-0-") for item in body["itemList"]), body
        # The default database is the instance folder's SQLite file, in the project.
        assert (project / "instance" / "segment.db").is_file()
        text = log.read_text(errors="replace")
        assert "background training failed" not in text
        assert "Traceback" not in text
        # Both of the Procfile's processes run (honcho prefixes each line with its name).
        assert "web.1" in text and "worker.1" in text, text[-4000:]
        running = processes_in(project)
        assert len(running) >= 3, running  # honcho, gunicorn's master and workers, the worker
    finally:
        stop(process)
    # One Ctrl-C stops both processes: nothing started from the project is left.
    wait_until(lambda: not processes_in(project), 30, "every process stops on Ctrl-C", log)


def processes_in(folder: Path) -> list[str]:
    """The command lines of the processes running in ``folder`` (their working directory)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cwd", "cmdline", "status"]):
        info = proc.info
        if info["status"] == psutil.STATUS_ZOMBIE or not info["cwd"]:
            continue
        if Path(info["cwd"]) == folder:
            found.append(" ".join(info["cmdline"] or []))
    return found
