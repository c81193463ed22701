"""Operability: /healthz and /metrics."""
from __future__ import annotations

import time
import weakref

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client.core import GaugeMetricFamily

from .. import metrics
from ..insights import report_settings, sample_ratio
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
        yield from _sample_ratio_gauge(services)
    return collect


_SRM_CACHE_SECONDS = 60.0
_srm_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # store: (when, split)


def _sample_ratio_gauge(services):
    """The experiment's sample-ratio p-value over the last 7 days (/insights' default
    period): below 0.001 the split is off. Read at most once a minute per process."""
    if not services.settings.insights_retention_days:
        return
    settings = report_settings(services)
    now = time.monotonic()
    cached = _srm_cache.get(services.store)
    if cached is None or now - cached[0] > _SRM_CACHE_SECONDS:
        try:
            cached = _srm_cache[services.store] = (now, sample_ratio(
                services.store, variants=settings["variants"], shares=settings["shares"]))
        except StoreUnavailable:
            return
    split = cached[1]
    if split is None or split["pValue"] is None:
        return
    yield GaugeMetricFamily(
        "experiment_sample_ratio_p_value",
        "Chi-squared p-value of the visitors per experiment variant against the "
        "configured split, over the last 7 days (as GET /insights); below 0.001 the "
        "comparison cannot be trusted (sample-ratio mismatch).",
        value=split["pValue"])


@bp.get("/metrics")
def prometheus_metrics():
    services = current_app.extensions["segment"]
    payload, content_type = metrics.exposition(_gauges(services))
    return Response(payload, content_type=content_type)
