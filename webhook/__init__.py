"""Segment → Amazon Personalize: webhook receiver and recommendations service.

``create_app`` is the application factory (``flask --app webhook ...``; ``wsgi.py`` for
gunicorn). Configuration is read once, here, into ``Settings``.
"""
from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from flask import Flask, g, request

from .config import ConfigError, SECRET_FIELDS, Settings
from .destinations import LocalDestination
from .ingest import Ingestor
from .logs import configure_logging
from .routing import Router
from .store import Store, StoreUnavailable, sqlite_url_for

__all__ = ["create_app", "ConfigError", "Settings"]

log = logging.getLogger("webhook")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

UNSIGNED_WARNING = (
    "UNSIGNED DELIVERIES ARE ACCEPTED: neither SEGMENT_SHARED_SECRET nor "
    "WEBHOOK_BEARER_TOKEN is set, so anyone who can reach POST /segment can write events"
)


@dataclass
class Services:
    settings: Settings
    store: Store
    ingestor: Ingestor
    warnings: list[str] = field(default_factory=list)
    _schema_ready: bool = False
    _schema_lock: threading.Lock = field(default_factory=threading.Lock)

    def ensure_schema(self) -> None:
        if self._schema_ready:
            return
        with self._schema_lock:
            if not self._schema_ready:
                self.store.create_schema()
                self._schema_ready = True


def _secret_values(settings: Settings) -> list[str]:
    values: list[str] = []
    for name in SECRET_FIELDS:
        value = getattr(settings, name)
        values.extend(value if isinstance(value, tuple) else [value])
    # A database URL's password is the secret part of it.
    match = re.match(r"^[^:]+://[^:/@]*:([^@]+)@", settings.database_url)
    if match:
        values.append(match.group(1))
    return [v for v in values if v]


def _forwarders(settings: Settings) -> list:
    if not settings.personalize_tracking_id:
        return []
    from .destinations.personalize import PersonalizeForwarder
    from .destinations.personalize_mapping import MappingConfig
    mapping = MappingConfig(
        tracking_id=settings.personalize_tracking_id,
        event_type_map=dict(settings.event_type_map),
        event_value_property=settings.event_value_property,
        event_properties=settings.event_properties,
        user_traits_map=settings.user_traits_map,
        item_properties_map=settings.item_properties_map,
    )
    return [PersonalizeForwarder(
        mapping,
        users_dataset_arn=settings.personalize_users_dataset_arn,
        items_dataset_arn=settings.personalize_items_dataset_arn,
        region=settings.aws_region,
        call_timeout=settings.personalize_call_timeout_seconds,
        max_concurrency=settings.personalize_max_concurrency,
    )]


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the application. ``test_config`` (settings by field name) replaces the
    environment, for tests; otherwise settings come from the environment."""
    app = Flask(__name__, instance_relative_config=True)
    settings = Settings.from_mapping(test_config) if test_config is not None \
        else Settings.from_env()
    configure_logging(settings.log_level, _secret_values(settings))

    database_url = settings.database_url or sqlite_url_for(app.instance_path)
    store = Store(database_url)
    router = Router(settings.interaction_events, settings.item_id_properties)
    ingestor = Ingestor(store, router, destinations=[LocalDestination],
                        forwarders=_forwarders(settings))
    services = Services(settings=settings, store=store, ingestor=ingestor)
    if not settings.authentication_enforced:
        services.warnings.append(UNSIGNED_WARNING)
        log.warning(UNSIGNED_WARNING)
    app.extensions["segment"] = services
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes

    try:
        services.ensure_schema()
    except StoreUnavailable as exc:
        # Start anyway: requests answer 503 until the database is back.
        log.warning("store unavailable at start-up, will retry: %s", exc)

    from . import engine
    from .views import errors, ops, segment
    errors.init_app(app)
    engine.init_app(app)
    app.register_blueprint(segment.bp)
    app.register_blueprint(ops.bp)
    _init_request_context(app, services)

    log.info("started", extra={"configured": settings.public_summary()})
    return app


def _init_request_context(app: Flask, services: Services) -> None:
    access = logging.getLogger("webhook.access")

    @app.before_request
    def _begin():
        incoming = request.headers.get("X-Request-Id", "")
        g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        g.started = time.perf_counter()
        g.deadline = time.monotonic() + services.settings.personalize_deadline_seconds
        if request.endpoint not in ("ops.healthz", "ops.prometheus_metrics"):
            try:
                services.ensure_schema()
            except StoreUnavailable:
                from .views.errors import error_response
                return error_response(503, "store_unavailable",
                                      "the store is unavailable; retry later",
                                      retry_after=services.settings.retry_after_seconds)

    @app.after_request
    def _finish(response):
        response.headers["X-Request-Id"] = g.get("request_id", "")
        # The path only: a query string may carry a token.
        access.info("request", extra={
            "method": request.method, "path": request.path, "status": response.status_code,
            "duration_ms": round((time.perf_counter() - g.get("started", time.perf_counter()))
                                 * 1000, 2),
        })
        return response
