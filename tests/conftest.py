"""Shared fixtures: an application factory over a fresh database per test.

SQLite lives in the test's temporary folder; PostgreSQL is the server on this machine
(TEST_DATABASE_URL, default the local `test` database), one fresh schema per test.
"""
from __future__ import annotations

import os
import uuid

import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient

from tests import prerequisites
from webhook import create_app
from webhook.store import StoreUnavailable

PG_URL = os.environ.get(
    "TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


_live_apps: list = []  # the apps make_app made for the running test


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """``@pytest.mark.requires("node", ...)``: skipped when one is missing, failed under
    CI (tests/prerequisites.py)."""
    for mark in item.iter_markers(name="requires"):
        for name in mark.args:
            prerequisites.require(name)


def _quiesce(apps) -> None:
    """No applier or write-back left running into the next test; connections closed."""
    for app in apps:
        services = app.extensions["segment"]
        services.stop_background()
        services.activation.wait_idle(10)
        services.store.dispose()


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
    """make_app(**settings) -> a Flask app; settings by field name (see webhook.config).
    Its ``test_client()`` applies the inbox after each request (``AppliedClient``)."""
    apps = []

    def factory(**settings):
        settings.setdefault("database_url", sqlite_url)
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
    With the store down there is nothing to apply it to: it stays in the inbox."""
    services = app.extensions["segment"]
    try:
        assert services.drain(timeout=timeout), "the inbox was not applied"
    except StoreUnavailable:
        pass


def raw_client(app) -> FlaskClient:
    """A test client that leaves the inbox as it is (nothing applied)."""
    return FlaskClient(app, app.response_class, use_cookies=True)
