"""Prometheus metrics, correct across several gunicorn workers.

Under gunicorn, ``gunicorn.conf.py`` sets ``PROMETHEUS_MULTIPROC_DIR`` before any worker
imports this module, and prometheus_client keeps each worker's counts in files there;
``/metrics`` adds them up. Without it (flask run, tests) the counts live in the process.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

MESSAGES = Counter(
    "segment_messages",
    "Segment messages received on the webhook, by type and outcome "
    "(accepted, duplicate, skipped, rejected).",
    ["type", "outcome"],
)
DELIVERIES = Counter(
    "segment_deliveries",
    "Webhook deliveries (HTTP requests to POST /segment), by response status.",
    ["status"],
)
DELIVERY_SECONDS = Histogram(
    "segment_delivery_seconds",
    "Time to answer a webhook delivery.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
PERSONALIZE_CALLS = Counter(
    "personalize_calls",
    "Calls to Amazon Personalize (personalize-events), by operation and outcome "
    "(ok, throttled, error, timeout, invalid, fatal); a retry is another call.",
    ["operation", "outcome"],
)
PERSONALIZE_RECORDS = Counter(
    "personalize_records",
    "Records for Amazon Personalize by kind (event, user, item) and outcome "
    "(sent, dropped, trimmed).",
    ["kind", "outcome"],
)
RECOMMENDATIONS = Counter(
    "recommendations",
    "GET /recommendations answers by source (personalize, local, popular) and whether the "
    "trait checks were degraded.",
    ["source", "degraded"],
)
ACTIVATIONS = Counter(
    "activations",
    "Write-backs of recommendations as a trait, by outcome (published, unchanged, too_soon, "
    "concurrent, failed, error, store_unavailable, deleted: the person was deleted since, "
    "dropped: the bounded queue was full).",
    ["outcome"],
)
PROFILE_LOOKUPS = Counter(
    "profile_lookups",
    "Trait lookups in the Segment Profile API, by outcome: ok, not_found, cached, shared "
    "(joined a concurrent call for the same visitor), and the ones that leave the traits "
    "unknown and the answer non-personalized: timeout, error, throttled (answered 429), "
    "paused (not asked: after a 429), over_budget (not asked: PROFILE_API_MAX_RPS).",
    ["outcome"],
)
PERSONALIZE_DELETIONS = Counter(
    "personalize_deletions",
    "Users deleted through Segment sent to Amazon Personalize data deletion jobs, by outcome "
    "(recorded, submitted, done, retried: their job failed and they wait for the next one).",
    ["outcome"],
)


INBOX_APPLIED = Counter(
    "inbox_applied",
    "Inbox rows applied, by applier (local, personalize).",
    ["applier"],
)
INBOX_APPLY_SECONDS = Histogram(
    "inbox_apply_seconds",
    "Time to apply one batch of inbox rows, by applier.",
    ["applier"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0, 300.0),
)
INBOX_EXPIRED = Counter(
    "inbox_expired",
    "Inbox rows pruned (MESSAGE_RETENTION_HOURS) before an applier reached them, by applier.",
    ["applier"],
)
INBOX_PRUNED = Counter(
    "inbox_pruned",
    "Rows deleted by retention, by table (inbox, interactions).",
    ["table"],
)
INBOX_UNREADABLE = Counter(
    "inbox_unreadable",
    "Inbox rows that no longer validated when applied, and were left out.",
)
DEAD_LETTERS_ADDED = Counter(
    "dead_letters_added",
    "Records put on the dead-letter list (refused for good), by applier.",
    ["applier"],
)
DEAD_LETTERS_DROPPED = Counter(
    "dead_letters_dropped",
    "Dead letters dropped because the list was full (DEAD_LETTERS_MAX).",
)
IMPRESSIONS = Counter(
    "recommendation_impressions",
    "Answers of GET /recommendations and POST /recommendations/rank recorded for the "
    "insights, by experiment variant.",
    ["variant"],
)
IMPRESSIONS_DROPPED = Counter(
    "recommendation_impressions_dropped",
    "Answers not recorded: the worker's impression buffer was full (the store down).",
)
ATTRIBUTIONS = Counter(
    "recommendation_attributions",
    "Segment events attributed to a recommendation, by variant and kind (click, add, order).",
    ["variant", "kind"],
)
ATTRIBUTED_REVENUE = Counter(
    "recommendation_attributed_revenue",
    "Revenue (price x quantity) of ordered products attributed to a recommendation, by variant.",
    ["variant"],
)


_children: dict = {}


def _child(metric, *values):
    """``metric.labels(*values)``, looked up once (a delivery counts three series; the
    lookup cost more than the count). Label values here come from small fixed sets."""
    key = (metric, values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


def count(metric, *labels: str, by: float = 1) -> None:
    """``metric.labels(*labels).inc(by)``, with the labelled child looked up once."""
    _child(metric, *labels).inc(by)


def record_outcomes(outcomes) -> None:
    """The outcomes of a delivery's messages, ``{(type, outcome): count}``."""
    for (kind, outcome), amount in outcomes.items():
        _child(MESSAGES, kind, outcome).inc(amount)


def delivery(status: int, seconds: float, outcomes: dict | None = None) -> None:
    """One webhook delivery answered with ``status`` after ``seconds``, and the outcomes
    of its messages, ``{(type, outcome): count}``."""
    _child(DELIVERIES, str(status)).inc()
    DELIVERY_SECONDS.observe(seconds)
    record_outcomes(outcomes or {})


class _Collected:
    """Gauges read when /metrics is scraped (from the database, so every worker and host
    sees the same values): ``collect()`` yields prometheus_client metric families."""

    def __init__(self, collect):
        self.collect = collect


def exposition(collect=None) -> tuple[bytes, str]:
    """The text format of every counter; ``collect`` adds scrape-time gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY as registry
    payload = generate_latest(registry)
    if collect is not None:
        gauges = CollectorRegistry(auto_describe=False)
        gauges.register(_Collected(collect))
        payload += generate_latest(gauges)
    return payload, CONTENT_TYPE_LATEST
