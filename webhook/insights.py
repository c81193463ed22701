"""Insights: do the recommendations earn their keep? Per variant, per day and in total.

Read from what the service recorded: every answer it gave (``impressions``) and what
Segment events said about them (``attributions``: clicks, add-to-carts, orders and their
revenue; ``appliers/attribution.py``).

The figures, for each variant:

* ``impressions``, ``visitors`` (distinct ids the answers were for), ``clicks``,
  ``addToCarts``, ``orders`` (distinct orders with at least one attributed product),
  ``revenue`` (price × quantity of the attributed products) and ``revenuePer1000``
  (revenue per 1,000 impressions);
* rates with 95 % Wilson intervals: ``ctr`` (answers with at least one click, of all
  answers), ``visitorClickRate``, ``visitorAddRate`` and ``visitorOrderRate`` (visitors
  who clicked, added to the cart or ordered from an answer shown in the period, of all
  visitors), and ``revenuePerVisitor``.

Visitors, not answers, are what the experiment splits (``experiments.py``), so the
comparisons are per visitor: each variant against the first (the baseline), on the four
per-visitor metrics. A visitor's answers are not independent of each other; testing on
answers would overstate the evidence. Each comparison has an always-valid confidence
sequence and p-value (valid however often the page is looked at) and, beside them, the
fixed-sample z-test (valid for one look planned in advance); ``insights_stats.py`` has the
formulas and their sources. The verdict in words uses the always-valid p-values, with
Benjamini–Hochberg over all comparisons, and no verdict is given while the visitors per
variant do not match the configured split (the sample-ratio check).

Always-valid results assume the looks share their first day: a growing sample. Choose a
period that covers the experiment since it started (``days``), and keep it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from .insights_stats import (
    ALPHA,
    SRM_ALPHA,
    Sample,
    benjamini_hochberg,
    compare,
    mixture_rho,
    sample_ratio_p_value,
    wilson,
)
from .storage import Store
from .storage.schema import attributions, impressions

DAY = 86400
MIN_VISITORS = 100  # per variant, before a difference is called at all
EXPECTED_VISITORS = 5000  # EXPERIMENT_EXPECTED_VISITORS' default

# The per-visitor metrics compared: (key, words, yes/no).
METRICS = (
    ("visitorClickRate", "visitors who clicked", True),
    ("visitorAddRate", "visitors who added to the cart", True),
    ("visitorOrderRate", "visitors who ordered", True),
    ("revenuePerVisitor", "revenue per visitor", False),
)
SRM_CAUSES = (
    "bots or crawlers that reach one variant more than another, redirects or "
    "caching in front of one variant, or visitors whose ids were merged or "
    "changed (alias, logins) after they were assigned"
)


# --- the report ------------------------------------------------------------------------


@dataclass
class _Counts:
    impressions: int = 0
    visitors: int = 0
    clicks: int = 0
    clicked_impressions: int = 0
    clicking_visitors: int = 0
    adds: int = 0
    adding_visitors: int = 0
    orders: int = 0
    ordering_visitors: int = 0
    revenue: float = 0.0
    visitor_revenue: float = 0.0  # revenue of the answers shown in the period
    visitor_revenue_squares: float = 0.0  # the sum of each visitor's revenue squared

    def as_json(self) -> dict:
        return {
            "impressions": self.impressions,
            "visitors": self.visitors,
            "clicks": self.clicks,
            "addToCarts": self.adds,
            "orders": self.orders,
            "revenue": round(self.revenue, 2),
            "revenuePer1000": (
                round(1000 * self.revenue / self.impressions, 2) if self.impressions else None
            ),
            "ctr": wilson(self.clicked_impressions, self.impressions),
            "visitorClickRate": wilson(self.clicking_visitors, self.visitors),
            "visitorAddRate": wilson(self.adding_visitors, self.visitors),
            "visitorOrderRate": wilson(self.ordering_visitors, self.visitors),
            "revenuePerVisitor": (
                round(self.visitor_revenue / self.visitors, 4) if self.visitors else None
            ),
        }

    def sample(self, metric: str) -> Sample:
        """This variant's visitors for a comparison of ``metric``."""
        if metric == "revenuePerVisitor":
            return Sample(self.visitors, self.visitor_revenue, self.visitor_revenue_squares)
        yes = {
            "visitorClickRate": self.clicking_visitors,
            "visitorAddRate": self.adding_visitors,
            "visitorOrderRate": self.ordering_visitors,
        }[metric]
        return Sample(self.visitors, yes, yes)


def _day(epoch_day: int) -> str:
    return datetime.fromtimestamp(epoch_day * DAY, UTC).strftime("%Y-%m-%d")


def _epoch_day(column, dialect: str):
    """Whole UTC days since the epoch, in SQL. SQLite's CAST truncates (times are
    positive); PostgreSQL's rounds, so it floors first (SQLite may lack floor())."""
    days = column / sa.literal_column(str(DAY))
    return sa.cast(sa.func.floor(days) if dialect == "postgresql" else days, sa.Integer)


def report(
    store: Store,
    days: int = 7,
    *,
    variants: Sequence[str] = (),
    shares: Mapping[str, float] | None = None,
    expected_visitors: float = EXPECTED_VISITORS,
    now: float | None = None,
) -> dict:
    """The insights of the last ``days`` days (UTC, today included). ``variants``: the
    experiment's, in order (the first is the baseline); variants seen in the data but no
    longer configured follow. ``shares``: the configured split, for the sample-ratio
    check. ``expected_visitors``: the always-valid results' tuning parameter."""
    now = time.time() if now is None else now
    first_day = int(now // DAY) - (days - 1)
    since = first_day * DAY
    total, daily = _read(store, since)

    names = list(dict.fromkeys([*variants, *sorted(total)]))
    dates = list(range(first_day, first_day + days))
    body_variants = []
    for name in names:
        counts = total.get(name, _Counts())
        body_variants.append(
            {
                "variant": name,
                "configured": name in variants,
                **counts.as_json(),
                "days": [
                    {"date": _day(d), **daily.get((name, d), _Counts()).as_json()} for d in dates
                ],
            }
        )
    rho = mixture_rho(expected_visitors)
    comparisons = _compare(names, total, rho)
    split = _sample_ratio(variants, shares or {}, total)
    return {
        "days": days,
        "from": _day(first_day),
        "to": _day(first_day + days - 1),
        "generatedAt": datetime.fromtimestamp(now, UTC)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z"),
        "baseline": names[0] if names else None,
        "variants": body_variants,
        "comparisons": comparisons,
        "analysis": {
            "alpha": ALPHA,
            "expectedVisitors": expected_visitors,
            "comparisons": sum(c["sequential"] is not None for c in comparisons),
            "discoveries": sum(
                bool(c["sequential"] and c["sequential"]["discovery"]) for c in comparisons
            ),
        },
        "sampleRatio": split,
        "verdict": _verdict(names, total, comparisons, split),
    }


def report_settings(services) -> dict:
    """``report``'s keyword arguments from the running service: the experiment's
    variants and split, and the tuning parameter."""
    experiment = services.recommendations.experiment
    return {
        "variants": experiment.names,
        "shares": {v.name: v.share for v in experiment.variants},
        "expected_visitors": services.settings.experiment_expected_visitors,
    }


def visitors_per_variant(store: Store, since: float) -> dict[str, int]:
    """Distinct visitors per variant of the answers shown since ``since``."""
    with store.read() as conn:
        return {
            variant: count
            for variant, count in conn.execute(
                sa.select(
                    impressions.c.variant,
                    sa.func.count(sa.distinct(sa.func.nullif(impressions.c.visitor, ""))),
                )
                .where(impressions.c.shown_at >= since)
                .group_by(impressions.c.variant)
            )
        }


def sample_ratio(
    store: Store,
    days: int = 7,
    *,
    variants: Sequence[str] = (),
    shares: Mapping[str, float] | None = None,
    now: float | None = None,
) -> dict | None:
    """The sample-ratio check alone (for ``/metrics``), over the same days as
    ``report``'s; None without an experiment."""
    now = time.time() if now is None else now
    since = (int(now // DAY) - (days - 1)) * DAY
    if len([name for name in variants if (shares or {}).get(name, 0) > 0]) < 2:
        return None
    counts = visitors_per_variant(store, since)
    return _sample_ratio(
        variants, shares or {}, {name: _Counts(visitors=n) for name, n in counts.items()}
    )


def _read(store: Store, since: float) -> tuple[dict, dict]:
    """The counts per variant in total and per (variant, UTC day) since ``since``."""
    imp_day = _epoch_day(impressions.c.shown_at, store.dialect)
    att_day = _epoch_day(attributions.c.at, store.dialect)
    total: dict[str, _Counts] = {}
    daily: dict[tuple[str, int], _Counts] = {}

    def put(variant, day, field, value):
        target = (
            total.setdefault(variant, _Counts())
            if day is None
            else daily.setdefault((variant, day), _Counts())
        )
        setattr(target, field, getattr(target, field) + value)

    shown = impressions.c.shown_at >= since
    happened = attributions.c.at >= since
    joined = attributions.join(
        impressions,
        impressions.c.recommendation_id == attributions.c.recommendation_id,
        isouter=True,
    )
    with store.read() as conn:
        for by_day in (False, True):
            group = [impressions.c.variant] + ([imp_day] if by_day else [])
            for row in conn.execute(
                sa.select(
                    *group,
                    sa.func.count(),
                    sa.func.count(sa.distinct(sa.func.nullif(impressions.c.visitor, ""))),
                )
                .where(shown)
                .group_by(*group)
            ):
                day = row[1] if by_day else None
                put(row[0], day, "impressions", row[-2])
                put(row[0], day, "visitors", row[-1])
            # Attributions by the day of the event, with the visitor of their answer.
            group = [attributions.c.variant, attributions.c.kind] + ([att_day] if by_day else [])
            for row in conn.execute(
                sa.select(
                    *group,
                    sa.func.count(),
                    sa.func.count(sa.distinct(attributions.c.recommendation_id)),
                    sa.func.count(sa.distinct(attributions.c.message_id)),
                    sa.func.count(sa.distinct(sa.func.nullif(impressions.c.visitor, ""))),
                    sa.func.coalesce(sa.func.sum(attributions.c.revenue), 0.0),
                )
                .select_from(joined)
                .where(happened)
                .group_by(*group)
            ):
                variant, kind = row[0], row[1]
                day = row[2] if by_day else None
                events, answers, messages, visitors, revenue = row[-5:]
                if kind == "click":
                    put(variant, day, "clicks", events)
                    put(variant, day, "clicked_impressions", answers)
                    if day is not None:
                        put(variant, day, "clicking_visitors", visitors)
                elif kind == "add":
                    put(variant, day, "adds", events)
                    if day is not None:
                        put(variant, day, "adding_visitors", visitors)
                elif kind == "order":
                    put(variant, day, "orders", messages)
                    put(variant, day, "revenue", float(revenue or 0.0))
                    if day is not None:
                        put(variant, day, "ordering_visitors", visitors)
        # In total, per visitor: what each visitor of the period did with the answers
        # they were shown in it (the visitors of the comparisons, and no others).
        per_visitor = (
            sa.select(
                impressions.c.variant.label("variant"),
                sa.func.max(_is(attributions.c.kind == "click")).label("clicked"),
                sa.func.max(_is(attributions.c.kind == "add")).label("added"),
                sa.func.max(_is(attributions.c.kind == "order")).label("ordered"),
                sa.func.sum(
                    sa.case((attributions.c.kind == "order", attributions.c.revenue), else_=0.0)
                ).label("revenue"),
            )
            .select_from(
                attributions.join(
                    impressions, impressions.c.recommendation_id == attributions.c.recommendation_id
                )
            )
            .where(shown, impressions.c.visitor != "")
            .group_by(impressions.c.variant, impressions.c.visitor)
        ).subquery()
        for totals in conn.execute(
            sa.select(
                per_visitor.c.variant,
                sa.func.sum(per_visitor.c.clicked),
                sa.func.sum(per_visitor.c.added),
                sa.func.sum(per_visitor.c.ordered),
                sa.func.sum(per_visitor.c.revenue),
                sa.func.sum(per_visitor.c.revenue * per_visitor.c.revenue),
            ).group_by(per_visitor.c.variant)
        ):
            variant, clicked, added, ordered, revenue, squares = totals
            put(variant, None, "clicking_visitors", int(clicked or 0))
            put(variant, None, "adding_visitors", int(added or 0))
            put(variant, None, "ordering_visitors", int(ordered or 0))
            put(variant, None, "visitor_revenue", float(revenue or 0.0))
            put(variant, None, "visitor_revenue_squares", float(squares or 0.0))
    return total, daily


def _is(condition):
    return sa.case((condition, 1), else_=0)


def _compare(names: Sequence[str], total: dict[str, _Counts], rho: float) -> list[dict]:
    """Each variant against the baseline on each metric; Benjamini–Hochberg over the
    always-valid p-values of all of them marks the discoveries."""
    if len(names) < 2:
        return []
    base = total.get(names[0], _Counts())
    out = []
    for name in names[1:]:
        other = total.get(name, _Counts())
        for metric, _, binary in METRICS:
            result = compare(base.sample(metric), other.sample(metric), rho=rho, binary=binary)
            out.append(
                {"variant": name, "baseline": names[0], "metric": metric, **_rounded(result)}
            )
    tested = [c for c in out if c["sequential"] is not None]
    found = benjamini_hochberg([c["sequential"]["pValue"] for c in tested], ALPHA)
    for c, discovery in zip(tested, found):
        c["sequential"]["discovery"] = bool(discovery)
        c["fixed"]["significant"] = c["fixed"]["pValue"] < ALPHA
    return out


def _rounded(result: dict | None) -> dict:
    if result is None:
        return {
            "baselineValue": None,
            "value": None,
            "difference": None,
            "relativeDifference": None,
            "sequential": None,
            "fixed": None,
        }

    def r(x):
        return None if x is None else float(f"{x:.6g}")

    return {
        "baselineValue": r(result["baselineValue"]),
        "value": r(result["value"]),
        "difference": r(result["difference"]),
        "relativeDifference": r(result["relativeDifference"]),
        "sequential": {k: r(v) for k, v in result["sequential"].items()},
        "fixed": {k: r(v) for k, v in result["fixed"].items()},
    }


def _sample_ratio(
    variants: Sequence[str], shares: Mapping[str, float], total: dict[str, _Counts]
) -> dict | None:
    """The visitors per configured variant against the configured split."""
    configured = [name for name in variants if shares.get(name, 0) > 0]
    if len(configured) < 2:
        return None
    observed = [total.get(name, _Counts()).visitors for name in configured]
    weights = [shares[name] for name in configured]
    p = sample_ratio_p_value(observed, weights)
    mismatch = p is not None and p < SRM_ALPHA
    whole = sum(weights)
    out: dict[str, Any] = {
        "pValue": None if p is None else float(f"{p:.4g}"),
        "threshold": SRM_ALPHA,
        "mismatch": mismatch,
        "variants": [
            {
                "variant": name,
                "visitors": n,
                "expectedShare": round(w / whole, 6),
                "observedShare": round(n / sum(observed), 6) if sum(observed) else None,
            }
            for name, n, w in zip(configured, observed, weights)
        ],
        "warning": None,
    }
    if mismatch:
        seen = ", ".join(
            f"{v['variant']} {v['visitors']:,} ({100 * v['observedShare']:.1f} %"
            f" where {100 * v['expectedShare']:.0f} % is configured)"
            for v in out["variants"]
        )
        out["warning"] = (
            f"Sample-ratio mismatch: the visitors per variant do not match the configured "
            f"split ({seen}; chi-squared p = {p:.2g}, below {SRM_ALPHA}). The comparison "
            f"cannot be trusted until the cause is found. Usual causes: {SRM_CAUSES}."
        )
    return out


def _percent(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _metric_value(metric: str, x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}" if metric == "revenuePerVisitor" else _percent(x)


def _change(c: dict) -> str:
    if c["metric"] == "revenuePerVisitor":
        text = f"{c['difference']:+.2f} a visitor"
    else:
        text = f"{100 * c['difference']:+.1f} points"
    if c["relativeDifference"] is not None:
        text += f", {100 * c['relativeDifference']:+.0f} %"
    return text


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3g}"


def _verdict(
    names: Sequence[str], total: dict[str, _Counts], comparisons: list[dict], split: dict | None
) -> dict:
    """Which variant is ahead, in plain words, from the always-valid results after
    Benjamini–Hochberg; and whether the data are enough to tell."""
    if len(names) < 2:
        only = names[0] if names else None
        return {
            "leader": None,
            "enough": False,
            "text": (
                "No experiment: every visitor gets the same recommender. Set EXPERIMENT (e.g. "
                "local:50,popular:50) to compare two."
                if only
                else "No recommendations were shown in this period yet."
            ),
        }
    if split is not None and split["mismatch"]:
        return {
            "leader": None,
            "enough": False,
            "text": (
                "No verdict: the visitors per variant do not match the configured split "
                f"(sample-ratio mismatch, {_p(split['pValue'])}), so the comparison cannot be "
                "trusted. Look for bots, redirects, caching or identity merges that reach one "
                "variant more than another."
            ),
        }
    small = [n for n in names if total.get(n, _Counts()).visitors < MIN_VISITORS]
    if small:
        return {
            "leader": None,
            "enough": False,
            "text": (
                f"Not enough data yet to tell: {', '.join(small)} had fewer than {MIN_VISITORS} "
                "visitors in this period. Keep the experiment running."
            ),
        }
    tested = [c for c in comparisons if c["sequential"] is not None]
    found = [c for c in tested if c["sequential"]["discovery"]]
    words = {key: text for key, text, _ in METRICS}
    how = (
        f"{len(found)} of {len(tested)} comparisons "
        f"{'is a discovery' if len(found) == 1 else 'are discoveries'} at a "
        f"false-discovery rate of {100 * ALPHA:.0f} % (always-valid p-values, "
        "Benjamini–Hochberg): this holds however often the page is looked at."
    )
    if not found:
        smallest = min((c["sequential"]["pValue"] for c in tested), default=1.0)
        return {
            "leader": None,
            "enough": False,
            "text": (
                f"Too close to call: none of the {len(tested)} comparisons is a discovery yet "
                f"(smallest always-valid p = {smallest:.3g}; Benjamini–Hochberg at "
                f"{100 * ALPHA:.0f} %). The differences could be chance. Keep the experiment "
                "running: this result stays valid however often you look."
            ),
        }
    base = names[0]
    wins: dict[str, list] = {}
    losses: dict[str, list] = {}
    for c in found:
        (wins if c["difference"] > 0 else losses).setdefault(c["variant"], []).append(c)
    clean_winners = [n for n in wins if n not in losses]
    mixed = [n for n in wins if n in losses]

    def listed(cs: list[dict], leader_is_variant: bool) -> str:
        parts = []
        for c in cs:
            first, second = (
                (c["value"], c["baselineValue"])
                if leader_is_variant
                else (c["baselineValue"], c["value"])
            )
            parts.append(
                f"{words[c['metric']]} {_metric_value(c['metric'], first)} against "
                f"{_metric_value(c['metric'], second)} "
                f"({_change(c) if leader_is_variant else _change(_negated(c))}, "
                f"always-valid {_p(c['sequential']['pValue'])})"
            )
        return "; ".join(parts)

    if clean_winners:
        leader = max(
            clean_winners,
            key=lambda n: (len(wins[n]), total[n].clicking_visitors / max(1, total[n].visitors)),
        )
        text = f"{leader} is ahead of {base}: {listed(wins[leader], True)}. {how}"
        return {"leader": leader, "enough": True, "text": text}
    if losses and not mixed:
        behind = [c for n in losses for c in losses[n]]
        others = ", ".join(dict.fromkeys(c["variant"] for c in behind))
        text = f"{base} is ahead of {others}: {listed(behind, False)}. {how}"
        return {"leader": base, "enough": True, "text": text}
    text = (
        "Mixed results: "
        + "; ".join(
            f"{n} is ahead on {', '.join(words[c['metric']] for c in wins[n])} but behind on "
            f"{', '.join(words[c['metric']] for c in losses[n])}"
            for n in mixed
        )
        + f". {how}"
    )
    return {"leader": None, "enough": True, "text": text}


def _negated(c: dict) -> dict:
    """The comparison seen from the baseline's side (for "baseline is ahead")."""
    flipped = dict(c, difference=-c["difference"])
    flipped["relativeDifference"] = c["baselineValue"] / c["value"] - 1 if c["value"] else None
    return flipped


def table(body: dict) -> str:
    """The report as a plain-text table (``flask --app webhook insights``)."""
    head = (
        "variant",
        "impressions",
        "visitors",
        "clicks",
        "CTR (95 % CI)",
        "add-to-carts",
        "orders",
        "revenue",
        "per 1,000",
    )
    rows = [head]
    for v in body["variants"]:
        ctr = v["ctr"]
        ctr_text = (
            "–"
            if ctr["value"] is None
            else f"{100 * ctr['value']:.1f} % ({100 * ctr['low']:.1f}–{100 * ctr['high']:.1f})"
        )
        rows.append(
            (
                v["variant"],
                str(v["impressions"]),
                str(v["visitors"]),
                str(v["clicks"]),
                ctr_text,
                str(v["addToCarts"]),
                str(v["orders"]),
                f"{v['revenue']:.2f}",
                "–" if v["revenuePer1000"] is None else f"{v['revenuePer1000']:.2f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"Insights {body['from']} to {body['to']} (UTC), {body['days']} days"]
    for n, row in enumerate(rows):
        lines.append(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    words = {key: text for key, text, _ in METRICS}
    comparisons = [c for c in body["comparisons"] if c["sequential"] is not None]
    if comparisons:
        analysis = body["analysis"]
        lines.append("")
        lines.append(
            f"Compared with {body['baseline']}: {analysis['comparisons']} "
            f"comparisons, {analysis['discoveries']} discoveries (always-valid "
            f"p-values, Benjamini-Hochberg at {100 * analysis['alpha']:.0f} %; "
            f"EXPERIMENT_EXPECTED_VISITORS {analysis['expectedVisitors']:g})"
        )
    for c in comparisons:
        seq, fixed = c["sequential"], c["fixed"]
        lines.append(
            f"  {c['variant']}, {words.get(c['metric'], c['metric'])}: "
            f"{_metric_value(c['metric'], c['value'])} against "
            f"{_metric_value(c['metric'], c['baselineValue'])} ({_change(c)})"
        )
        lines.append(
            f"    always valid: {_interval(c['metric'], seq)}, {_p(seq['pValue'])}"
            f"{', a discovery' if seq['discovery'] else ''}"
        )
        lines.append(
            f"    fixed sample (valid for one planned look only): "
            f"{_interval(c['metric'], fixed)}, {_p(fixed['pValue'])}"
        )
    split = body.get("sampleRatio")
    if split and split["mismatch"]:
        lines.append("")
        lines.append("WARNING: " + split["warning"])
    lines.append("")
    lines.append(body["verdict"]["text"])
    return "\n".join(lines)


def _interval(metric: str, side: dict) -> str:
    if metric == "revenuePerVisitor":
        return f"{side['low']:+.2f} to {side['high']:+.2f} a visitor"
    return f"{100 * side['low']:+.1f} to {100 * side['high']:+.1f} points"
