"""The service as deployed: gunicorn with several workers."""

import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from tests.conftest import sample
from tests.deliveries import sign, track, wait_applied
from tests.gunicorn_server import gunicorn, wait_for_workers
from tests.operator import OPERATOR
from tests.waiting import niceness, wait_until

pytestmark = pytest.mark.slow  # each test starts gunicorn

SECRET = "gunicorn-test-secret"


def _signed(message):
    body = json.dumps(message, separators=(",", ":")).encode()
    return body, {"Content-Type": "application/json", "X-Signature": sign(body, SECRET)}


def _message(n):
    return track(
        product_id=f"p-{n % 13}",
        message_id=f"gm-{n}",
        anonymous_id=f"anon-{n % 7}",
        timestamp="2026-11-27T10:00:00.000Z",
        properties={"price": 9.5},
    )


def _counter(text, kind, outcome):
    return sample(text, "segment_messages_total", outcome=outcome, type=kind)


def test_message_counter_is_correct_across_workers(tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {
        "SEGMENT_SHARED_SECRET": SECRET,
        "DATABASE_URL": f"sqlite:///{tmp_path}/g.db",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "_LOG_DIR": str(tmp_path),
    }
    with gunicorn(env, workers=2) as (base, _):

        def post(n):
            body, headers = _signed(_message(n))
            # A new connection each time, so both workers take requests.
            return requests.post(
                base + "/segment", data=body, headers={**headers, "Connection": "close"}, timeout=10
            )

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(120)))
        assert all(a.status_code == 200 for a in answers)
        # Redeliver 30 of them: duplicates.
        with ThreadPoolExecutor(8) as pool:
            again = list(pool.map(post, range(30)))
        assert all(a.json()["duplicates"] == 1 for a in again)

        def scrape():
            return requests.get(
                base + "/metrics", headers={"Connection": "close", **OPERATOR}, timeout=5
            ).text

        def complete(text):
            return (
                _counter(text, "track", "accepted") == 120
                and _counter(text, "track", "duplicate") == 30
                and sample(text, "segment_deliveries_total", status="200") == 150
                and sample(text, "segment_delivery_seconds_count") == 150
            )

        # Each worker hands its delivery counts over within a second (metrics._Tally):
        # by then every scrape, whichever worker answers it, sees the sum over all.
        text = wait_until(
            lambda: (lambda text: text if complete(text) else None)(scrape()),
            10,
            "every worker's delivery counts in the scrape",
            interval=0.1,
        )
        assert _counter(text, "track", "accepted") == 120
        assert _counter(text, "track", "duplicate") == 30
        assert sample(text, "segment_deliveries_total", status="200") == 150
        # Each delivery is one observation of its time, in its bucket.
        assert sample(text, "segment_delivery_seconds_count") == 150
        assert sample(text, "segment_delivery_seconds_bucket", le="+Inf") == 150
        assert 0 < sample(text, "segment_delivery_seconds_sum") < 150 * 5
        bounds = ("0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0")
        cumulative = [sample(text, "segment_delivery_seconds_bucket", le=b) for b in bounds]
        assert cumulative == sorted(cumulative)  # cumulative, as the text format says
        assert cumulative[-1] == 150  # every delivery answered within Segment's 5 s
        for _ in range(10):
            text = scrape()
            assert _counter(text, "track", "accepted") == 120
            assert _counter(text, "track", "duplicate") == 30
            assert sample(text, "segment_delivery_seconds_count") == 150
        writers = {
            name.rsplit("_", 1)[-1]
            for name in os.listdir(metrics_dir)
            if name.startswith("counter_")
        }
        assert len(writers) >= 2, "both workers should have counted messages"


def test_a_burst_of_keep_alive_connections_is_shared_by_both_workers(tmp_path):
    """A client that opens its connections at once and keeps them (Segment's deliveries,
    a load balancer) gets both web processes: on one shared socket the idle worker took
    the whole burst, and the other idled while one process, one GIL, did all the work
    (GUNICORN_REUSE_PORT=false brings that back: this test then fails nearly always)."""
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/g.db", "_LOG_DIR": str(tmp_path)}
    with gunicorn(env, workers=2, worker=False) as (base, process):
        workers = wait_for_workers(process.pid, 2)
        port = int(base.rsplit(":", 1)[1])
        # Both workers listen before the burst (each binds its socket as it boots).
        wait_until(
            lambda: all(
                any(
                    c.laddr.port == port and c.status == "LISTEN"
                    for c in psutil.Process(pid).net_connections("tcp")
                )
                for pid in workers
            ),
            30,
            "both workers listening",
            interval=0.1,
        )
        splits = []
        for _ in range(3):
            # Every connection made before any request: the whole burst waits to be accepted.
            socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(32)]
            try:
                for sock in socks:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                for sock in socks:
                    assert sock.recv(65536).startswith(b"HTTP/1.1 ")
                held = [
                    sum(
                        1
                        for c in psutil.Process(pid).net_connections("tcp")
                        if c.laddr.port == port and c.status == "ESTABLISHED"
                    )
                    for pid in workers
                ]
            finally:
                for sock in socks:
                    sock.close()
            assert sum(held) == 32
            splits.append(min(held))
            time.sleep(0.5)
    # Spread by the kernel's hash, the fewer of 32 is under 6 once in ~9,000 bursts.
    assert all(fewer >= 6 for fewer in splits), f"the less busy worker held {splits} of 32"


def test_a_mistyped_reuse_port_stops_gunicorn_naming_the_variable(tmp_path):
    env = {"GUNICORN_REUSE_PORT": "sometimes", "_LOG_DIR": str(tmp_path)}
    with pytest.raises(RuntimeError, match="gunicorn exited") as stopped, gunicorn(env, workers=1):
        pass
    assert "GUNICORN_REUSE_PORT must be true or false" in str(stopped.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [("GUNICORN_KEEPALIVE", "a minute"), ("GUNICORN_THREADS", "0"), ("GUNICORN_TIMEOUT", "-5")],
)
def test_a_mistyped_number_stops_gunicorn_naming_the_variable(tmp_path, name, value):
    env = {name: value, "_LOG_DIR": str(tmp_path)}
    with pytest.raises(RuntimeError, match="gunicorn exited") as stopped, gunicorn(env, workers=1):
        pass
    assert f"configuration error: {name} must be a whole number" in str(stopped.value)


def _idle_connection_survives(base: str, seconds: float) -> bool:
    """A request, then ``seconds`` idle: whether the server still holds the connection."""
    import http.client

    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request("GET", "/healthz")
        answer = connection.getresponse()
        answer.read()
        assert answer.status == 200 and not answer.will_close
        time.sleep(seconds)
        sock = connection.sock
        sock.setblocking(False)
        try:
            return sock.recv(1) != b""  # EOF: the server hung up
        except BlockingIOError:
            return True  # nothing to read: still open
    finally:
        connection.close()


def test_on_heroku_an_idle_connection_outlasts_the_routers_keep_alive(tmp_path):
    """Heroku's router keeps its connections to a dyno alive 90 s. Were gunicorn to close
    an idle one first (its default is 5 s), a request the router sends at that moment
    fails; Heroku sets DYNO on every dyno."""
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/g.db", "_LOG_DIR": str(tmp_path)}
    with gunicorn({**env, "DYNO": "web.1"}, workers=1, worker=False) as (base, _process):
        assert _idle_connection_survives(base, 6.5)
    # Elsewhere, clients connect directly: idle connections go after gunicorn's 5 s.
    with gunicorn(env, workers=1, worker=False) as (base, _process):
        assert not _idle_connection_survives(base, 6.5)


def test_healthz_under_gunicorn_says_signatures_are_not_enforced(tmp_path):
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/g.db", "_LOG_DIR": str(tmp_path)}
    with gunicorn(env, workers=1) as (base, process):
        health = requests.get(base + "/healthz", headers=OPERATOR, timeout=5).json()
        assert health["signatures_enforced"] is False
        assert any("UNSIGNED" in w for w in health["warnings"])
    assert "UNSIGNED DELIVERIES ARE ACCEPTED" in process.log_path.read_text()


def test_bad_setting_stops_gunicorn_naming_the_variable(tmp_path):
    env = {"MAX_BODY_BYTES": "eight megabytes", "_LOG_DIR": str(tmp_path)}
    with pytest.raises(RuntimeError, match="gunicorn exited") as stopped, gunicorn(env, workers=1):
        pass
    assert "exited with 0:" not in str(stopped.value)
    assert "configuration error: MAX_BODY_BYTES" in str(stopped.value)


def _post(base, n):
    body, headers = _signed(_message(n))
    return requests.post(
        base + "/segment", data=body, headers={**headers, "Connection": "close"}, timeout=10
    )


def _interactions(tmp_path, name) -> int:
    import sqlite3

    with sqlite3.connect(str(tmp_path / name)) as db:
        return db.execute("SELECT count(*) FROM interactions").fetchone()[0]


def test_the_worker_applies_what_the_web_process_accepted_below_its_priority(tmp_path):
    """The Procfile's two processes: the web workers only accept (nothing is applied
    while the worker is stopped: the lag grows), the worker applies, at WORKER_NICE, and
    a worker started again catches up with what waited."""
    env = {
        "SEGMENT_SHARED_SECRET": SECRET,
        "DATABASE_URL": f"sqlite:///{tmp_path}/a.db",
        "WORKER_NICE": "7",
        "_LOG_DIR": str(tmp_path),
    }
    with gunicorn(env, workers=2) as (base, process):
        workers = wait_for_workers(process.pid, 2)
        worker = process.worker
        wait_until(lambda: niceness(worker.pid) == 7, 10, "the worker's priority lowered")
        for pid in workers:
            assert niceness(pid) == 0  # the web processes keep the server's priority
        with ThreadPoolExecutor(4) as pool:
            assert all(a.status_code == 200 for a in pool.map(lambda n: _post(base, n), range(40)))
        wait_applied(base, 20)
        assert _interactions(tmp_path, "a.db") == 40

        worker.terminate()
        assert worker.wait(20) == 0  # a clean stop: batches finished or given back
        with ThreadPoolExecutor(4) as pool:
            assert all(
                a.status_code == 200 for a in pool.map(lambda n: _post(base, n), range(40, 80))
            )
        time.sleep(1)
        lag = requests.get(base + "/healthz", headers=OPERATOR, timeout=5).json()["inbox"]
        assert lag["appliers"]["local"]["pending"] > 0  # nobody applies without a worker
        assert _interactions(tmp_path, "a.db") == 40
        process.restart_worker()
        assert wait_applied(base, 30)["appliers"]["local"]["pending"] == 0
        assert _interactions(tmp_path, "a.db") == 80
    log_text = process.log_path.read_text(errors="replace")
    assert "Traceback" not in log_text and "worker: stopped" in log_text


def test_worker_in_web_runs_the_same_loops_in_the_web_process(tmp_path):
    """WORKER_IN_WEB (a host with one process type): no worker process, the web
    processes apply themselves, under the same leases."""
    env = {
        "SEGMENT_SHARED_SECRET": SECRET,
        "DATABASE_URL": f"sqlite:///{tmp_path}/w.db",
        "WORKER_IN_WEB": "true",
        "_LOG_DIR": str(tmp_path),
    }
    with gunicorn(env, workers=2, worker=False) as (base, process):
        with ThreadPoolExecutor(4) as pool:
            assert all(a.status_code == 200 for a in pool.map(lambda n: _post(base, n), range(30)))
        assert wait_applied(base, 20)["appliers"]["local"]["pending"] == 0
        assert _interactions(tmp_path, "w.db") == 30
    assert "Traceback" not in process.log_path.read_text(errors="replace")


@pytest.mark.skipif(
    not os.path.exists("/proc/self/autogroup"), reason="the kernel has no autogroup scheduling"
)
def test_a_worker_started_as_a_session_leader_lowers_its_sessions_priority(tmp_path):
    """honcho (`make run`) starts each process in a session of its own. With autogroup
    scheduling the CPU is shared between sessions first, so the worker's nice value only
    counts against the web process once its session's group carries it too."""
    import subprocess
    import sys

    from tests.gunicorn_server import ROOT, stop

    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_")}
    env.update(DATABASE_URL=f"sqlite:///{tmp_path}/w.db", WORKER_NICE="7")
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "webhook", "worker"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def group_nice() -> str:
            with open(f"/proc/{worker.pid}/autogroup") as handle:
                return handle.read().split()[-1]

        wait_until(lambda: group_nice() == "7", 15, "the worker's session group at nice 7")
        assert niceness(worker.pid) == 7
    finally:
        stop(worker)


def _hold_closed_connections(port, stop, held, every=0.2, keep=10):
    """The attack: ask for `Connection: close`, read the answer, then never hang up."""
    while not stop.is_set():
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        held.append(sock)
        while len(held) > keep:
            held.pop(0).close()
        stop.wait(every)


def _connections(pid: int) -> int:
    """How many connections the process holds open, in any TCP state (a socket the peer
    has closed no longer shows in psutil's list, but still holds a descriptor)."""
    sockets = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            sockets += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except FileNotFoundError:
            pass
    listeners = psutil.Process(pid).net_connections("all")
    return sockets - sum(1 for c in listeners if c.status in (psutil.CONN_LISTEN, psutil.CONN_NONE))


def test_a_client_that_keeps_its_socket_after_connection_close_stalls_no_one(tmp_path):
    """gunicorn 27's gthread worker lingers up to 2 s in its main thread after a
    `Connection: close` answer, waiting for the client to hang up; meanwhile the worker
    accepts nothing. One unauthenticated client holding its sockets open stalled every
    other client of that worker by ~2 s. Our worker lingers without blocking."""
    import threading

    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/g.db", "_LOG_DIR": str(tmp_path)}
    with gunicorn(env, workers=1, worker=False) as (base, process):
        (worker_pid,) = wait_for_workers(process.pid, 1)
        port = int(base.rsplit(":", 1)[1])
        stop, held = threading.Event(), []
        holder = threading.Thread(target=_hold_closed_connections, args=(port, stop, held))
        holder.start()
        try:
            time.sleep(1)
            slowest = _slowest_of(base, 30, pause=0.05)
            stop.set()
            holder.join()

            # The lingering is bounded in time: the worker lets go of every connection
            # although the client still holds its end.
            wait_until(
                lambda: _connections(worker_pid) == 0,
                5,
                "the worker closing the held connections",
                detail=lambda: f"{_connections(worker_pid)} still open",
            )

            # A client that sends more after its request, then hangs up: its answer is
            # whole, what it sent is drained, and the worker lets go as soon as it hangs up.
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + b"x" * 20000
                )
                answer = _read_to_close(sock)
            head, _, body = answer.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            assert head.startswith(b"HTTP/1.1 200") and len(body) == length
            wait_until(
                lambda: _connections(worker_pid) == 0, 1, "the worker closing a hung-up connection"
            )
        finally:
            stop.set()
            holder.join()
            for sock in held:
                sock.close()
        assert len(held) > 0, "the holder never got an answer"
        assert slowest < 1.0, f"slowest of 30 requests took {slowest:.2f} s"


def _drip(port, head, stop, sockets, every=0.5):
    """The attack: a request sent a byte at a time, never finished."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sockets.append(sock)
    sock.sendall(head)
    while not stop.is_set():
        try:
            sock.sendall(b"x")
        except OSError:
            return  # the server closed it
        stop.wait(every)


def _read_to_close(sock) -> bytes:
    """Everything the server sends until it closes the connection."""
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def _exchange(port, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes (the requests say Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        return _read_to_close(sock)


def _slowest_of(base: str, count: int, pause: float = 0.0) -> float:
    """Seconds the slowest of ``count`` GET /healthz took, each on a new connection."""
    timings = []
    for _ in range(count):
        started = time.monotonic()
        with requests.Session() as fresh:  # a new connection each time
            assert fresh.get(base + "/healthz", timeout=10).status_code == 200
        timings.append(time.monotonic() - started)
        time.sleep(pause)
    return max(timings)


def test_clients_that_send_slowly_take_no_thread_and_are_cut_off(tmp_path):
    """A thread used to wait for each request's bytes: a dozen connections dripping a byte
    a second (a head never ended, a body never finished) held every thread of the two
    workers, and every other request timed out. Now a request is read whole before a
    thread takes it, and a client that takes more than READ_SECONDS is cut off."""
    import threading

    from webhook.gunicorn_worker import READ_SECONDS

    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/g.db", "_LOG_DIR": str(tmp_path)}
    with gunicorn(env, workers=2, worker=False) as (base, _process):
        port = int(base.rsplit(":", 1)[1])
        heads = [b"POST /segment HTTP/1.1\r\nHost: x\r\nX-Slow: "] * 10 + [
            b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        ] * 10
        stop, sockets = threading.Event(), []
        drips = [threading.Thread(target=_drip, args=(port, head, stop, sockets)) for head in heads]
        started = time.monotonic()
        for drip in drips:
            drip.start()
        try:
            time.sleep(1.5)
            slowest = _slowest_of(base, 20)
            assert slowest < 1.0, f"slowest of 20 requests took {slowest:.2f} s"
            # Every slow client is cut off once its time is up.
            for drip in drips:
                drip.join(timeout=READ_SECONDS + 5 - (time.monotonic() - started))
            assert not any(drip.is_alive() for drip in drips), "a slow client was not cut off"
        finally:
            stop.set()
            for sock in sockets:
                sock.close()


def test_requests_the_worker_reads_ahead_are_answered_as_before(tmp_path):
    """What the worker must still get right while it reads requests whole: a body sent
    after `Expect: 100-continue`, a chunked body, two requests in one packet, a head that
    arrives in pieces, and a malformed length answered by gunicorn's parser."""
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/g.db",
        "SEGMENT_SHARED_SECRET": SECRET,
        "_LOG_DIR": str(tmp_path),
    }
    with gunicorn(env, workers=1, worker=False) as (base, _process):
        port = int(base.rsplit(":", 1)[1])
        body, headers = _signed(_message(1))
        head = (
            "POST /segment HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nX-Signature: {headers['X-Signature']}\r\n"
        ).encode()

        # Expect: 100-continue: the body is sent only after the interim answer.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                head + b"Expect: 100-continue\r\n" + b"Content-Length: %d\r\n\r\n" % len(body)
            )
            assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(body)
            answer = _read_to_close(sock)
        final = answer[answer.rindex(b"HTTP/1.1 ") :]
        assert final.startswith(b"HTTP/1.1 200"), answer[:300]
        assert b'"accepted":1' in final

        # A chunked body, in two chunks.
        half = len(body) // 2
        chunked = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (
            half,
            body[:half],
            len(body) - half,
            body[half:],
        )
        answer = _exchange(port, head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert b'"duplicates":1' in answer  # the same message as above

        # Two requests in one packet, the first kept alive: two answers, in order.
        two = (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        answer = _exchange(port, two)
        assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1 ") == 2
        assert b"HTTP/1.1 404" in answer

        # A head in pieces, a few milliseconds apart.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for piece in (
                b"GET /hea",
                b"lthz HTTP/1.1\r\nHo",
                b"st: x\r\nConnection: close\r\n",
                b"\r\n",
            ):
                sock.sendall(piece)
                time.sleep(0.05)
            answer = _read_to_close(sock)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]

        # A malformed Content-Length: gunicorn's parser refuses it.
        answer = _exchange(
            port, b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n{}"
        )
        assert answer.startswith(b"HTTP/1.1 400"), answer[:300]


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # its own cert
def test_with_tls_in_gunicorn_itself_requests_are_still_answered(tmp_path):
    """With --certfile the socket is wrapped in the thread, after the worker would have
    read ahead: there the worker leaves reading to the thread, as gthread does."""
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"],
        check=True,
        capture_output=True,
    )
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/g.db",
        "_LOG_DIR": str(tmp_path),
        "GUNICORN_CMD_ARGS": f"--certfile {cert} --keyfile {key}",
    }
    with gunicorn(env, workers=1, worker=False, scheme="https") as (base, _process):
        assert base.startswith("https://")
        for _ in range(3):  # a new connection each time, then one kept alive
            answer = requests.get(base + "/healthz", timeout=5, verify=False)
            assert answer.status_code == 200
        with requests.Session() as session:
            for _ in range(3):
                assert session.get(base + "/healthz", timeout=5, verify=False).status_code == 200
