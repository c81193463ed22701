#!/usr/bin/env python3
"""Where a single delivery's CPU goes, by process: the web processes (gunicorn), the
worker process and the PostgreSQL server's backends, for the service beside its target
anchor (``bench/anchor_app.py``): on PostgreSQL (``--variant PG``, the default) or on
SQLite at ``FULL`` or ``NORMAL``. A helper for the throughput benchmark,
whose report gives only the sum (``srv ms/req``) and the rest of the machine (``other%``).

It starts both as ``webhook_throughput.py`` does (the same gunicorn flags, environment,
fresh databases, pools of signed single-message deliveries and wrk), then runs
``--rounds`` interleaved rounds of ``--duration`` seconds each and prints, per round, the
CPU milliseconds a request of each kind of process (user and system for the web
processes), and the busy CPU of the whole machine a request. After each service round it
waits until the worker has applied the inbox, so no round shares the cores with a
backlog.

    .venv/bin/python bench/cpu_split.py [--variant PG|FULL|NORMAL] [--rounds 3]
        [--duration 10] [--connections 8]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import webhook_throughput as wt  # noqa: E402


def postgres_cpu() -> float:
    """User + system seconds of every PostgreSQL server process on this machine."""
    total = 0.0
    for proc in psutil.process_iter(["name"]):
        if (proc.info["name"] or "").startswith("postgres"):
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue  # a backend that ended meanwhile
            total += times.user + times.system
    return total


def tree_cpu(pid: int) -> tuple[float, float]:
    """User and system seconds of a process and its children."""
    user = system = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0, 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        user += times.user
        system += times.system
    return user, system


def sample(server: wt.Server) -> dict[str, float]:
    web_user, web_system = tree_cpu(server.proc.pid)
    worker = sum(tree_cpu(server.worker.pid)) if server.worker else 0.0
    busy, _ = wt.machine_busy()
    return {
        "web_user": web_user,
        "web_system": web_system,
        "worker": worker,
        "postgres": postgres_cpu(),
        "machine": busy / wt.CLK_TCK,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--variant", choices=sorted(wt.TARGETS), default="PG")
    a = p.parse_args()
    args = argparse.Namespace(
        duration=a.duration,
        rounds=a.rounds,
        warmup=2,
        connections=a.connections,
        threads=1,
        timeout=10,
        python_loadgen=False,
        pool_single=100_000,
        pool_batch=100,
        single_rate_cap=6000,
        batch_rate_cap=10,
        service_app="wsgi:app",
        keep_tmp=False,
    )
    tmp = Path(tempfile.mkdtemp(prefix="cpu-split-"))
    bench = wt.Bench(args, tmp)
    try:
        bench.make_pools()
        anchor = wt.TARGETS[a.variant][0]
        anchor_env = {
            label: env for label, _, env in wt.SQLITE_APPS + wt.PG_APPS if label == anchor
        }.get(anchor, {})
        servers = {
            anchor: bench.launch(a.variant, anchor, "bench.anchor_app:app", anchor_env),
            "service": bench.launch(a.variant, "service", "wsgi:app", {}),
        }
        cursor = dict.fromkeys(servers, 0)
        print(
            f"{'round':<6}{'app':<11}{'req/s':>8}  ms of CPU a request: "
            f"{'web':>6} {'(user':>6} {'sys)':>5} {'worker':>7} {'postgres':>9} {'machine':>8}"
        )
        for rnd in range(a.rounds + 1):  # round 0: the warm-up, not printed
            for label, server in servers.items():
                before = sample(server)
                stats = bench.load(server, "single", cursor[label], 2 if rnd == 0 else a.duration)
                after = sample(server)
                cursor[label] += stats["sent_max"]
                result = wt.Result(a.variant, label, "single", rnd, stats, 0, 0, 0)
                if result.problems:
                    raise RuntimeError(f"{label}: " + "; ".join(result.problems))
                if rnd:
                    per = {k: 1000 * (after[k] - before[k]) / stats["ok"] for k in after}
                    print(
                        f"{rnd:<6}{label:<11}{result.rps:8.1f}  {'':20}"
                        f"{per['web_user'] + per['web_system']:6.3f} {per['web_user']:6.3f} "
                        f"{per['web_system']:5.3f} {per['worker']:7.3f} {per['postgres']:9.3f} "
                        f"{per['machine']:8.3f}",
                        flush=True,
                    )
                if server.worker is not None:
                    wt.wait_applied(server)
    finally:
        bench.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
