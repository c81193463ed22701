"""End to end in headless Chromium: the insights page (GET /insights as a browser asks for
it) and the recommendation cards' link back to their answer (GET /).

The real service under gunicorn, with an experiment (EXPERIMENT=local:50,popular:50),
seeded through the real endpoints: product events signed to POST /segment, visitors
asking GET /recommendations, some of them clicking (``Product Clicked`` naming the
answer's recommendationId), adding to the cart and ordering. The test waits, with a
deadline, until GET /insights counts what it sent; then the page must show the same
numbers, draw its three charts as inline SVG, and ask nothing of any other origin.
Playwright's Python package drives Debian's Chromium (tests/prerequisites.py).
"""

from __future__ import annotations

import contextlib
import re
import urllib.parse
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from tests.deliveries import Seeder, track, wait_applied
from tests.gunicorn_server import gunicorn
from tests.waiting import wait_until

SHARED_SECRET = "insights-browser-shared-secret"
INSIGHTS_TOKEN = "insights-browser-token-0123456789"
pytestmark = [pytest.mark.requires("chromium"), pytest.mark.browser, pytest.mark.slow]

PRODUCTS = [  # (id, name, price); popularity falls in this order
    ("sku-1", "Oak Desk Chair", 149.0),
    ("sku-2", "Linen Throw", 39.5),
    ("sku-3", "Ceramic Mug", 12.0),
    ("sku-4", "Walnut Shelf", 89.0),
    ("sku-5", "Wool Rug", 220.0),
    ("sku-6", "Brass Lamp", 64.0),
]
VISITORS = 40
DEADLINE_SECONDS = 30.0
COUNTED = ("impressions", "visitors", "clicks", "addToCarts", "orders", "revenue")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _item_url(item_id: str) -> str:
    return f"https://shop.example/p/{item_id}?colour=oak"


def catalog(seeder: Seeder) -> None:
    """Every product viewed, the first by the most visitors: one delivery."""
    seeder.send(
        *[
            track(
                product_id=item_id,
                anonymous_id=f"anon-{n}",
                properties={"name": name, "price": price, "url": _item_url(item_id)},
            )
            for rank, (item_id, name, price) in enumerate(PRODUCTS)
            for n in range(len(PRODUCTS) - rank)
        ]
    )


def _recommend(base: str, user_id: str) -> dict:
    response = requests.get(
        base + "/recommendations",
        timeout=10,
        params={"userId": user_id, "numResults": 4},
        headers={"Accept": "application/json"},
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["itemList"] and answer["variant"] in ("local", "popular"), answer
    return answer


def _report(base: str, days: int = 7, token: str | None = None) -> requests.Response:
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    return requests.get(f"{base}/insights?days={days}&format=json", headers=headers, timeout=10)


def _wait_for_counts(base: str, expected: dict[str, dict], token: str | None = None) -> dict:
    """Poll GET /insights until every variant's counts are the expected ones: attribution
    runs in the workers' background appliers, after the answers are recorded."""
    seen: dict = {}

    def reached() -> dict | None:
        response = _report(base, token=token)
        assert response.status_code == 200, response.text
        body = response.json()
        seen.update({v["variant"]: {k: v[k] for k in COUNTED} for v in body["variants"]})
        return body if all(seen.get(n) == c for n, c in expected.items()) else None

    return wait_until(
        reached,
        DEADLINE_SECONDS,
        "GET /insights showing the expected counts",
        interval=0.1,
        detail=lambda: f"  expected {expected}\n  seen     {seen}",
    )


def _seed_experiment(base: str, visitors: int) -> dict[str, dict]:
    """Visitors ask for recommendations; some click, add to the cart and order. Returns
    the counts GET /insights must show per variant."""
    # Timed now: attribution looks back from the event's own time.
    seeder = Seeder(base, SHARED_SECRET)
    catalog(seeder)
    # The catalog must be known before the first visitor asks, or the answer is empty.
    wait_applied(base, DEADLINE_SECONDS)
    expected: dict[str, dict] = defaultdict(lambda: dict.fromkeys(COUNTED, 0))
    events = []
    for n in range(visitors):
        user = f"visitor-{n:02d}"
        answer = _recommend(base, user)
        counts = expected[answer["variant"]]
        counts["impressions"] += 1
        counts["visitors"] += 1
        items = [i["itemId"] for i in answer["itemList"]]
        rid = answer["recommendationId"]
        if n % 3 == 0:  # a click on the first item, from the shop's product page
            events.append(
                {
                    "type": "track",
                    "event": "Product Clicked",
                    "userId": user,
                    "properties": {"product_id": items[0], "recommendation_id": rid},
                }
            )
            counts["clicks"] += 1
        if n % 5 == 0 and len(items) > 1:  # added to the cart: a product the answer showed
            events.append(
                {
                    "type": "track",
                    "event": "Product Added",
                    "userId": user,
                    "properties": {"product_id": items[1], "quantity": 1},
                }
            )
            counts["addToCarts"] += 1
        if n % 4 == 0:  # an order: one recommended product, one never shown (not counted)
            price = 10.0 + n
            events.append(
                {
                    "type": "track",
                    "event": "Order Completed",
                    "userId": user,
                    "properties": {
                        "order_id": f"order-{n}",
                        "products": [
                            {"product_id": items[0], "price": price, "quantity": 2},
                            {"product_id": "sku-never-shown", "price": 999.0},
                        ],
                    },
                }
            )
            counts["orders"] += 1
            counts["revenue"] = round(counts["revenue"] + 2 * price, 2)
    seeder.send(*events)
    return dict(expected)


def _env(tmp: Path, name: str, database_url: str | None = None, **extra) -> dict[str, str]:
    metrics = tmp / f"metrics-{name}"
    metrics.mkdir()
    return {
        "DATABASE_URL": database_url or f"sqlite:///{tmp}/{name}.db",
        "SEGMENT_SHARED_SECRET": SHARED_SECRET,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics),
        "ENGINE_BACKGROUND_TRAINING": "false",
        "EXPERIMENT": "local:50,popular:50",
        "_LOG_DIR": str(tmp),
        **extra,
    }


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def experiment_database(request, tmp_path_factory):
    """The service's database: a SQLite file, or a schema of its own on the PostgreSQL
    server the other tests use."""
    if request.param == "sqlite":
        yield None
        return
    import sqlalchemy as sa

    from tests.conftest import PG_URL

    schema = "t_" + uuid.uuid4().hex[:12]
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(scope="module")
def experiment_service(tmp_path_factory, experiment_database):
    """An open GET /insights (no INSIGHTS_TOKEN), seeded; yields (base, report) once the
    report counts everything that was sent. On SQLite and on PostgreSQL."""
    tmp = tmp_path_factory.mktemp("insights-open")
    with gunicorn(_env(tmp, "open", experiment_database), timeout=90) as (base, _):
        expected = _seed_experiment(base, VISITORS)
        # Forty visitors over two variants by a stable hash: both get some.
        assert set(expected) == {"local", "popular"}, expected
        assert all(c["clicks"] and c["orders"] for c in expected.values()), expected
        yield base, _wait_for_counts(base, expected), expected


@pytest.fixture(scope="module")
def locked_service(tmp_path_factory):
    """INSIGHTS_TOKEN set; a few answers and clicks recorded. /recommendations stays
    open (no SECRET_KEY): the recommendation page's tests use it too."""
    tmp = tmp_path_factory.mktemp("insights-locked")
    with gunicorn(_env(tmp, "locked", INSIGHTS_TOKEN=INSIGHTS_TOKEN), workers=1, timeout=90) as (
        base,
        _,
    ):
        expected = _seed_experiment(base, 8)
        yield base, _wait_for_counts(base, expected, token=INSIGHTS_TOKEN)


@contextlib.contextmanager
def _page(browser, init_script: str | None = None):
    """A fresh context and page (en-US, so numbers are formatted predictably) that records
    every request it makes, console errors (CSP violations land there) and page errors."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
    if init_script:
        context.add_init_script(init_script)
    page = context.new_page()
    page.problems = []
    page.requests = []
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    page.on("request", lambda r: page.requests.append(r.url))
    try:
        yield page
    finally:
        context.close()


def _wait_state(page, state: str) -> None:
    page.wait_for_selector(f"body[data-state='{state}']", timeout=15000)


def _numbers(text: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*(?:\.\d+)?", text)]


def _cell(page, variant: str, field: str):
    return page.locator(f"#figures td[data-variant='{variant}'][data-field='{field}']")


# --- the insights page --------------------------------------------------------------------


def test_insights_page_shows_the_report(experiment_service, browser):
    base, polled, expected = experiment_service
    with _page(browser) as page:
        with page.expect_response(lambda r: "format=json" in r.url) as seen:
            page.goto(base + "/insights?days=7")
        _wait_state(page, "ready")
        response = seen.value
        assert response.status == 200
        data = response.json()
        assert data["days"] == 7 and data["baseline"] == "local"
        names = [v["variant"] for v in data["variants"]]
        assert names == ["local", "popular"]
        # What the page drew is what was sent (and what the poll saw).
        for v in data["variants"]:
            assert {k: v[k] for k in COUNTED} == expected[v["variant"]]
        assert data["verdict"] == polled["verdict"]

        # The verdict, as the report says it (40 visitors: not enough to call).
        verdict = page.locator("#verdict")
        assert verdict.inner_text() == data["verdict"]["text"]
        assert verdict.get_attribute("data-enough") == (
            "true" if data["verdict"]["enough"] else "false"
        )
        assert verdict.get_attribute("data-leader") == (data["verdict"]["leader"] or "")
        assert data["verdict"]["enough"] is False and "Not enough data" in verdict.inner_text()
        assert page.input_value("#days") == "7"
        assert page.inner_text("#range") == f"{data['from']} to {data['to']} (UTC), 7 days"

        # The table: every figure, as a number and as people read it.
        for v in data["variants"]:
            name = v["variant"]
            for field in ("impressions", "visitors", "clicks", "addToCarts", "orders"):
                cell = _cell(page, name, field)
                assert int(cell.get_attribute("data-value")) == v[field], (name, field)
                assert cell.inner_text() == f"{v[field]:,}", (name, field)
            for field in ("revenue", "revenuePer1000"):
                cell = _cell(page, name, field)
                assert float(cell.get_attribute("data-value")) == v[field], (name, field)
                assert cell.inner_text() == f"{v[field]:,.2f}", (name, field)
            ctr = _cell(page, name, "ctr")
            assert float(ctr.get_attribute("data-value")) == v["ctr"]["value"]
            assert float(ctr.get_attribute("data-low")) == v["ctr"]["low"]
            assert float(ctr.get_attribute("data-high")) == v["ctr"]["high"]
            shown = _numbers(ctr.inner_text())  # "10.0 %", under it "(3.2–27.1)"
            wanted = [100 * v["ctr"][k] for k in ("value", "low", "high")]
            assert len(shown) == 3 and all(abs(a - b) <= 0.051 for a, b in zip(shown, wanted))
            assert "%" in ctr.inner_text()
        legend = page.eval_on_selector_all("#legend li", "l => l.map(i => i.dataset.variant)")
        assert legend == names

        # The comparisons: one row per (variant, measure), both results as reported.
        compared = [c for c in data["comparisons"] if c["sequential"]]
        rows = page.locator("#comparisons-body tr")
        assert rows.count() == len(compared) == data["analysis"]["comparisons"] == 4
        assert f"{len(compared)} comparisons" in page.inner_text("#comparisons-note")
        for c in compared:
            row = page.locator(
                f"#comparisons-body tr[data-variant='{c['variant']}'][data-metric='{c['metric']}']"
            )
            for field, value in (
                ("sequentialPValue", c["sequential"]["pValue"]),
                ("fixedPValue", c["fixed"]["pValue"]),
                ("difference", c["difference"]),
            ):
                assert (
                    float(row.locator(f"[data-field='{field}']").get_attribute("data-value"))
                    == value
                ), (c["metric"], field)
            for which in ("sequential", "fixed"):
                interval = row.locator(f"[data-field='{which}Interval']")
                assert float(interval.get_attribute("data-low")) == c[which]["low"]
                assert float(interval.get_attribute("data-high")) == c[which]["high"]
            assert row.locator("[data-field='discovery']").inner_text() == (
                "yes" if c["sequential"]["discovery"] else "no"
            )
            unit = "points" if c["metric"] != "revenuePerVisitor" else "."
            assert unit in row.locator("[data-field='difference']").inner_text()
        # Each drawn with its two intervals; the split is as configured: no warning.
        marks = page.eval_on_selector_all(
            "svg[data-chart='intervals'] .mark",
            "ms => ms.map(m => [m.dataset.variant, m.dataset.metric, "
            "m.querySelectorAll('line').length])",
        )
        assert sorted(marks) == sorted([c["variant"], c["metric"], 2] for c in compared)
        assert data["sampleRatio"]["mismatch"] is False
        assert page.is_hidden("#sample-ratio")

        # The charts: inline SVG, titled, one mark per variant (and day).
        for chart in ("impressions", "ctr", "revenue"):
            svg = page.locator(f"svg[data-chart='{chart}']")
            assert svg.count() == 1
            assert svg.evaluate("s => s.namespaceURI") == "http://www.w3.org/2000/svg"
            assert svg.locator("title").first.text_content()
            assert svg.get_attribute("aria-label")
            box = svg.bounding_box()
            assert box and box["width"] > 200 and box["height"] > 80
        daily = page.eval_on_selector_all(
            "svg[data-chart='impressions'] .mark",
            "ms => ms.map(m => [m.dataset.variant, m.dataset.date, Number(m.dataset.value)])",
        )
        assert len(daily) == 7 * len(names)
        for v in data["variants"]:
            marks = [(date, value) for name, date, value in daily if name == v["variant"]]
            assert marks == [(d["date"], d["impressions"]) for d in v["days"]]
            assert sum(value for _, value in marks) == v["impressions"]
        ctr_marks = page.eval_on_selector_all(
            "svg[data-chart='ctr'] .mark",
            "ms => ms.map(m => [m.dataset.variant, Number(m.dataset.value), "
            "Number(m.dataset.low), Number(m.dataset.high), m.querySelectorAll('line').length])",
        )
        assert ctr_marks == [
            [v["variant"], v["ctr"]["value"], v["ctr"]["low"], v["ctr"]["high"], 3]
            for v in data["variants"]
        ]
        revenue_marks = page.eval_on_selector_all(
            "svg[data-chart='revenue'] .mark",
            "ms => ms.map(m => [m.dataset.variant, Number(m.dataset.value), "
            "Number(m.getAttribute('height'))])",
        )
        assert [m[:2] for m in revenue_marks] == [
            [v["variant"], v["revenuePer1000"]] for v in data["variants"]
        ]
        assert all(m[2] > 0 for m in revenue_marks)  # every variant earned something

        # Another period: the address says so, and the page asks for it.
        with page.expect_response(lambda r: "days=30" in r.url and "format=json" in r.url):
            page.select_option("#days", "30")
        _wait_state(page, "ready")
        assert urllib.parse.parse_qs(urllib.parse.urlsplit(page.url).query)["days"] == ["30"]
        assert page.locator("svg[data-chart='impressions'] .mark").count() == 30 * len(names)
        assert page.inner_text("#range").endswith("30 days")

        # Nothing from anywhere else, nothing refused, no script error.
        assert page.requests and all(url.startswith(base + "/") for url in page.requests), (
            page.requests
        )
        assert page.problems == []


def test_insights_page_warns_when_the_split_is_off(experiment_service, browser, make_app):
    """The report of answers given under a 20/80 split and read under the configured
    50/50 (made by the real report, in-process, on a database of its own), served to the
    page in place of the service's: the page says the comparison cannot be trusted,
    names the usual causes and gives no verdict."""
    import json

    given = make_app(experiment=(("local", 20.0), ("popular", 80.0)), attribution_hold_seconds=0.0)
    client = given.test_client()
    client.post(
        "/segment",
        json={
            "batch": [
                {
                    "type": "track",
                    "event": "Product Viewed",
                    "anonymousId": f"seed-{n}",
                    "messageId": f"seed-{n}",
                    "timestamp": _now_iso(),
                    "properties": {"product_id": PRODUCTS[n % 3][0]},
                }
                for n in range(6)
            ]
        },
    )
    for n in range(300):
        assert client.get(f"/recommendations?anonymousId=skew-{n}").status_code == 200
    given.extensions["segment"].impressions.flush()
    reader = make_app(
        database_url=given.extensions["segment"].settings.database_url,
        experiment=(("local", 50.0), ("popular", 50.0)),
    )
    skewed = (
        reader.test_client()
        .get("/insights?days=7", headers={"Accept": "application/json"})
        .get_json()
    )
    assert skewed["sampleRatio"]["mismatch"]

    base, _, _ = experiment_service
    with _page(browser) as page:
        page.route(
            "**/insights?days=7&format=json",
            lambda route: route.fulfill(
                status=200, content_type="application/json", body=json.dumps(skewed)
            ),
        )
        page.goto(base + "/insights?days=7")
        _wait_state(page, "ready")
        box = page.locator("#sample-ratio")
        assert box.is_visible() and box.get_attribute("data-mismatch") == "true"
        text = box.inner_text()
        assert "cannot be trusted" in text and skewed["sampleRatio"]["warning"] in text
        for cause in ("bots", "redirects", "caching", "merged"):
            assert cause in text
        assert page.inner_text("#verdict") == skewed["verdict"]["text"]
        assert page.get_attribute("#verdict", "data-enough") == "false"
        assert page.problems == []


def test_insights_page_asks_for_the_token(locked_service, browser):
    base, polled = locked_service
    assert _report(base).status_code == 401
    with _page(browser) as page:
        page.goto(base + "/insights?days=7")
        _wait_state(page, "error")
        message = page.locator("#message")
        assert message.get_attribute("data-code") == "token_required"
        assert "needs the insights token" in message.inner_text()
        assert page.is_visible("#token-form") and page.is_hidden("#report")

        page.goto(base + "/insights?days=7#token=not-the-token-at-all")
        _wait_state(page, "error")
        assert page.get_attribute("#message", "data-code") == "token_invalid"

        page.goto(base + "/insights?days=7#token=" + INSIGHTS_TOKEN)
        _wait_state(page, "ready")
        assert "token" not in page.url  # kept for the tab, out of the address
        assert page.is_hidden("#message") and page.is_hidden("#token-form")
        assert page.inner_text("#verdict") == polled["verdict"]["text"]
        for v in polled["variants"]:
            assert (
                int(_cell(page, v["variant"], "impressions").get_attribute("data-value"))
                == v["impressions"]
            )
        assert page.locator("svg[data-chart='ctr'] .mark").count() == len(polled["variants"])
        assert not any(INSIGHTS_TOKEN in url for url in page.requests), page.requests

    with _page(browser) as page:
        # Typed into the form instead (a new tab: nothing kept): the same.
        page.goto(base + "/insights?days=14")
        _wait_state(page, "error")
        page.fill("#token", INSIGHTS_TOKEN)
        page.click("#token-form button[type=submit]")
        _wait_state(page, "ready")
        assert page.input_value("#days") == "14"
        assert page.locator("svg[data-chart='impressions'] .mark").count() == 14 * len(
            polled["variants"]
        )
        assert all(url.startswith(base + "/") for url in page.requests), page.requests
        assert not any(INSIGHTS_TOKEN in url for url in page.requests), page.requests
        assert [p for p in page.problems if "401" not in p] == []  # the 401s are logged


# --- the recommendation cards link back to their answer -----------------------------------

# analytics.js, as far as the page uses it; and no navigation to the shop.
ANALYTICS_STUB = """
window.analytics = {calls: [], track(event, properties) { this.calls.push([event, properties]); }};
window.addEventListener('click', (e) => { if (e.target.closest('a')) e.preventDefault(); }, true);
"""
NO_NAVIGATION = """
window.addEventListener('click', (e) => { if (e.target.closest('a')) e.preventDefault(); }, true);
"""


def test_card_links_carry_the_recommendation_id(locked_service, browser):
    base, _ = locked_service
    with _page(browser, ANALYTICS_STUB) as page:
        with page.expect_response(lambda r: "/recommendations?" in r.url) as seen:
            page.goto(base + "/?userId=u-cards&numResults=4")
        _wait_state(page, "ready")
        answer = seen.value.json()
        rid = answer["recommendationId"]
        assert rid and answer["itemList"]
        hrefs = page.eval_on_selector_all(
            "#cards .card",
            "cs => cs.map(c => [c.dataset.itemId, c.querySelector('a').getAttribute('href')])",
        )
        assert [item for item, _ in hrefs] == [i["itemId"] for i in answer["itemList"]]
        for item_id, href in hrefs:
            url = urllib.parse.urlsplit(href)
            assert f"{url.scheme}://{url.netloc}{url.path}" == f"https://shop.example/p/{item_id}"
            query = urllib.parse.parse_qs(url.query)
            assert query == {"colour": ["oak"], "recommendation_id": [rid]}, href

        page.locator("#cards .card a").nth(1).click()
        page.locator("#cards .card a").first.click()
        assert page.evaluate("analytics.calls") == [
            [
                "Product Clicked",
                {"product_id": hrefs[1][0], "position": 2, "recommendation_id": rid},
            ],
            [
                "Product Clicked",
                {"product_id": hrefs[0][0], "position": 1, "recommendation_id": rid},
            ],
        ]
        assert all(url.startswith(base + "/") for url in page.requests), page.requests
        assert page.problems == []

    # Without analytics.js the click is only a link.
    with _page(browser, NO_NAVIGATION) as page:
        page.goto(base + "/?userId=u-cards&numResults=4")
        _wait_state(page, "ready")
        assert "recommendation_id=" in page.get_attribute("#cards .card a", "href")
        page.locator("#cards .card a").first.click()
        assert page.evaluate("typeof window.analytics") == "undefined"
        assert page.problems == []
