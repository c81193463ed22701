"""Operability: /healthz and /metrics.

``GET /healthz`` answers anyone with the status and, when not ok, its reason: enough for a
load balancer or Heroku's router. The details (mode, each applier's lag, dead letters, the
credentials and delivery shapes enforced, what is configured, warnings meant for the
operator) need ``METRICS_TOKEN`` as a bearer token; without that setting they are not
served at all (``flask --app webhook inbox`` shows the lag on the host).

``GET /metrics`` needs ``METRICS_TOKEN`` when it is set (Prometheus sends it with
``authorization: {credentials: ...}``).
"""

from __future__ import annotations

import time
import weakref

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client.core import GaugeMetricFamily

from .. import metrics
from ..insights import report_settings, sample_ratio
from ..settings import reveal
from ..signature import accepted_shapes
from ..storage import StoreUnavailable
from .auth import bearer, matches, operator_refusal
from .errors import error_response

bp = Blueprint("ops", __name__)

# A Profile API whose answers were mostly 404s in the last minute, with at least this many
# calls, gets a warning: most likely SEGMENT_SPACE_ID names another space.
NOT_FOUND_WARNING_MIN_CALLS = 20
NOT_FOUND_WARNING = (
    "MOST PROFILE API LOOKUPS OF THE LAST MINUTE WERE 404s ({share:.0%} of {calls}): is "
    "SEGMENT_SPACE_ID the space of this source's profiles? Visitors without a profile get "
    "personalized answers but no write-back"
)


@bp.get("/healthz")
def healthz():
    services = current_app.extensions["segment"]
    settings = services.settings
    token = bearer()
    wants_details = token is not None
    if wants_details and not matches(token, reveal(settings.metrics_token)):
        response = error_response(
            401,
            "token_invalid",
            "the details of /healthz need METRICS_TOKEN as a bearer token"
            + ("" if settings.metrics_token else " (METRICS_TOKEN is not set)"),
        )
        response.headers["WWW-Authenticate"] = 'Bearer realm="operations"'
        return response
    store_ok = services.store.ping()
    body: dict = {"status": "ok" if store_ok else "unavailable"}
    if not store_ok:
        body["reason"] = "the database is unavailable"
    if wants_details:
        body.update(
            {
                "mode": settings.mode,
                "store": "ok" if store_ok else "unavailable",
                "inbox": _inbox(services) if store_ok else None,
                "signatures_enforced": bool(settings.segment_shared_secrets),
                "bearer_token_enforced": bool(settings.webhook_bearer_tokens),
                "deliveries": accepted_shapes(
                    secrets=bool(settings.segment_shared_secrets),
                    bearer=bool(settings.webhook_bearer_tokens),
                ),
                "configured": settings.public_summary(),
                "warnings": services.warnings + _live_warnings(services),
            }
        )
    response = jsonify(body)
    response.status_code = 200 if store_ok else 503
    response.headers["Cache-Control"] = "no-store"
    return response


def _live_warnings(services) -> list[str]:
    share_of = getattr(services.recommendations.profiles, "not_found_share", None)
    if share_of is None:
        return []
    share, calls = share_of()
    if calls >= NOT_FOUND_WARNING_MIN_CALLS and share > 0.5:
        return [NOT_FOUND_WARNING.format(share=share, calls=calls)]
    return []


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
        "appliers": {
            name: {
                "pending": info.pending,
                "oldest_seconds": round(info.oldest_seconds, 3),
                "applying": info.owner is not None,
                "applying_for_seconds": round(now - info.applying_since, 3)
                if info.applying_since
                else None,
            }
            for name, info in lag.items()
        },
        "dead_letters": dead,
    }


def _gauges(services):
    def collect():
        try:
            lag = services.inbox.lag(services.runners)
            dead = services.dead_letters.count()
        except StoreUnavailable:
            return
        pending = GaugeMetricFamily(
            "inbox_pending",
            "Inbox rows not yet applied, by applier "
            "(latest sequence number minus the applier's position).",
            labels=["applier"],
        )
        oldest = GaugeMetricFamily(
            "inbox_oldest_seconds",
            "Age of the oldest inbox row not yet applied, by applier.",
            labels=["applier"],
        )
        for name, info in lag.items():
            pending.add_metric([name], info.pending)
            oldest.add_metric([name], info.oldest_seconds)
        yield pending
        yield oldest
        yield GaugeMetricFamily("dead_letters", "Records on the dead-letter list.", value=dead)
        yield from _sample_ratio_gauge(services)

    return collect


_SRM_CACHE_SECONDS = 60.0
_srm_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # store: (when, split)


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
            cached = _srm_cache[services.store] = (
                now,
                sample_ratio(
                    services.store, variants=settings["variants"], shares=settings["shares"]
                ),
            )
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
        value=split["pValue"],
    )


@bp.get("/metrics")
def prometheus_metrics():
    services = current_app.extensions["segment"]
    refusal = operator_refusal(reveal(services.settings.metrics_token), "METRICS_TOKEN", "metrics")
    if refusal is not None:
        return refusal
    payload, content_type = metrics.exposition(_gauges(services))
    return Response(payload, content_type=content_type)
