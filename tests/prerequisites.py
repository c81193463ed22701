"""What some tests need from the machine, checked in one place.

Three programs are not Python packages: Node.js (an independent JSON.stringify and HMAC,
so a Python bug in the service cannot be mirrored by one in the test), the PostgreSQL
server binaries (a throwaway server to stop and start in failure tests) and Debian's
Chromium (the browser tests). On a developer's machine a test that needs a missing one is
skipped, and says why; under CI (the ``CI`` environment variable set, as ``.ci/run``
does) it fails instead: a run that passes must have run everything.

    pytestmark = pytest.mark.requires("node")     # a module, a class or a test
    @pytest.mark.requires("postgresql", "node")
    require("postgresql")                         # inside a fixture or a test
    if have("node"): ...                          # optional here, required under CI
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

from tests import pg_server


def chromium_path() -> str | None:
    """Debian's Chromium (``CHROMIUM_PATH`` overrides)."""
    for candidate in (
        os.environ.get("CHROMIUM_PATH"),
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        "/usr/bin/chromium",
    ):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def _node() -> str | None:
    if shutil.which("node") is None:
        return "Node.js (`node`) is not on PATH"
    return None


def _postgresql() -> str | None:
    if pg_server.bin_dir() is None:
        return (
            "the PostgreSQL server binaries (initdb, pg_ctl) are not installed "
            "(Debian: the postgresql package; PG_BIN names another folder)"
        )
    if not pg_server.can_run_as_postgres():
        return "running as root, and there is no `postgres` user to run the server as"
    return None


def _chromium() -> str | None:
    if chromium_path() is None:
        return "Debian's chromium is not installed (CHROMIUM_PATH names another one)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (requirements-dev.txt)"
    return None


_CHECKS = {"node": _node, "postgresql": _postgresql, "chromium": _chromium}


def missing(name: str) -> str | None:
    """Why the prerequisite ``name`` is not there, or None when it is."""
    try:
        check = _CHECKS[name]
    except KeyError:
        raise ValueError(f"unknown prerequisite {name!r}; known: {sorted(_CHECKS)}") from None
    return check()


def under_ci() -> bool:
    return bool(os.environ.get("CI"))


def require(name: str) -> None:
    """Skip the running test when ``name`` is missing; under CI, fail it."""
    reason = missing(name)
    if reason is None:
        return
    if under_ci():
        pytest.fail(f"CI needs {name}: {reason}", pytrace=False)
    pytest.skip(f"needs {name}: {reason}")


def have(name: str) -> bool:
    """Whether ``name`` is there, for a test that can do without it on a developer's
    machine; under CI a missing one fails the test."""
    if missing(name) is None:
        return True
    if under_ci():
        require(name)
    return False
