"""Browser access to GET /recommendations: signed tokens and CORS.

Tokens are minted the way an operator mints them (``flask --app webhook token``, run as a
real subprocess) or, for expired and forged ones, with itsdangerous directly (the format
the service documents: a URL-safe timed serializer with its key and salt).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from tests.deliveries import deliver, product_viewed
from webhook.settings import ConfigError, Settings
from webhook.tokens import SALT

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cret-key-for-tests-0123456789"
ORIGIN = "https://shop.example"


@pytest.fixture
def secured(make_app):
    app = make_app(secret_key=SECRET)
    deliver(app.test_client(), product_viewed("sku-1"), product_viewed("sku-2"))
    return app


def cli_token(tmp_path, *args: str, secret: str | None = SECRET) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SECRET_KEY", "FLASK_APP") and not k.startswith("PROMETHEUS_")
    }
    env["DATABASE_URL"] = f"sqlite:///{tmp_path}/cli.db"
    if secret is not None:
        env["SECRET_KEY"] = secret
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "webhook", "token", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def minted(tmp_path, *args: str) -> str:
    result = cli_token(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token and "\n" not in token
    return token


def token_from(seconds_ago: int, subject: dict, secret: str = SECRET) -> str:
    class Signer(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - seconds_ago

    return URLSafeTimedSerializer(secret, salt=SALT, signer=Signer).dumps(subject)


def status(client, query: str, headers: dict | None = None) -> int:
    """The status of GET /recommendations?query; a ``token=`` written in ``query`` is sent
    as ``Authorization: Bearer``, as a page sends it (the address never carries it)."""
    params, token = [], None
    for part in query.split("&"):
        if part.startswith("token="):
            token = part[len("token=") :]
        else:
            params.append(part)
    headers = dict(headers or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return client.get("/recommendations?" + "&".join(params), headers=headers).status_code


# --- without SECRET_KEY ----------------------------------------------------------------------


def test_without_secret_key_the_endpoint_is_open_and_start_up_says_so(make_app, caplog):
    with caplog.at_level(logging.WARNING, logger="webhook"):
        app = make_app()
    assert any(
        "SECRET_KEY" in r.getMessage() and r.levelno >= logging.WARNING for r in caplog.records
    )
    assert status(app.test_client(), "userId=u-1") == 200


def test_with_secret_key_start_up_does_not_warn_about_an_open_endpoint(make_app, caplog):
    with caplog.at_level(logging.WARNING, logger="webhook"):
        make_app(secret_key=SECRET)
    assert not any("/recommendations" in r.getMessage() for r in caplog.records)


def test_short_secret_keys_are_refused():
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        Settings.from_env({"SECRET_KEY": "short"})


# --- tokens -------------------------------------------------------------------------------


def test_cli_token_opens_the_endpoint_for_that_user(secured, tmp_path):
    client = secured.test_client()
    token = minted(tmp_path, "u-1")
    response = client.get(
        "/recommendations?userId=u-1", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200
    assert [i["itemId"] for i in response.get_json()["itemList"]]
    assert status(client, f"userId=u-1&token={token}") == 200
    # Related items only: any valid visitor token will do.
    assert status(client, f"itemId=sku-1&token={token}") == 200


def test_cli_anonymous_token_is_for_that_anonymous_id(secured, tmp_path):
    client = secured.test_client()
    token = minted(tmp_path, "anon-1", "--anonymous")
    assert status(client, f"anonymousId=anon-1&token={token}") == 200
    assert status(client, f"userId=anon-1&token={token}") == 403
    assert status(client, f"anonymousId=anon-2&token={token}") == 403


def test_cli_without_secret_key_refuses(tmp_path):
    result = cli_token(tmp_path, "u-1", secret=None)
    assert result.returncode != 0
    assert "SECRET_KEY" in result.stderr


@pytest.mark.parametrize("query", ["userId=u-1", "anonymousId=a-1", "itemId=sku-1"])
def test_a_missing_token_is_401(secured, query):
    response = secured.test_client().get("/recommendations?" + query)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.get_json()["error"]["code"]


@pytest.mark.parametrize("authorization", ["Bearer", "Bearer ", "Basic dTox", "token"])
def test_a_malformed_authorization_header_is_401(secured, authorization):
    assert status(secured.test_client(), "userId=u-1", {"Authorization": authorization}) == 401


def test_a_tampered_token_is_401(secured, tmp_path):
    client = secured.test_client()
    token = minted(tmp_path, "u-1")
    payload, _, signature = token.rpartition(".")
    # The first character (the last one of unpadded base64 may carry only padding bits).
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    assert status(client, f"userId=u-1&token={payload}.{flipped}") == 401
    # Someone else's subject under the original signature.
    other = token_from(0, {"u": "u-2"})
    forged = other.rsplit(".", 2)[0] + "." + ".".join(token.rsplit(".", 2)[1:])
    assert status(client, f"userId=u-2&token={forged}") == 401
    assert status(client, "userId=u-1&token=not-a-token") == 401


def test_a_token_signed_with_another_key_is_401(secured):
    token = token_from(0, {"u": "u-1"}, secret="another-secret-key-0123456789")
    assert status(secured.test_client(), f"userId=u-1&token={token}") == 401


def test_an_expired_token_is_401(make_app):
    app = make_app(secret_key=SECRET, token_max_age_seconds=600)
    client = app.test_client()
    assert status(client, f"userId=u-1&token={token_from(60, {'u': 'u-1'})}") == 200
    response = client.get(
        "/recommendations?userId=u-1",
        headers={"Authorization": f"Bearer {token_from(700, {'u': 'u-1'})}"},
    )
    assert response.status_code == 401
    assert "expired" in response.get_json()["error"]["message"]


def test_the_default_token_lifetime_is_an_hour(secured):
    client = secured.test_client()
    assert status(client, f"userId=u-1&token={token_from(3000, {'u': 'u-1'})}") == 200
    assert status(client, f"userId=u-1&token={token_from(3700, {'u': 'u-1'})}") == 401


def test_another_users_token_is_403(secured, tmp_path):
    client = secured.test_client()
    token = minted(tmp_path, "u-1")
    response = client.get(
        "/recommendations?userId=u-2", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 403
    assert status(client, f"anonymousId=u-1&token={token}") == 403


def test_the_token_is_checked_before_anything_is_computed(secured, tmp_path):
    """A refused request must not leak the answer, nor the traits used."""
    response = secured.test_client().get(
        "/recommendations?userId=u-2",
        headers={"Authorization": "Bearer " + minted(tmp_path, "u-1")},
    )
    assert response.status_code == 403
    assert "itemList" not in response.get_json()
    assert "traitsUsed" not in response.get_json()


def test_a_token_in_the_address_is_not_accepted(secured, tmp_path):
    """Addresses end up in logs, proxies and browser history: tokens come from the
    Authorization header only."""
    token = minted(tmp_path, "u-1")
    response = secured.test_client().get(f"/recommendations?userId=u-1&token={token}")
    assert response.status_code == 401
    assert status(secured.test_client(), f"userId=u-1&token={token}") == 200


def test_the_token_does_not_appear_in_the_log(secured, tmp_path, caplog):
    token = minted(tmp_path, "u-1")
    with caplog.at_level(logging.DEBUG):
        assert status(secured.test_client(), f"userId=u-1&token={token}") == 200
    assert token not in caplog.text


# --- CORS ---------------------------------------------------------------------------------


@pytest.fixture
def cors_app(make_app):
    return make_app(cors_origins=(ORIGIN, "https://www.shop.example"), secret_key=SECRET)


def test_allowed_origin_can_read_the_answer(cors_app):
    token = token_from(0, {"u": "u-1"})
    response = cors_app.test_client().get(
        "/recommendations?userId=u-1",
        headers={"Origin": ORIGIN, "Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Origin" in response.headers.get("Vary", "")


def test_preflight_allows_the_authorization_header_without_a_token(cors_app):
    response = cors_app.test_client().options(
        "/recommendations?userId=u-1",
        headers={
            "Origin": "https://www.shop.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert response.status_code == 200  # flask-cors answers the preflight
    assert response.headers["Access-Control-Allow-Origin"] == "https://www.shop.example"
    assert "authorization" in response.headers["Access-Control-Allow-Headers"].lower()
    assert "GET" in response.headers["Access-Control-Allow-Methods"]


def test_refusals_are_readable_by_an_allowed_origin(cors_app):
    """A page must be able to tell a 401 from a network failure."""
    response = cors_app.test_client().get("/recommendations?userId=u-1", headers={"Origin": ORIGIN})
    assert response.status_code == 401
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_other_origins_get_no_cors_headers(cors_app):
    client = cors_app.test_client()
    token = token_from(0, {"u": "u-1"})
    response = client.get(
        f"/recommendations?userId=u-1&token={token}", headers={"Origin": "https://evil.example"}
    )
    assert "Access-Control-Allow-Origin" not in response.headers
    preflight = client.options(
        "/recommendations",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert "Access-Control-Allow-Origin" not in preflight.headers


def test_cors_only_covers_recommendations(cors_app):
    response = cors_app.test_client().post(
        "/segment", data="[]", headers={"Origin": ORIGIN, "Content-Type": "application/json"}
    )
    assert "Access-Control-Allow-Origin" not in response.headers


def test_without_cors_origins_no_cors_headers(make_app):
    response = (
        make_app().test_client().get("/recommendations?userId=u-1", headers={"Origin": ORIGIN})
    )
    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response.headers


def test_cors_origins_setting_is_validated():
    settings = Settings.from_env({"CORS_ORIGINS": "https://a.example, http://b.example:8080"})
    assert settings.cors_origins == ("https://a.example", "http://b.example:8080")
    with pytest.raises(ConfigError, match="CORS_ORIGINS"):
        Settings.from_env({"CORS_ORIGINS": "https://a.example/path"})
