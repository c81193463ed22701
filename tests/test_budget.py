"""The host's Profile API budget (``webhook.budget.HostBudget``), driven by real processes
sharing its file: the bound holds at Segment's end whatever a busy host's delays are."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
import time

from tests.fake_segment_apis import busiest_second
from tests.waiting import wait_until
from webhook.budget import HostBudget


def caller(path: str, share: int, seed: int, until: float, results) -> None:
    """Eight threads calling as fast as admitted, each call delayed 0-0.6 s before it
    "arrives" and 0-0.2 s more before its answer: the delays of a saturated host."""
    budget = HostBudget(path, capacity=share, stale_after=5)
    arrivals: list[float] = []

    def calls(rng: random.Random) -> None:
        while time.monotonic() < until:
            outcome, ticket = budget.acquire(share)
            if outcome != "ok":
                time.sleep(0.002)
                continue
            time.sleep(rng.uniform(0, 0.6))
            arrivals.append(time.monotonic())
            time.sleep(rng.uniform(0, 0.2))
            budget.complete(ticket)

    threads = [
        threading.Thread(target=calls, args=(random.Random(seed * 100 + n),)) for n in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(arrivals)


def test_no_second_at_the_api_holds_more_than_the_share_whatever_the_delays(tmp_path):
    path, share = str(tmp_path / "budget"), 20
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    until = time.monotonic() + 4
    workers = [ctx.Process(target=caller, args=(path, share, n, until, results)) for n in range(3)]
    for w in workers:
        w.start()
    seen = [when for _ in workers for when in results.get(timeout=30)]
    for w in workers:
        w.join(10)
    assert busiest_second(seen) <= share, sorted(seen)
    # And the budget is used: each call holds its slot for its own time (0.4 s on average)
    # and one second more, so about share / 1.4 calls a second once it runs.
    assert len(seen) >= 0.6 * share / 1.4 * 4, len(seen)


def test_over_the_share_a_call_is_refused_until_a_second_after_the_last_answer(tmp_path):
    budget = HostBudget(str(tmp_path / "budget"), capacity=5)
    tickets = [budget.acquire(2) for _ in range(2)]
    assert [outcome for outcome, _ in tickets] == ["ok", "ok"]
    assert budget.acquire(2)[0] == "over_budget"
    time.sleep(1.1)
    assert budget.acquire(2)[0] == "over_budget", "calls in flight still count"
    for _, ticket in tickets:
        budget.complete(ticket)
    answered = time.monotonic()
    assert budget.acquire(2)[0] == "over_budget"
    wait_until(
        lambda: budget.acquire(2)[0] == "ok", 5, "the answered calls stop counting", interval=0.01
    )
    assert time.monotonic() - answered >= 1.0


def test_a_killed_callers_calls_stop_counting_after_stale_after(tmp_path):
    path = str(tmp_path / "budget")
    ctx = multiprocessing.get_context("fork")
    admitted = ctx.Event()

    def hold():
        budget = HostBudget(path, capacity=3, stale_after=0.5)
        for _ in range(3):
            assert budget.acquire(3)[0] == "ok"
        admitted.set()
        time.sleep(60)  # killed in flight

    process = ctx.Process(target=hold)
    process.start()
    assert admitted.wait(10)
    os.kill(process.pid, signal.SIGKILL)
    process.join(10)
    budget = HostBudget(path, capacity=3, stale_after=0.5)
    assert budget.acquire(3)[0] == "over_budget"
    wait_until(
        lambda: budget.acquire(3)[0] == "ok",
        5,
        "a killed worker's calls stop counting",
        interval=0.02,
    )
