"""Waiting in tests, in one place: the polling loop (always with a deadline) and the
checks on processes (psutil, as the product's own leases use).

    wait_until(lambda: fake.events(), 5, "Personalize received the events")
    wait_until(lambda: process_gone(pid), 10, "the worker exited")
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import psutil

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    ignoring: tuple[type[BaseException], ...] = (),
    detail: Callable[[], Any] | None = None,
) -> T:
    """Call ``predicate`` until it returns something true, and return that; after
    ``timeout`` seconds raise an AssertionError naming ``what`` was awaited, the last
    value (or the last exception of a kind in ``ignoring``) and ``detail()`` when given
    (a log's tail, say). Any other exception is the test's, raised at once."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except ignoring as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            message = f"{what}: not within {timeout:g} s (last: {last!r})"
            if detail is not None:
                message += f"\n{detail()}"
            raise AssertionError(message)
        time.sleep(interval)


def process_gone(pid: int) -> bool:
    """The process has exited: no such process, or a zombie its parent has not reaped."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def child_pids(pid: int) -> set[int]:
    """The live direct children of ``pid`` (gunicorn's workers under its master)."""
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return set()
    alive = set()
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return alive


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, theirs, and so on)."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def niceness(pid: int) -> int:
    """The process's nice value."""
    return psutil.Process(pid).nice()
