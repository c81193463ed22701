"""Shared fixtures: an application factory over a fresh database per test.

SQLite lives in the test's temporary folder; PostgreSQL is the server on this machine
(TEST_DATABASE_URL, default the local `test` database), one fresh schema per test.
Also here: the genuine ``corpus``, ``aws_stand_ins`` (boto3 pointed at local stand-ins)
and ``metric`` (a sample from GET /metrics). Elsewhere, once each: the gunicorn launcher
and ``free_port`` (tests/gunicorn_server.py); building messages, signing them (the Python
signer), Segment-style deliveries, their ledger and the Seeder of a running service
(tests/deliveries.py); waiting with a deadline and the process checks (tests/waiting.py);
the wire-level corpus and Node.js's independent signing (tests/segment_wire.py); a copy
of the project and its commands as a user runs them (tests/project.py); the stand-in
servers (tests/fake_*.py) and the machine's prerequisites (tests/prerequisites.py).
"""

from __future__ import annotations

import os
import uuid

import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from tests import prerequisites
from tests.operator import OPERATOR, OPERATOR_TOKEN
from tests.segment_wire import STORY, capture_corpus
from tests.waiting import wait_until
from webhook import create_app

PG_URL = os.environ.get("TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


_live_apps: list = []  # the apps make_app made for the running test

# The suite's messages carry fixed times (a scripted story, corpora captured once), which
# fall behind the defaults' bounds as the calendar moves on: live messages older than
# MESSAGE_RETENTION_HOURS are skipped as too old, interactions older than
# INTERACTION_RETENTION_DAYS as older than retention. make_app and the test servers turn
# both bounds off unless a test sets them; the bounds themselves, with their defaults, are
# tested on messages of today (tests/test_trust_boundary.py), and so is the path a
# newcomer takes (tests/test_default_path.py).
TIMELESS = {"max_message_age_hours": 0.0, "interaction_retention_days": 0.0}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """``@pytest.mark.requires("node", ...)``: skipped when one is missing, failed under
    CI (tests/prerequisites.py)."""
    for mark in item.iter_markers(name="requires"):
        for name in mark.args:
            prerequisites.require(name)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI a skip is a failure: a run that passes must have run everything (a missing
    prerequisite, a platform condition, a control that could not be shown)."""
    outcome = yield
    report = outcome.get_result()
    if prerequisites.under_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, which must run everything: {reason}"


def _quiesce(apps) -> None:
    """No applier or write-back left running into the next test; connections closed."""
    for app in apps:
        parts = app.extensions["segment"]
        parts.stop()
        parts.activation.wait_idle(10)
        parts.store.dispose()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path}/segment.db"


@pytest.fixture
def postgresql_url():
    """A PostgreSQL URL whose search_path is a schema made for this test alone."""
    schema = "t_" + uuid.uuid4().hex[:12]
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    # This runs before make_app's teardown: let the test's apps finish their background
    # work (a write-back after a purchase reads the schema) before it goes.
    _quiesce(_live_apps)
    for attempt in range(3):
        try:
            with admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
            break
        except sa.exc.OperationalError:  # a deadlock with a straggler: it was rolled back
            if attempt == 2:
                raise
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request):
    """Runs a test once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue(f"{request.param}_url")


class AppliedClient(FlaskClient):
    """Flask's test client for an app whose inbox is applied after every request.

    Under a server, each worker's background appliers apply an accepted delivery within
    milliseconds (tests/test_inbox.py measures it under gunicorn); here no server threads
    run, so the client applies the inbox itself, in the test's thread, before returning
    the answer. Tests that look at the inbox before it is applied use ``raw_client``."""

    def open(self, *args, **kwargs):
        response = super().open(*args, **kwargs)
        applied(self.application)
        return response


@pytest.fixture
def make_app(sqlite_url):
    """make_app(**settings) -> a Flask app; settings by field name (see webhook.settings).
    Its ``test_client()`` applies the inbox after each request (``AppliedClient``)."""
    apps = []

    def factory(**settings):
        settings.setdefault("database_url", sqlite_url)
        settings.setdefault("metrics_token", OPERATOR_TOKEN)
        settings.update({name: value for name, value in TIMELESS.items() if name not in settings})
        app = create_app(settings)
        app.config["TESTING"] = True
        app.test_client_class = AppliedClient
        apps.append(app)
        _live_apps.append(app)
        return app

    yield factory
    _quiesce(apps)
    _live_apps.clear()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


def store_of(app):
    return app.extensions["segment"].store


def applied(app, timeout: float = 30.0) -> None:
    """Apply everything the app's inbox holds now, in this thread: what the background
    appliers of a server worker do after each delivery (tests run no server threads).
    A product error (StoreUnavailable included) is the test's: a test that takes the
    store down uses ``raw_client``, which applies nothing.

    On PostgreSQL an applier reads only rows written before every transaction still
    running on the server began (the shared server: other tests' and other processes'
    too), so one drain can stop short of rows already committed: drained again until no
    applier has a row pending."""
    services = app.extensions["segment"]

    def drained() -> bool:
        assert services.drain(timeout=timeout), "the inbox was not applied"
        return not any(each.pending for each in services.inbox.lag(services.runners).values())

    wait_until(
        drained,
        timeout,
        "the inbox applied",
        interval=0.01,
        detail=lambda: services.inbox.lag(services.runners),
    )


def raw_client(app) -> FlaskClient:
    """A test client that leaves the inbox as it is (nothing applied)."""
    return FlaskClient(app, app.response_class, use_cookies=True)


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's, driven by Playwright's Python package; no browser
    download), one per test module; the tests that use it are marked
    ``requires("chromium")``."""
    from playwright.sync_api import sync_playwright  # a dev requirement, checked first

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=prerequisites.chromium_path(), args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def corpus():
    """The genuine corpus: the scripted story as segment-analytics-python serialized it
    (tests/segment_wire.py), in send order; captured once per test module."""
    messages = capture_corpus()
    assert [(m["type"], m.get("event") or m.get("name")) for m in messages] == STORY
    return messages


def aws_stand_ins(monkeypatch, **endpoints: str) -> None:
    """boto3, as the code under test makes its clients (on first use), pointed at local
    stand-ins with dummy credentials, and nothing of the developer's AWS setup or proxies
    in the way. ``personalize_events=url`` sets AWS_ENDPOINT_URL_PERSONALIZE_EVENTS;
    likewise ``personalize_runtime``, ``personalize``, ``s3``."""
    for service, url in endpoints.items():
        monkeypatch.setenv(f"AWS_ENDPOINT_URL_{service.upper()}", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name`` with exactly ``labels`` in Prometheus text (0 when
    the series does not exist yet)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return 0.0


def metric(app_or_client, name: str, **labels: str) -> float:
    """``sample`` read from the app's GET /metrics."""
    client = (
        app_or_client if isinstance(app_or_client, FlaskClient) else app_or_client.test_client()
    )
    return sample(client.get("/metrics", headers=OPERATOR).get_data(as_text=True), name, **labels)


def health(app_or_client) -> dict:
    """GET /healthz with the operator's token: the details."""
    client = (
        app_or_client if isinstance(app_or_client, FlaskClient) else app_or_client.test_client()
    )
    response = client.get("/healthz", headers=OPERATOR)
    assert response.status_code in (200, 503), response.get_data(as_text=True)
    return response.get_json()
