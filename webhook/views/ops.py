"""Operability: /healthz and /metrics."""
from __future__ import annotations

import time

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client.core import GaugeMetricFamily

from .. import metrics
from ..signature import accepted_shapes
from ..store import StoreUnavailable

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    services = current_app.extensions["segment"]
    settings = services.settings
    store_ok = services.store.ping()
    body = {
        "status": "ok" if store_ok else "unavailable",
        "mode": settings.mode,
        "store": "ok" if store_ok else "unavailable",
        "inbox": _inbox(services) if store_ok else None,
        "signatures_enforced": bool(settings.segment_shared_secrets),
        "bearer_token_enforced": bool(settings.webhook_bearer_tokens),
        "deliveries": accepted_shapes(secrets=bool(settings.segment_shared_secrets),
                                      bearer=bool(settings.webhook_bearer_tokens)),
        "configured": settings.public_summary(),
        "warnings": services.warnings,
    }
    response = jsonify(body)
    response.status_code = 200 if store_ok else 503
    return response


def _inbox(services) -> dict | None:
    """Each applier's lag: rows not applied yet, the age of the oldest, who applies."""
    try:
        services.ensure_schema()
        lag = services.inbox.lag(services.runners)
        dead = services.dead_letters.count()
    except StoreUnavailable:
        return None
    now = time.time()
    return {
        "appliers": {name: {
            "pending": info.pending,
            "oldest_seconds": round(info.oldest_seconds, 3),
            "applying": info.owner is not None,
            "applying_for_seconds": round(now - info.applying_since, 3)
            if info.applying_since else None,
        } for name, info in lag.items()},
        "dead_letters": dead,
    }


def _gauges(services):
    def collect():
        try:
            lag = services.inbox.lag(services.runners)
            dead = services.dead_letters.count()
        except StoreUnavailable:
            return
        pending = GaugeMetricFamily("inbox_pending", "Inbox rows not yet applied, by applier.",
                                    labels=["applier"])
        oldest = GaugeMetricFamily("inbox_oldest_seconds",
                                   "Age of the oldest inbox row not yet applied, by applier.",
                                   labels=["applier"])
        for name, info in lag.items():
            pending.add_metric([name], info.pending)
            oldest.add_metric([name], info.oldest_seconds)
        yield pending
        yield oldest
        yield GaugeMetricFamily("dead_letters", "Records on the dead-letter list.", value=dead)
    return collect


@bp.get("/metrics")
def prometheus_metrics():
    services = current_app.extensions["segment"]
    payload, content_type = metrics.exposition(_gauges(services))
    return Response(payload, content_type=content_type)
