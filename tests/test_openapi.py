"""openapi.yaml describes every endpoint, is served at /openapi.yaml, and the running
service (real gunicorn) conforms to it, checked by Schemathesis: no 5xx, and every answer
(status, content type, headers, body) matches the document.

Schemathesis runs as its CLI in a subprocess against the served document, with a bounded
number of examples per operation (SCHEMATHESIS_EXAMPLES, default 60) and a fixed seed
(SCHEMATHESIS_SEED; set it to "random" to explore), so CI stays well under 2 minutes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from tests.gunicorn_server import ROOT, gunicorn

DOCUMENT = ROOT / "openapi.yaml"
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
EXAMPLES = os.environ.get("SCHEMATHESIS_EXAMPLES", "60")
SEED = os.environ.get("SCHEMATHESIS_SEED", "20261127")
# What "matches the schema" means here, check by check.
CONFORMANCE_CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "unsupported_method",
        "missing_required_header",
    )
)
METHODS = ("get", "post", "put", "patch", "delete")
WRITE_KEY = "openapi-write-key"  # the Tracking API (/v1) is on, with this key


def _document() -> dict:
    return yaml.safe_load(DOCUMENT.read_text())


def _flask_path(rule: str) -> str:
    """/static/<path:filename> -> /static/{filename}"""
    return re.sub(r"<(?:[a-z]+:)?([A-Za-z_][A-Za-z0-9_]*)>", r"{\1}", rule)


def test_document_is_openapi_3_and_loads_in_schemathesis():
    import schemathesis

    document = _document()
    assert document["openapi"].startswith("3.")
    schema = schemathesis.openapi.from_path(str(DOCUMENT))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /segment",
        "GET /recommendations",
        "GET /healthz",
        "GET /metrics",
        "GET /openapi.yaml",
    }


def test_every_route_of_the_app_is_described_and_nothing_else(app):
    """Whoever adds an endpoint must describe it; whoever removes one must drop it."""
    described = {
        (path, method.upper())
        for path, item in _document()["paths"].items()
        for method in item
        if method in METHODS
    }
    routed = {
        (_flask_path(rule.rule), method)
        for rule in app.url_map.iter_rules()
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert routed - described == set(), "routes missing from openapi.yaml"
    assert described - routed == set(), "openapi.yaml describes routes the app lacks"


def test_every_error_answer_is_described_as_json(app):
    """Each documented non-2xx answer of a JSON endpoint has the Error schema."""
    document = _document()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in METHODS:
                continue
            for status, answer in operation["responses"].items():
                if "$ref" in answer:
                    answer = document["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]]
                if int(status) >= 400 and path != "/healthz":
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema["$ref"] in (
                        "#/components/schemas/Error",
                        "#/components/schemas/TrackingApiError",
                    ), (path, status)


def test_served_document_is_the_file(client):
    response = client.get("/openapi.yaml")
    assert response.status_code == 200
    assert response.mimetype == "application/yaml"
    assert response.data == DOCUMENT.read_bytes()


@pytest.fixture(scope="module")
def service(tmp_path_factory, corpus):
    """The service under gunicorn (2 workers, SQLite), seeded with the genuine corpus so
    recommendations have popular items to answer with."""
    tmp = tmp_path_factory.mktemp("openapi")
    env = {
        "DATABASE_URL": f"sqlite:///{tmp}/openapi.db",
        "_LOG_DIR": str(tmp),
        "ENGINE_BACKGROUND_TRAINING": "false",
        "INGEST_WRITE_KEYS": WRITE_KEY,
    }
    with gunicorn(env, workers=2) as (base, process):
        seeded = requests.post(base + "/segment", json=corpus, timeout=10)
        assert seeded.status_code == 200, seeded.text
        yield base, process, tmp


def _schemathesis(base: str, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        str(SCHEMATHESIS),
        "run",
        base + "/openapi.yaml",
        "--max-examples",
        EXAMPLES,
        "--request-timeout",
        "10",
        "--max-failures",
        "20",
        "--no-shrink",
        *args,
    ]
    if SEED != "random":
        command += ["--seed", SEED]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"))
    }
    env["NO_COLOR"] = "1"
    return subprocess.run(
        command, cwd=workdir, capture_output=True, text=True, timeout=150, env=env
    )


@pytest.mark.slow
def test_schemathesis_every_answer_conforms_and_none_is_a_5xx(service):
    base, process, tmp = service
    result = _schemathesis(base, tmp, "--checks", CONFORMANCE_CHECKS, "--auth", f"{WRITE_KEY}:")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-15000:]
    # Every generated case passed, and there were some: "0 generated, 0 passed" is a failure.
    assert re.search(r"\b([1-9]\d*) generated, \1 passed", output), output[-5000:]
    # The service itself logged no unhandled error while being fuzzed.
    log = process.log_path.read_text(errors="replace")
    assert "unhandled error" not in log and "Traceback" not in log, log[-5000:]


@pytest.mark.slow
def test_schemathesis_invalid_recommendation_parameters_are_refused(service):
    """Negative data (numResults out of range or not a number, over-long ids) gets a 4xx."""
    base, _, tmp = service
    result = _schemathesis(
        base,
        tmp,
        "--include-path",
        "/recommendations",
        "--mode",
        "negative",
        "--checks",
        "negative_data_rejection,not_a_server_error,response_schema_conformance",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-15000:]
