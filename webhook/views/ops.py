"""Operability: /healthz and /metrics."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from .. import metrics

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
        "signatures_enforced": bool(settings.segment_shared_secrets),
        "bearer_token_enforced": bool(settings.webhook_bearer_tokens),
        "configured": settings.public_summary(),
        "warnings": services.warnings,
    }
    response = jsonify(body)
    response.status_code = 200 if store_ok else 503
    return response


@bp.get("/metrics")
def prometheus_metrics():
    payload, content_type = metrics.exposition()
    return Response(payload, content_type=content_type)
