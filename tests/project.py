"""The project as a user has it: a copy of a clone, the environment of a fresh shell, and
the ``flask --app webhook`` command line run in it (the README's commands, as typed).

Tests that run what a user runs use these rather than the test factories: no
``DATABASE_URL`` (the instance folder's SQLite file, the embedded default), no secret,
nothing of the test process's environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

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


def flask(
    project: Path, env: dict[str, str], *args: str, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``flask --app webhook ARGS`` in ``project``, as a user types it (the project's
    virtual environment on PATH, as ``make`` or an activated venv has it); its exit code,
    stdout and stderr (text)."""
    path = f"{project / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        ["flask", "--app", "webhook", *args],
        cwd=project,
        env={**env, "PATH": path},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
