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

The binaries are the installed server's (``bin_dir``); a test that needs them says so
with ``pytest.mark.requires("postgresql")`` (tests/prerequisites.py).
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from tests.gunicorn_server import free_port
from tests.waiting import wait_until


@functools.cache
def bin_dir() -> Path | None:
    """The folder of the installed server's initdb and pg_ctl: ``PG_BIN`` if set, else
    what ``pg_config --bindir`` says, else the newest ``/usr/lib/postgresql/*/bin``
    (Debian's layout), else wherever ``initdb`` is on PATH. None when there is none."""

    def usable(folder) -> bool:
        return folder is not None and all(
            (Path(folder) / tool).is_file() for tool in ("initdb", "pg_ctl")
        )

    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"]) if usable(os.environ["PG_BIN"]) else None
    candidates = []
    try:
        candidates.append(
            subprocess.run(
                ["pg_config", "--bindir"], capture_output=True, text=True, timeout=30
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        pass
    # pg_config may be libpq-dev's, naming the client library's version, not the server's.
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else -1,
        reverse=True,
    )
    candidates += [str(path) for path in versions]
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).resolve().parent))
    return next((Path(folder) for folder in candidates if folder and usable(folder)), None)


def can_run_as_postgres() -> bool:
    """PostgreSQL refuses to run as root: then it runs as the ``postgres`` user."""
    return os.geteuid() != 0 or _postgres_user() is not None


def available() -> bool:
    return bin_dir() is not None and can_run_as_postgres()


def _postgres_user():
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        return None


class ThrowawayPostgres:
    def __init__(self, port: int | None = None):
        self.bin = bin_dir()
        if self.bin is None:
            raise RuntimeError(
                "the PostgreSQL server binaries are not installed "
                "(tests.prerequisites says how to get them)"
            )
        self.port = port or free_port()
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
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=self.root
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}\n{self.server_log()}"
            )
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
        self._run(
            self.bin / "initdb",
            "-D",
            self.data,
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        self._initialized = True

    def start(self, timeout: float = 30) -> None:
        if not self._initialized:
            self.init()
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-k {self.socket_dir} -c fsync=off "
            f"-c full_page_writes=off -c max_connections=60"
        )
        self._run(
            self.bin / "pg_ctl",
            "-D",
            self.data,
            "-l",
            self.log,
            "-o",
            options,
            "-w",
            "-t",
            str(int(timeout)),
            "start",
            timeout=timeout + 10,
        )

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """``fast``: roll back open transactions, close connections, shut down cleanly;
        ``immediate``: kill every server process at once (crash recovery on start)."""
        self._run(
            self.bin / "pg_ctl",
            "-D",
            self.data,
            "-m",
            mode,
            "-w",
            "-t",
            str(int(timeout)),
            "stop",
            timeout=timeout + 10,
        )

    def running(self) -> bool:
        command = [str(self.bin / "pg_ctl"), "-D", str(self.data), "status"]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, timeout=30).returncode == 0

    def wait_ready(self, timeout: float = 30) -> None:
        def accepts() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        wait_until(
            accepts,
            timeout,
            f"the throwaway PostgreSQL on {self.port} accepting connections",
            interval=0.1,
            ignoring=(OSError,),
        )

    def cleanup(self) -> None:
        try:
            if self._initialized and self.running():
                self.stop(mode="immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()
