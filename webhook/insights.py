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
  answers), ``visitorClickRate`` and ``visitorOrderRate`` (visitors who clicked, or
  ordered a recommended product, of all visitors).

Visitors, not answers, are what the experiment splits (``experiments.py``), so the test
between two variants compares visitor rates: a two-sided two-proportion z-test of each
variant against the first (the baseline), on the visitor click rate and the visitor order
rate. A visitor's answers are not independent of each other; testing on answers would
overstate the evidence.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence

import sqlalchemy as sa

from .store import Store, attributions, impressions

DAY = 86400
Z95 = 1.959963984540054
SIGNIFICANCE = 0.05
MIN_VISITORS = 100  # per variant, before a difference is called at all


# --- statistics ----------------------------------------------------------------------------

def wilson(successes: int, trials: int, z: float = Z95) -> dict:
    """The rate and its Wilson score interval (95 % by default)."""
    if trials <= 0:
        return {"value": None, "low": None, "high": None}
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return {"value": round(p, 6), "low": round(max(0.0, centre - half), 6),
            "high": round(min(1.0, centre + half), 6)}


def two_proportion_test(x1: int, n1: int, x2: int, n2: int) -> dict:
    """Two-sided z-test of p2 - p1 with the pooled standard error: difference, z, p."""
    if n1 <= 0 or n2 <= 0:
        return {"difference": None, "z": None, "pValue": None}
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return {"difference": round(p2 - p1, 6), "z": 0.0, "pValue": 1.0}
    z = (p2 - p1) / se
    return {"difference": round(p2 - p1, 6), "z": round(z, 4),
            "pValue": float(f"{math.erfc(abs(z) / math.sqrt(2)):.6g}")}


# --- the report ------------------------------------------------------------------------

@dataclass
class _Counts:
    impressions: int = 0
    visitors: int = 0
    clicks: int = 0
    clicked_impressions: int = 0
    clicking_visitors: int = 0
    adds: int = 0
    orders: int = 0
    ordering_visitors: int = 0
    revenue: float = 0.0

    def as_json(self) -> dict:
        return {
            "impressions": self.impressions,
            "visitors": self.visitors,
            "clicks": self.clicks,
            "addToCarts": self.adds,
            "orders": self.orders,
            "revenue": round(self.revenue, 2),
            "revenuePer1000": (round(1000 * self.revenue / self.impressions, 2)
                               if self.impressions else None),
            "ctr": wilson(self.clicked_impressions, self.impressions),
            "visitorClickRate": wilson(self.clicking_visitors, self.visitors),
            "visitorOrderRate": wilson(self.ordering_visitors, self.visitors),
        }


def _day(epoch_day: int) -> str:
    return datetime.fromtimestamp(epoch_day * DAY, timezone.utc).strftime("%Y-%m-%d")


def _epoch_day(column, dialect: str):
    """Whole UTC days since the epoch, in SQL. SQLite's CAST truncates (times are
    positive); PostgreSQL's rounds, so it floors first (SQLite may lack floor())."""
    days = column / sa.literal_column(str(DAY))
    return sa.cast(sa.func.floor(days) if dialect == "postgresql" else days, sa.Integer)


def report(store: Store, days: int = 7, *, variants: Sequence[str] = (),
           now: float | None = None) -> dict:
    """The insights of the last ``days`` days (UTC, today included). ``variants``: the
    experiment's, in order (the first is the baseline); variants seen in the data but no
    longer configured follow."""
    now = time.time() if now is None else now
    first_day = int(now // DAY) - (days - 1)
    since = first_day * DAY
    imp_day = _epoch_day(impressions.c.shown_at, store.dialect)
    att_day = _epoch_day(attributions.c.at, store.dialect)
    total: dict[str, _Counts] = {}
    daily: dict[tuple[str, int], _Counts] = {}

    def put(variant, day, field, value):
        target = total.setdefault(variant, _Counts()) if day is None else \
            daily.setdefault((variant, day), _Counts())
        setattr(target, field, getattr(target, field) + value)

    shown = impressions.c.shown_at >= since
    happened = attributions.c.at >= since
    with store.read() as conn:
        for by_day in (False, True):
            group = [impressions.c.variant] + ([imp_day] if by_day else [])
            for row in conn.execute(
                    sa.select(*group, sa.func.count(),
                              sa.func.count(sa.distinct(sa.func.nullif(impressions.c.visitor,
                                                                       ""))))
                    .where(shown).group_by(*group)):
                day = row[1] if by_day else None
                put(row[0], day, "impressions", row[-2])
                put(row[0], day, "visitors", row[-1])
            # Attributions, with the visitor of the answer they belong to.
            joined = attributions.join(
                impressions,
                impressions.c.recommendation_id == attributions.c.recommendation_id,
                isouter=True)
            group = [attributions.c.variant, attributions.c.kind] + (
                [att_day] if by_day else [])
            for row in conn.execute(
                    sa.select(*group, sa.func.count(),
                              sa.func.count(sa.distinct(attributions.c.recommendation_id)),
                              sa.func.count(sa.distinct(attributions.c.message_id)),
                              sa.func.count(sa.distinct(
                                  sa.func.nullif(impressions.c.visitor, ""))),
                              sa.func.coalesce(sa.func.sum(attributions.c.revenue), 0.0))
                    .select_from(joined).where(happened).group_by(*group)):
                variant, kind = row[0], row[1]
                day = row[2] if by_day else None
                events, answers, messages, visitors, revenue = row[-5:]
                if kind == "click":
                    put(variant, day, "clicks", events)
                    put(variant, day, "clicked_impressions", answers)
                    put(variant, day, "clicking_visitors", visitors)
                elif kind == "add":
                    put(variant, day, "adds", events)
                elif kind == "order":
                    put(variant, day, "orders", messages)
                    put(variant, day, "ordering_visitors", visitors)
                    put(variant, day, "revenue", float(revenue or 0.0))

    names = list(dict.fromkeys([*variants, *sorted(total)]))
    dates = list(range(first_day, first_day + days))
    body_variants = []
    for name in names:
        counts = total.get(name, _Counts())
        body_variants.append({
            "variant": name,
            "configured": name in variants,
            **counts.as_json(),
            "days": [{"date": _day(d), **daily.get((name, d), _Counts()).as_json()}
                     for d in dates],
        })
    comparisons = _compare(names, total)
    return {
        "days": days,
        "from": _day(first_day),
        "to": _day(first_day + days - 1),
        "generatedAt": datetime.fromtimestamp(now, timezone.utc).isoformat(
            timespec="seconds").replace("+00:00", "Z"),
        "baseline": names[0] if names else None,
        "variants": body_variants,
        "comparisons": comparisons,
        "verdict": _verdict(names, total, comparisons),
    }


def _compare(names: Sequence[str], total: dict[str, _Counts]) -> list[dict]:
    if len(names) < 2:
        return []
    base = total.get(names[0], _Counts())
    out = []
    for name in names[1:]:
        other = total.get(name, _Counts())
        for metric, field in (("visitorClickRate", "clicking_visitors"),
                              ("visitorOrderRate", "ordering_visitors")):
            test = two_proportion_test(getattr(base, field), base.visitors,
                                       getattr(other, field), other.visitors)
            out.append({"variant": name, "baseline": names[0], "metric": metric, **test,
                        "significant": test["pValue"] is not None
                        and test["pValue"] < SIGNIFICANCE})
    return out


def _percent(x: int, n: int) -> str:
    return f"{100 * x / n:.1f} %" if n else "–"


def _verdict(names: Sequence[str], total: dict[str, _Counts],
             comparisons: list[dict]) -> dict:
    """Which variant is ahead on the visitors' click rate, in plain words, and whether the
    data are enough to tell."""
    if len(names) < 2:
        only = names[0] if names else None
        return {"leader": None, "enough": False, "text": (
            "No experiment: every visitor gets the same recommender. Set EXPERIMENT (e.g. "
            "local:50,popular:50) to compare two." if only else
            "No recommendations were shown in this period yet.")}
    small = [n for n in names if total.get(n, _Counts()).visitors < MIN_VISITORS]
    clicks = {c["variant"]: c for c in comparisons if c["metric"] == "visitorClickRate"}

    def rate(name):
        c = total.get(name, _Counts())
        return c.clicking_visitors / c.visitors if c.visitors else 0.0

    def described(name):
        c = total.get(name, _Counts())
        return f"{name} ({_percent(c.clicking_visitors, c.visitors)} of {c.visitors} visitors)"

    if small:
        return {"leader": None, "enough": False, "text": (
            f"Not enough data yet to tell: {', '.join(small)} had fewer than {MIN_VISITORS} "
            "visitors in this period. Keep the experiment running.")}
    significant = [name for name, c in clicks.items() if c["significant"]]
    base = names[0]
    if not significant:
        worst = min(clicks.values(), key=lambda c: c["pValue"] if c["pValue"] is not None
                    else 1.0)
        return {"leader": None, "enough": False, "text": (
            f"Too close to call: {', '.join(described(n) for n in names)} clicked a "
            f"recommendation; the difference could be chance (p = {worst['pValue']:.3g}, "
            f"not below {SIGNIFICANCE}). Keep the experiment running.")}
    candidates = [base, *significant]
    leader = max(candidates, key=rate)
    if leader == base:
        runner_up = max(significant, key=rate)
        p = clicks[runner_up]["pValue"]
        text = (f"{base} is ahead: {described(base)} clicked a recommendation, against "
                f"{described(runner_up)}; the difference is significant (p = {p:.3g}).")
    else:
        p = clicks[leader]["pValue"]
        text = (f"{leader} is ahead: {described(leader)} clicked a recommendation, against "
                f"{described(base)}; the difference is significant (p = {p:.3g}).")
    return {"leader": leader, "enough": True, "text": text}


def table(body: dict) -> str:
    """The report as a plain-text table (``flask --app webhook insights``)."""
    head = ("variant", "impressions", "visitors", "clicks", "CTR (95 % CI)", "add-to-carts",
            "orders", "revenue", "per 1,000")
    rows = [head]
    for v in body["variants"]:
        ctr = v["ctr"]
        ctr_text = ("–" if ctr["value"] is None else
                    f"{100 * ctr['value']:.1f} % ({100 * ctr['low']:.1f}–"
                    f"{100 * ctr['high']:.1f})")
        rows.append((v["variant"], str(v["impressions"]), str(v["visitors"]),
                     str(v["clicks"]), ctr_text, str(v["addToCarts"]), str(v["orders"]),
                     f"{v['revenue']:.2f}",
                     "–" if v["revenuePer1000"] is None else f"{v['revenuePer1000']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"Insights {body['from']} to {body['to']} (UTC), {body['days']} days"]
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    for c in body["comparisons"]:
        if c["pValue"] is not None:
            lines.append(f"{c['variant']} vs {c['baseline']}, {c['metric']}: difference "
                         f"{100 * c['difference']:+.2f} points, p = {c['pValue']:.3g}")
    lines.append(body["verdict"]["text"])
    return "\n".join(lines)
