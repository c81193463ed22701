"""This process's id, without a system call at every look.

Per-process state (a worker's SQLite write connection, its lock file, its wake-up socket)
is checked against the process id on the request path, because gunicorn forks workers
from a master that may have made that state already. ``os.getpid()`` is a system call
each time (the C library no longer caches it): three a delivery. This keeps the id in a
variable that a fork hook refreshes in the child (``os.fork`` runs it, and so does
``multiprocessing``'s fork; a child that runs a new program starts a new interpreter).
"""
from __future__ import annotations

import os

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def current() -> int:
    """``os.getpid()``, kept up to date across forks."""
    return _pid
