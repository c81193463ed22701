"""End to end in headless Chromium: the page at GET /, served by the real service under
gunicorn, driven by Playwright's Python package against Debian's `chromium` (no browser
download: ``executable_path`` points at the system's Chromium).

Set SAVE_SCREENSHOT=1 to write docs/screenshot.png from the desktop test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import urllib.parse
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from tests.deliveries import Seeder, wait_applied
from tests.gunicorn_server import ROOT, gunicorn
from webhook.tokens import mint_token

SHARED_SECRET = "browser-test-shared-secret"
SECRET_KEY = "browser-test-secret-key-0123456789"
pytestmark = [pytest.mark.requires("chromium"), pytest.mark.browser, pytest.mark.slow]


# --- the catalog and the visitors the tests see --------------------------------------------


def _image(colour: str, label: str) -> str:
    svg = (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='400' height='300'>"
        f"<rect width='400' height='300' fill='{colour}'/>"
        f"<circle cx='200' cy='150' r='80' fill='white' fill-opacity='0.35'/>"
        f"<text x='200' y='165' font-family='sans-serif' font-size='44' fill='white' "
        f"text-anchor='middle'>{label}</text></svg>"
    )
    return "data:image/svg+xml," + urllib.parse.quote(svg)


PRODUCTS = [
    # (id, name, price, colour); popularity falls in this order
    ("sku-1", "Oak Desk Chair", 149.0, "#5c7cfa"),
    ("sku-2", "Linen Throw", 39.5, "#20c997"),
    ("sku-3", "Ceramic Mug", 12.0, "#f59f00"),
    ("sku-4", "Walnut Shelf", 89.0, "#845ef7"),
    ("sku-5", "Wool Rug", 220.0, "#e64980"),
    ("sku-6", "Brass Lamp", 64.0, "#15aabf"),
    ("sku-7", "Cotton Cushion", 24.9, "#fa5252"),
]


def seeder_for(base: str) -> Seeder:
    """The shop's messages, at a fixed time, each applied before the next is sent."""
    return Seeder(base, SHARED_SECRET, timestamp="2026-11-27T12:00:00.000Z", settle=True)


def view(seeder: Seeder, anonymous_id: str, product: tuple) -> None:
    item_id, name, price, colour = product
    seeder.view(
        anonymous_id,
        item_id,
        name=name,
        price=price,
        url=f"https://shop.example/p/{item_id}",
        image_url=_image(colour, name.split()[-1]),
    )


def catalog(seeder: Seeder) -> None:
    for rank, product in enumerate(PRODUCTS):
        for viewer in range(len(PRODUCTS) - rank):
            view(seeder, f"anon-{viewer}", product)
    # An item the catalog knows nothing about: only its id.
    seeder.view("anon-x", "sku-bare")


def hostile_item(seeder: Seeder) -> None:
    seeder.view(
        "anon-x",
        "sku-evil",
        name="<img src=x onerror=\"document.title='pwned'\">",
        url="javascript:document.title='pwned'",
        image_url="javascript:alert(1)",
    )


@contextlib.contextmanager
def _service(env: dict[str, str]):
    """The service under gunicorn (tests.gunicorn_server), patient at start-up: the
    workers import numpy and friends, which takes a while on a busy machine."""
    with gunicorn(env, timeout=90) as started:
        yield started


def _service_env(tmp: Path, name: str, **extra) -> dict[str, str]:
    metrics = tmp / f"metrics-{name}"
    metrics.mkdir()
    return {
        "DATABASE_URL": f"sqlite:///{tmp}/{name}.db",
        "SEGMENT_SHARED_SECRET": SHARED_SECRET,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics),
        "ENGINE_BACKGROUND_TRAINING": "false",
        "_LOG_DIR": str(tmp),
        **extra,
    }


# --- other origins: a shop page somewhere else that fetch()es the service ------------------


class _Origin:
    def __init__(self, folder: Path):
        handler = partial(_QuietHandler, directory=str(folder))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def origins(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shop")
    (folder / "shop.html").write_text(
        '<!doctype html><title>shop</title><link rel=icon href="data:,"><p>a shop page</p>'
    )
    allowed, refused = _Origin(folder), _Origin(folder)
    yield {"allowed": allowed.url, "refused": refused.url, "folder": folder}
    allowed.close()
    refused.close()


@pytest.fixture(scope="module")
def open_service(tmp_path_factory, origins):
    """No SECRET_KEY: anyone may ask. CORS allows one other origin."""
    tmp = tmp_path_factory.mktemp("open")
    with _service(_service_env(tmp, "open", CORS_ORIGINS=origins["allowed"])) as (base, _):
        seeder = seeder_for(base)
        catalog(seeder)
        seeder.identify("u-shopper", {"name": "Ada", "purchased_products": ["sku-2"]})
        seeder.order("u-shopper", ["sku-5"])
        yield base, seeder


@pytest.fixture(scope="module")
def locked_service(tmp_path_factory, origins):
    """SECRET_KEY set: /recommendations needs a token bound to the visitor."""
    tmp = tmp_path_factory.mktemp("locked")
    # ENGINE_EXCLUDE_SEEN=false: what a visitor bought is left to the trait checks.
    env = _service_env(
        tmp,
        "locked",
        CORS_ORIGINS=origins["allowed"],
        SECRET_KEY=SECRET_KEY,
        ENGINE_EXCLUDE_SEEN="false",
    )
    with _service(env) as (base, _):
        seeder = seeder_for(base)
        catalog(seeder)
        hostile_item(seeder)
        yield base, seeder


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.problems = []  # console errors (CSP violations land here) and page errors
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    yield page
    context.close()


def _open(page, url: str, state: str = "ready"):
    page.goto(url)
    page.wait_for_selector(f"body[data-state='{state}']", timeout=15000)
    return page


def _card_ids(page) -> list[str]:
    return page.eval_on_selector_all("#cards .card", "cards => cards.map(c => c.dataset.itemId)")


def _csp_problems(page) -> list[str]:
    return [p for p in page.problems if "Content Security Policy" in p or "Refused" in p]


# --- the page ---------------------------------------------------------------------------


def test_page_renders_recommendations_as_cards(open_service, page, tmp_path):
    base, _ = open_service
    with page.expect_response(lambda r: "/recommendations?" in r.url) as seen:
        _open(page, base + "/?userId=u-shopper")
    answer = seen.value.json()

    # The public status (/healthz), and what runs (from the page itself); nothing of the
    # operator's details (they need METRICS_TOKEN).
    page.wait_for_selector("#health .pill.ok")
    health = page.inner_text("#health")
    assert "mode: embedded" in health and "healthy" in health and "no tokens" in health
    assert "signatures" not in health and "store" not in health

    ids = _card_ids(page)
    assert ids and ids[0] == "sku-1"  # sku-5, bought, would be the most popular
    # sku-2 is in the purchased_products trait; sku-5 was bought (Order Completed: the
    # local engine leaves out what the visitor had, and the local profile store adds it to
    # purchased_products).
    assert "sku-2" not in ids and "sku-5" not in ids
    first = page.locator("#cards .card").first
    assert first.locator(".card-name").inner_text() == "Oak Desk Chair"
    assert first.locator(".card-price").inner_text() == "149.00"
    assert first.locator(".card-id").inner_text() == "sku-1"
    assert first.locator("img").get_attribute("src").startswith("data:image/svg+xml,")
    assert first.locator("img").evaluate("img => img.complete && img.naturalWidth > 0")
    # The link carries the answer's id, for the shop's product page to send back.
    assert (
        first.locator("a").get_attribute("href")
        == "https://shop.example/p/sku-1?recommendation_id=" + answer["recommendationId"]
    )
    # An item the catalog knows only by id: the id is its name, no price, no image.
    bare = page.locator("#cards .card[data-item-id='sku-bare']")
    assert bare.locator(".card-name").inner_text() == "sku-bare"
    assert bare.locator(".card-price").count() == 0 and bare.locator("img").count() == 0

    # recommendationId, as /recommendations said. No SECRET_KEY, so no token: nothing of
    # what the trait checks removed, or which traits they used (the visitor's own data).
    assert page.inner_text("#recommendation-id") == answer["recommendationId"]
    assert _card_ids(page) == [item["itemId"] for item in answer["itemList"]]
    assert "filtered" not in answer and "traitsUsed" not in answer
    assert page.inner_text("#filtered-summary") == "Shown only with a token for this userId."
    assert page.inner_text("#traits-summary") == "Shown only with a token for this userId."
    assert page.locator("#filtered li").count() == 0
    assert page.locator("#traits div").count() == 0
    assert _csp_problems(page) == [] and page.problems == []


@pytest.mark.parametrize("which", ["open", "locked"])
def test_bought_item_is_gone_after_a_reload(which, open_service, locked_service, page):
    base, seeder = open_service if which == "open" else locked_service
    token = mint_token(SECRET_KEY, user_id="u-buyer") if which == "locked" else ""
    _open(page, base + "/?userId=u-buyer#token=" + token)
    assert "token" not in page.url  # kept for the tab, out of the address
    shown = _card_ids(page)
    assert "sku-3" in shown
    assert page.inner_text("#filtered-summary") == (
        "Nothing was removed." if which == "locked" else "Shown only with a token for this userId."
    )

    seeder.order("u-buyer", ["sku-3"])
    # The appliers write the purchase behind the 200 (real time: within 1 s); reloaded
    # once the service reports it applied.
    wait_applied(base, 10)
    page.reload()
    page.wait_for_selector("body[data-state='ready']")
    after = _card_ids(page)
    assert "sku-3" not in after
    assert set(shown) - {"sku-3"} <= set(after)
    # Who removed it depends on the recommender: the local engine already leaves out
    # what the visitor had (ENGINE_EXCLUDE_SEEN); otherwise the trait checks do, and the
    # page says why (recent_purchase, or purchased_products where the profile store adds
    # purchases to that trait, as the local one does).
    reasons = page.eval_on_selector_all("#filtered li", "l => l.map(i => i.dataset.reason)")
    if which == "locked":  # the trait checks removed it, and the page says so
        assert reasons in (["recent_purchase"], ["purchased_products"])
        assert page.inner_text("#filtered-summary") == "1 item was left out:"
        # The visitor's own token (still the tab's after the reload): the value is shown.
        assert json.loads(page.inner_text("#traits dd")) == ["sku-3"]
    else:  # no token: nothing of it
        assert reasons == [] and "sku-3" not in page.inner_text("#traits")


def test_segment_cookie_is_the_visitor_without_a_user_id(open_service, browser):
    base, seeder = open_service
    seeder.send(
        {
            "type": "identify",
            "anonymousId": "anon-cookie",
            "traits": {"purchased_products": ["sku-1"]},
        }
    )
    for raw in ("%22anon-cookie%22", '"anon-cookie"', "anon-cookie"):
        context = browser.new_context()
        context.add_cookies([{"name": "ajs_anonymous_id", "value": raw, "url": base}])
        page = context.new_page()
        _open(page, base + "/")
        assert page.get_attribute("#who", "data-param") == "anonymousId"
        assert page.get_attribute("#who", "data-visitor") == "anon-cookie"
        assert "sku-1" not in _card_ids(page)  # its purchased_products trait applied
        context.close()

    # No cookie and no userId: the page asks for one instead of calling the service.
    context = browser.new_context()
    page = context.new_page()
    _open(page, base + "/", state="idle")
    assert "Enter a user id" in page.inner_text("#message")
    assert page.is_hidden("#answer")
    context.close()


def test_no_trait_values_in_the_dom_without_a_token(open_service, page):
    """Anyone can open /?userId=X when SECRET_KEY is unset: the page must not show what X
    bought, or any other trait value, anywhere in the DOM."""
    base, seeder = open_service
    seeder.identify(
        "u-private",
        {
            "purchased_products": ["secret-sku-4711", "sku-4"],
            "recommendations_opt_out": False,
            "email": "private.person@example.org",
        },
    )
    with page.expect_response(lambda r: "/recommendations?" in r.url) as seen:
        _open(page, base + "/?userId=u-private")
    answer = seen.value.json()
    for private in ("traitValues", "traitsUsed", "filtered"):
        assert private not in answer
    html = page.content()
    text = page.inner_text("body")
    for value in (
        "secret-sku-4711",
        "private.person@example.org",
        "purchased_products",
        "recommendations_opt_out",
    ):
        assert value not in html and value not in text
    assert "sku-4" not in _card_ids(page)  # the trait still applied
    assert page.problems == []


def test_catalog_text_is_never_markup(locked_service, page):
    base, _ = locked_service
    token = mint_token(SECRET_KEY, user_id="u-xss")
    _open(page, base + "/?userId=u-xss&numResults=20#token=" + token)
    evil = page.locator("#cards .card[data-item-id='sku-evil']")
    assert evil.locator(".card-name").inner_text().startswith("<img src=x")
    assert evil.locator("a").get_attribute("href") is None  # javascript: is not a link
    assert evil.locator("img").count() == 0
    evil.locator("a").click()
    assert page.title().startswith("Recommendations")
    assert page.evaluate("document.querySelectorAll('#cards img[src=x]').length") == 0


def test_phone_width_has_no_horizontal_scroll(open_service, browser, tmp_path):
    base, _ = open_service
    context = browser.new_context(
        viewport={"width": 390, "height": 844},
        is_mobile=True,
        has_touch=True,
        device_scale_factor=2,
    )
    page = context.new_page()
    _open(page, base + "/?userId=u-shopper#token=" + "x" * 120)
    widths = page.evaluate("""() => ({
        scroll: document.documentElement.scrollWidth,
        client: document.documentElement.clientWidth,
        widest: Math.max(...[...document.querySelectorAll('body *')]
                         .map(e => e.getBoundingClientRect().right))})""")
    assert widths["client"] == 390
    assert widths["scroll"] <= widths["client"], widths
    assert widths["widest"] <= widths["client"] + 0.5, widths
    boxes = page.eval_on_selector_all(
        "#cards .card", "cs => cs.slice(0, 2).map(c => c.getBoundingClientRect().toJSON())"
    )
    assert boxes[0]["y"] == boxes[1]["y"] and boxes[0]["width"] < 195  # two per row
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
    context.close()


def test_security_headers_on_page_and_static(open_service, page):
    base, _ = open_service
    for path in ("/", "/static/page.js", "/static/page.css"):
        headers = requests.get(base + path, timeout=10).headers
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
    html = requests.get(base + "/", timeout=10).text
    assert "<script src=" in html and "<script>" not in html and "style=" not in html
    # The JSON endpoints are left alone.
    assert "Content-Security-Policy" not in requests.get(base + "/healthz", timeout=10).headers

    # The browser enforces it: an injected inline script does not run.
    _open(page, base + "/?userId=u-shopper")
    page.evaluate("""() => { const s = document.createElement('script');
                            s.textContent = 'window.__inline = 1'; document.body.append(s); }""")
    assert page.evaluate("window.__inline") is None


# --- tokens -------------------------------------------------------------------------------


def test_missing_token_is_explained_on_the_page(locked_service, page):
    base, _ = locked_service
    _open(page, base + "/?userId=u-locked", state="error")
    message = page.locator("#message")
    assert message.get_attribute("data-code") == "token_required"
    assert "A token is required" in message.inner_text()
    assert "flask --app webhook token u-locked" in message.inner_text()
    assert page.is_hidden("#answer") and page.is_visible("#token")
    assert "tokens required" in page.inner_text("#health")

    # Someone else's token: 403, said so.
    other = mint_token(SECRET_KEY, user_id="u-other")
    _open(page, base + "/?userId=u-locked#token=" + other, state="error")
    assert page.get_attribute("#message", "data-code") == "token_forbidden"
    assert "another visitor" in page.inner_text("#message")

    _open(page, base + "/?userId=u-locked#token=not-a-token", state="error")
    assert page.get_attribute("#message", "data-code") == "token_invalid"

    # The right token, typed in the form: the recommendations, and the token in no
    # address the browser asked for.
    token = mint_token(SECRET_KEY, user_id="u-locked")
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_selector("body[data-state='ready']")
    assert _card_ids(page) and page.is_visible("#cards .card img")
    assert page.is_hidden("#message")
    assert asked and not any(token in url for url in asked), asked
    assert token not in page.url


def test_the_visitors_own_token_shows_what_the_checks_removed(locked_service, page, tmp_path):
    base, seeder = locked_service
    seeder.identify("u-owner", {"purchased_products": ["sku-2"]})
    wait_applied(base, 10)
    token = mint_token(SECRET_KEY, user_id="u-owner")
    with page.expect_response(lambda r: "/recommendations?" in r.url) as seen:
        _open(page, base + "/?userId=u-owner#token=" + token)
    answer = seen.value.json()
    assert "token" not in page.url
    filtered = answer["filtered"]
    assert filtered["reasons"].get("purchased_products") == 1  # sku-2
    assert page.inner_text("#filtered-summary") == "1 item was left out:"
    shown = page.eval_on_selector_all("#filtered li", "l => l.map(i => i.innerText)")
    assert shown == ['purchased_products × 1: listed in the visitor\'s "purchased_products" trait']
    assert page.inner_text("#traits-summary") == "From the visitor's profile:"
    assert page.inner_text("#traits dt") == "purchased_products"
    assert json.loads(page.inner_text("#traits dd")) == ["sku-2"]
    assert "sku-2" not in _card_ids(page)
    assert _csp_problems(page) == [] and page.problems == []
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("SAVE_SCREENSHOT"):
        shutil.copyfile(shot, ROOT / "docs" / "screenshot.png")


# --- CORS, as the browser applies it ------------------------------------------------------

FETCH = """async ([url, token]) => {
  try {
    const response = await fetch(url, token ? {headers: {Authorization: 'Bearer ' + token}}
                                            : {});
    const body = await response.json();
    return {status: response.status, first: (body.itemList || [])[0]?.itemId};
  } catch (error) {
    return {error: error.name + ': ' + error.message};
  }
}"""


@pytest.mark.parametrize("which", ["open", "locked"])
def test_cors_allows_only_the_configured_origin(which, open_service, locked_service, origins, page):
    base, _ = open_service if which == "open" else locked_service
    # With a token the request has an Authorization header: a preflight first.
    token = mint_token(SECRET_KEY, user_id="u-cors") if which == "locked" else None
    url = base + "/recommendations?userId=u-cors"

    page.goto(origins["allowed"] + "/shop.html")
    allowed = page.evaluate(FETCH, [url, token])
    assert allowed["status"] == 200 and allowed["first"].startswith("sku-"), allowed

    page.goto(origins["refused"] + "/shop.html")
    refused = page.evaluate(FETCH, [url, token])
    assert refused.get("error", "").startswith("TypeError"), refused
    assert any("CORS" in p for p in page.problems), page.problems


# --- the README's shop snippet, run as written -------------------


def _snippet_html() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index('<div id="recommended">')
    return text[start : text.index("</script>", start) + len("</script>")]


def test_readme_snippet_renders_and_tracks_the_click(locked_service, origins, page):
    base, _ = locked_service
    folder = origins["folder"]
    # The shop's backend (here: a file) hands out a token for its visitor.
    (folder / "recs-token").write_text(
        json.dumps({"userId": "u-snippet", "token": mint_token(SECRET_KEY, user_id="u-snippet")})
    )
    # analytics.js, as far as the snippet uses it: trackLink records the click.
    stub = """<script>window.analytics = {calls: [], trackLink(link, event, properties) {
      link.addEventListener('click', (e) => { e.preventDefault();
        this.calls.push([event, properties]); }); }};</script>"""
    snippet = _snippet_html()
    assert "https://recs.example.com" in snippet
    (folder / "snippet.html").write_text(
        '<!doctype html><title>shop</title><link rel=icon href="data:,">'
        + stub
        + snippet.replace("https://recs.example.com", base)
    )

    page.goto(origins["allowed"] + "/snippet.html")
    page.wait_for_selector("#recommended a")
    links = page.locator("#recommended a")
    assert links.count() == 8
    assert links.first.locator("img").count() == 1
    name = links.first.inner_text()
    links.first.click()
    calls = page.evaluate("analytics.calls")
    assert len(calls) == 1 and calls[0][0] == "Product Clicked"
    properties = calls[0][1]
    assert len(properties["impression"]) == 8
    assert properties["product_id"] == properties["impression"][0]
    assert name.startswith(properties["name"])
    assert len(properties["recommendation_id"]) >= 8
    assert page.problems == []
