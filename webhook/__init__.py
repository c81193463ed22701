"""Segment → Amazon Personalize: webhook receiver and recommendations service.

``create_app`` is the application factory (``flask --app webhook ...``; ``wsgi.py`` for
gunicorn): settings read once (``settings.py``), every part built by ``wiring.build``, one
blueprint per concern (``views/``), CORS from flask-cors, a request id and an access line
for every request (``views/edge.RequestLog``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from flask import Flask, request

from .logs import configure_logging
from .memory import tune_allocator
from .settings import ConfigError, Settings
from .storage import StoreUnavailable
from .views.edge import RequestLog
from .wiring import Parts, build, secret_values

__all__ = ["create_app", "ConfigError", "Settings"]

log = logging.getLogger("webhook")


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the application. ``test_config`` (settings by field name) replaces the
    environment, for tests; otherwise settings come from the environment."""
    tune_allocator()  # before the server starts its threads; see webhook/memory.py
    app = Flask(__name__, instance_relative_config=True)
    settings = (
        Settings.from_mapping(test_config) if test_config is not None else Settings.from_env()
    )
    configure_logging(settings.log_level, secret_values(settings), settings.log_format)
    parts = build(settings, app.instance_path)
    for warning in parts.warnings:
        log.warning(warning)
    app.extensions["segment"] = parts
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes

    try:
        parts.ensure_schema()
    except StoreUnavailable as exc:
        # Start anyway: requests answer 503 until the database is back.
        log.warning("store unavailable at start-up, will retry: %s", exc)

    from . import cli, deletions, engine
    from .views import (
        errors,
        insights,
        openapi,
        ops,
        page,
        rank,
        recommendations,
        segment,
        tracking_api,
    )

    errors.init_app(app)
    for view in (segment, tracking_api, recommendations, rank, page, insights, ops, openapi):
        app.register_blueprint(view.bp)
    _init_cors(app, settings)
    cli.init_app(app)
    engine.init_app(app)
    deletions.init_app(app)
    _init_request_context(app, parts)

    summary = settings.public_summary()
    # A text line shows the three short fields; the whole summary goes to JSON lines only.
    log.info(
        "started",
        extra={
            "mode": summary["mode"],
            "database": summary["database"],
            "recommender": summary["recommender"],
            "configured": summary,
        },
    )
    return app


def _init_cors(app: Flask, settings: Settings) -> None:
    """Every CORS header the service sends, from flask-cors: the shop's origins
    (``CORS_ORIGINS``) may read recommendations and rankings; any page may post to the
    Segment-compatible Tracking API, as analytics.js does (its write key is public)."""
    from flask_cors import CORS

    resources: dict[str | re.Pattern[str], dict[str, Any]] = {
        r"/v1/*": {
            "origins": "*",
            "send_wildcard": False,
            "methods": ["POST", "OPTIONS"],
            "allow_headers": ["Authorization", "Content-Type", "Content-Encoding"],
        }
    }
    if settings.cors_origins:  # else only same-origin pages may read the answers
        resources[r"/recommendations"] = {
            "origins": list(settings.cors_origins),
            "methods": ["GET", "OPTIONS"],
        }
        resources[r"/recommendations/rank"] = {
            "origins": list(settings.cors_origins),
            "methods": ["POST", "OPTIONS"],
        }
    CORS(
        app,
        resources=resources,
        allow_headers=["Authorization", "Content-Type"],
        max_age=600,
        vary_header=True,
    )
    # Its headers go on the answers of the blueprints browsers call, and only there: moved
    # from every request's after_request functions (Flask's scope None) to theirs. A
    # webhook delivery (server to server) no longer pays for matching its path against
    # the resources (bench/README.md). Error answers still get them: flask-cors wraps the
    # app's exception handlers as well.
    cors_headers = app.after_request_funcs[None].pop()
    if cors_headers.__name__ != "cors_after_request":  # flask-cors changed how it hooks in
        raise RuntimeError(f"unexpected after_request function {cors_headers!r}")
    for scope in ("tracking_api", "recommendations", "rank"):
        app.after_request_funcs.setdefault(scope, []).append(cors_headers)


_NO_SCHEMA_NEEDED = frozenset(
    {"ops.healthz", "ops.prometheus_metrics", "page.index", "static", "openapi.openapi_document"}
)
# Deliveries answered under 400 are counted in /metrics and logged at DEBUG only: at
# thousands a second a line each is noise. Refused deliveries and every other request are
# at INFO.
_QUIET_WHEN_OK = ("/segment", "/v1/")


def _init_request_context(app: Flask, parts: Parts) -> None:
    app.wsgi_app = RequestLog(app.wsgi_app, _QUIET_WHEN_OK)  # type: ignore[method-assign]

    @app.before_request
    def _ready():
        if not app.testing:
            # Once a process (a WSGI host without gunicorn's post_worker_init).
            parts.start_web()
        if not parts.store._schema_ready and request.endpoint not in _NO_SCHEMA_NEEDED:
            try:
                parts.ensure_schema()
            except StoreUnavailable:
                from .views.errors import error_response

                return error_response(
                    503,
                    "store_unavailable",
                    "the store is unavailable; retry later",
                    retry_after=parts.settings.retry_after_seconds,
                )
        return None
