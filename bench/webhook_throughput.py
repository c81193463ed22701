#!/usr/bin/env python3
"""Side-by-side throughput benchmark: the webhook service vs. its anchors and bare Flask.

Targets checked here (one run, same machine, same load, same gunicorn settings), for each
variant: PostgreSQL (``PG``, the production database) and SQLite at each synchronous
setting (``FULL``, the default, and ``NORMAL``):

* signed single-message deliveries reach a share of the requests/s of an *anchor*
  (``bench/anchor_app.py``), the smallest honest receiver on the same stack: bearer token
  and HMAC-SHA1 check of the raw body, ``json.loads``, a messageId and type check, one
  insert committed before the 200. On PostgreSQL: ``INSERT … ON CONFLICT DO NOTHING`` in
  autocommit (``synchronous_commit`` on) on a connection per server thread, target 0.80x.
  On SQLite, ``INSERT OR IGNORE`` in two variants: group commit (one writer thread per
  process), target 1.0x at FULL; each request committing its own insert, target 0.80x at
  NORMAL (the other anchor is shown for scale);
* Segment Actions batches of 100 events reach >= 15x the single-message events/s. The
  anchors get the same batches (the same job for each message, one transaction a
  delivery), so the report also shows what the stack itself gives for batches.

The service runs as users run it (the Procfile): ``gunicorn wsgi:app`` and, beside it with
the same environment, the worker process ``flask --app webhook worker``, which applies the
inbox behind the answers. Its CPU counts as the service's. Every request carries the
credentials a deployment asks for (``WEBHOOK_BEARER_TOKEN`` as a bearer token, and the
X-Signature of ``SEGMENT_SHARED_SECRET``); the bench reads the inbox's lag from
``/healthz`` with ``METRICS_TOKEN``.

A bare Flask endpoint that answers "ok" (``bench/bare_app.py``) is measured beside them for
scale.

Usage (from the repo root)::

    .venv/bin/python bench/webhook_throughput.py [--duration 10] [--connections 8]
        [--variants PG,FULL,NORMAL]

How it works:

1. Signed Segment messages are pre-generated in Python (wrk's LuaJIT has no
   HMAC) into two pools (single messages; Actions batches of 100), one
   ``signature<TAB>body`` per line, one file per wrk thread.  Every request
   carries a distinct ``messageId`` (the service de-duplicates by messageId,
   so repeated bodies would only measure the duplicate path): each wrk run
   starts where the previous run against that server launch stopped.  Every
   server launch gets a fresh database (a SQLite file, or a PostgreSQL database
   dropped at the end).  A run that exhausts its pool
   (wraps around) is reported and fails.
2. gunicorn is launched for each app with *identical* command-line flags and
   environment (``-c gunicorn.conf.py``, ``--workers 2 --no-control-socket``,
   ``--bind 127.0.0.1:<free port>``, ``SQLITE_SYNCHRONOUS``, a fresh ``DATABASE_URL``),
   cwd = repo root.
   The resolved gunicorn settings (worker class, threads, ...) are printed for
   every app and must match.
3. Load is generated with ``wrk`` (C, leaves CPU to the server) and a Lua
   script generated per run that walks the pool and counts non-200
   responses.  Any non-200 response or socket error fails the run.  If wrk
   cannot be had, a multi-process Python generator (requests.Session,
   keep-alive) is used instead and the output says so.
4. All servers of a variant stay up (an idle one costs nothing) and the
   measurements are interleaved: after a warm-up, ``--rounds`` rounds of (bare,
   the anchors, service single, the anchors with batches, service batch) (on PG one
   anchor), each
   ``--duration`` seconds with ``--connections`` connections; ratios use the
   medians, so a burst of other work on the machine skews one round, not the
   verdict.  Server, load-generator and whole-machine CPU are sampled per run
   (``other%`` shows interference).
5. After each service cell the service is given time to apply its inbox
   (it acknowledges after the durable insert and applies in the background)
   before the next cell starts, so no other app is measured while the service's
   backlog holds the cores; the report shows how long each catch-up took, and
   the stored row counts.

Only loopback traffic; every load loop is bounded by time and pool size.
All processes are cleaned up in ``finally`` (also on Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECRET = "bench-secret"
# The service's credentials, as a deployment sets them: Segment's batches need the bearer
# token besides the X-Signature (every request carries both; the anchors check both too),
# and /healthz's details (the inbox's lag) need the operator's token.
BEARER = "bench-bearer-token-0123456789"
METRICS_TOKEN = "bench-metrics-token-0123456789"
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
WORKER_CMD = [sys.executable, "-m", "flask", "--app", "webhook", "worker"]
# The messages' time: now, as Segment's are (the service skips messages older than
# MAX_MESSAGE_AGE_HOURS, and its answer for those is a 200 too).
TIMESTAMP = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
HOST = "127.0.0.1"
BATCH_SIZE = 100
# Each variant's anchor and the share of its req/s the service's single deliveries must
# reach (issue 27): the group-commit anchor at FULL, the per-request anchor at NORMAL, the
# PostgreSQL anchor on PostgreSQL.
TARGETS = {"FULL": ("anchor-grp", 1.0), "NORMAL": ("anchor-req", 0.80), "PG": ("anchor-pg", 0.80)}
TARGET_BATCH_VS_SINGLE = 15.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------
# Pre-generated, signed Segment messages
# --------------------------------------------------------------------------


def sign(data: bytes) -> str:
    return hmac.new(SECRET.encode(), data, hashlib.sha1).hexdigest()


def event_obj(message_id: str, n: int) -> dict:
    return {
        "type": "track",
        "event": "Product Viewed",
        "messageId": message_id,
        "anonymousId": f"anon-{n % 5000}",
        "userId": f"u{n % 1000}",
        "timestamp": TIMESTAMP,
        "properties": {
            "product_id": f"p{n % 500}",
            "name": f"Product {n % 500}",
            # Never an integral float: JSON.stringify writes 5.0 as "5" where Python writes
            # "5.0", and Actions batches are signed over JSON.stringify(body[0]).
            "price": (n % 997) + 0.99,
        },
    }


def event_json(message_id: str, n: int) -> str:
    """Compact JSON of ``event_obj`` (ASCII only, so identical to JSON.stringify).

    A template is ~4x faster than json.dumps for the hundreds of thousands of events a
    run needs; ``self_check`` proves both give the same bytes.
    """
    return (
        f'{{"type":"track","event":"Product Viewed","messageId":"{message_id}",'
        f'"anonymousId":"anon-{n % 5000}","userId":"u{n % 1000}","timestamp":"{TIMESTAMP}",'
        f'"properties":{{"product_id":"p{n % 500}","name":"Product {n % 500}",'
        f'"price":{(n % 997) + 0.99!r}}}}}'
    )


def write_pool(prefix: Path, tag: str, kind: str, count: int, nthreads: int) -> int:
    """Write ``count`` requests (single messages or batches), split over per-thread files.

    File ``<prefix>-t<k>.tsv`` (k = 1..nthreads) holds lines ``signature<TAB>body``.
    messageIds are ``<tag>-t<k>-<n>`` (single) or ``<tag>-t<k>-<n>-<j>`` (batch),
    unique across the whole run.  Returns the number of bytes written.
    """
    per_thread = -(-count // nthreads)
    total = 0
    key = SECRET.encode()
    for t in range(1, nthreads + 1):
        with open(f"{prefix}-t{t}.tsv", "w", encoding="ascii") as out:
            for n in range(per_thread):
                if kind == "single":
                    body = event_json(f"{tag}-t{t}-{n}", n)
                    sig = hmac.new(key, body.encode(), hashlib.sha1).hexdigest()
                else:
                    events = [
                        event_json(f"{tag}-t{t}-{n}-{j}", n * BATCH_SIZE + j)
                        for j in range(BATCH_SIZE)
                    ]
                    # Actions batch: bare JSON array, signed over JSON.stringify(body[0]).
                    body = "[" + ",".join(events) + "]"
                    sig = hmac.new(key, events[0].encode(), hashlib.sha1).hexdigest()
                total += out.write(f"{sig}\t{body}\n")
    return total


def self_check() -> None:
    """Guard the generator: template == json.dumps, batch signing rule, JS-safe floats."""
    for n in (0, 1, 7, 996, 997, 123456):
        assert event_json(f"chk-{n}", n) == json.dumps(
            event_obj(f"chk-{n}", n), separators=(",", ":")
        )
    evs = [event_json(f"chk-{j}", j) for j in range(3)]
    body = "[" + ",".join(evs) + "]"
    parsed = json.loads(body)
    assert json.dumps(parsed, separators=(",", ":")) == body
    assert json.dumps(parsed[0], separators=(",", ":")) == evs[0]
    for n in range(997):
        price = event_obj("x", n)["properties"]["price"]
        assert price != int(price) and 1e-6 < price < 1e21, price


# --------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------

LUA_SCRIPT = r"""
-- Generated by bench/webhook_throughput.py.
-- args: <pool prefix> <start line, 0-based> <bearer token>
-- Each thread reads <prefix>-t<id>.tsv (signature<TAB>body per line) and sends the
-- lines in order from <start>; wrapping around (pool exhausted) is counted.
local threads = {}
local counter = 1

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local path = args[1] .. "-t" .. id .. ".tsv"
  sigs, bodies = {}, {}
  for line in io.lines(path) do
    local tab = line:find("\t", 1, true)
    sigs[#sigs + 1] = line:sub(1, tab - 1)
    bodies[#bodies + 1] = line:sub(tab + 1)
  end
  pool = #bodies
  idx = tonumber(args[2] or "0")
  authorization = "Bearer " .. (args[3] or "")
  sent = 0
  wrapped = 0
  ok = 0
  non200 = 0
  first_err = ""
  sample = ""
end

function request()
  idx = idx + 1
  sent = sent + 1
  if idx > pool then
    idx = 1
    wrapped = wrapped + 1
  end
  return wrk.format("POST", "/segment",
    {["Content-Type"] = "application/json", ["X-Signature"] = sigs[idx],
     ["Authorization"] = authorization},
    bodies[idx])
end

function response(status, headers, body)
  if status == 200 then
    ok = ok + 1
    if sample == "" then sample = body:sub(1, 200) end
  else
    non200 = non200 + 1
    if first_err == "" then first_err = tostring(status) .. " " .. body:sub(1, 300) end
  end
end

local function clean(s)
  return (s:gsub("[%c\"\\]", "'"))
end

function done(summary, latency, requests)
  local t = {ok = 0, non200 = 0, sent = 0, wrapped = 0, pool = 0}
  local sent_max = 0
  local first_err, sample = "", ""
  for _, thread in ipairs(threads) do
    for k, _ in pairs(t) do t[k] = t[k] + (thread:get(k) or 0) end
    sent_max = math.max(sent_max, thread:get("sent") or 0)
    local e = thread:get("first_err") or ""
    if first_err == "" and e ~= "" then first_err = e end
    local s = thread:get("sample") or ""
    if sample == "" and s ~= "" then sample = s end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
    '"ok":%d,"non200":%d,"sent":%d,"sent_max":%d,"wrapped":%d,"pool":%d,' ..
    '"lat_mean_us":%.1f,"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_max_us":%d,' ..
    '"first_err":"%s","sample":"%s"}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    t.ok, t.non200, t.sent, sent_max, t.wrapped, t.pool,
    latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max,
    clean(first_err), clean(sample)))
end
"""


def ensure_wrk() -> str | None:
    path = shutil.which("wrk")
    if path:
        return path
    log("wrk not found; trying apt-get install -y wrk")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for pre in ([], [["apt-get", "update"]]):
        try:
            for cmd in pre:
                subprocess.run(
                    cmd,
                    env=env,
                    timeout=300,
                    check=False,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            r = subprocess.run(
                ["apt-get", "install", "-y", "wrk"],
                env=env,
                timeout=300,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0 and shutil.which("wrk"):
            return shutil.which("wrk")
    return None


# --------------------------------------------------------------------------
# Python fallback load generator (only if wrk is unavailable)
# --------------------------------------------------------------------------


def _py_worker(url: str, pool_file: str, start: int, duration: float, timeout: float, q) -> None:
    import requests  # local import: only needed in the fallback

    lines = Path(pool_file).read_text(encoding="ascii").splitlines()
    sess = requests.Session()
    lat, ok, non200, errors, sent, wrapped = [], 0, 0, 0, 0, 0
    first_err, sample = "", ""
    deadline = time.monotonic() + duration
    i = start
    while time.monotonic() < deadline:
        if i >= len(lines):
            i = 0
            wrapped += 1
        sig, body = lines[i].split("\t", 1)
        i += 1
        sent += 1
        t0 = time.perf_counter()
        try:
            r = sess.post(
                url,
                data=body.encode(),
                timeout=timeout,
                headers={
                    "Content-Type": "application/json",
                    "X-Signature": sig,
                    "Authorization": f"Bearer {BEARER}",
                },
            )
        except requests.RequestException as exc:
            errors += 1
            first_err = first_err or repr(exc)[:300]
            continue
        lat.append((time.perf_counter() - t0) * 1e6)
        if r.status_code == 200:
            ok += 1
            sample = sample or r.text[:200]
        else:
            non200 += 1
            first_err = first_err or f"{r.status_code} {r.text[:300]}"
    q.put(
        dict(
            lat=lat,
            ok=ok,
            non200=non200,
            errors=errors,
            sent=sent,
            wrapped=wrapped,
            pool=len(lines),
            first_err=first_err,
            sample=sample,
        )
    )


def run_python_load(
    url: str, pool_prefix: Path, start: int, duration: float, nproc: int, timeout: float
) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [
        ctx.Process(
            target=_py_worker, args=(url, f"{pool_prefix}-t{k}.tsv", start, duration, timeout, q)
        )
        for k in range(1, nproc + 1)
    ]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    try:
        results = [q.get(timeout=duration + timeout + 60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    elapsed = time.monotonic() - t0
    lat = sorted(x for r in results for x in r["lat"])

    def pct(p):
        return int(lat[min(len(lat) - 1, int(len(lat) * p / 100))]) if lat else 0

    agg = {
        k: sum(r[k] for r in results) for k in ("ok", "non200", "errors", "sent", "wrapped", "pool")
    }
    return dict(
        requests=agg["ok"] + agg["non200"],
        duration_us=int(elapsed * 1e6),
        bytes=0,
        err_connect=agg["errors"],
        err_read=0,
        err_write=0,
        err_status=agg["non200"],
        err_timeout=0,
        ok=agg["ok"],
        non200=agg["non200"],
        sent=agg["sent"],
        sent_max=max(r["sent"] for r in results),
        wrapped=agg["wrapped"],
        pool=agg["pool"],
        lat_mean_us=sum(lat) / len(lat) if lat else 0,
        lat_p50_us=pct(50),
        lat_p90_us=pct(90),
        lat_p99_us=pct(99),
        lat_max_us=int(lat[-1]) if lat else 0,
        first_err=next((r["first_err"] for r in results if r["first_err"]), ""),
        sample=next((r["sample"] for r in results if r["sample"]), ""),
    )


# --------------------------------------------------------------------------
# gunicorn process management
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def gunicorn_flags(extra: list[str]) -> list[str]:
    """Flags shared verbatim by both apps (the bind address is added per launch)."""
    flags = []
    if (REPO / "gunicorn.conf.py").exists():
        flags += ["-c", "gunicorn.conf.py"]
    # --no-control-socket: gunicorn 27 otherwise creates ~/.gunicorn/gunicorn.ctl, shared by
    # every gunicorn on the machine (a dev server or test run could be clobbered).
    flags += ["--workers", "2", "--no-control-socket"]
    return flags + extra


_RESOLVE_SNIPPET = r"""
import json, sys
sys.argv = ["gunicorn"] + sys.argv[1:]
from gunicorn.app.wsgiapp import WSGIApplication
cfg = WSGIApplication("%(prog)s [OPTIONS] [APP_MODULE]").cfg
out = {}
for k in ("workers", "threads", "worker_connections", "keepalive", "timeout",
          "preload_app", "accesslog", "loglevel", "backlog", "max_requests"):
    try:
        out[k] = getattr(cfg, k)
    except Exception as exc:  # setting absent in this gunicorn version
        out[k] = "n/a"
out["worker_class"] = cfg.worker_class_str
print("RESOLVED " + json.dumps(out, default=str))
"""


def resolve_config(argv: list[str], env: dict) -> dict:
    """What gunicorn will actually use for these flags (config file + CLI), without starting it."""
    r = subprocess.run(
        [sys.executable, "-c", _RESOLVE_SNIPPET, *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    for line in r.stdout.splitlines():
        if line.startswith("RESOLVED "):
            return json.loads(line[len("RESOLVED ") :])
    raise RuntimeError(f"could not resolve gunicorn config:\n{r.stdout}\n{r.stderr}")


@dataclass
class Server:
    label: str
    app: str
    cmd: list[str]
    port: int
    log_path: Path
    proc: subprocess.Popen | None = None
    config: dict = field(default_factory=dict)
    # The service's worker process (`flask --app webhook worker`, the Procfile's worker),
    # started beside gunicorn with the same environment; None for the other apps.
    worker_cmd: list[str] | None = None
    worker: subprocess.Popen | None = None
    db_url: str = ""

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, env: dict) -> None:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        if self.worker_cmd:
            # Not a session of its own from here: the worker starts one itself to lower
            # its priority (webhook/worker.py; under `make run` honcho gives it one).
            self.worker = subprocess.Popen(
                self.worker_cmd,
                cwd=REPO,
                env=env,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def log_tail(self, n: int = 8) -> str:
        """Last lines of the server log that are not routine INFO lines (per-request logs)."""
        try:
            lines = [
                line
                for line in self.log_path.read_text(errors="replace").splitlines()
                if '"level": "INFO"' not in line and "[INFO]" not in line
            ][-n:]
            return "\n".join("    | " + line[:300] for line in lines)
        except OSError:
            return ""

    def wait_ready(self, health: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.label}: gunicorn exited with {self.proc.returncode}\n{self.log_tail()}"
                )
            if self.worker is not None and self.worker.poll() is not None:
                raise RuntimeError(
                    f"{self.label}: the worker exited with {self.worker.returncode}\n"
                    + self.log_tail()
                )
            try:
                if health == "GET /healthz":
                    req = urllib.request.Request(
                        self.url + "/healthz",
                        headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
                    )
                else:  # bare app has a single route
                    req = urllib.request.Request(
                        self.url + "/segment",
                        data=b"{}",
                        method="POST",
                        headers={"Content-Type": "application/json"},
                    )
                with urllib.request.urlopen(req, timeout=2) as resp:
                    if resp.status == 200 and not self.worker:
                        return
                    if resp.status == 200 and self.worker_running():
                        return
                    last = f"status {resp.status}" + (
                        "" if resp.status != 200 else ", the worker not running yet"
                    )
            except urllib.error.HTTPError as exc:
                if health != "GET /healthz":
                    return  # an anchor answers an unsigned probe with 401: it is up
                last = f"status {exc.code}"
            except (OSError, urllib.error.URLError) as exc:
                last = repr(exc)
            time.sleep(0.2)
        raise RuntimeError(
            f"{self.label}: {health} not 200 within {timeout:.0f}s ({last})\n{self.log_tail()}"
        )

    def worker_running(self) -> bool:
        """The worker process said it runs its loops (its log line, in the shared log)."""
        try:
            return '"worker: running"' in self.log_path.read_text(errors="replace")
        except OSError:
            return False

    def cpu_seconds(self) -> float:
        """utime+stime of the server's processes: gunicorn's process group (master + web
        workers) and, for the service, the worker process (which starts a session of its
        own to lower its priority) with its children."""
        if not self.proc:
            return 0.0
        total = tree_cpu_seconds(self.proc.pid)
        if self.worker is not None:
            total += tree_cpu_seconds(self.worker.pid, root=self.worker.pid)
        return total

    def stop(self) -> None:
        if not self.proc:
            return
        if self.worker is not None:
            # SIGTERM: it finishes or gives back its batches in flight, then exits.
            if self.worker.poll() is None:
                self.worker.terminate()
                try:
                    self.worker.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.worker.kill()
                    self.worker.wait()
            try:  # its own session (see start): a child it left behind
                os.killpg(self.worker.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.worker = None
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGINT, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Workers are in the same session/group; make sure none outlives the master.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()
        self.proc = None


def tree_cpu_seconds(pgid: int, root: int = 0) -> float:
    """utime+stime of every process in process group ``pgid`` or descended from one (or
    from process ``root``)."""
    stats: dict[int, tuple[int, int, int]] = {}  # pid -> (ppid, pgrp, ticks)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        # fields[0] = state (field 3); ppid, pgrp = fields 4, 5; utime/stime = 14/15
        stats[int(d)] = (int(fields[1]), int(fields[2]), int(fields[11]) + int(fields[12]))
    total = 0
    for pid, (ppid, pgrp, ticks) in stats.items():
        seen = 0
        # up to an ancestor in the group (or the root)
        while pgrp != pgid and pid != root and ppid in stats and seen < 64:
            pid, ppid, pgrp = ppid, stats[ppid][0], stats[ppid][1]
            seen += 1
        if pgrp == pgid or pid == root:
            total += ticks
    return total / CLK_TCK


def machine_busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


def machine_steal() -> float:
    """CPU-seconds the hypervisor gave to other machines while this one had work ready
    (/proc/stat's steal column; 0 on bare metal): a cell with much of it was measured
    on slower cores than its neighbours."""
    with open("/proc/stat") as f:
        vals = f.readline().split()[1:]
    return int(vals[7]) / CLK_TCK if len(vals) > 7 else 0.0


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


@dataclass
class Result:
    variant: str
    label: str  # "bare" | "service"
    kind: str  # "single" | "batch"
    round: int  # 0 = warm-up
    stats: dict
    server_cpu: float  # CPU-seconds of the measured gunicorn (master + workers)
    loadgen_cpu: float  # CPU-seconds of the load generator
    host_cpu: float  # busy CPU-seconds of the whole machine (all cores), steal included
    steal_cpu: float = 0.0  # CPU-seconds stolen by the hypervisor meanwhile (all cores)

    @property
    def seconds(self) -> float:
        return self.stats["duration_us"] / 1e6

    @property
    def rps(self) -> float:
        return self.stats["ok"] / self.seconds

    @property
    def eps(self) -> float:
        return self.rps * (BATCH_SIZE if self.kind == "batch" else 1)

    @property
    def problems(self) -> list[str]:
        s = self.stats
        out = []
        if s["non200"]:
            out.append(f"{s['non200']} non-200 responses (first: {s['first_err']!r})")
        errs = {k: s[k] for k in ("err_connect", "err_read", "err_write", "err_timeout") if s[k]}
        if errs:
            out.append(f"socket errors {errs}")
        if s["wrapped"]:
            out.append(
                f"pool exhausted ({s['sent']} sent from a pool of {s['pool']}): "
                "messageIds were reused; raise --pool-single/--pool-batch"
            )
        if s["ok"] == 0:
            out.append("no successful responses")
        return out


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


# The apps of one variant, in the order of a round: (label, WSGI app, extra environment).
# A variant is a SQLite synchronous setting (FULL, NORMAL) or PG (PostgreSQL).
SQLITE_APPS = (
    ("bare", "bench.bare_app:app", {}),
    ("anchor-req", "bench.anchor_app:app", {"ANCHOR_COMMIT": "request"}),
    ("anchor-grp", "bench.anchor_app:app", {"ANCHOR_COMMIT": "group"}),
    ("service", "wsgi:app", {}),
)
PG_APPS = (
    ("bare", "bench.bare_app:app", {}),
    ("anchor-pg", "bench.anchor_app:app", {}),
    ("service", "wsgi:app", {}),
)
VARIANTS = ("PG", "FULL", "NORMAL")


def apps_of(variant: str) -> tuple:
    return PG_APPS if variant == "PG" else SQLITE_APPS


def anchors_of(variant: str) -> tuple[str, ...]:
    return tuple(label for label, _, _ in apps_of(variant) if label.startswith("anchor"))


def pg_execute(sql: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


class Bench:
    def __init__(self, args, tmp: Path):
        self.args = args
        self.tmp = tmp
        self.servers: list[Server] = []
        self.commands: list[str] = []
        self.results: list[Result] = []
        self.configs: dict[str, dict[str, dict]] = {}
        self.db_notes: list[str] = []
        self.drain_notes: list[str] = []
        self.wrk = None if args.python_loadgen else ensure_wrk()
        self.nparts = args.threads if self.wrk else args.connections
        self.lua = tmp / "segment.lua"
        self.lua.write_text(LUA_SCRIPT)
        self.pools: dict[str, Path] = {}
        self.pg_databases: list[str] = []

    # pools ---------------------------------------------------------------
    def make_pools(self) -> None:
        a = self.args
        seconds = a.rounds * a.duration + a.warmup  # what one server launch consumes
        plan = {
            "single": max(a.pool_single, int(seconds * a.single_rate_cap)),
            "batch": max(a.pool_batch, int(seconds * a.batch_rate_cap)),
        }
        run_tag = f"bench{os.getpid()}x{int(time.time())}"
        for kind, count in plan.items():
            t0 = time.monotonic()
            prefix = self.tmp / f"pool-{kind}"
            size = write_pool(prefix, f"{run_tag}-{kind[0]}", kind, count, self.nparts)
            self.pools[kind] = prefix
            log(
                f"pool {kind}: {count} requests ({count * (BATCH_SIZE if kind == 'batch' else 1)}"
                f" distinct messageIds), {size / 1e6:.0f} MB in {time.monotonic() - t0:.1f}s"
            )
        # Written back before any cell: their dirty pages flushed behind the servers'
        # fsyncs would stall whichever cell came first.
        os.sync()

    # load ------------------------------------------------------------------
    def load(self, server: Server, kind: str, start: int, duration: int) -> dict:
        prefix = self.pools[kind]
        conns = self.args.connections
        if self.wrk:
            cmd = [
                self.wrk,
                "-t",
                str(self.nparts),
                "-c",
                str(conns),
                "-d",
                f"{int(duration)}s",
                "--timeout",
                f"{int(self.args.timeout)}s",
                "-s",
                str(self.lua),
                server.url + "/segment",
                "--",
                str(prefix),
                str(start),
                BEARER,
            ]
            self.last_cmd = shlex.join(cmd)
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120)
            for line in r.stdout.splitlines():
                if line.startswith("BENCH_JSON "):
                    return json.loads(line[len("BENCH_JSON ") :])
            raise RuntimeError(f"wrk gave no result (rc {r.returncode}):\n{r.stdout}\n{r.stderr}")
        self.last_cmd = (
            f"python loadgen: {conns} processes x requests.Session (keep-alive) "
            f"-> {server.url}/segment for {duration}s"
        )
        return run_python_load(
            server.url + "/segment", prefix, start, duration, conns, self.args.timeout
        )

    def run_one(
        self, variant: str, server: Server, kind: str, rnd: int, start: int, duration: int
    ) -> Result:
        cpu0 = server.cpu_seconds()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        b0, st0 = machine_busy(), machine_steal()
        stats = self.load(server, kind, start, duration)
        b1, st1 = machine_busy(), machine_steal()
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu1 = server.cpu_seconds()
        lg = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        res = Result(
            variant,
            server.label,
            kind,
            rnd,
            stats,
            cpu1 - cpu0,
            lg,
            (b1[0] - b0[0]) / CLK_TCK,
            st1 - st0,
        )
        name = f"{variant} {server.label} {kind} " + (f"round {rnd}" if rnd else "warm-up")
        log(
            f"{name:<34} {res.rps:9.1f} req/s {res.eps:10.1f} ev/s  "
            f"p50 {stats['lat_p50_us'] / 1000:.1f} ms  p99 {stats['lat_p99_us'] / 1000:.1f} ms"
        )
        if rnd == 1:
            self.commands.append(self.last_cmd + f"   # {server.label} {kind}")
            log(f"  first 200 body: {stats['sample'][:120]}")
        if res.problems:
            log(f"PROBLEM {name}: " + "; ".join(res.problems) + "\n" + server.log_tail())
        return res

    # servers -----------------------------------------------------------------
    def launch(self, variant: str, label: str, app: str, extra_env: dict) -> Server:
        run_dir = self.tmp / f"{variant}-{label}"
        run_dir.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_")}
        if variant == "PG":
            # A fresh database per server launch, dropped when the run ends.
            name = f"bench_{os.getpid()}_{int(time.time())}_{label.replace('-', '_')}"
            pg_execute(f'CREATE DATABASE "{name}"')
            self.pg_databases.append(name)
            db_url = f"postgresql://postgres@127.0.0.1:5432/{name}"
        else:
            # Fresh database per server launch (pools are reused across settings).
            db_url = f"sqlite:///{run_dir}/bench.db"
        env.update(
            SEGMENT_SHARED_SECRET=SECRET,
            WEBHOOK_BEARER_TOKEN=BEARER,
            METRICS_TOKEN=METRICS_TOKEN,
            DATABASE_URL=db_url,
            SQLITE_SYNCHRONOUS="FULL" if variant == "PG" else variant,
            # This measures ingestion: the local engine's periodic training (its own
            # benchmark is bench/engine_scale.py) would otherwise land in random rounds.
            ENGINE_BACKGROUND_TRAINING="false",
            PYTHONUNBUFFERED="1",
            **extra_env,
        )
        # gunicorn.conf.py creates a prometheus multiprocess dir unless one is given, and
        # removes it only on a clean exit: give each launch (every app alike) its own in tmp.
        metrics_dir = run_dir / "metrics"
        metrics_dir.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        flags = gunicorn_flags([])
        port = free_port()
        cmd = [sys.executable, "-m", "gunicorn", *flags, "--bind", f"{HOST}:{port}", app]
        # The service runs as users run it: gunicorn wsgi:app and the worker process.
        worker_cmd = WORKER_CMD if app == "wsgi:app" else None
        srv = Server(label, app, cmd, port, run_dir / "gunicorn.log", worker_cmd=worker_cmd)
        srv.config = resolve_config([*flags, "--bind", f"{HOST}:{port}", app], env)
        srv.db_path = run_dir / "bench.db"
        srv.db_url = db_url
        shown_env = " ".join(
            f"{k}={shlex.quote(env[k])}"
            for k in (
                "SEGMENT_SHARED_SECRET",
                "WEBHOOK_BEARER_TOKEN",
                "METRICS_TOKEN",
                "SQLITE_SYNCHRONOUS",
                "ENGINE_BACKGROUND_TRAINING",
                *extra_env,
            )
        )
        shown_db = (
            "postgresql://postgres@127.0.0.1:5432/<fresh>"
            if variant == "PG"
            else "sqlite:///<fresh>/bench.db"
        )
        self.commands.append(f"(repo root) {shown_env} DATABASE_URL={shown_db} {shlex.join(cmd)}")
        if worker_cmd:
            self.commands.append(
                f"  and beside it, the same environment: {shlex.join(['python', *worker_cmd[1:]])}"
            )
        self.servers.append(srv)
        srv.start(env)
        srv.wait_ready("GET /healthz" if app == "wsgi:app" else "POST /segment")
        log(
            f"{variant}: {label} ({app}) up on :{port}; worker_class={srv.config['worker_class']} "
            f"threads={srv.config['threads']} workers={srv.config['workers']}"
            + (f"; worker process pid {srv.worker.pid}" if srv.worker else "")
        )
        return srv

    def stop(self, srv: Server) -> None:
        srv.stop()
        if srv in self.servers:
            self.servers.remove(srv)

    def stop_all(self) -> None:
        for srv in list(self.servers):
            try:
                srv.stop()
            except Exception as exc:  # keep cleaning up the rest
                print(f"cleanup of {srv.label} failed: {exc!r}", file=sys.stderr)
        self.servers.clear()
        for name in self.pg_databases:
            try:
                pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as exc:  # keep cleaning up the rest
                print(f"dropping database {name} failed: {exc!r}", file=sys.stderr)
        self.pg_databases.clear()

    # one setting = every app, same flags, interleaved rounds ----------------
    def run_variant(self, vname: str) -> None:
        a = self.args
        apps, anchors = apps_of(vname), anchors_of(vname)
        servers = {
            label: self.launch(vname, label, app, env)
            for label, app, env in apps
            if app != "wsgi:app" or a.service_app == "wsgi:app"
        }
        if "service" not in servers:
            servers["service"] = self.launch(vname, "service", a.service_app, {})
        cfgs = self.configs[vname] = {label: s.config for label, s in servers.items()}
        if len({json.dumps(c, sort_keys=True) for c in cfgs.values()}) > 1:
            log(f"WARNING: resolved gunicorn config differs between the apps: {cfgs}")
        # Cursors: every line is sent to a server at most once per launch (the bare app
        # ignores bodies; it gets fresh lines anyway, like the others).
        cursor = {(label, kind): 0 for label in servers for kind in ("single", "batch")}
        plan = [(servers[label], "single") for label, _, _ in apps] + [
            (servers[label], "batch") for label in (*anchors, "service") if label in servers
        ]
        catch_up: list[str] = []
        for rnd in range(0 if a.warmup else 1, a.rounds + 1):
            for srv, kind in plan:
                start = cursor[(srv.label, kind)]
                res = self.run_one(
                    vname, srv, kind, rnd, start, a.warmup if rnd == 0 else a.duration
                )
                cursor[(srv.label, kind)] += res.stats["sent_max"]
                if rnd == 0 and res.problems:
                    raise RuntimeError(
                        f"{vname} {srv.label} {kind} warm-up failed: " + "; ".join(res.problems)
                    )
                if rnd:
                    self.results.append(res)
                if srv is servers["service"]:
                    # The worker process applies behind the answers, below the web
                    # workers' CPU priority (WORKER_NICE): what a cell leaves it is applied
                    # here, before the next cell, so that the next cells (bare, anchors)
                    # never share the cores with the service's backlog.
                    catch_up.append(f"{kind} r{rnd}: " + wait_applied(servers["service"]))
        self.drain_notes.append(f"{vname}: after each service cell: " + "; ".join(catch_up))
        for srv in servers.values():
            self.stop(srv)
        service = servers["service"]
        self.db_notes.append(
            f"{vname}: "
            + (pg_summary(service.db_url) if vname == "PG" else db_summary(service.db_path))
        )


def wait_applied(service: Server, limit: float = 300.0) -> str:
    """Wait until the service reports no inbox row left to apply; say how long it took."""
    started = time.monotonic()
    last = first = ""
    while time.monotonic() - started < limit:
        try:
            req = urllib.request.Request(
                service.url + "/healthz", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
            )
            with urllib.request.urlopen(req, timeout=5) as resp:
                body = json.loads(resp.read())
        except (OSError, ValueError, urllib.error.URLError) as exc:
            last = repr(exc)
            time.sleep(0.5)
            continue
        appliers = body.get("inbox", {}).get("appliers", {})
        if not appliers:
            return "the service reports no inbox appliers"
        pending = {name: a.get("pending", 0) for name, a in appliers.items()}
        if not first:
            first = f"{pending.get('local', 0)} rows left to apply"
        if not any(pending.values()):
            return f"{first}, applied after {time.monotonic() - started:.1f} s"
        last = f"pending {pending}"
        time.sleep(0.2)
    return f"inbox NOT applied within {limit:.0f} s ({last})"


def pg_summary(url: str) -> str:
    import psycopg

    try:
        with psycopg.connect(url, autocommit=True) as conn:
            names = [
                r[0]
                for r in conn.execute(
                    "select tablename from pg_tables where schemaname = 'public' order by 1"
                )
            ]
            counts = [
                f"{n}={conn.execute(f'select count(*) from {n}').fetchone()[0]}" for n in names
            ]
        return ", ".join(counts) or "no tables"
    except psycopg.Error as exc:
        return f"unreadable ({exc})"


def db_summary(db: Path) -> str:
    if not db.exists():
        return "no sqlite file"
    parts = []
    try:
        # The database, and the inbox's own file beside it (webhook/store.py).
        for path in (db, Path(f"{db}-inbox")):
            if not path.exists():
                continue
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            try:
                names = [
                    r[0]
                    for r in con.execute(
                        "select name from sqlite_master where type='table' "
                        "and name not like 'sqlite_%'"
                    )
                ]
                parts += [
                    f"{n}={con.execute(f'select count(*) from {n!r}').fetchone()[0]}" for n in names
                ]
            finally:
                con.close()
        return ", ".join(parts) or "no tables"
    except sqlite3.Error as exc:
        return f"unreadable ({exc})"


def print_report(bench: Bench, variants: list[str]) -> bool:
    a = bench.args
    ncpu = os.cpu_count() or 1
    results = bench.results
    print()
    print("=" * 120)
    print(
        f"Segment webhook throughput: {ncpu} cores, gunicorn --workers 2, {a.connections} "
        f"connections, {a.rounds} interleaved round(s) of {a.duration}s per measurement "
        f"(+{a.warmup}s warm-up), load generator: "
        + (
            f"wrk ({bench.nparts} thread(s))"
            if bench.wrk
            else "PYTHON FALLBACK (wrk unavailable; not comparable to wrk runs)"
        )
    )
    print("=" * 120)
    hdr = (
        f"{'sync':<8}{'app':<12}{'payload':<11}{'round':>6}{'req/s':>10}{'events/s':>11}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'srv ms/req':>12}"
        f"{'srv%':>7}{'wrk%':>6}{'other%':>8}{'steal%':>8}"
    )
    print(hdr)
    print("-" * len(hdr))

    def row(v, label, kind, rnd, rps, eps, p50, p99, mx, cpu_req, srv, lg, oth, stl):
        payload = f"batch x{BATCH_SIZE}" if kind == "batch" else "single"
        print(
            f"{v:<8}{label:<12}{payload:<11}{rnd:>6}{rps:>10.1f}{eps:>11.1f}{p50:>9.2f}"
            f"{p99:>9.2f}{mx:>9.1f}{cpu_req:>12.3f}{srv:>7.0f}{lg:>6.0f}{oth:>8.0f}{stl:>8.0f}"
        )

    def other(r: Result) -> float:
        rest = r.host_cpu - r.server_cpu - r.loadgen_cpu - r.steal_cpu
        return 100 * max(0.0, rest) / r.seconds

    def steal(r: Result) -> float:
        return 100 * r.steal_cpu / r.seconds

    med: dict[tuple[str, str, str], float] = {}
    for v in variants:
        rows = [(label, "single") for label, _, _ in apps_of(v)] + [
            (label, "batch") for label in (*anchors_of(v), "service")
        ]
        for label, kind in rows:
            rs = [r for r in results if (r.variant, r.label, r.kind) == (v, label, kind)]
            if not rs:
                continue
            for r in rs:
                s = r.stats
                row(
                    v,
                    label,
                    kind,
                    str(r.round),
                    r.rps,
                    r.eps,
                    s["lat_p50_us"] / 1e3,
                    s["lat_p99_us"] / 1e3,
                    s["lat_max_us"] / 1e3,
                    r.server_cpu / max(1, s["ok"]) * 1e3,
                    100 * r.server_cpu / r.seconds,
                    100 * r.loadgen_cpu / r.seconds,
                    other(r),
                    steal(r),
                )
            if len(rs) > 1:
                m = lambda f, rs=rs: median([f(r) for r in rs])  # noqa: E731
                row(
                    v,
                    label,
                    kind,
                    "median",
                    m(lambda r: r.rps),
                    m(lambda r: r.eps),
                    m(lambda r: r.stats["lat_p50_us"] / 1e3),
                    m(lambda r: r.stats["lat_p99_us"] / 1e3),
                    m(lambda r: r.stats["lat_max_us"] / 1e3),
                    m(lambda r: r.server_cpu / max(1, r.stats["ok"]) * 1e3),
                    m(lambda r: 100 * r.server_cpu / r.seconds),
                    m(lambda r: 100 * r.loadgen_cpu / r.seconds),
                    m(other),
                    m(steal),
                )
            med[(v, label, kind)] = median([r.rps for r in rs])
        print()
    print(
        "(srv% / wrk% = CPU of the measured gunicorn / load generator, 100 = one core; "
        f"other% = rest of the machine, {100 * ncpu} = all cores busy; steal% = CPU the "
        "hypervisor gave to other machines meanwhile (/proc/stat): a cell with much of it ran "
        "on slower cores than its neighbours; srv ms/req = server CPU per request)"
    )
    print()

    def per_round(num: tuple[str, str], den: tuple[str, str], v: str, mult: float = 1.0) -> str:
        nums = [r for r in results if (r.variant, r.label, r.kind) == (v, *num)]
        dens = [r for r in results if (r.variant, r.label, r.kind) == (v, *den)]
        return ", ".join(f"{mult * n.rps / d.rps:.2f}" for n, d in zip(nums, dens))

    ok_all = True
    for v in variants:
        bare = med.get((v, "bare", "single"))
        single, batch = med.get((v, "service", "single")), med.get((v, "service", "batch"))
        anchors = {
            label: med[(v, label, "single")]
            for label in anchors_of(v)
            if (v, label, "single") in med
        }
        if bare:
            for label in (*anchors_of(v), "service"):
                if (v, label, "single") in med:
                    print(
                        f"[{v}] {label:<10} single / bare req/s = "
                        f"{med[(v, label, 'single')]:8.1f} / {bare:8.1f} = "
                        f"{med[(v, label, 'single')] / bare:6.3f}"
                    )
        target_anchor, target = TARGETS[v]
        for label in anchors if single else ():
            ratio = single / anchors[label]
            held = label == target_anchor
            ok = ratio >= target
            print(
                f"[{v}] service single / {label} = {single:8.1f} / "
                f"{anchors[label]:8.1f} = {ratio:6.3f}  "
                + (
                    f"(target >= {target:.2f})  {'PASS' if ok else 'FAIL'}"
                    if held
                    else "(for scale)"
                )
                + f"   per round: {per_round(('service', 'single'), (label, 'single'), v)}"
            )
            if held:
                ok_all &= ok
        for label in anchors_of(v):  # what the stack gives for batches: no target, for scale
            a_single, a_batch = med.get((v, label, "single")), med.get((v, label, "batch"))
            if a_single and a_batch:
                print(
                    f"[{v}] {label} batch / single events/s = "
                    f"{a_batch * BATCH_SIZE:8.1f} / {a_single:8.1f} = "
                    f"{a_batch * BATCH_SIZE / a_single:6.2f}x (the anchor, for scale)"
                )
        if single and batch:
            ratio = batch * BATCH_SIZE / single
            ok = ratio >= TARGET_BATCH_VS_SINGLE
            print(
                f"[{v}] service batch / single events/s = {batch * BATCH_SIZE:8.1f} / "
                f"{single:8.1f} = {ratio:6.2f}x (target >= {TARGET_BATCH_VS_SINGLE:.0f}x)   "
                f"{'PASS' if ok else 'FAIL'}   per round: "
                f"{per_round(('service', 'batch'), ('service', 'single'), v, BATCH_SIZE)}"
            )
            ok_all &= ok
    if a.rounds > 1:
        print("(ratios are of the medians over rounds)")
    others = [other(r) / 100 for r in results]
    if others and median(others) > 0.25:
        print(
            f"WARNING: the machine was busy with other work during the run (median other% "
            f"{100 * median(others):.0f}, of {100 * ncpu}): figures are noisy; rerun when idle."
        )
    problems = [
        f"{r.variant} {r.label} {r.kind} round {r.round}: {p}" for r in results for p in r.problems
    ]
    print()
    if problems:
        print("ERRORS (run is invalid):")
        for p in problems:
            print("  " + p)
        ok_all = False
    else:
        total = sum(r.stats["ok"] for r in results)
        print(
            f"All {total} measured responses were 200; no socket errors; "
            "no messageId sent twice to a server launch."
        )
    for note in bench.drain_notes:
        print(f"Service inbox, {note}")
        ok_all &= "NOT applied" not in note
    print()
    print("Gunicorn settings (resolved from the same flags + config file for every app):")
    for v, cfgs in bench.configs.items():
        for label, cfg in cfgs.items():
            print(
                f"  {v:<7} {label:<11} worker_class={cfg['worker_class']} "
                f"threads={cfg['threads']} workers={cfg['workers']} "
                f"keepalive={cfg['keepalive']} timeout={cfg['timeout']} "
                f"accesslog={cfg['accesslog']} loglevel={cfg['loglevel']}"
            )
    if bench.db_notes:
        print("Service DB row counts after each launch: " + "; ".join(bench.db_notes))
        for note in bench.db_notes:
            if re.search(r"\binteractions=0\b", note):
                # A 200 that stored nothing (a message skipped as too old, say) is no
                # delivery: the run measured the wrong path.
                print(f"ERROR: the service stored no interaction ({note.split(':')[0]})")
                ok_all = False
    print()
    print("Command: " + shlex.join([Path(sys.executable).name, *sys.argv]))
    for c in bench.commands:
        print("  " + c)
    print()
    print("OVERALL: " + ("PASS" if ok_all else "FAIL"))
    return ok_all


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=int, default=10, help="seconds per measured run (default 10)")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds (bare, anchors, service single, service batch); "
        "ratios use medians (default 3)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="warm-up seconds per measurement kind after start, 0 = none (default 2)",
    )
    p.add_argument("--connections", type=int, default=8, help="concurrent connections (default 8)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--timeout", type=int, default=10, help="per-request timeout, s (default 10)")
    p.add_argument(
        "--variants",
        "--synchronous",
        dest="variants",
        default=",".join(VARIANTS),
        help="what to measure, comma-separated: PG (PostgreSQL on 127.0.0.1:5432, a fresh "
        "database per launch), FULL and NORMAL (SQLite's synchronous settings) "
        "(default PG,FULL,NORMAL)",
    )
    p.add_argument(
        "--service-app",
        default="wsgi:app",
        help="WSGI app for the service rows (default wsgi:app; "
        "bench.bare_app:app tests the plumbing)",
    )
    p.add_argument(
        "--pool-single",
        type=int,
        default=100_000,
        help="minimum single messages in the pool (default 100000)",
    )
    p.add_argument(
        "--pool-batch", type=int, default=1_000, help="minimum batches in the pool (default 1000)"
    )
    p.add_argument(
        "--single-rate-cap",
        type=float,
        default=8_000,
        help="single req/s the pool is sized for: pool >= cap x (rounds x duration "
        "+ warmup) (default 8000)",
    )
    p.add_argument(
        "--batch-rate-cap",
        type=float,
        default=1200,
        help="batch req/s the pool is sized for (default 1200: the anchors take ~800 batches/s)",
    )
    p.add_argument("--python-loadgen", action="store_true", help="force the Python fallback")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (pools, logs, DBs)")
    args = p.parse_args()
    if not 1 <= args.connections <= 1000:
        p.error("--connections must be in [1, 1000]")
    if not 1 <= args.threads <= args.connections:
        p.error("--threads must be in [1, connections]")
    if not 0 < args.duration <= 300:
        p.error("--duration must be in [1, 300]")
    if not 1 <= args.rounds <= 20:
        p.error("--rounds must be in [1, 20]")
    if not 0 <= args.warmup <= 60:
        p.error("--warmup must be in [0, 60]")
    settings = [s.strip().upper() for s in args.variants.split(",") if s.strip()]
    if not settings or any(s not in VARIANTS for s in settings):
        p.error("--variants takes PG, FULL, NORMAL or several of them")

    # Turn SIGTERM into KeyboardInterrupt so the finally block cleans up.
    def _term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)

    self_check()
    tmp = Path(tempfile.mkdtemp(prefix="webhook-bench-"))
    bench = None
    try:
        bench = Bench(args, tmp)
        if not bench.wrk:
            log("WARNING: wrk unavailable; using the Python multi-process load generator")
        if args.service_app != "wsgi:app":
            log(f"NOTE: service rows use {args.service_app} (plumbing test), not wsgi:app")
        bench.make_pools()
        for setting in settings:
            bench.run_variant(setting)
        return 0 if print_report(bench, settings) else 1
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    except Exception as exc:
        log(f"ERROR: {exc}")
        if bench and bench.results:
            print_report(bench, sorted({r.variant for r in bench.results}))
        return 2
    finally:
        if bench:
            bench.stop_all()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
