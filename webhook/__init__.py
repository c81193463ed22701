"""Segment → Amazon Personalize: webhook receiver and recommendations service.

``create_app`` is the application factory (``flask --app webhook ...``; ``wsgi.py`` for
gunicorn). Configuration is read once, here, into ``Settings``.
"""
from __future__ import annotations

import logging
import random
import re
import time
from typing import Any, Mapping

from flask import Flask, g, request

from . import pids
from .config import ConfigError, Settings
from .logs import configure_logging
from .memory import tune_allocator
from .services import build_services, secret_values
from .store import StoreUnavailable

__all__ = ["create_app", "ConfigError", "Settings"]

log = logging.getLogger("webhook")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the application. ``test_config`` (settings by field name) replaces the
    environment, for tests; otherwise settings come from the environment."""
    tune_allocator()  # before the server starts its threads; see webhook/memory.py
    app = _App(__name__, instance_relative_config=True)
    settings = Settings.from_mapping(test_config) if test_config is not None \
        else Settings.from_env()
    configure_logging(settings.log_level, secret_values(settings), settings.log_format)
    services = build_services(settings, app.instance_path)
    for warning in services.warnings:
        log.warning(warning)
    app.extensions["segment"] = services
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes

    try:
        services.ensure_schema()
    except StoreUnavailable as exc:
        # Start anyway: requests answer 503 until the database is back.
        log.warning("store unavailable at start-up, will retry: %s", exc)

    from . import cli, deletions, engine
    from .views import (errors, insights, openapi, ops, page, rank, recommendations,
                        segment, tracking_api)
    errors.init_app(app)
    for view in (segment, tracking_api, recommendations, rank, page, insights, ops, openapi):
        app.register_blueprint(view.bp)
    _init_cors(app, settings)
    cli.init_app(app)
    engine.init_app(app)
    deletions.init_app(app)
    _init_request_context(app, services)

    summary = settings.public_summary()
    # A text line shows the three short fields; the whole summary goes to JSON lines only.
    log.info("started", extra={"mode": summary["mode"], "database": summary["database"],
                               "recommender": summary["recommender"], "configured": summary})
    return app


class _App(Flask):
    """Flask, with the answer to "is this hook a coroutine?" remembered: Flask asks it of
    every hook and view on every request (inspect calls; measured at a few percent of a
    webhook delivery). The functions registered never change kind."""

    def ensure_sync(self, func):
        known = self.__dict__.setdefault("_sync_functions", {})
        wrapped = known.get(func)
        if wrapped is None:
            wrapped = known[func] = super().ensure_sync(func)
        return wrapped


def _init_cors(app: Flask, settings: Settings) -> None:
    if not settings.cors_origins:
        return  # no CORS headers: only same-origin pages may read the answers
    from flask_cors import CORS
    CORS(app, resources={r"/recommendations": {"origins": list(settings.cors_origins)}},
         allow_headers=["Authorization", "Content-Type"], methods=["GET", "OPTIONS"],
         max_age=600, vary_header=True)


_NO_SCHEMA_NEEDED = frozenset({"ops.healthz", "ops.prometheus_metrics", "page.index",
                               "static", "openapi.openapi_document"})
# Deliveries answered 2xx are counted in /metrics and logged at DEBUG only: at thousands a
# second a line each is noise, and it cost a fifth of a delivery (measured). Refused
# deliveries and every other request are logged at INFO.
_QUIET_WHEN_OK = frozenset({"segment.receive", "tracking_api.receive"})


def _init_request_context(app: Flask, services) -> None:
    access = logging.getLogger("webhook.access")

    @app.before_request
    def _begin():
        req = request._get_current_object()
        incoming = req.environ.get("HTTP_X_REQUEST_ID", "")  # no header-name lookup
        context = g._get_current_object()
        # Unique, not secret: os.urandom would be a system call that lets go of the GIL,
        # which under load hands the worker to another thread at every request.
        context.request_id = (incoming if _REQUEST_ID.match(incoming)
                              else f"{random.getrandbits(64):016x}")
        context.started = time.perf_counter()
        if services._background_pid != pids.current() and not app.testing:
            services.start_background()  # a WSGI host without gunicorn's post_worker_init
        if not services._schema_ready and req.endpoint not in _NO_SCHEMA_NEEDED:
            try:
                services.ensure_schema()
            except StoreUnavailable:
                from .views.errors import error_response
                return error_response(503, "store_unavailable",
                                      "the store is unavailable; retry later",
                                      retry_after=services.settings.retry_after_seconds)

    @app.after_request
    def _finish(response):
        context = g._get_current_object()
        response.headers["X-Request-Id"] = context.get("request_id", "")
        req = request._get_current_object()
        status = response.status_code
        level = logging.DEBUG if status < 400 and req.endpoint in _QUIET_WHEN_OK \
            else logging.INFO
        if access.isEnabledFor(level):
            # The path only: a query string may carry a token.
            started = context.get("started")
            access.log(level, "request", extra={
                "method": req.method, "path": req.path, "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2)
                if started is not None else None,
                **context.get("log_extra", {}),
            })
        return response
