"""A throwaway PostgreSQL server of the test's own, to stop and start in failure tests.

The machine's shared server (127.0.0.1:5432) is used by other tests at the same time and
is never touched here. ``ThrowawayPostgres`` runs ``initdb`` into a fresh temporary folder
and ``pg_ctl`` on a free loopback port, as the ``postgres`` OS user when the tests run as
root (PostgreSQL refuses to run as root), with trust authentication for that loopback
port only and ``fsync=off``: a commit still writes its WAL to the kernel before it returns
(``synchronous_commit`` stays on), so killing the server's processes loses nothing
committed; only a crash of the machine could. (``synchronous_commit=off`` would lose the
last commits on an immediate stop, and make a correct service look like it lost data.)

    with ThrowawayPostgres() as pg:
        url = pg.url                     # postgresql+psycopg://postgres@127.0.0.1:PORT/postgres
        pg.stop(mode="immediate")        # as if it crashed: every connection dropped
        pg.start()                       # crash recovery, same data, same port
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))


def available() -> bool:
    return (BIN / "initdb").exists() and (BIN / "pg_ctl").exists() and (
        os.geteuid() != 0 or _postgres_user() is not None)


def _postgres_user():
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThrowawayPostgres:
    def __init__(self, port: int | None = None):
        self.port = port or _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="throwaway-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log = self.root / "server.log"
        self._as_postgres = os.geteuid() == 0
        self._initialized = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        command = [str(a) for a in args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                cwd=self.root)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n"
                               f"{result.stdout}\n{result.stderr}\n{self.server_log()}")
        return result

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def init(self) -> None:
        self.socket_dir.mkdir()
        if self._as_postgres:
            user = _postgres_user()
            for path in (self.root, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run(BIN / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8", "--locale=C")
        self._initialized = True

    def start(self, timeout: float = 30) -> None:
        if not self._initialized:
            self.init()
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                   f"-k {self.socket_dir} -c fsync=off "
                   f"-c full_page_writes=off -c max_connections=60")
        self._run(BIN / "pg_ctl", "-D", self.data, "-l", self.log, "-o", options,
                  "-w", "-t", str(int(timeout)), "start", timeout=timeout + 10)

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """``fast``: roll back open transactions, close connections, shut down cleanly;
        ``immediate``: kill every server process at once (crash recovery on start)."""
        self._run(BIN / "pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", str(int(timeout)),
                  "stop", timeout=timeout + 10)

    def running(self) -> bool:
        command = [str(BIN / "pg_ctl"), "-D", str(self.data), "status"]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, timeout=30).returncode == 0

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"throwaway PostgreSQL on {self.port} not ready")

    def cleanup(self) -> None:
        try:
            if self._initialized and self.running():
                self.stop(mode="immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "ThrowawayPostgres":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()
