"""gunicorn settings, read from the environment (gunicorn loads this file by itself
when started from the project folder: ``gunicorn wsgi:app``)."""

import os
import shutil
import sys
import tempfile

# Each worker counts metrics in its own files here; /metrics adds them up. It must be set
# before a worker imports prometheus_client, hence here, in the master.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="segment-metrics-")
    _own_metrics_dir = True
else:
    _own_metrics_dir = False

# Loopback unless told otherwise: a newcomer's `make run` is not reachable from the
# network. The Procfile binds 0.0.0.0:$PORT, as Heroku requires.
bind = (
    os.environ.get("GUNICORN_BIND")
    or f"{os.environ.get('HOST') or '127.0.0.1'}:{os.environ.get('PORT', '8000')}"
)


def _switch(name: str, default: str) -> bool:
    value = os.environ.get(name, default).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    sys.stderr.write(f"configuration error: {name} must be true or false, not {value[:20]!r}\n")
    raise SystemExit(3)


def _whole(name: str, default: str, low: int, high: int) -> int:
    value = os.environ.get(name, default).strip()
    if value.isdigit() and low <= int(value) <= high:
        return int(value)
    sys.stderr.write(
        f"configuration error: {name} must be a whole number from {low} to {high}, "
        f"not {value[:20]!r}\n"
    )
    raise SystemExit(3)


workers = _whole("WEB_CONCURRENCY", "2", 1, 256)
# gthread, except that closing a connection never blocks the worker (see the module).
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "webhook.gunicorn_worker.ThreadWorker")
threads = _whole("GUNICORN_THREADS", "4", 1, 256)
# Segment gives a webhook 5 seconds; a worker stuck far longer than that is replaced.
timeout = _whole("GUNICORN_TIMEOUT", "30", 1, 3600)
# Seconds an idle keep-alive connection stays open. Behind a router or load balancer that
# keeps its connections to the app alive, this must outlast the router's own idle timeout:
# otherwise a worker can close a connection just as the router sends a request on it, and
# that request fails. Heroku's router keeps them 90 s (and Heroku sets DYNO on every
# dyno), hence 95 there; elsewhere gunicorn's 5, for clients that connect directly.
keepalive = _whole("GUNICORN_KEEPALIVE", "95" if os.environ.get("DYNO") else "5", 0, 3600)


# Each worker listens on a socket of its own (SO_REUSEPORT) and the kernel spreads new
# connections across them. On one shared socket, whichever worker is idle takes every
# connection of a burst: a client that keeps a few connections alive (Segment's webhook
# deliveries, a load balancer) can end up on one worker while the other idles.
reuse_port = _switch("GUNICORN_REUSE_PORT", "true")
graceful_timeout = 20
# No access log from gunicorn: its lines would carry query strings (tokens); the service
# logs each request itself, path only, as JSON.
accesslog = None
errorlog = "-"


def on_starting(server):
    # Check the configuration once, in the master, so a bad value stops the start with
    # one clear line instead of every worker failing to boot.
    sys.path.insert(0, os.getcwd())
    from webhook.settings import ConfigError, Settings

    try:
        Settings.from_env()
    except ConfigError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        raise SystemExit(3) from None


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _own_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def _parts(worker):
    extensions = getattr(getattr(worker, "wsgi", None), "extensions", None) or {}
    return extensions.get("segment")


def post_worker_init(worker):
    # This web process's own background work (model reloads; with WORKER_IN_WEB the
    # worker's loops too), from the start rather than at a first request.
    parts = _parts(worker)
    if parts is not None:
        parts.start_web()


def worker_exit(server, worker):
    # A process stopping gracefully gives its leases back instead of letting them expire.
    parts = _parts(worker)
    if parts is not None:
        parts.stop()
