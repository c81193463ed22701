"""The path every newcomer takes, as they take it: ``make run`` from a copy of the project,
with an environment that holds no ``DATABASE_URL`` and no secret, events over HTTP, and
answers from the local engine without any manual command.

Every other test sets ``DATABASE_URL``; this one must not, or it would miss what the
README's first command does (background training once failed there for ever).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from datetime import UTC
from pathlib import Path

import psutil
import pytest
import requests

from tests.gunicorn_server import free_port
from tests.project import newcomer_environment, project_copy
from tests.waiting import descendants, niceness, process_gone, wait_until

pytestmark = pytest.mark.slow


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


def wait_logged(predicate, timeout: float, what: str, log: Path):
    """``wait_until`` for a server started here: a refused connection is waited out, and
    a timeout shows the tail of its log."""
    return wait_until(
        predicate,
        timeout,
        what,
        interval=0.25,
        ignoring=(requests.RequestException,),
        detail=lambda: log.read_text(errors="replace")[-4000:],
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
    family: list[int] = []  # make's processes: honcho, the web's and the worker's
    try:
        health = wait_logged(
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

        body = wait_logged(local_answer, 90, "answers come from the local engine", log)
        assert body["itemList"], body
        # Visitor 0 viewed group 0's products: the engine recommends the rest of group 0.
        assert all(item["itemId"].startswith("sku-0-") for item in body["itemList"]), body
        # The default database is the instance folder's SQLite file, in the project.
        assert (project / "instance" / "segment.db").is_file()
        text = log.read_text(errors="replace")
        assert "background training failed" not in text
        assert "Traceback" not in text
        family = descendants(process.pid)
        (worker,) = [p for p in family if psutil.Process(p).cmdline()[-1:] == ["worker"]]
        # Both of the Procfile's processes run (honcho prefixes each line with its name).
        assert "web.1" in text and "worker.1" in text, text[-4000:]
        # Below the web's priority (WORKER_NICE), in the session honcho started it in (so
        # in the process group honcho signals), whose autogroup, where the kernel has
        # them, gets the same nice value: the session holds the worker alone.
        assert niceness(worker) == 10
        assert os.getsid(worker) != os.getsid(process.pid)
        autogroup = Path(f"/proc/{worker}/autogroup")
        if autogroup.exists() and autogroup.read_text().strip():
            assert autogroup.read_text().split()[-1] == "10", autogroup.read_text()
    finally:
        stop(process)
    # Ctrl-C stops all of it: the worker too, though it runs in a session of its own.
    try:
        wait_until(
            lambda: all(process_gone(p) for p in family),
            30,
            "every process of make run gone after Ctrl-C",
            detail=lambda: [psutil.Process(p).cmdline() for p in family if not process_gone(p)],
        )
    finally:
        for pid in family:  # whatever outlived it: this test started it
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
